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
from conftest import private_copy, tiny_competition

from competition import rle
from competition.config import Recipe, RecipeCheckpoint, RecipeMember, dump_yaml, load_competition
from competition.io import file_hash

EXP = {"competition": "tiny-hands", "model": {"arch": "Unet", "encoder": "tu-test_resnet",
                                              "decoder_channels": [16, 16, 16, 16, 16]},
       "optimizer": {"name": "adamw", "lr": 0.003}, "scheduler": {"name": "cosine", "warmup_epochs": 0},
       "data": {"input_size": 64, "batch_size": 4, "workers": 0},
       "train": {"epochs": 2, "progress": False, "seed": 0}, "tracking": {"wandb": False}}
FOLDS = [0, 1, 2]


pytestmark = pytest.mark.usefixtures("one_thread")  # the bundle's subprocess uses one thread too


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
    return private_copy(trained, tmp_path, monkeypatch)


@pytest.fixture
def proj_oof(trained, tmp_path, monkeypatch) -> Path:
    """As ``proj``, keeping the OOF stores training wrote."""
    p = tmp_path / "proj"
    shutil.copytree(trained, p, ignore=shutil.ignore_patterns("last.pt", "wandb"))
    monkeypatch.chdir(p)
    return p


def ck(exp: str, fold: int) -> RecipeCheckpoint:
    path = f"runs/{exp}/fold{fold}/best.pt"
    return RecipeCheckpoint(path=path, sha256=file_hash(Path(path)))


def write_recipe(name: str = "duo", members=None, **extra) -> Recipe:
    comp = load_competition("tiny-hands")
    c = len(comp.classes)
    members = members or [
        RecipeMember(experiment="big", folds=FOLDS, checkpoints=[ck("big", k) for k in FOLDS], weights=[0.75],
                     tta=["identity", "hflip"]),
        RecipeMember(experiment="small", folds=FOLDS, checkpoints=[ck("small", k) for k in FOLDS],
                     weights=[0.25] * (c - 1) + [0.5], tta=["identity", "hflip"])]  # the last class: equal
    fields = dict(name=name, competition="tiny-hands", task="multilabel", classes=comp.classes,
                  folds_sha256=file_hash(Path("folds/tiny-hands.csv")), members=members,
                  thresholds=[0.3 + 0.4 * k / (c - 1) for k in range(c)],
                  scores={"in_sample": 0.61, "nested": {"mean": 0.58}})
    recipe = Recipe(**{**fields, **extra})
    dump_yaml(recipe, f"ensembles/{name}.yaml")
    return recipe


def reference_probs(recipe: Recipe) -> dict[str, np.ndarray]:
    """The ensemble written out the slow, obvious way: per image, per member, per checkpoint, per view;
    each member's mean resized to the image's original size and quantised to uint8 there (as its OOF
    row would be), then blended."""
    from competition.config import ExperimentConfig
    from competition.data.adapters import make_adapter
    from competition.data.dataset import SegDataset
    from competition.models import build_model
    comp = load_competition(recipe.competition)
    adapter = make_adapter(comp)
    c = len(comp.classes)
    w = np.array([np.broadcast_to(m.weights, (c,)) for m in recipe.members], float)
    w /= w.sum(0)
    members = []  # (member's share per class, [(experiment, model) per fold])
    for m, wm in zip(recipe.members, w):
        models = []
        for cp in m.checkpoints:
            data = torch.load(cp.path, weights_only=True)
            exp = ExperimentConfig(**data["config"]["experiment"])
            model = build_model(exp.model, c, 1)
            model.load_state_dict(data["model"])
            models.append((exp, model.eval()))
        members.append((torch.as_tensor(wm, dtype=torch.float32).view(c, 1, 1), models))
    out = {}
    for image in adapter.test_ids:
        size = tuple(adapter.image_size(image, "test"))
        total = torch.zeros(c, *size)
        for share, models in members:
            mean = 0
            for exp, model in models:
                x = SegDataset(adapter, [image], exp, "multilabel", "test", split="test")[0]["image"][None]
                with torch.no_grad():
                    p = (torch.sigmoid(model(x)) + torch.sigmoid(model(x.flip(-1))).flip(-1)) / 2
                mean = mean + p / len(models)
            mean = F.interpolate(mean, size=size, mode="bilinear", align_corners=False)[0]
            total += share * torch.round(mean * 255) / 255
        out[adapter.submission_id(image, "test")] = total.numpy()
    return out


