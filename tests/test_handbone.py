"""Hand-bone at full size: the real competition's config, its generated 2048² twin, the handbone-*
recipes and ``competition train --dry-run`` (one real training step, nothing written)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import pandas as pd
import pytest
import yaml

from competition.cli import main
from competition.config import CompetitionConfig, find_config, load_competition, load_experiment, validate
from competition.data import synthetic
from competition.data.adapters import make_adapter

REPO = Path(__file__).resolve().parent.parent
TWIN = "synthetic-hands-2048"
HANDBONE = ([f"finger-{i}" for i in range(1, 20)] +
            ["Trapezium", "Trapezoid", "Capitate", "Hamate", "Scaphoid", "Lunate", "Triquetrum", "Pisiform",
             "Radius", "Ulna"])
RECIPES = sorted(p.stem for p in (REPO / "configs/experiments").glob("handbone-*.yaml"))
# The CPU dry run at each recipe's full size takes 65-142 s per step on one thread (see the recipes'
# headers), so the test runs it on the same data at a smaller network input: the resize recipes keep
# their output_scale (and so the high-resolution head), the crop recipe still crops the 2048² image.
INPUT_SIZE = {"handbone-unet3plus-2048": 128, "handbone-unet3plus-eff": 256,
              "handbone-hrnet-1024crop": 256, "handbone-segformer": 256, "handbone-hrnet": 256,
              "handbone-nnunet": 256}
# nnunet is planned from the input size: at 256 px it has 7 stages (6 outputs), not the recipe's 9.
EXTRA = {"handbone-nnunet": ["--set", "loss.deep_supervision_weights=null"]}
# Random init as nnU-Net trains; every other recipe starts from ImageNet weights.
WEIGHTS = {"handbone-nnunet": None}


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (hidden ones too) -> (size, mtime_ns)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def twin_project(tmp_path_factory) -> Path:
    """A project folder holding the generated twin and its folds file (made once: ~10 s)."""
    root = tmp_path_factory.mktemp("handbone")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["folds", "--comp", TWIN]) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def in_twin(twin_project, monkeypatch) -> Path:
    monkeypatch.chdir(twin_project)
    return twin_project


def test_hand_bone_config_is_the_real_competition(tmp_path, twin_project):
    cfg = load_competition("hand-bone")
    assert cfg.classes == HANDBONE == synthetic.HANDBONE_CLASSES
    assert (cfg.data_root, cfg.format, cfg.task, cfg.image.channels) == ("data/hand-bone", "polygon_json",
                                                                         "multilabel", "grayscale")
    assert cfg.groups.source == "folder" and cfg.synthetic is None  # real data: nothing is ever generated
    sub = cfg.submission
    assert (sub.id_column, sub.class_column, sub.rle_column, sub.pixel_order, sub.id_format) == (
        "image_name", "class", "rle", "row-major", "filename")
    pj = cfg.polygon_json
    assert (pj.train_images, pj.train_labels, pj.test_images) == ("train/DCM", "train/outputs_json", "test/DCM")
    # Every key is commented (the file is the user's documentation).
    lines = find_config("competitions", "hand-bone").read_text().splitlines()
    keyed = [ln for ln in lines if ln and not ln.lstrip().startswith(("#", "-")) and ":" in ln
             and not ln.startswith(("classes", "          "))]
    assert all("#" in ln for ln in keyed), [ln for ln in keyed if "#" not in ln]
    # The layout keys match the real layout: pointed at a folder in that layout (the twin's, copied
    # without its marker, i.e. "real" data), the adapter finds images, labels and groups.
    data = tmp_path / "hand-bone"
    shutil.copytree(twin_project / f"data/{TWIN}", data, ignore=shutil.ignore_patterns(".generated*"))
    raw = yaml.safe_load(find_config("competitions", "hand-bone").read_text())
    ad = make_adapter(validate(CompetitionConfig, {**raw, "data_root": str(data)}, "hand-bone"))
    assert len(ad.ids) == 12 and len(ad.test_ids) == 4
    assert set(ad.groups().values()) == {f"ID{s:03d}" for s in range(6)}
    assert ad.load_mask(ad.ids[0], (64, 64)).shape == (29, 64, 64)


def test_twin_generates_29_hand_bone_classes_at_2048(in_twin):
    cfg = load_competition(TWIN)
    assert cfg.classes == load_competition("hand-bone").classes
    root = in_twin / cfg.data_root
    folds = pd.read_csv(in_twin / "folds" / f"{TWIN}.csv")
    assert len(folds) == 12 and folds["group"].nunique() == 6 and folds["fold"].nunique() == cfg.folds
    assert folds.groupby("group")["fold"].nunique().max() == 1
    ad = make_adapter(cfg)
    img = cv2.imread(str(next((root / "train/DCM").rglob("*.png"))), cv2.IMREAD_UNCHANGED)
    assert img.shape == (2048, 2048) and img.dtype.name == "uint8"
    for label in (root / "train/outputs_json").rglob("*.json"):
        assert {a["label"] for a in json.loads(label.read_text())["annotations"]} == set(HANDBONE)
    m = ad.load_mask(ad.ids[0], (256, 256))
    assert m.shape == (29, 256, 256) and m.reshape(29, -1).any(1).all()
    # Overlapping classes, as in the real data: neighbouring carpals and bones at the joints.
    assert (m[HANDBONE.index("Triquetrum")] & m[HANDBONE.index("Pisiform")]).any()
    truth = pd.read_csv(root / "test_truth.csv", keep_default_na=False)
    sample = pd.read_csv(root / "sample_submission.csv", keep_default_na=False)
    assert len(truth) == len(sample) == 4 * 29 and list(sample.columns) == ["image_name", "class", "rle"]
    assert set(truth["class"]) == set(HANDBONE) and (truth["height"] == 2048).all() and (truth["rle"] != "").all()
    # `make folds` again keeps the file (it matches the data).
    assert main(["folds", "--comp", TWIN]) == 0


def test_generator_class_sets(tmp_path):
    raw = yaml.safe_load((REPO / "configs/competitions/synthetic-hands.yaml").read_text())
    cfg = lambda classes: validate(CompetitionConfig, {**raw, "classes": classes}, "t")  # noqa: E731
    assert synthetic.class_set(cfg(synthetic.CLASSES)) == "default"
    assert synthetic.class_set(cfg(["Radius", "finger-3"])) == "handbone"
    with pytest.raises(ValueError, match="default set .*hand-bone set"):
        synthetic.class_set(cfg(["radius", "Ulna"]))


def test_recipes_validate_and_name_hand_bone():
    assert set(RECIPES) == set(INPUT_SIZE), "a new handbone-* recipe needs its test input size here"
    for name in RECIPES:
        exp = load_experiment(name)
        assert exp.competition == "hand-bone" and exp.model.encoder_weights == WEIGHTS.get(name, "imagenet")
        text = find_config("experiments", name).read_text()
        assert text.startswith("# ") and "not yet measured" in text and "GPU: NVIDIA" in text


def test_dry_run_needs_the_folds_file_of_the_comp(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--exp", "handbone-segformer", "--comp", TWIN, "--fold", "0", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"make folds COMP={TWIN}" in err
    assert not any(tmp_path.iterdir())  # refused before anything, the synthetic data included


def test_comp_with_other_classes_is_refused(in_twin, capsys):
    before = tree(in_twin)
    assert main(["train", "--exp", "handbone-segformer", "--comp", "synthetic-hands", "--fold", "0",
                 "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "classes differ" in err and "finger-1, finger-2" in err and "thumb, index" in err
    assert "hand-bone (29)" in err and "synthetic-hands (12)" in err
    assert main(["train", "--exp", "baseline", "--comp", TWIN, "--check"]) == 2
    assert "classes differ" in capsys.readouterr().err
    assert tree(in_twin) == before


def test_dry_run_flags_need_dry_run(in_twin, capsys):
    assert main(["train", "--exp", "handbone-segformer", "--batch-size", "1"]) == 2
    assert "--batch-size apply to --dry-run only" in capsys.readouterr().err
    assert main(["train", "--exp", "handbone-segformer", "--comp", TWIN]) == 2
    assert "--comp applies to --check and --dry-run only" in capsys.readouterr().err
    assert main(["train", "--exp", "handbone-segformer", "--comp", TWIN, "--fold", "0", "--check"]) == 0
    assert f"on {TWIN}" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_dry_run_every_recipe_on_the_twin(recipe, in_twin, capsys):
    exp = load_experiment(recipe)
    size = INPUT_SIZE[recipe]
    before = tree(in_twin)
    assert main(["train", "--exp", recipe, "--comp", TWIN, "--fold", "0", "--dry-run", "--batch-size", "1",
                 "--workers", "0", "--input-size", str(size), *EXTRA.get(recipe, [])]) == 0
    out = capsys.readouterr().out
    print(out)
    assert tree(in_twin) == before and not (in_twin / "runs").exists()  # nothing written, no run folder
    replaced = "model.encoder_weights 'imagenet' replaced by random init" in out
    assert replaced == (exp.model.encoder_weights is not None)
    assert f"input:  1x1x{size}x{size} float32" in out
    o = size * exp.model.output_scale
    assert f"target: 1x29x{o}x{o} uint8" in out
    if exp.model.arch == "nnunet":  # one output per decoder stage, from stride 1: the plan is printed
        assert f"finest first: {', '.join(f'1x29x{size // 2 ** k}x{size // 2 ** k}' for k in range(6))}" in out
        assert f"model plan: nnU-Net 2D plan for {size}x{size}: PlainConvUNet, 7 stages" in out
    elif exp.model.deep_supervision:
        assert f"finest first: 1x29x{o}x{o}, 1x29x{size // 4}x{size // 4}," in out
    else:
        assert f"output: 1x29x{o}x{o}" in out
    assert "parameters" in out and "step (forward + loss + backward + optimizer step" in out
    assert "peak memory:" in out and "dry run ok: nothing was written" in out


@pytest.mark.parametrize("recipe", ["handbone-nnunet", "handbone-hrnet"])
def test_the_nnunet_and_hrnetv2_recipes_pass_check(recipe, in_twin, capsys):
    """The whole recipe at its full size (1024 crops of the 2048 twin), its model built on the meta device
    (no weights downloaded) and put through one training-mode forward: nothing is written."""
    exp = load_experiment(recipe)
    if exp.model.arch == "nnunet":
        pytest.importorskip("dynamic_network_architectures")
    before = tree(in_twin)
    assert main(["train", "--exp", recipe, "--comp", TWIN, "--fold", "0", "--check"]) == 0
    assert f"configuration ok: {recipe} fold(s) 0 on {TWIN}" in capsys.readouterr().out
    assert tree(in_twin) == before
    assert (exp.data.input_size, exp.data.policy, exp.data.crop_from) == (1024, "crop", 2048)
    if exp.model.arch == "nnunet":
        assert len(exp.loss.deep_supervision_weights) == 8  # 9 stages at 1024 px: 8 decoder stages
    else:
        assert (exp.model.arch, exp.model.encoder, exp.model.encoder_weights) == ("hrnetv2", "tu-hrnet_w48",
                                                                                  "imagenet")
