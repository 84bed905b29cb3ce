"""The `ignore` label: void pixels from each format, carried in band (IGNORE_INDEX) through the dataset,
cache and batch mixing, left out of every loss term, and out of validation, OOF and `competition score`
only when `ignore.metric: exclude`. Known answers on tiny arrays; no model is trained here."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from competition.config import IGNORE_INDEX, CompetitionConfig, ConfigError, ExperimentConfig, LossConfig, LossTerm
from competition.data.adapters import make_adapter
from competition.losses import build_loss
from competition.rle import encode
from competition.score import ScoreError, _subtract_runs, _union_runs, score_frames

H, W = 16, 20
TERMS = ["bce", "dice", "focal", "jaccard", "tversky", "lovasz"]


def index_mask() -> np.ndarray:
    """Class a (1) in rows 2-5, class b (2) in rows 6-8 left half, void (255) in rows 0-1 and a
    3x3 block at the bottom right."""
    m = np.zeros((H, W), np.uint8)
    m[2:6, 2:10] = 1
    m[6:9, :8] = 2
    m[:2, :] = 255
    m[13:16, 17:20] = 255
    return m


VOID = index_mask() == 255
N_A, N_VOID = int((index_mask() == 1).sum()), int(VOID.sum())  # 32, 2 * 20 + 9
PARTIAL = 2 * N_A / (N_A + N_A + N_VOID)  # class a predicted on its pixels and on every void pixel


def write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)


def mask_folders(root: Path, task="multiclass", metric="exclude", **extra) -> CompetitionConfig:
    for i in ("p", "q"):
        write(root / "images" / f"{i}.png", np.full((H, W), 40 if i == "p" else 90, np.uint8))
        write(root / "masks" / f"{i}.png", index_mask() if i == "p" else np.zeros((H, W), np.uint8))
    return CompetitionConfig(name="mf", data_root=str(root), format="mask_folders", classes=["a", "b"], task=task,
                             mask_folders={"mask_mode": "index"}, groups={"source": "none"},
                             ignore={"value": 255, "metric": metric}, **extra)


# -- adapters ---------------------------------------------------------------------------------------
def test_mask_folders_void_value_is_the_ignore_region_and_no_class(tmp_path):
    ad = make_adapter(mask_folders(tmp_path))
    m = index_mask()
    np.testing.assert_array_equal(ad.load_mask("p"), np.stack([m == 1, m == 2]).astype(np.uint8))
    np.testing.assert_array_equal(ad.load_ignore("p"), VOID)
    assert not ad.load_ignore("q").any()
    half = ad.load_ignore("p", (6, 8))  # nearest resize, as masks are
    np.testing.assert_array_equal(half, cv2.resize(VOID.astype(np.uint8), (8, 6), interpolation=cv2.INTER_NEAREST) > 0)
    assert ad.presence("p").tolist() == [True, True]


def test_mask_folders_void_value_must_not_be_a_class_value(tmp_path):
    cfg = mask_folders(tmp_path)
    with pytest.raises(ConfigError, match=r"ignore.value 2 is a pixel value the index masks use for a class"):
        make_adapter(cfg.model_copy(update={"ignore": cfg.ignore.model_copy(update={"value": 2})}))


def test_per_class_void_file(tmp_path):
    write(tmp_path / "images/p.png", np.zeros((H, W), np.uint8))
    write(tmp_path / "masks/p/a.png", (index_mask() == 1).astype(np.uint8) * 255)
    write(tmp_path / "masks/p/void.png", VOID.astype(np.uint8) * 255)
    ad = make_adapter(CompetitionConfig(name="pc", data_root=str(tmp_path), format="mask_folders", classes=["a"],
                                        mask_folders={"mask_mode": "per_class"}, groups={"source": "none"},
                                        ignore={"value": "void"}))
    np.testing.assert_array_equal(ad.load_ignore("p"), VOID)
    np.testing.assert_array_equal(ad.load_mask("p")[0], index_mask() == 1)


def test_rle_csv_void_rows(tmp_path):
    write(tmp_path / "train_images/p.png", np.zeros((H, W), np.uint8))
    m = index_mask()
    pd.DataFrame({"id": ["p", "p", "p"], "class": ["1", "255", "255"],
                  "rle": [encode(m == 1), encode(np.r_[VOID[:2], np.zeros((H - 2, W), bool)]),
                          encode(np.r_[np.zeros((2, W), bool), VOID[2:]])]}).to_csv(tmp_path / "train.csv", index=False)
    ad = make_adapter(CompetitionConfig(name="rc", data_root=str(tmp_path), format="rle_csv", classes=["a"],
                                        rle_csv={"class_values": [1], "test_images": None},
                                        groups={"source": "none"}, ignore={"value": 255}))
    np.testing.assert_array_equal(ad.load_ignore("p"), VOID)  # both void rows, unioned
    np.testing.assert_array_equal(ad.load_mask("p")[0], m == 1)
    assert ad.presence("p").tolist() == [True]
    ad.validate_labels()


def test_polygon_void_label_and_labelled_pixels_win(tmp_path):
    write(tmp_path / "train/DCM/s1/p.png", np.zeros((H, W), np.uint8))
    anns = [{"label": "bone", "points": [[0, 0], [8, 0], [8, 4], [0, 4]]},
            {"label": "void", "points": [[4, 0], [W, 0], [W, H], [4, H]]}]
    (tmp_path / "train/outputs_json/s1").mkdir(parents=True)
    (tmp_path / "train/outputs_json/s1/p.json").write_text(json.dumps({"annotations": anns}))
    ad = make_adapter(CompetitionConfig(name="pj", data_root=str(tmp_path), format="polygon_json", classes=["bone"],
                                        ignore={"value": "void"}))
    bone, ign = ad.load_mask("s1/p")[0].astype(bool), ad.load_ignore("s1/p")
    assert ad.void_region("s1/p")[:4, 4:8].all()  # the void polygon covers part of the bone...
    assert not (bone & ign).any() and bone[:4, 4:8].all()  # ...but a labelled pixel is never ignored
    assert ign[:, 9:].all() and not ign[:, :3].any()


# -- dataset, cache, mixing -------------------------------------------------------------------------
def _exp(**data) -> ExperimentConfig:
    return ExperimentConfig.model_validate({"name": "t", "competition": "mf",
                                            "data": {"input_size": [H, W], "workers": 0, **data}})


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_targets_carry_ignore_in_band_and_the_cache_keeps_it(tmp_path, monkeypatch, task):
    from competition.data.dataset import SegDataset
    monkeypatch.chdir(tmp_path)
    ad = make_adapter(mask_folders(tmp_path / "data", task))
    plain = SegDataset(ad, ad.ids, _exp(), task, "val")[0]["mask"]
    m = index_mask()
    if task == "multiclass":
        want = np.where(m == 255, IGNORE_INDEX, m)
    else:
        want = np.stack([m == 1, m == 2]).astype(np.uint8)
        want[:, VOID] = IGNORE_INDEX
    np.testing.assert_array_equal(plain.numpy(), want)
    cached = SegDataset(ad, ad.ids, _exp(cache=True), task, "val")
    for _ in range(2):  # filled, then read back from the memory-mapped store
        assert torch.equal(cached[0]["mask"], plain)


def test_copy_paste_never_takes_ignored_pixels_for_a_class():
    from competition.data.mixing import copy_paste, cutmix
    y = torch.zeros(2, 2, 4, 4, dtype=torch.uint8)
    y[0, :, :2] = IGNORE_INDEX  # image 0: top half ignored, no class
    y[1, 0, 2:, 2:] = 1  # image 1: class 0 in the bottom right
    x = torch.zeros(2, 1, 4, 4)
    _, out = copy_paste(x, y, "multilabel", [0], donors=torch.tensor([1, 0]))
    assert (out[1] == y[1]).all()  # image 0's ignored pixels are no donor region
    assert (out[0, 0, 2:, 2:] == 1).all() and (out[0, :, :2] == IGNORE_INDEX).all()
    _, mixed = cutmix(x, y, perm=torch.tensor([1, 0]), box=(0, 2, 0, 4))
    assert (mixed[1, :, :2] == IGNORE_INDEX).all()  # the pasted box brings its ignore region along


# -- losses -----------------------------------------------------------------------------------------
def _batch(task: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m = torch.from_numpy(index_mask()).long()
    if task == "multiclass":
        y = torch.stack([m, torch.where(m == 255, m, (m + 1) % 3)])
        logits = torch.randn(2, 3, H, W, generator=g)
    else:
        y = torch.stack([(m == 1), (m == 2)]).to(torch.uint8)
        y[:, m == 255] = IGNORE_INDEX
        y = torch.stack([y, y.flip(-1)]).float()
        logits = torch.randn(2, 2, H, W, generator=g)
    return logits, y


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
@pytest.mark.parametrize("term", TERMS)
def test_loss_is_blind_to_predictions_on_ignored_pixels(task, term):
    loss = build_loss(LossConfig(terms=[LossTerm(name=term)]), task, 3 if task == "multiclass" else 2,
                      ignore_index=IGNORE_INDEX)
    logits, y = _batch(task)
    ignored = (y == IGNORE_INDEX) if task == "multiclass" else (y == IGNORE_INDEX).all(1)
    assert ignored.any()
    a = logits.clone().requires_grad_(True)
    value = loss(a, y)
    value.backward()
    other = logits.clone()
    other[ignored.unsqueeze(1).expand_as(other)] = 50.0  # confident nonsense where nothing is labelled
    assert torch.isfinite(value)
    assert loss(other, y).item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7)
    assert a.grad[ignored.unsqueeze(1).expand_as(a)].abs().max() == 0
    # An all-ignored batch is 0, not NaN.
    assert loss(logits, torch.full_like(y, IGNORE_INDEX)).item() == 0.0


def test_cross_entropy_and_bce_are_means_over_the_labelled_pixels_only():
    logits, y = _batch("multiclass")
    keep = y != IGNORE_INDEX
    ce = build_loss(LossConfig(terms=[LossTerm(name="bce")]), "multiclass", 3, ignore_index=IGNORE_INDEX)
    want = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[keep], y[keep])
    assert ce(logits, y).item() == pytest.approx(want.item(), rel=1e-6)
    logits, y = _batch("multilabel")
    keep = y != IGNORE_INDEX
    bce = build_loss(LossConfig(terms=[LossTerm(name="bce")]), "multilabel", 2, ignore_index=IGNORE_INDEX)
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits[keep], y[keep])
    assert bce(logits, y).item() == pytest.approx(want.item(), rel=1e-6)


def test_ignore_index_is_the_competitions_not_a_loss_kwarg():
    with pytest.raises(ConfigError, match=r"may not set \['ignore_index'\].*`ignore` key"):
        build_loss(LossConfig(terms=[LossTerm(name="dice", kwargs={"ignore_index": 3})]), "multiclass", 3)


# -- validation Dice --------------------------------------------------------------------------------
class _Fixed(torch.nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.logits + self.w


@pytest.mark.parametrize("metric, want", [("exclude", 1.0), ("background", PARTIAL)])
def test_validation_dice_leaves_ignored_pixels_out_only_for_exclude(tmp_path, metric, want):
    """Truth: class a on its pixels. Prediction: class a there and on every void pixel."""
    from competition.train import distributed as dd
    from competition.train.engine import Engine
    comp = mask_folders(tmp_path, metric=metric)
    m = torch.from_numpy(index_mask()).long()
    y = torch.where(m == 2, torch.zeros_like(m), m)[None]  # class b absent: a = 1, void = 255
    logits = torch.full((1, 3, H, W), -5.0)
    logits[0, 0] = 5.0  # background everywhere...
    logits[0, 0][(m == 1) | (m == 255)] = -5.0
    logits[0, 1][(m == 1) | (m == 255)] = 5.0  # ...except class a on its pixels and on every void pixel
    exp = ExperimentConfig.model_validate({"name": "t", "competition": "mf", "train": {"channels_last": False}})
    engine = Engine(_Fixed(logits), None, exp, comp, torch.device("cpu"), dd.Dist())
    scores = engine.validate([{"image": torch.zeros(1, 1, H, W), "mask": y}], 1)
    assert scores[0] == pytest.approx(want) and scores[1] == 1.0  # b: empty truth, empty prediction


# -- OOF scoring ------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["exclude", "background"])
def test_oof_dice_excludes_ignored_pixels_only_for_exclude(tmp_path, metric):
    """An OOF store at the original size (class a predicted on its pixels and on every void pixel)
    scored against the truth: the void pixels count only with ``ignore.metric: background``."""
    from competition.cv.oofscore import per_image
    from competition.cv.views import Images, MemoryTruth
    from competition.store import tiles
    comp = mask_folders(tmp_path / "data", metric=metric)
    ad = make_adapter(comp)
    m = index_mask()
    w = tiles.StoreWriter(tmp_path / "oof", ["p"], ["a", "b"], {"p": (H, W)}, {"task": "multilabel"})
    w.add(0, np.stack([(m == 1) | (m == 255), m == 2]).astype(np.uint8) * 255)
    w.close()
    member = tiles.open_store(tmp_path / "oof")
    truth = MemoryTruth(ad, ["p"], comp.classes)
    for task in ("multilabel", "multiclass"):
        images = Images([member], truth, ad, task)
        ign = images.ignore(0)
        assert (ign is None) == (metric == "background")
        if ign is not None:
            np.testing.assert_array_equal(ign, VOID)
        got = per_image(images, task, 0.5, 1.0, workers=1)[0]
        a = 1.0 if metric == "exclude" else PARTIAL
        assert got == pytest.approx([a, 1.0])


def test_report_metrics_binarise_a_multiclass_oof_as_the_submission_does(tmp_path):
    """``metric.report`` figures come from the submission's masks: on class b's pixels the stored
    values (a 1, b 127) leave the background at 127, a tie the submission's float argmax gives to b
    (an integer argmax would give it to the background and score b 0)."""
    import torch

    from competition.config import MetricSpec
    from competition.cv.oofscore import per_image, report_metrics
    from competition.cv.views import Images, MemoryTruth
    from competition.metrics import PairMetric
    from competition.store import tiles
    from competition.store.probs import binarize, blend
    comp = mask_folders(tmp_path / "data", metric="exclude")
    ad = make_adapter(comp)
    m = index_mask()
    u = np.zeros((2, H, W), np.uint8)
    u[0][(m == 1) | (m == 255)] = 200  # class a on its pixels and on every void pixel (left out)
    u[0][m == 2], u[1][m == 2] = 1, 127
    tie = binarize(blend([torch.from_numpy(u)], torch.ones(1, 2)), "multiclass", torch.zeros(2)).numpy()
    assert tie[1][m == 2].all() and not tie[0][m == 2].any()  # the submission's answer on the tie
    w = tiles.StoreWriter(tmp_path / "oof", ["p"], ["a", "b"], {"p": (H, W)}, {"task": "multiclass"})
    w.add(0, u)
    w.close()
    images = Images([tiles.open_store(tmp_path / "oof")], MemoryTruth(ad, ["p"], comp.classes), ad, "multiclass")
    assert per_image(images, "multiclass", 0.5, PairMetric("dice", 1.0), workers=1)[0] == pytest.approx([1.0, 1.0])
    got = report_metrics(images, "multiclass", 0.5, MetricSpec(name="iou", report=["dice", "iou"]))
    assert got == pytest.approx({"dice": 1.0})


# -- the scorer -------------------------------------------------------------------------------------
def _score_cfg(metric: str | None) -> CompetitionConfig:
    return CompetitionConfig(name="s", data_root="data/s", format="rle_csv", classes=["a", "b"],
                             **({"ignore": {"value": "void", "metric": metric}} if metric else {}))


def _truth_and_sub():
    m = index_mask()
    truth = pd.DataFrame({"image_name": ["p.png"] * 3, "class": ["a", "b", "void"],
                          "rle": [encode(m == 1), encode(m == 2), encode(VOID)], "height": [H] * 3, "width": [W] * 3})
    sub = pd.DataFrame({"image_name": ["p.png"] * 2, "class": ["a", "b"],
                        "rle": [encode((m == 1) | VOID), encode(m == 2)]})  # class a also on every void pixel
    return truth, sub


@pytest.mark.parametrize("metric, want_a", [("exclude", 1.0), ("background", PARTIAL)])
def test_scorer_leaves_void_pixels_out_only_for_exclude(metric, want_a):
    truth, sub = _truth_and_sub()
    r = score_frames(sub, truth, _score_cfg(metric))
    assert r.per_class == pytest.approx({"a": want_a, "b": 1.0})
    assert len(r.per_row) == 2  # the void row is no image x class pair


def test_scorer_without_ignore_refuses_void_rows():
    truth, sub = _truth_and_sub()
    with pytest.raises(ScoreError, match=r"row 3 .*class=void.*unknown class"):
        score_frames(sub, truth, _score_cfg(None))


def test_scorer_subtracts_void_from_the_truth_too():
    """A truth class run that overlaps the void region counts only outside it."""
    m = index_mask()
    a = (m == 1) | VOID  # the truth labels class a on the void pixels as well
    truth = pd.DataFrame({"image_name": ["p.png"] * 2, "class": ["a", "void"], "rle": [encode(a), encode(VOID)],
                          "height": [H] * 2, "width": [W] * 2})
    sub = pd.DataFrame({"image_name": ["p.png"], "class": ["a"], "rle": [encode(m == 1)]})
    cfg = CompetitionConfig(name="s", data_root="d", format="rle_csv", classes=["a"], ignore={"value": "void"})
    assert score_frames(sub, truth, cfg).mean == pytest.approx(1.0)


def test_run_arithmetic_known_answers():
    def runs(*pairs):
        return np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64)
    s, e = _subtract_runs(runs((0, 10), (20, 30)), runs((5, 8), (8, 12), (25, 40)))
    assert list(zip(s.tolist(), e.tolist())) == [(0, 5), (20, 25)]
    s, e = _union_runs([runs((0, 4), (10, 12)), runs((3, 6), (12, 15), (20, 21))])
    assert list(zip(s.tolist(), e.tolist())) == [(0, 6), (10, 15), (20, 21)]