def test_submit_matches_an_independent_computation_validates_scores_and_logs(proj, capsys):
    from competition.cli import main
    recipe = write_recipe()
    assert main(["submit", "--ensemble", "duo", "--no-progress", "--force"]) == 0
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
    assert row["members"] == "big(f0,1,2)x~0.74 + small(f0,1,2)x~0.26"
    assert row["tta"] == "big:identity+hflip@1 small:identity+hflip@1"
    assert float(row["cv_native_in_sample"]) == 0.61 and float(row["cv_native_nested"]) == 0.58
    # One resolution: the columns of a second (OOF-size) score stay empty for recipes of this version.
    assert row["oof_in_sample"] == "" and row["oof_nested"] == "" and row["images"] == "4"
    assert not list((proj / "submissions").glob(".*"))  # no temp file left behind


def test_bundle_reproduces_the_submission_byte_for_byte(proj, tmp_path):
    """The bundle runs in a fresh process, in a folder with no project, and writes the same bytes."""
    from competition.predict.bundle import make_bundle
    from competition.predict.options import Inference
    from competition.predict.run import submit
    write_recipe(postprocess={"thumb": {"min_area": 5}, "radius": {"keep_largest": True}})
    assert torch.get_num_threads() == 1  # the subprocess below runs with OMP_NUM_THREADS=1 too
    ref = submit("duo", out=proj / "submissions/ref.csv", inference=Inference(progress=False, force=True)).path
    bundle = make_bundle("duo", tmp_path / "bundle", log=lambda *_: None)
    assert sorted(p.name for p in bundle.iterdir()) == [".competition-bundle.json", "README.md", "checkpoints",
                                                         "competition.yaml", "recipe.yaml", "run.py"]
    assert len(list((bundle / "checkpoints").glob("*.pt"))) == 6
    assert set(torch.load(bundle / "checkpoints/big-fold0.pt", weights_only=True)) == {"model", "config"}
    elsewhere = tmp_path / "elsewhere"  # no project folder, no configs, no runs: only the data
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, str(bundle / "run.py"), "--data-root", str(proj / "data/tiny-hands"),
                        "--out", "submission.csv", "--no-progress", "--force"], cwd=elsewhere, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "48 rows" in r.stdout
    assert (elsewhere / "submission.csv").read_bytes() == ref.read_bytes()


def test_missing_run_and_corrupt_checkpoints_are_errors_naming_them(proj, capsys):
    from competition.checkpoint import CheckpointError
    from competition.cli import main
    from competition.predict.options import Inference
    from competition.predict.run import submit
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
        submit("duo", inference=Inference(progress=False, force=True))
    write_recipe("duo")  # a recipe taken after the damage: the hash matches, the file still cannot load
    with pytest.raises(CheckpointError, match=r"runs/small/fold1/best.pt: cannot be read as a checkpoint"):
        submit("duo", inference=Inference(progress=False, force=True))
    assert not list((proj / "submissions").glob("*.csv"))  # nothing written, not even a ledger row


def test_failed_validation_leaves_no_submission(proj, monkeypatch):
    from competition.predict import submit as submit_mod
    from competition.predict.options import Inference
    from competition.predict.run import submit
    from competition.score import ScoreError
    write_recipe(members=[RecipeMember(experiment="big", folds=[0], checkpoints=[ck("big", 0)], weights=[1.0])])
    real = submit_mod.encode_counted

    def off_by_a_pixel(masks, *args):  # a writer bug: the last class's runs spill past the image
        texts, counts = real(masks, *args)
        return texts[:-1] + [f"{masks.shape[1] * masks.shape[2]} 2"], counts

    monkeypatch.setattr(submit_mod, "encode_counted", off_by_a_pixel)
    with pytest.raises(ScoreError, match=r"row 12 \(image_name=\S+, class=sesamoid\): bad RLE for a 64x64 image"):
        submit("duo", inference=Inference(progress=False, force=True))
    assert not [p for p in (proj / "submissions").iterdir()]  # no CSV, no temp file, no ledger row


