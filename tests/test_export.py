"""Code-competition inference on a tiny recipe trained here: `competition export` (ONNX and TorchScript,
each checked against torch), `--runtime onnx` through `submit` and through a bundle's run.py,
`--compile`'s wiring, and the bundle's run-time estimate against `submission.time_limit_h`.

The recipe has two members over one checkpoint: identity+hflip at scale 1, and identity at scales 1 and
1.5 (so the exported network must take 64x64 and 96x96 inputs).

Tolerance, ONNX Runtime vs torch: the exported network's logits differ from torch's by float rounding
(~1e-6), so a pixel whose probability lies that close to a threshold (or to a uint8 quantisation step)
may flip. Required: at least 99.9% identical mask pixels per class over all test images, after decoding
both CSVs' RLEs (in practice the CSVs are usually identical).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import private_copy, tiny_competition, trained_core
from test_installs import EXP

from competition import rle
from competition.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # ONNX Runtime takes torch's thread count, and run.py 1
AGREE = 0.999


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data_cache) -> Path:
    """A project with experiment `core` (fold 0, 1 epoch) and the two-member recipe `duo` over it."""
    from competition.config import Recipe, RecipeCheckpoint, RecipeMember, dump_yaml, load_competition
    from competition.io import file_hash
    root = tmp_path_factory.mktemp("export")
    with trained_core(root, tiny_data_cache, {**EXP, "tracking": {"wandb": False}}):
        comp = load_competition("tiny-hands")
        ck = RecipeCheckpoint(path="runs/core/fold0/best.pt", sha256=file_hash(root / "runs/core/fold0/best.pt"))
        members = [RecipeMember(experiment="core", folds=[0], checkpoints=[ck], weights=[0.6],
                                tta=["identity", "hflip"]),
                   RecipeMember(experiment="core", folds=[0], checkpoints=[ck], weights=[0.4], tta=["identity"],
                                tta_scales=[1.0, 1.5])]
        dump_yaml(Recipe(name="duo", competition="tiny-hands", task="multilabel", classes=comp.classes,
                         folds_sha256=file_hash(root / "folds/tiny-hands.csv"), members=members,
                         thresholds=[0.4] * len(comp.classes)), root / "ensembles/duo.yaml")
    return root


@pytest.fixture
def proj(trained, tmp_path, monkeypatch) -> Path:
    """A private copy of the trained project as the cwd (tests write exports and submissions)."""
    return private_copy(trained, tmp_path, monkeypatch)


def torch_model():
    """The recipe's network, rebuilt here from its checkpoint the plain way."""
    from competition.config import ExperimentConfig
    from competition.models import build_model
    data = torch.load("runs/core/fold0/best.pt", weights_only=True)
    exp = ExperimentConfig(**data["config"]["experiment"])
    model = build_model(exp.model, len(data["config"]["competition"]["classes"]), 1, exp.data.input_hw)
    model.load_state_dict(data["model"])
    return model.eval()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def submit(*flags: str, out: str) -> int:
    return main(["submit", "--ensemble", "duo", "--out", out, "--no-progress", "--force", *flags])


def agreement(a: Path, b: Path) -> tuple[dict[str, float], int]:
    """Per class: the share of identical mask pixels over every test image (decoded RLEs); and how many
    pixels ``a`` marks in all."""
    from competition.config import load_competition
    from competition.data.adapters import make_adapter
    comp = load_competition("tiny-hands")
    adapter = make_adapter(comp)
    size = {adapter.submission_id(i, "test"): tuple(adapter.image_size(i, "test")) for i in adapter.test_ids}
    da, db = (pd.read_csv(p, keep_default_na=False, dtype=str) for p in (a, b))
    assert da[["image_name", "class"]].equals(db[["image_name", "class"]])
    same = {c: [0, 0] for c in comp.classes}
    marked = 0
    for (image, cls, ra), rb in zip(da.itertuples(index=False), db["rle"]):
        ma, mb = rle.decode(ra, size[image]), rle.decode(rb, size[image])
        same[cls][0] += int((ma == mb).sum())
        same[cls][1] += ma.size
        marked += int(ma.sum())
    return {c: s / n for c, (s, n) in same.items()}, marked


