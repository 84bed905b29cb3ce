"""`competition submit / predict / bundle` end to end on two tiny experiments trained here (3 folds,
2 epochs): the CSV against an independent re-computation, validation, the ledger, the offline bundle
byte for byte, sliding windows, and the errors a user meets (missing run, corrupt checkpoint)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from competition import rle
from competition.config import Recipe, RecipeCheckpoint, RecipeMember, dump_yaml, load_competition
from competition.train.checkpoint import file_hash

from conftest import tiny_competition

EXP = {"competition": "tiny-hands", "model": {"arch": "Unet", "encoder": "tu-test_resnet",
                                              "decoder_channels": [16, 16, 16, 16, 16]},
       "optimizer": {"name": "adamw", "lr": 0.003}, "scheduler": {"name": "cosine", "warmup_epochs": 0},
       "data": {"input_size": 64, "batch_size": 4, "workers": 0},
       "train": {"epochs": 2, "progress": False, "seed": 0}, "tracking": {"wandb": False}}
FOLDS = [0, 1, 2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one CPU thread (and the bundle's subprocess uses one too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data_cache) -> Path:
    """A project with experiments `big` (64 px input) and `small` (32 px), every fold trained."""
    root = tmp_path_factory.mktemp("trained")
    (root / "configs/competitions").mkdir(parents=True)
    (root / "configs/experiments").mkdir(parents=True)
    (root / "configs/competitions/tiny-hands.yaml").write_text(yaml.safe_dump(tiny_competition()))
    shutil.copytree(tiny_data_cache, root / "data/tiny-hands")
    small = {**EXP, "data": {**EXP["data"], "input_size": 32}, "train": {**EXP["train"], "seed": 1}}
    for name, cfg in (("big", EXP), ("small", small)):
        (root / f"configs/experiments/{name}.yaml").write_text(yaml.safe_dump(cfg))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        from competition.cli import main
        from competition.config import load_experiment
        from competition.train.loop import fit
        assert main(["folds", "--comp", "tiny-hands"]) == 0
        for name in ("big", "small"):
            for k in FOLDS:
                fit(load_experiment(name), k, log=lambda *_: None)
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def proj(trained, tmp_path, monkeypatch) -> Path:
    """A private copy of the trained project (tests corrupt files), as the cwd."""
    p = tmp_path / "proj"
    shutil.copytree(trained, p, ignore=shutil.ignore_patterns("last.pt", "oof", "wandb"))
    monkeypatch.chdir(p)
    return p


def ck(exp: str, fold: int) -> RecipeCheckpoint:
    path = f"runs/{exp}/fold{fold}/best.pt"
    return RecipeCheckpoint(path=path, sha256=file_hash(Path(path)))


def write_recipe(name: str = "duo", members=None, **extra) -> Recipe:
    comp = load_competition("tiny-hands")
    c = len(comp.classes)
    members = members or [
        RecipeMember(experiment="big", folds=FOLDS, checkpoints=[ck("big", k) for k in FOLDS], weights=[0.75]),
        RecipeMember(experiment="small", folds=FOLDS, checkpoints=[ck("small", k) for k in FOLDS],
                     weights=[0.25] * (c - 1) + [0.5])]  # per class: the last class weighs both equally
    fields = dict(name=name, competition="tiny-hands", task="multilabel", classes=comp.classes,
                  folds_sha256=file_hash(Path("folds/tiny-hands.csv")), members=members,
                  thresholds=[0.3 + 0.4 * k / (c - 1) for k in range(c)], tta=["identity", "hflip"],
                  scores={"in_sample": 0.61, "nested": {"mean": 0.58}})
    recipe = Recipe(**{**fields, **extra})
    dump_yaml(recipe, f"ensembles/{name}.yaml")
    return recipe


def reference_probs(recipe: Recipe) -> dict[str, np.ndarray]:
    """The ensemble written out the slow, obvious way: per image, per checkpoint, per view."""
    from competition.config import ExperimentConfig
    from competition.data.adapters import make_adapter
    from competition.data.dataset import SegDataset
    from competition.models import build_model
    comp = load_competition(recipe.competition)
    adapter = make_adapter(comp)
    c = len(comp.classes)
    w = np.array([np.broadcast_to(m.weights, (c,)) for m in recipe.members], float)
    w /= w.sum(0)
    models = []  # (checkpoint's share of the ensemble, experiment, model), each loaded once
    for m, wm in zip(recipe.members, w):
        for cp in m.checkpoints:
            data = torch.load(cp.path, weights_only=True)
            exp = ExperimentConfig(**data["config"]["experiment"])
            model = build_model(exp.model, c, 1)
            model.load_state_dict(data["model"])
            models.append((torch.as_tensor(wm / len(m.checkpoints), dtype=torch.float32).view(c, 1, 1), exp,
                           model.eval()))
    out = {}
    for image in adapter.test_ids:
        size = adapter.image_size(image, "test")
        total = torch.zeros(c, *size)
        for share, exp, model in models:
            x = SegDataset(adapter, [image], exp, "multilabel", "test", split="test")[0]["image"][None]
            with torch.no_grad():
                p = (torch.sigmoid(model(x)) + torch.sigmoid(model(x.flip(-1))).flip(-1)) / 2
            total += share * F.interpolate(p, size=size, mode="bilinear", align_corners=False)[0]
        out[adapter.submission_id(image, "test")] = total.numpy()
    return out


def test_submit_matches_an_independent_computation_validates_scores_and_logs(proj, capsys):
    from competition.cli import main
    recipe = write_recipe()
    assert main(["submit", "--ensemble", "duo", "--no-progress"]) == 0
    out = capsys.readouterr().out
    files = sorted((proj / "submissions").glob("*.csv"))
    sub = next(f for f in files if f.name != "ledger.csv")
    assert re.fullmatch(r"\d{8}-\d{6}-duo\.csv", sub.name) and f"wrote {sub}: 48 rows, validated" in out
    df = pd.read_csv(sub, keep_default_na=False, dtype=str)
    assert df.columns.tolist() == ["image_name", "class", "rle"] and len(df) == 4 * 12
    ref = reference_probs(recipe)
    checked = 0
    for image, cls, text in df.itertuples(index=False):
        k = recipe.classes.index(cls)
        p = ref[image][k]
        got = rle.decode(text, p.shape)
        clear = np.abs(p - recipe.thresholds[k]) > 1e-4  # pixels a float rounding cannot flip
        np.testing.assert_array_equal(got[clear], (p >= recipe.thresholds[k])[clear], err_msg=f"{image} {cls}")
        checked += int(got.sum())
    assert checked > 0, "the tiny models predict something"
    assert main(["score", "--comp", "tiny-hands", str(sub)]) == 0
    assert re.search(r"mean Dice 0\.\d{4} over 48 image x class pairs \(4 images\)", capsys.readouterr().out)
    led = pd.read_csv(proj / "submissions/ledger.csv", keep_default_na=False, dtype=str)
    row = led.iloc[-1]
    assert row["file"] == f"submissions/{sub.name}" and row["ensemble"] == "duo"
    assert row["ensemble_sha256"] == file_hash(proj / "ensembles/duo.yaml")
    assert row["members"] == "big(f0,1,2)x~0.74 + small(f0,1,2)x~0.26" and row["tta"] == "identity+hflip@1"
    assert float(row["oof_in_sample"]) == 0.61 and float(row["oof_nested"]) == 0.58 and row["images"] == "4"
    assert not list((proj / "submissions").glob(".*"))  # no temp file left behind


def test_bundle_reproduces_the_submission_byte_for_byte(proj, tmp_path):
    """The bundle runs in a fresh process, in a folder with no project, and writes the same bytes."""
    from competition.predict.bundle import make_bundle
    from competition.predict.run import submit
    write_recipe(postprocess={"thumb": {"min_area": 5}, "radius": {"keep_largest": True}})
    assert torch.get_num_threads() == 1  # the subprocess below runs with OMP_NUM_THREADS=1 too
    ref = submit("duo", out=proj / "submissions/ref.csv", progress=False).path
    bundle = make_bundle("duo", tmp_path / "bundle", log=lambda *_: None)
    assert sorted(p.name for p in bundle.iterdir()) == ["README.md", "checkpoints", "competition.yaml",
                                                         "recipe.yaml", "run.py"]
    assert len(list((bundle / "checkpoints").glob("*.pt"))) == 6
    assert set(torch.load(bundle / "checkpoints/big-fold0.pt", weights_only=True)) == {"model", "config"}
    elsewhere = tmp_path / "elsewhere"  # no project folder, no configs, no runs: only the data
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, str(bundle / "run.py"), "--data-root", str(proj / "data/tiny-hands"),
                        "--out", "submission.csv", "--no-progress"], cwd=elsewhere, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "48 rows" in r.stdout
    assert (elsewhere / "submission.csv").read_bytes() == ref.read_bytes()


def test_missing_run_and_corrupt_checkpoints_are_errors_naming_them(proj, capsys):
    from competition.cli import main
    from competition.predict.run import submit
    from competition.train.checkpoint import CheckpointError
    ghost = RecipeMember(experiment="ghost", folds=[0], weights=[1.0],
                         checkpoints=[RecipeCheckpoint(path="runs/ghost/fold0/best.pt", sha256="0" * 16)])
    write_recipe("ghostly", members=[ghost])
    assert main(["submit", "--ensemble", "ghostly"]) == 2
    err = capsys.readouterr().err
    assert "member ghost fold 0: checkpoint runs/ghost/fold0/best.pt not found" in err and "Traceback" not in err

    write_recipe("duo")
    best = proj / "runs/small/fold1/best.pt"
    best.write_bytes(best.read_bytes()[:5000])  # truncated on a bad copy
    with pytest.raises(CheckpointError, match=r"member small fold 1: checkpoint runs/small/fold1/best.pt has "
                                              r"sha256 \w+, the recipe expects"):
        submit("duo", progress=False)
    write_recipe("duo")  # a recipe taken after the damage: the hash matches, the file still cannot load
    with pytest.raises(CheckpointError, match=r"runs/small/fold1/best.pt: cannot be read as a checkpoint"):
        submit("duo", progress=False)
    assert not list((proj / "submissions").glob("*.csv"))  # nothing written, not even a ledger row


def test_failed_validation_leaves_no_submission(proj, monkeypatch):
    from competition.predict import submit as submit_mod
    from competition.predict.run import submit
    from competition.score import ScoreError
    write_recipe(members=[RecipeMember(experiment="big", folds=[0], checkpoints=[ck("big", 0)], weights=[1.0])])
    real = submit_mod.encode_image

    def off_by_a_pixel(masks, *args):  # a writer bug: the last class's runs spill past the image
        texts = real(masks, *args)
        return texts[:-1] + [f"{masks.shape[1] * masks.shape[2]} 2"]

    monkeypatch.setattr(submit_mod, "encode_image", off_by_a_pixel)
    with pytest.raises(ScoreError, match=r"row 12 \(image_name=\S+, class=sesamoid\): bad RLE for a 64x64 image"):
        submit("duo", progress=False)
    assert not [p for p in (proj / "submissions").iterdir()]  # no CSV, no temp file, no ledger row


def test_predict_one_experiment_and_a_missing_fold(proj, capsys):
    from competition.cli import main
    assert main(["predict", "--exp", "big", "--no-progress"]) == 0
    sub = next(p for p in (proj / "submissions").glob("*-big.csv"))
    assert len(pd.read_csv(sub)) == 48
    row = pd.read_csv(proj / "submissions/ledger.csv").iloc[-1]
    oof = np.mean([pd.read_json(proj / f"runs/big/fold{k}/metrics.json", typ="series")["oof_dice"] for k in FOLDS])
    assert row["ensemble"] == "big" and row["oof_in_sample"] == pytest.approx(oof, abs=1e-6)
    assert row["members"] == "big(f0,1,2)x1.00" and row["tta"] == "identity+hflip@1"  # the competition's TTA
    (proj / "runs/big/fold2/best.pt").unlink()
    capsys.readouterr()
    assert main(["predict", "--exp", "big"]) == 2
    assert "no best.pt for fold(s) [2]" in capsys.readouterr().err


def test_large_inputs_go_through_gaussian_sliding_windows(proj, monkeypatch):
    """A crop-policy member (32 px windows over 64 px images) is predicted window by window."""
    from competition.predict import infer
    from competition.predict.run import submit
    from competition.train.checkpoint import save
    data = torch.load("runs/big/fold0/best.pt", weights_only=True)
    data["config"]["experiment"]["data"].update(policy="crop", input_size=32, crop_from=64)
    save(data, Path("runs/big/fold0/crop.pt"))
    member = RecipeMember(experiment="big", folds=[0], weights=[1.0],
                          checkpoints=[RecipeCheckpoint(path="runs/big/fold0/crop.pt",
                                                        sha256=file_hash(Path("runs/big/fold0/crop.pt")))])
    write_recipe("crop", members=[member], tta=["identity", "vflip"], tta_scales=[1.0, 1.5])
    calls = []
    real = infer.sliding_window
    monkeypatch.setattr(infer, "sliding_window", lambda fn, x, window, *a, **k: calls.append((tuple(x.shape), window))
                        or real(fn, x, window, *a, **k))
    r = submit("crop", progress=False)
    assert r.rows == 48 and calls and all(shape[-2:] == (64, 64) and w == 32 for shape, w in calls)