def test_predict_one_experiment_and_a_missing_fold(proj, capsys):
    from competition.cli import main
    assert main(["predict", "--exp", "big", "--no-progress", "--force"]) == 0
    sub = next(p for p in (proj / "submissions").glob("*-big.csv"))
    assert len(pd.read_csv(sub)) == 48
    row = pd.read_csv(proj / "submissions/ledger.csv").iloc[-1]
    metrics = [pd.read_json(proj / f"runs/big/fold{k}/metrics.json", typ="series") for k in FOLDS]
    # metrics.json scores the OOF once, at the original sizes (oof_dice_native: the same figure, by its
    # earlier name); the ledger's CV pools the folds over their images, as `competition oof` does (not
    # an unweighted mean of folds), with no second (OOF-size) score.
    assert all(m["oof_size"] == "original" and m["oof_dice_native"] == m["oof_dice"] for m in metrics)
    assert row["ensemble"] == "big" and pd.isna(row["oof_in_sample"])
    pooled = sum(m["oof_dice"] * m["n_val"] for m in metrics) / sum(m["n_val"] for m in metrics)
    assert row["cv_native_in_sample"] == pytest.approx(pooled, abs=1e-6)
    assert row["members"] == "big(f0,1,2)x1.00" and row["tta"] == "big:identity+hflip@1"  # the competition's TTA
    # --set: a lower threshold marks at least as many pixels; TTA views recorded; model keys refused
    assert main(["predict", "--exp", "big", "--no-progress", "--set", "train.threshold=0.05",
                 "--set", "oof.tta=[identity]", "--out", "low.csv", "--force"]) == 0
    row = pd.read_csv(proj / "submissions/ledger.csv").iloc[-1]
    assert row["tta"] == "big:identity@1"

    def pixels(path) -> int:
        return sum(int(x) for r in pd.read_csv(path, keep_default_na=False)["rle"] for x in str(r).split()[1::2])
    assert pixels("low.csv") > pixels(sub)
    capsys.readouterr()
    assert main(["predict", "--exp", "big", "--set", "model.encoder=resnet18"]) == 2
    assert "predict may change train.threshold" in capsys.readouterr().err
    assert main(["predict", "--exp", "big", "--set", "train.threshold=high"]) == 2
    assert "train.threshold" in capsys.readouterr().err
    (proj / "runs/big/fold2/best.pt").unlink()
    capsys.readouterr()
    assert main(["predict", "--exp", "big"]) == 2
    assert "no best.pt for fold(s) [2]" in capsys.readouterr().err


def test_large_inputs_go_through_gaussian_sliding_windows(proj, monkeypatch):
    """A crop-policy member (32 px windows over 64 px images) is predicted window by window."""
    from competition.checkpoint import save
    from competition.predict import infer
    from competition.predict.options import Inference
    from competition.predict.run import submit
    data = torch.load("runs/big/fold0/best.pt", weights_only=True)
    data["config"]["experiment"]["data"].update(policy="crop", input_size=32, crop_from=64)
    save(data, Path("runs/big/fold0/crop.pt"))
    member = RecipeMember(experiment="big", folds=[0], weights=[1.0], tta=["identity", "vflip"], tta_scales=[1.0, 1.5],
                          checkpoints=[RecipeCheckpoint(path="runs/big/fold0/crop.pt",
                                                        sha256=file_hash(Path("runs/big/fold0/crop.pt")))])
    write_recipe("crop", members=[member])
    calls = []
    real = infer.sliding_window
    monkeypatch.setattr(infer, "sliding_window", lambda fn, x, window, *a, **k: calls.append((tuple(x.shape), window))
                        or real(fn, x, window, *a, **k))
    r = submit("crop", inference=Inference(progress=False, force=True))
    assert r.rows == 48 and calls and all(shape[-2:] == (64, 64) and w == 32 for shape, w in calls)


# --------------------------------------------------------------------------------------------- #
# CV you can trust: OOF is the submission, held out; native CV is what the scorer computes
# --------------------------------------------------------------------------------------------- #
def serve_fold_as_test(proj: Path, fold: int) -> list[str]:
    """Make fold ``fold``'s held-out training images the test set (same files, same order)."""
    data = proj / "data/tiny-hands"
    folds = pd.read_csv(proj / "folds/tiny-hands.csv")
    ids = folds.loc[folds["fold"] == fold, "id"].tolist()
    shutil.rmtree(data / "test/DCM")
    for subject in sorted({i.split("/")[0] for i in ids}):
        shutil.copytree(data / "train/DCM" / subject, data / "test/DCM" / subject)
    classes = load_competition("tiny-hands").classes
    pd.DataFrame([(f"{Path(i).name}.png" if not i.endswith(".png") else Path(i).name, c) for i in ids for c in classes],
                 columns=["image_name", "class"]).assign(rle="").to_csv(data / "sample_submission.csv", index=False)
    return ids