@pytest.mark.slow  # ONNX exports: 10-20 s each on 2 cores
def test_onnx_export_lists_the_members_and_reproduces_torch(proj, capsys):
    import onnx
    import onnxruntime as ort
    assert main(["export", "--ensemble", "duo"]) == 0
    out = proj / "runs/_export/duo-onnx"
    said = capsys.readouterr().out
    assert f"wrote {out}: 1 onnx models" in said and "max |logit diff|" in said, said
    doc = json.loads((out / "export.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["core-fold0.onnx", "export.json"] == doc["files"]
    a, b = doc["members"]
    assert a["files"] == b["files"] == ["core-fold0.onnx"]  # one checkpoint, exported once
    assert (a["tta"], a["tta_scales"], b["tta"], b["tta_scales"]) == (["identity", "hflip"], [1.0], ["identity"],
                                                                      [1.0, 1.5])
    assert a["input_size"] == [64, 64] and a["channels"] == 1 and a["normalisation"]["mean"] == [0.449]
    assert (a["weights_normalised"], b["weights_normalised"]) == ([0.6] * 12, [0.4] * 12)  # per class
    assert doc["thresholds"] == [0.4] * 12 and "not folded" in doc["tta_note"]
    (m,) = doc["models"]
    assert m["checkpoint"] == "runs/core/fold0/best.pt" and m["exporter"] in ("dynamo", "torchscript")
    assert m["opset"] >= 17 and m["sizes_checked"] == [[64, 64], [96, 96]]
    assert m["dynamic"] == ["batch", "height", "width"]
    assert 0 <= m["max_abs_diff"] <= m["tolerance"]
    onnx.checker.check_model(str(out / "core-fold0.onnx"))
    # Independently of the exporter's own check: ONNX Runtime against the network rebuilt by hand,
    # at a batch size and a size the export never saw as its example.
    session = ort.InferenceSession(str(out / "core-fold0.onnx"), providers=["CPUExecutionProvider"])
    model = torch_model()
    g = torch.Generator().manual_seed(5)
    for shape in ((5, 1, 64, 64), (1, 1, 96, 96)):
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == ref.shape == (shape[0], 12, *shape[2:])
        np.testing.assert_allclose(got, ref, atol=1e-3 * max(1.0, np.abs(ref).max()), rtol=0)


@pytest.mark.slow  # ONNX exports: 10-20 s each on 2 cores
def test_onnx_runtime_submission_matches_torch(proj, capsys):
    assert submit(out="torch.csv") == 0
    assert main(["export", "--ensemble", "duo"]) == 0
    capsys.readouterr()
    assert submit("--runtime", "onnx", out="onnx.csv") == 0
    assert f"--runtime onnx: 1 ONNX models from {proj / 'runs/_export/duo-onnx'}" in capsys.readouterr().out
    shares, marked = agreement(proj / "torch.csv", proj / "onnx.csv")
    assert marked > 0, "the tiny model marks something: the comparison is not between empty masks"
    assert min(shares.values()) >= AGREE, shares
    # Without an export on disk, the run exports into a temporary folder and leaves nothing behind.
    shutil.rmtree(proj / "runs/_export")
    assert submit("--runtime", "onnx", out="onnx2.csv") == 0
    assert "exported 1 models to ONNX for this run" in capsys.readouterr().out
    assert min(agreement(proj / "torch.csv", proj / "onnx2.csv")[0].values()) >= AGREE
    assert not (proj / "runs/_export").exists()


@pytest.mark.slow  # ONNX exports: 10-20 s each on 2 cores
def test_bundle_with_the_onnx_runtime_needs_no_network_code_and_matches_torch(proj, tmp_path, capsys):
    assert submit(out="torch.csv") == 0
    bundle = tmp_path / "bundle"
    assert main(["bundle", "duo", "--out", str(bundle), "--runtime", "onnx", "--test-images", "800"]) == 0
    said = capsys.readouterr().out
    # The bundle copies a checkpoint per member (core-fold0.pt, core-fold0-2.pt), so it holds two networks.
    assert "onnx/ (2 ONNX models" in said, said
    line = next(ln for ln in said.splitlines() if ln.startswith("estimated "))
    assert " for 800 test images on this machine (CPU, 1 thread, runtime onnx) at " in line and "img/s" in line
    assert "a Kaggle GPU will differ" in line
    assert json.loads((bundle / "onnx/export.json").read_text())["models"][0]["file"] == "core-fold0.onnx"
    assert "onnx/core-fold0.onnx" in json.loads((bundle / ".competition-bundle.json").read_text())["files"]
    # run.py in a fresh process, in a folder with no project, with the networks' constructors made to
    # fail: the ONNX runtime must not rebuild a torch model.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import runpy, sys; import competition.predict.members as m\n"
            "def refuse(*a, **k): raise AssertionError('a torch network was built')\n"
            "m.build_model = refuse; sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code, str(bundle / "run.py"), "--data-root",
                        str(proj / "data/tiny-hands"), "--out", "submission.csv", "--no-progress", "--force"],
                       cwd=elsewhere, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"--runtime onnx: 2 ONNX models from {bundle / 'onnx'}" in r.stdout and "48 rows" in r.stdout, r.stdout
    shares, marked = agreement(proj / "torch.csv", elsewhere / "submission.csv")
    assert marked > 0 and min(shares.values()) >= AGREE, shares


def test_torchscript_export_round_trips_and_a_foreign_out_is_refused(proj, tmp_path, capsys):
    out = tmp_path / "ts"
    assert main(["export", "--ensemble", "duo", "--format", "torchscript", "--out", str(out)]) == 0
    doc = json.loads((out / "export.json").read_text())
    (m,) = doc["models"]
    assert m["file"] == "core-fold0.pt" and m["exporter"] == "torch.jit.trace" and m["max_abs_diff"] <= m["tolerance"]
    net = torch.jit.load(str(out / "core-fold0.pt"))
    model = torch_model()
    g = torch.Generator().manual_seed(6)
    for shape in ((3, 1, 64, 64), (2, 1, 96, 96)):
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(net(x), model(x), atol=1e-4, rtol=1e-4)
    assert main(["export", "--ensemble", "duo", "--format", "torchscript", "--out", str(out)]) == 0  # ours: replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    assert main(["export", "--ensemble", "duo", "--out", str(mine)]) == 2
    err = one_line_error(capsys)
    assert str(mine) in err and "notes.txt" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_compile_is_wired_and_refusals_are_one_line(proj, monkeypatch, capsys):
    from competition.predict import runtime
    assert submit(out="plain.csv") == 0
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(type(model).__name__) or model)
    assert submit("--compile", out="compiled.csv") == 0
    assert len(calls) == 1, calls  # two members share one network: compiled once
    assert "--compile: 1 network(s) compiled" in capsys.readouterr().out
    assert (proj / "compiled.csv").read_bytes() == (proj / "plain.csv").read_bytes()
    for flags, said in ((["--compile", "--runtime", "onnx"], "--compile applies to --runtime torch"),
                        (["--from-probs", "--runtime", "onnx"], "--from-probs runs no network")):
        assert submit(*flags, out="x.csv") == 2
        assert said in one_line_error(capsys)
    monkeypatch.setattr(runtime, "cxx_compiler", lambda: None)
    assert submit("--compile", "--device", "cpu", out="x.csv") == 2
    assert "needs a C++ compiler" in one_line_error(capsys)
    assert not (proj / "x.csv").exists()


