"""Training end to end on the tiny synthetic competition: learning, artifacts, resume after SIGKILL,
NaN handling, DDP with gloo. Tiny models at 32-64 px so the whole file runs in a minute or two."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from competition.config import load_experiment

TINY = {"competition": "tiny-hands",
        "model": {"arch": "Unet", "encoder": "resnet18"},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "scheduler": {"name": "cosine", "warmup_epochs": 0},
        "data": {"input_size": 64, "batch_size": 2, "workers": 0},
        "train": {"epochs": 8, "progress": False, "seed": 0}}


def write_exp(project: Path, name: str, **sections) -> None:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in TINY.items()}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    (project / "configs/experiments" / f"{name}.yaml").write_text(yaml.safe_dump(data))


def cli(project: Path, *args: str, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "competition", *args], cwd=project, env=env,
                          capture_output=True, text=True, **kw)


@pytest.fixture
def folded(tiny_project):
    from competition.cli import main
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    return tiny_project


@pytest.mark.slow
def test_training_improves_and_writes_every_artifact(folded):
    from competition.config import load_competition
    from competition.data.adapters import make_adapter
    from competition.metrics import dice_per_class
    from competition.store import tiles
    from competition.train.loop import fit
    write_exp(folded, "tiny")
    m = fit(load_experiment("tiny"), fold=0, log=lambda *_: None)
    run = folded / "runs/tiny/fold0"
    hist = pd.read_csv(run / "history.csv")
    assert len(hist) == 8 and hist["val_dice"].max() > hist["val_dice"].iloc[0] + 0.05
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val_dice"] == pytest.approx(hist["val_dice"].max())
    assert (set(metrics["val_dice_per_class"]) == set(m["val_dice_per_class"])
            and len(metrics["val_dice_per_class"]) == 12)
    assert metrics["best_epoch"] == int(hist["val_dice"].idxmax()) + 1
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["experiment"]["optimizer"]["lr"] == 0.003 and saved["fold"] == 0
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["config"]["experiment"]["name"] == "tiny" and best["epoch"] == metrics["best_epoch"]
    torch.load(run / "last.pt", weights_only=True)
    folds = pd.read_csv(folded / "folds/tiny-hands.csv")
    val_ids = folds.loc[folds["fold"] == 0, "id"].tolist()
    adapter = make_adapter(load_competition("tiny-hands"))
    oof = tiles.open_store(run / "oof")
    assert oof.ids == val_ids and not (run / "oof/probs.npy").exists()
    for r, i in enumerate(val_ids):  # every row at its image's original size
        assert oof.image(r).dtype == np.uint8 and oof.image(r).shape == (12, *adapter.image_size(i))
    meta = json.loads((run / "oof/meta.json").read_text())
    assert meta["original_sizes"][val_ids[0]] == [64, 64] and "size" not in meta
    # The OOF store, thresholded, scores what validation scored for the best checkpoint (here the
    # model's input is the images' 64 px, so they are the same pixels).
    assert metrics["oof_dice"] == pytest.approx(metrics["val_dice"], abs=0.02)
    assert metrics["oof_size"] == "original" and metrics["oof_dice_native"] == metrics["oof_dice"]
    # Known answer: metrics.json's OOF Dice is the store's rows at >= 0.5 against the masks, directly.
    want = np.concatenate([dice_per_class(oof.image(r)[None] >= 128, adapter.load_mask(i)[None])
                           for r, i in enumerate(val_ids)])
    assert metrics["oof_dice"] == pytest.approx(want.mean(), abs=1e-9)
    # Training also wrote the competition's TTA variant, from the same best.pt.
    assert metrics["oof_variants"] == ["plain", "identity+hflip"]
    tta_meta = json.loads((run / "oof-identity+hflip/meta.json").read_text())
    assert tta_meta["tta"] == ["identity", "hflip"] and tta_meta["checkpoint_sha256"] == meta["checkpoint_sha256"]
    assert metrics["oof_store_bytes"] == oof.nbytes + tiles.open_store(run / "oof-identity+hflip").nbytes


def test_multiclass_oof_dice_uses_the_argmax(tiny_project):
    """metrics.json's multiclass OOF Dice is the argmax against the background, as `competition oof`
    and the submission binarise, not a per-class 0.5 threshold."""
    from conftest import tiny_competition

    from competition.cli import main
    from competition.cv import oofscore
    from competition.train.loop import fit
    (tiny_project / "configs/competitions/tiny-hands.yaml").write_text(
        yaml.safe_dump(tiny_competition(task="multiclass")))
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    write_exp(tiny_project, "mc", model={"arch": "Unet", "encoder": "tu-test_resnet"},
              data={"input_size": 32}, train={"epochs": 2}, tracking={"wandb": False})
    m = [fit(load_experiment("mc"), k, log=lambda *_: None) for k in range(3)][0]
    folds = pd.read_csv(tiny_project / "folds/tiny-hands.csv")
    r = oofscore.run("mc", log=lambda *_: None)
    fold0 = r["table"][r["table"]["fold"] == 0]
    assert m["oof_dice"] == pytest.approx(fold0["mean"].mean(), abs=1e-9)
    assert "native_mean" not in r["table"].columns and m["oof_dice_native"] == m["oof_dice"]  # one resolution
    assert len(fold0) == (folds["fold"] == 0).sum()


def test_iou_metric_drives_validation_and_report_metrics_reach_metrics_json(tiny_project):
    """metric.name: iou is what validation picks best.pt by and OOF scores with; metric.report adds
    dice, f1_at_iou and hausdorff95 at the original sizes to metrics.json and the runs table."""
    from conftest import tiny_competition

    from competition import runs_table
    from competition.cli import main
    from competition.cv import oofscore
    from competition.train.loop import fit
    comp = tiny_competition(metric={"name": "iou", "report": ["dice", "f1_at_iou", "hausdorff95"]})
    (tiny_project / "configs/competitions/tiny-hands.yaml").write_text(yaml.safe_dump(comp))
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    write_exp(tiny_project, "iou", model={"arch": "Unet", "encoder": "tu-test_resnet"},
              data={"input_size": 32}, train={"epochs": 2}, tracking={"wandb": False})
    m = [fit(load_experiment("iou"), k, log=lambda *_: None) for k in range(3)][0]
    assert m["metric"] == "iou" and set(m["oof_report"]) == {"dice", "f1_at_iou", "hausdorff95"}
    assert m["oof_report"]["dice"] >= m["oof_dice"]  # Dice >= IoU on every pair
    assert m["oof_report"]["hausdorff95"] >= 0
    r = oofscore.run("iou", log=lambda *_: None)
    fold0 = r["table"][r["table"]["fold"] == 0]
    assert m["oof_dice"] == pytest.approx(fold0["mean"].mean(), abs=1e-9)  # the OOF score is IoU too
    t = runs_table.table(runs_table.collect()[0])
    assert {"oof_dice", "oof_f1_at_iou", "oof_hausdorff95"} <= set(t.columns)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(folded, tmp_path):
    write_exp(folded, "tiny", train={"epochs": 4})
    ref = cli(folded, "train", "--exp", "tiny", "--fold", "0")
    assert ref.returncode == 0, ref.stderr
    ref_hist = pd.read_csv(folded / "runs/tiny/fold0/history.csv")
    (folded / "runs").rename(folded / "runs-ref")

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "competition", "train", "--exp", "tiny", "--fold", "0"],
                            cwd=folded, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hist_file = folded / "runs/tiny/fold0/history.csv"
    deadline = time.time() + 300
    while time.time() < deadline:
        if hist_file.is_file() and len(pd.read_csv(hist_file)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(pd.read_csv(hist_file))
    assert 2 <= done < 4, "the run must be killed mid-way"
    again = cli(folded, "train", "--exp", "tiny", "--fold", "0")
    assert again.returncode == 0, again.stderr
    assert "resuming tiny fold 0 from" in again.stdout
    hist = pd.read_csv(hist_file)
    assert hist["epoch"].tolist() == [1, 2, 3, 4]
    # Deterministic CPU settings: the resumed run reproduces the uninterrupted one (tolerance 1e-4).
    np.testing.assert_allclose(hist["val_dice"], ref_hist["val_dice"], atol=1e-4)
    np.testing.assert_allclose(hist["train_loss"], ref_hist["train_loss"], rtol=1e-4)
    a = json.loads((folded / "runs/tiny/fold0/metrics.json").read_text())
    b = json.loads((folded / "runs-ref/tiny/fold0/metrics.json").read_text())
    assert a["val_dice"] == pytest.approx(b["val_dice"], abs=1e-4) and a["best_epoch"] == b["best_epoch"]


def test_nan_loss_stops_loudly_and_overwrites_nothing(folded):
    from competition.train.loop import TrainingDiverged, fit
    write_exp(folded, "nan", optimizer={"name": "sgd", "lr": 1e12},
              train={"epochs": 3, "grad_clip": None}, loss={"terms": [{"name": "bce"}]})
    with pytest.raises(TrainingDiverged, match=r"(at epoch \d+, step \d+|during epoch \d+)"):
        fit(load_experiment("nan"), fold=0, log=lambda *_: None)
    run = folded / "runs/nan/fold0"
    if (run / "last.pt").exists():  # epochs before the NaN were fine; the diverged one left no trace
        s = torch.load(run / "last.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in s["model"].values() if v.is_floating_point())
    assert not (run / "metrics.json").exists() and not (run / "oof").exists()


def test_config_typo_is_a_clear_cli_error(folded):
    write_exp(folded, "typo", optimizer={"nmae": "sgd"})
    r = cli(folded, "train", "--exp", "typo", "--fold", "0")
    assert r.returncode == 2
    assert "optimizer.nmae: unknown key; valid keys here:" in r.stderr and "Traceback" not in r.stderr


def test_changed_config_refuses_to_resume(folded):
    from competition.config import ConfigError
    from competition.train.loop import fit
    write_exp(folded, "tiny", train={"epochs": 1})
    fit(load_experiment("tiny"), fold=0, log=lambda *_: None)
    write_exp(folded, "tiny", train={"epochs": 1}, optimizer={"lr": 0.02})
    with pytest.raises(ConfigError, match=r"different configuration \(changed: \['optimizer.lr'\]\)"):
        fit(load_experiment("tiny"), fold=0, log=lambda *_: None)
    # Where a run is reported (tracking.*) and how fast it loads (data.workers) are not its configuration.
    write_exp(folded, "tiny", train={"epochs": 1}, tracking={"wandb": False, "project": "elsewhere", "entity": "team"},
              data={"workers": 1})
    m = fit(load_experiment("tiny"), fold=0, log=lambda *_: None)
    assert m["epochs_run"] == 1


@pytest.mark.slow
def test_ddp_two_processes_gloo(folded):
    write_exp(folded, "ddp", train={"epochs": 1})
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "competition", "train",
                        "--exp", "ddp", "--fold", "0"], cwd=folded, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert out.count("epoch   1/1") == 1  # rank 0 logs and writes, once
    assert "weights identical on all 2 ranks" in out
    run = folded / "runs/ddp/fold0"
    assert (run / "best.pt").is_file() and (run / "metrics.json").is_file()
    assert not list(run.glob(".*.tmp"))


def test_precision_on_the_cpu(monkeypatch):
    """auto and fp16 stay fp32 on the CPU; bf16 autocasts only where the CPU runs bf16 natively."""
    from competition.models import precision as engine
    cpu = torch.device("cpu")
    assert engine.autocast_dtype("auto", cpu) is None and engine.autocast_dtype("fp16", cpu) is None
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: True)
    assert engine.autocast_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert engine.autocast_dtype("bf16", cpu) is None