@pytest.mark.parametrize("exp", ["big", "small"])
@pytest.mark.parametrize("tta", [["identity"], ["identity", "hflip"]])
def test_oof_is_the_submission_held_out_bit_for_bit(proj_oof, tta, exp):
    """The OOF row of a held-out image and the submission path's prediction of the same image, served
    as a test image by `submit`, are the same bytes (plain OOF and the TTA variant training wrote), at
    the image's original size whether the model's output is that size (big) or half of it (small)."""
    from competition.config import Recipe as R
    from competition.data.adapters import make_adapter
    from competition.predict.options import Inference
    from competition.predict.run import run_recipe
    from competition.predict.tta import variant_name
    from competition.store import tiles
    ids = serve_fold_as_test(proj_oof, 0)
    store = proj_oof / f"runs/{exp}/fold0" / (f"oof-{variant_name(tta)}" if variant_name(tta) else "oof")
    oof = tiles.open_store(store)
    oof_ids = oof.ids
    comp = load_competition("tiny-hands")
    adapter = make_adapter(comp)
    member = RecipeMember(experiment=exp, folds=[0], weights=[1.0], tta=tta, checkpoints=[ck(exp, 0)])
    recipe = R(name="one", competition="tiny-hands", task="multilabel", classes=comp.classes, folds_sha256="",
               members=[member], thresholds=[0.5] * len(comp.classes))
    seen = {}
    run_recipe(recipe, comp, proj_oof, proj_oof / "submissions/one.csv", "test", Inference(progress=False, force=True),
               on_probs=lambda i, us: seen.setdefault(i, us[0]))
    assert sorted(seen) == sorted(ids) == sorted(oof_ids)
    for i in ids:
        assert seen[i].dtype == np.uint8 and seen[i].shape == (12, *adapter.image_size(i))
        np.testing.assert_array_equal(seen[i], oof.image(oof_ids.index(i)), err_msg=i)
    assert any(oof.image(r).any() for r in range(len(oof)))


def test_oof_csv_closed_loop_with_the_scorer(proj_oof, capsys):
    """`competition oof --csv --truth-csv` writes the OOF as a submission at native size (64 px, from a
    32 px model here) and the truth; the scorer gives exactly the OOF Dice `competition oof` prints."""
    from competition.cli import main
    from competition.cv import oofscore
    from competition.score import score_files
    r = oofscore.run("small", options=oofscore.OofOptions(csv="oof.csv", truth_csv="truth.csv"), log=lambda *_: None)
    assert pd.read_csv("oof.csv", keep_default_na=False).columns.tolist() == ["image_name", "class", "rle"]
    s = score_files("oof.csv", "truth.csv", load_competition("tiny-hands"))
    assert abs(s.mean - r["native"]) < 1e-9 and abs(s.mean - r["mean"]) < 1e-9  # one figure
    capsys.readouterr()
    assert main(["score", "--comp", "tiny-hands", "oof.csv", "--truth", "truth.csv"]) == 0
    assert f"mean Dice {r['native']:.4f}" in capsys.readouterr().out

    # metric.name: iou drives the OOF score and the scorer, and the loop still closes
    cfg_path = Path("configs/competitions/tiny-hands.yaml")
    comp = yaml.safe_load(cfg_path.read_text())
    cfg_path.write_text(yaml.safe_dump({**comp, "metric": {"name": "iou", "empty_score": 1.0}}))
    r_iou = oofscore.run("small", options=oofscore.OofOptions(csv="oof.csv", truth_csv="truth.csv"),
                         log=lambda *_: None)
    s_iou = score_files("oof.csv", "truth.csv", load_competition("tiny-hands"))
    assert abs(s_iou.mean - r_iou["native"]) < 1e-9 and s_iou.metric == "iou"
    assert r_iou["native"] < r["native"]  # IoU <= Dice pair by pair