def test_without_onnxruntime_the_error_names_the_extra(proj, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when it is absent
    assert submit("--runtime", "onnx", out="x.csv") == 2
    err = one_line_error(capsys)
    assert "onnxruntime" in err and "'export' extra" in err and "pip install 'competition[export]'" in err, err


def test_estimate_known_answers_and_the_time_limit_warning():
    from competition.config import Recipe, RecipeCheckpoint, RecipeMember
    from competition.predict.estimate import Estimate, duration, report
    assert (duration(4320), duration(450), duration(42)) == ("1 h 12 min", "7 min 30 s", "42 s")
    ck = RecipeCheckpoint(path="a.pt", sha256="0" * 16)
    recipe = Recipe(name="r", competition="c", task="multilabel", classes=["a"], folds_sha256="", thresholds=[0.5],
                    members=[RecipeMember(experiment="e", folds=[0, 1], checkpoints=[ck, ck], weights=[1.0],
                                          tta=["identity", "hflip"], tta_scales=[1.0, 1.25])])
    est = Estimate(images_per_s=0.2, measured=4, split="test", load_s=30.0, total_images=800, device="CPU, 2 threads",
                   runtime="torch")
    assert est.seconds == 30 + 800 / 0.2  # 4030 s
    first, *warn = report(est, recipe, None)
    assert first.startswith("estimated 1 h 7 min for 800 test images on this machine (CPU, 2 threads, runtime "
                            "torch) at 0.2 img/s (measured on 4 test images after one warm-up, + 30 s to load")
    assert warn == [] and report(est, recipe, 9.0)[1:] == []
    over = report(est, recipe, 1.0)[1]  # 4030 s > 3600 s
    assert over.startswith("WARNING: the estimate (1 h 7 min at 0.2 img/s) EXCEEDS submission.time_limit_h (1 h)")
    assert "e (identity+hflip @ 1+1.25): 2 views x 2 scales x 2 models = 8" in over and "Cut TTA views" in over
    near = report(est, recipe, 1.25)[1]  # 80% of 4500 s = 3600 s < 4030 s <= 4500 s
    assert "is over 80% of submission.time_limit_h (1.25 h)" in near
    unknown = Estimate(0.2, 4, "train", 1.0, 0, "CPU, 2 threads", "onnx")
    (only,) = report(unknown, recipe, 1.0)
    assert "no test images" in only and "--test-images N" in only


def test_time_limit_key_is_validated_and_warns_through_bundle(proj, tmp_path, monkeypatch, capsys):
    from competition.config import CompetitionConfig, ConfigError, validate
    from competition.predict import estimate
    bad = tiny_competition(submission={**tiny_competition()["submission"], "time_limit_h": 0})
    with pytest.raises(ConfigError, match="time_limit_h"):
        validate(CompetitionConfig, bad, "tiny-hands.yaml")
    cfg = tiny_competition(submission={**tiny_competition()["submission"], "time_limit_h": 0.5})
    (proj / "configs/competitions/tiny-hands.yaml").write_text(yaml.safe_dump(cfg))
    fixed = estimate.Estimate(0.1, 4, "test", 2.0, 4000, "CPU", "torch")  # 40002 s
    monkeypatch.setattr(estimate, "measure", lambda *a, **k: fixed)
    assert main(["bundle", "duo", "--out", str(tmp_path / "b")]) == 0
    said = capsys.readouterr().out
    assert "estimated 11 h 6 min for 4000 test images" in said and "WARNING" in said and "EXCEEDS" in said, said
    assert main(["bundle", "duo", "--out", str(tmp_path / "b"), "--no-estimate"]) == 0
    assert "estimated" not in capsys.readouterr().out
