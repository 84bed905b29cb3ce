"""Non-square inputs (`data.input_size: [h, w]`) and `data.resize: letterbox`: the geometry's known
answers, letterbox-then-undo round trips, an identity-like model whose predictions must land back on
the native image, and a 96x64 multiclass set with a void label trained end to end (OOF, native CV
closed with the scorer, and a submission at each test image's native size)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from competition.config import ConfigError, ExperimentConfig, load_experiment, validate
from competition.data.dataset import Geometry, SegDataset, fit, pad_to, unletterbox

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [(64, 96)] * 5 + [(48, 80)] * 3  # (H, W): 96x64 and 80x48 images


def make_set(root: Path, sizes=SIZES, n_test: int = 3) -> None:
    """Index masks (class a = 1, b = 2) on a dark image where a is bright and b mid-grey; a void band
    (255) along the top, as bright as class a (a model calls it a). Test images are the first
    ``n_test`` training images again."""
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate(sizes):
        img, m = np.full((h, w), 20, np.uint8), np.zeros((h, w), np.uint8)
        y, x = rng.integers(6, h // 2), rng.integers(0, w // 2)
        m[y:y + h // 3, x:x + w // 3] = 1
        y, x = rng.integers(6, h // 2), rng.integers(w // 2, w - w // 4)
        m[y:y + h // 4, x:x + w // 5] = 2
        img[m == 1], img[m == 2] = 220, 120
        m[:4], img[:4] = 255, 220
        for folder, arr in (("images", img), ("masks", m)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(root / folder / f"i{k}.png"), arr)
        if k < n_test:
            (root / "test").mkdir(exist_ok=True)
            assert cv2.imwrite(str(root / "test" / f"t{k}.png"), img)


COMP = {"name": "ns", "data_root": "data/ns", "format": "mask_folders", "classes": ["a", "b"], "task": "multiclass",
        "mask_folders": {"mask_mode": "index", "test_images": "test"}, "groups": {"source": "none"},
        "ignore": {"value": 255, "metric": "exclude"}, "folds": 2, "tta": ["identity", "hflip"],
        "submission": {"id_format": "stem"}}
EXP = {"competition": "ns", "model": {"arch": "Unet", "encoder": "tu-test_resnet", "decoder_channels": [16] * 5},
       "optimizer": {"name": "adamw", "lr": 0.003}, "scheduler": {"name": "none"},
       "data": {"input_size": [32, 64], "resize": "letterbox", "batch_size": 4, "workers": 0},
       "train": {"epochs": 1, "progress": False, "seed": 0}, "oof": {"tta": []}, "tracking": {"wandb": False}}


@pytest.fixture
def ns_project(tmp_path, monkeypatch) -> Path:
    (tmp_path / "configs/competitions").mkdir(parents=True)
    (tmp_path / "configs/experiments").mkdir(parents=True)
    (tmp_path / "configs/competitions/ns.yaml").write_text(yaml.safe_dump(COMP))
    (tmp_path / "configs/experiments/lb.yaml").write_text(yaml.safe_dump(EXP))
    make_set(tmp_path / "data/ns")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- configuration and geometry ---------------------------------------------------------------------
def test_input_size_is_an_int_or_h_w():
    def data(**kw):
        return validate(ExperimentConfig, {"name": "t", "data": kw}, "t.yaml").data
    assert data(input_size=96).input_hw == (96, 96) and data(input_size=[64, 96]).input_hw == (64, 96)
    assert data().resize == "stretch"
    for bad in (8, [64], [64, 8], [64, "96"], True):
        with pytest.raises(ConfigError, match=r"data.input_size.*\[height, width\]"):
            data(input_size=bad)
    with pytest.raises(ConfigError, match=r"data.resize.*'stretch' or 'letterbox'"):
        data(resize="pad")
    # OOF is kept at each image's original size, whatever the model's input and output: the key that
    # set an OOF size is refused, naming itself and the remedy.
    for size in ([40, 60], 64):
        with pytest.raises(ConfigError, match=r"oof\.size.*oof\.size is gone: OOF is kept at each image's "
                                              r"original size.*remove the key"):
            validate(ExperimentConfig, {"name": "t", "data": {"input_size": [32, 64]}, "oof": {"size": size}}, "t")
    assert validate(ExperimentConfig, {"name": "t", "oof": {"size": None}}, "t").oof.size is None


def test_fit_and_content_known_answers():
    assert fit((64, 96), (32, 64)) == (32, 48)  # height decides
    assert fit((48, 80), (32, 64)) == (32, 53)  # 80 * 32 / 48 = 53.3
    assert fit((100, 10), (32, 32)) == (32, 3)
    assert fit((64, 96), (64, 96)) == (64, 96)
    g = Geometry((32, 64), 2, "resize", None, "letterbox")
    assert g.output_size == (64, 128) and g.whole((480, 360)) == (32, 64)
    assert g.content((64, 96), (64, 128)) == (64, 96)
    assert Geometry((32, 64), 1, "resize", None, "stretch").content((64, 96), (32, 64)) == (32, 64)


def test_letterbox_then_undo_gives_back_the_native_mask():
    """A mask letterboxed by an integer factor and undone (crop, bilinear resize) is the mask again;
    any factor gives a mask of exactly the native shape that differs only along edges."""
    rng = np.random.default_rng(1)
    native = (cv2.resize(rng.random((6, 9)), (36, 24), interpolation=cv2.INTER_NEAREST) > 0.5).astype(np.uint8)
    for canvas, exact in (((48, 96), True), ((40, 40), False)):
        content = fit(native.shape, canvas)
        up = cv2.resize(native, content[::-1], interpolation=cv2.INTER_NEAREST)
        boxed = pad_to(up[None], canvas, channels_first=True)
        assert boxed.shape == (1, *canvas) and not boxed[0, content[0]:, :].any() and not boxed[0, :, content[1]:].any()
        back = unletterbox(torch.from_numpy(boxed).float(), content, native.shape)
        assert tuple(back.shape) == (1, *native.shape)
        got = (back[0] >= 0.5).numpy().astype(np.uint8)
        if exact:
            np.testing.assert_array_equal(got, native)
        else:
            assert (got != native).mean() < 0.05


def test_dataset_letterboxes_image_and_mask(tmp_path, monkeypatch):
    from competition.config import CompetitionConfig
    from competition.data.adapters import make_adapter
    make_set(tmp_path / "data/ns")
    monkeypatch.chdir(tmp_path)
    ad = make_adapter(validate(CompetitionConfig, COMP, "ns"))
    exp = validate(ExperimentConfig, {"name": "t", **EXP}, "lb")
    s = SegDataset(ad, ["i0"], exp, "multiclass", "val")[0]
    assert s["image"].shape == (1, 32, 64) and s["mask"].shape == (32, 64)
    content = fit((64, 96), (32, 64))  # (32, 48): 16 columns of padding on the right
    pad_value = (0.0 - 0.449) / 0.226
    assert torch.allclose(s["image"][0, :, content[1]:], torch.tensor(pad_value))
    assert (s["mask"][:, content[1]:] == 0).all()  # padding is background
    want = np.zeros(ad.load_mask("i0", content).shape[1:], np.int64)
    m = ad.load_mask("i0", content)
    want[m[0] == 1], want[m[1] == 1] = 1, 2
    want[ad.load_ignore("i0", content)] = 255
    np.testing.assert_array_equal(s["mask"][:, :content[1]].numpy(), want)
    stretch = exp.model_copy(update={"data": exp.data.model_copy(update={"resize": "stretch"})})
    stretched = SegDataset(ad, ["i0"], stretch, "multiclass", "val")[0]
    assert stretched["mask"].shape == (32, 64) and (stretched["mask"][:, 48:] != 0).any()


def test_sliding_window_with_a_non_square_window():
    """Windows of 32x48 over a 70x100 image (and a 2x head): a position-independent model comes out
    unchanged, and every window the model sees has the window's shape."""
    from competition.predict.sliding import sliding_window
    x = torch.randn(2, 1, 70, 100)
    seen = []

    def up2(b):
        seen.append(tuple(b.shape[-2:]))
        return torch.nn.functional.interpolate(b, scale_factor=2, mode="nearest")
    out = sliding_window(up2, x, (32, 48), 0.5, batch=3)
    assert set(seen) == {(32, 48)} and out.shape == (2, 1, 140, 200)
    torch.testing.assert_close(out, torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


class _Bright(torch.nn.Module):
    """logits = 4 x the normalised input: a model whose probability map is the image itself."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return 4 * x * self.w


@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
def test_predictions_land_back_on_the_native_image(tmp_path, monkeypatch, resize):
    """Through the submission's member path (TestInputs -> MemberPredictor), the identity-like model's
    probabilities come back at each image's native size and are the native image's; leaving the
    padding in would stretch it over the image and shift everything."""
    from competition.config import CompetitionConfig
    from competition.data.adapters import make_adapter
    from competition.predict.infer import MemberPredictor, TestInputs
    from competition.predict.members import LoadedModel
    make_set(tmp_path / "data/ns")
    monkeypatch.chdir(tmp_path)
    comp = validate(CompetitionConfig, {**COMP, "task": "multilabel", "classes": ["a"], "ignore": None,
                                        "mask_folders": {"mask_mode": "binary", "test_images": "test"}}, "ns")
    ad = make_adapter(comp)
    exp = validate(ExperimentConfig, {"name": "t", **EXP, "data": {**EXP["data"], "resize": resize}}, "lb")
    member = MemberPredictor([LoadedModel(Path("x"), exp, _Bright(), None)], "multilabel", ["identity", "hflip"],
                             [1.0], torch.device("cpu"))
    ds = TestInputs(ad, ad.test_ids, {"in0": exp}, "multilabel")
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    probs = member(batch["inputs"]["in0"], batch["size"])
    assert len(probs) == 3
    for i, image_id in enumerate(ad.test_ids):
        native = ad.load_image(image_id, "test").astype(np.float32) / 255
        want = torch.sigmoid(4 * (torch.from_numpy(native) - 0.449) / 0.226)
        assert probs[i].dtype == torch.uint8 and tuple(probs[i].shape) == (1, *native.shape), image_id
        got = probs[i][0].float() / 255
        assert (got - want).abs().mean() < 0.05, image_id
        bright = want > 0.9
        assert (got[bright] > 0.5).float().mean() > 0.9  # the bright class lands where it is


# -- end to end -------------------------------------------------------------------------------------
def test_nonsquare_multiclass_with_void_trains_and_maps_back_to_native_sizes(ns_project):
    from competition.cli import main
    from competition.config import load_competition
    from competition.cv import oofscore
    from competition.predict.options import Inference
    from competition.predict.run import predict_experiment
    from competition.rle import decode
    from competition.score import score_files
    from competition.train.loop import fit as train
    assert main(["folds", "--comp", "ns"]) == 0
    metrics = [train(load_experiment("lb"), k, log=lambda *_: None) for k in (0, 1)]
    saved = yaml.safe_load((ns_project / "runs/lb/fold0/config.yaml").read_text())["experiment"]["data"]
    assert saved["input_size"] == [32, 64] and saved["resize"] == "letterbox"  # recorded with the run
    meta = json.loads((ns_project / "runs/lb/fold0/oof/meta.json").read_text())
    assert "size" not in meta and {tuple(v) for v in meta["original_sizes"].values()} <= {(64, 96), (48, 80)}
    # Each OOF row is the whole native image (no letterbox padding, not the 32x64 model input).
    from competition.data.adapters import make_adapter
    from competition.store import tiles
    adapter = make_adapter(load_competition("ns"))
    for k in (0, 1):
        st = tiles.open_store(ns_project / f"runs/lb/fold{k}/oof")
        for r, i in enumerate(st.ids):
            assert st.image(r).shape == (2, *adapter.image_size(i)) and adapter.image_size(i) in SIZES
    assert all(np.isfinite(m["oof_dice"]) and m["oof_size"] == "original" for m in metrics)
    # Native CV (void pixels left out: ignore.metric exclude) is exactly what the scorer computes from
    # the OOF written as a submission and the truth with its void rows.
    printed = []
    r = oofscore.run("lb", options=oofscore.OofOptions(csv="oof.csv", truth_csv="truth.csv"), log=printed.append)
    head = next(line for line in printed if "OOF Dice" in line)
    assert "(argmax against the background)" in head and "threshold" not in head  # multiclass
    truth = pd.read_csv("truth.csv", keep_default_na=False)
    assert set(truth["class"]) == {"a", "b", "255"} and len(truth) == len(SIZES) * 3
    comp = load_competition("ns")
    s = score_files("oof.csv", "truth.csv", comp)
    assert abs(s.mean - r["native"]) < 1e-9
    as_background = comp.model_copy(update={"ignore": comp.ignore.model_copy(update={"metric": "background"})})
    assert score_files("oof.csv", "truth.csv", as_background).mean < s.mean - 1e-3  # the band is predicted a
    # The submission: every test image at its own native size.
    res = predict_experiment("lb", inference=Inference(progress=False))
    sub = pd.read_csv(res.path, keep_default_na=False)
    assert len(sub) == 3 * 2
    sizes = {f"t{k}": SIZES[k] for k in range(3)}
    for _, row in sub.iterrows():
        decode(row["rle"], sizes[str(row["image_name"])])  # raises unless it fits the native (H, W)
    os.remove(res.path)