def test_ensemble_chooses_tta_variants_on_oof_and_scores_at_native_size(proj_oof, capsys):
    """Each (experiment, TTA variant) is a candidate; the recipe's in-sample native CV equals the
    scorer on its OOF CSV; submit applies exactly the recipe's variants."""
    from competition.cli import main
    from competition.config import load_recipe
    from competition.score import score_files
    assert main(["oof", "small", "--tta", "hflip"]) == 0  # a third variant: hflip alone
    capsys.readouterr()
    assert main(["ensemble", "--name", "loop", "small", "--csv", "ens.csv", "--truth-csv", "truth.csv"]) == 0
    out = capsys.readouterr().out
    rec = load_recipe("loop")
    s = rec.scores
    assert sorted(v["member"] for v in s["variants"]) == ["small", "small[hflip]", "small[identity+hflip]"]
    for v in s["variants"]:
        line = next(x for x in out.splitlines() if x.strip().startswith(f"variant {v['member']} "))
        assert ("not kept" in line) == (not v["weight"])
    native_line = next(x for x in out.splitlines() if x.startswith("native-resolution CV"))
    assert f"in-sample {s['in_sample']:.4f}" in native_line and f"nested {s['nested']:.4f}" in native_line
    assert "OOF size" not in out  # one resolution: every score is at the original sizes
    assert abs(score_files("ens.csv", "truth.csv", load_competition("tiny-hands")).mean - s["in_sample"]) < 1e-9
    chosen = {p: s["candidates"][p]["native"]["nested"] for p in ("search", "single", "equal")}
    assert chosen[s["chosen"]] == max(chosen.values())
    kept = {(m.experiment, tuple(m.tta)) for m in rec.members}
    allowed = {("small", ("identity",)), ("small", ("hflip",)), ("small", ("identity", "hflip"))}
    assert kept <= allowed and rec.oof_size is None
    # submit runs exactly these members and views
    from competition.predict import infer
    views = []
    real = infer.tta_predict
    import competition.predict.infer as inf
    inf.tta_predict = lambda fn, x, v, s, *a: views.append(tuple(v)) or real(fn, x, v, s, *a)
    try:
        assert main(["submit", "--ensemble", "loop", "--no-progress", "--force"]) == 0
    finally:
        inf.tta_predict = real
    assert set(views) == {t for _, t in kept}


def test_saved_test_probabilities_reblend_to_the_same_csv(proj, capsys):
    """`submit --save-probs` keeps each member's test probabilities; `submit --from-probs` re-blends them
    without any model and writes the same bytes; a changed member is refused."""
    from competition.cli import main
    from competition.data.adapters import make_adapter
    from competition.predict import run as run_mod
    from competition.store import tiles
    write_recipe(postprocess={"thumb": {"min_area": 5}})
    assert main(["submit", "--ensemble", "duo", "--no-progress", "--save-probs", "--out", "full.csv", "--force"]) == 0
    adapter = make_adapter(load_competition("tiny-hands"))
    for m in ("big", "small"):  # tile stores at each test image's original size
        st = tiles.open_store(proj / "runs" / m / "test-identity+hflip")
        assert not (st.folder / "probs.npy").exists() and sorted(st.ids) == sorted(adapter.test_ids)
        for r, i in enumerate(st.ids):
            assert st.image(r).shape == (12, *adapter.image_size(i, "test"))
    calls = []
    real = run_mod.build_predictor
    run_mod.build_predictor = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        assert main(["submit", "--ensemble", "duo", "--no-progress", "--from-probs", "--out", "again.csv",
                     "--force"]) == 0
    finally:
        run_mod.build_predictor = real
    assert not calls  # no model was built
    assert Path("again.csv").read_bytes() == Path("full.csv").read_bytes()
    c = len(load_competition("tiny-hands").classes)
    write_recipe(members=[
        RecipeMember(experiment="big", folds=FOLDS, checkpoints=[ck("big", k) for k in FOLDS], weights=[1.0],
                     tta=["identity"])])
    capsys.readouterr()
    assert main(["submit", "--ensemble", "duo", "--no-progress", "--from-probs", "--out", "x.csv"]) == 2
    assert "no saved test probabilities for member big" in capsys.readouterr().err
    assert c == 12


# -- pseudo-labels ------------------------------------------------------------------------------------
def _fold_blend(recipe: Recipe, fold: int) -> dict[str, np.ndarray]:
    """Fold ``fold``'s pseudo-labels the obvious way: each member's fold-``fold`` model only, its TTA
    mean resized to the image's original size and quantised there, blended by the recipe's weights,
    quantised again."""
    from competition.config import ExperimentConfig
    from competition.data.adapters import make_adapter
    from competition.data.dataset import SegDataset
    from competition.models import build_model
    comp = load_competition(recipe.competition)
    adapter = make_adapter(comp)
    c = len(comp.classes)
    w = np.array([np.broadcast_to(m.weights, (c,)) for m in recipe.members], float)
    w /= w.sum(0)
    out = {}
    for image in adapter.test_ids:
        size = tuple(adapter.image_size(image, "test"))
        total = torch.zeros(c, *size)
        for m, wm in zip(recipe.members, w):
            data = torch.load(m.checkpoints[m.folds.index(fold)].path, weights_only=True)
            exp = ExperimentConfig(**data["config"]["experiment"])
            model = build_model(exp.model, c, 1)
            model.load_state_dict(data["model"])
            x = SegDataset(adapter, [image], exp, "multilabel", "test", split="test")[0]["image"][None]
            with torch.no_grad():
                p = (torch.sigmoid(model.eval()(x)) + torch.sigmoid(model(x.flip(-1))).flip(-1)) / 2
            p = F.interpolate(p, size=size, mode="bilinear", align_corners=False)[0]
            total += torch.as_tensor(wm, dtype=torch.float32).view(c, 1, 1) * torch.round(p * 255) / 255
        out[image] = torch.round(total.clamp(0, 1) * 255).to(torch.uint8).numpy()
    return out


def test_confidence_known_answers():
    from competition.pseudo import confidence
    certain = np.zeros((2, 4, 4), np.uint8)
    certain[0] = 255
    assert confidence(certain, "multilabel") == 1.0
    assert confidence(np.full((2, 4, 4), 128, np.uint8), "multilabel") == pytest.approx(1 / 255, rel=1e-4)
    # multiclass: one class at p=1 everywhere is certain; an even split of 3 (bg + 2) is a coin flip
    assert confidence(certain, "multiclass") == pytest.approx(1.0)
    third = np.full((2, 4, 4), 85, np.uint8)
    assert confidence(third, "multiclass") == pytest.approx(0.0, abs=1e-6)


def test_pseudo_labels_per_fold_and_training_on_them(proj, capsys):
    from competition.cli import main
    from competition.config import load_experiment
    from competition.data.adapters import make_adapter
    from competition.store import tiles
    from competition.store.probs import binarize, to_size
    from competition.train.distributed import setup
    from competition.train.loop import fit, training_loader
    recipe = write_recipe("duo")
    assert main(["pseudo", "--ensemble", "duo"]) == 0
    assert "4 test images, folds [0, 1, 2]" in capsys.readouterr().out
    comp = load_competition("tiny-hands")
    adapter = make_adapter(comp)
    stores = {k: tiles.open_store(Path(f"runs/_pseudo/duo/fold{k}")) for k in FOLDS}
    for k, st in stores.items():
        want = _fold_blend(recipe, k)
        meta = st.meta
        for r, image in enumerate(st.ids):  # fold k's labels come from the fold-k models alone
            got = st.image(r)
            assert got.shape == want[image].shape == (12, *adapter.image_size(image, "test")), (k, image)
            assert np.abs(got.astype(int) - want[image].astype(int)).max() <= 1, (k, image)
        assert meta["fold"] == k and meta["recipe"] == "duo" and sorted(meta["kept"]) == sorted(st.ids)
    # fold 0 differs from fold 1: they are different models' labels
    assert not all(np.array_equal(stores[0].image(r), stores[1].image(stores[1].ids.index(i)))
                   for r, i in enumerate(stores[0].ids))

    exp_cfg = {**EXP, "name": "pl", "data": {**EXP["data"], "pseudo": {"name": "duo", "weight": 2.0}},
               "train": {**EXP["train"], "epochs": 1}}
    Path("configs/experiments/pl.yaml").write_text(yaml.safe_dump(exp_cfg))
    exp = load_experiment("pl")
    folds = pd.read_csv("folds/tiny-hands.csv")
    train_ids = folds.loc[folds["fold"] != 0, "id"].tolist()
    ds, sampler, _ = training_loader(exp, comp, adapter, train_ids, setup(), 0)
    assert len(ds) == len(train_ids) + len(adapter.test_ids)
    assert sampler.weights.tolist() == [1.0] * len(train_ids) + [2.0] * len(adapter.test_ids)
    pseudo_ds = ds.datasets[1]
    st = stores[0]
    for j, pid in enumerate(pseudo_ds.ids):  # the hard label: the submission's resize and thresholds
        test_id = pid.split(":", 1)[1]
        work = pseudo_ds._work_size(pid)
        want = binarize(to_size(torch.from_numpy(st.image(st.ids.index(test_id))).float() / 255, work),
                        "multilabel", torch.tensor(recipe.thresholds)).numpy()
        assert np.array_equal(pseudo_ds._decode(pid, True)[1], want)
        assert not (set(adapter.ids) & {pid})  # never a training id
    fit(exp, 0, log=print)
    out = capsys.readouterr().out
    assert f"data.pseudo: {len(adapter.test_ids)} pseudo-labelled test images of 'duo'" in out
    # validation is fold 0's labelled images only: its OOF rows are exactly those
    assert sorted(tiles.open_store(Path("runs/pl/fold0/oof")).ids) == sorted(folds.loc[folds["fold"] == 0, "id"])
    assert (yaml.safe_load(Path("runs/pl/fold0/config.yaml").read_text())["experiment"]["data"]["pseudo"]["name"]
            == "duo")


def test_pseudo_min_confidence_and_missing_sets_are_clear_errors(proj, capsys):
    from competition.cli import main
    write_recipe("duo")
    exp_cfg = {**EXP, "name": "pl", "data": {**EXP["data"], "pseudo": {"name": "none-yet"}}}
    Path("configs/experiments/pl.yaml").write_text(yaml.safe_dump(exp_cfg))
    assert main(["train", "--exp", "pl", "--fold", "0"]) == 2
    assert "competition pseudo --ensemble RECIPE --name none-yet" in capsys.readouterr().err
    assert main(["pseudo", "--ensemble", "duo", "--name", "strict", "--min-confidence", "1"]) == 0
    assert "fold 0: 0" in capsys.readouterr().out
    Path("configs/experiments/pl.yaml").write_text(
        yaml.safe_dump({**exp_cfg, "data": {**EXP["data"], "pseudo": {"name": "strict"}}}))
    assert main(["train", "--exp", "pl", "--fold", "0"]) == 2
    assert "keeps no image" in capsys.readouterr().err
    assert main(["pseudo", "--ensemble", "duo", "--min-confidence", "1.5"]) == 2


def test_a_submission_that_cannot_be_right_is_not_written_and_the_ledger_goes_with_the_csv(proj, capsys,
                                                                                           monkeypatch):
    """Thresholds in (0, 1), weights fine, but the training truth has every class in every image and
    the test prediction has one class nowhere: refused (no CSV, no ledger row) unless --force. A
    ledger that cannot be written (a full disk) takes the validated CSV with it: both or neither."""
    import errno

    from competition import ledger
    from competition.cli import main
    comp = load_competition("tiny-hands")
    write_recipe("sure", scores={"in_sample": 0.6, "truth_share": {c: 1.0 for c in comp.classes}},
                 thresholds=[0.3] * (len(comp.classes) - 1) + [0.999])  # the last class: almost never
    listed = lambda: sorted(p.name for p in (proj / "submissions").glob("*.csv"))  # noqa: E731
    before = listed()
    assert main(["submit", "--ensemble", "sure", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not written: it cannot be right" in err, err
    assert f"{comp.classes[-1]} (in 100% of training images)" in err and "--force" in err
    assert listed() == before  # no CSV, no ledger
    assert main(["submit", "--ensemble", "sure", "--no-progress", "--force"]) == 0
    assert len(listed()) == len(before) + 2  # the CSV and the ledger
    rows = len(ledger.read())

    def full_disk(row):
        raise OSError(errno.ENOSPC, "No space left on device", str(proj / "submissions/.ledger.csv.x.tmp"))
    monkeypatch.setattr(ledger, "append", full_disk)
    capsys.readouterr()
    assert main(["submit", "--ensemble", "sure", "--no-progress", "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert "disk is full" in err and len(err.splitlines()) == 1
    assert len(listed()) == len(before) + 2 and len(ledger.read()) == rows  # the new CSV went with its row
