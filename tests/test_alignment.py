"""Labels that fit their images: mask boundaries against image edges (competition.data.alignment), and
`competition folds` refusing an RLE competition whose pixel order is the transposed one."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import tiny_competition

from competition.config import CompetitionConfig, load_competition, validate
from competition.data.adapters import make_adapter
from competition.data.alignment import (
    LabelFitError,
    boundary,
    check_pixel_order,
    edge_map,
    order_evidence,
    transpose_fit,
)
from competition.folds import run
from competition.rle import encode

SIZE = 128  # the synthetic hands at 64 px are too coarse for the bones' edges to be told apart reliably


def _disc_off_centre(n: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """An image with a bright ellipse off the diagonal and its exact mask."""
    mask = np.zeros((n, n), np.uint8)
    cv2.ellipse(mask, (n // 4, n // 2), (n // 8, n // 4), 0, 0, 360, 1, -1)
    rng = np.random.default_rng(0)
    img = (40 + 150 * mask + rng.normal(0, 4, mask.shape)).clip(0, 255).astype(np.uint8)
    return img, mask


# --------------------------------------------------------------------------------------------- #
# The scoring
# --------------------------------------------------------------------------------------------- #
def test_a_mask_fits_its_image_and_its_transpose_does_not():
    img, mask = _disc_off_centre()
    right, wrong = transpose_fit(img, mask), transpose_fit(img, mask.T)
    assert right.reason is None and wrong.reason is None
    assert right.ratio < 0.2 and wrong.ratio > 5  # the edges lie on the true boundary only
    assert transpose_fit(np.dstack([img] * 3), mask[None]).ratio == pytest.approx(right.ratio, rel=1e-4)


def test_no_evidence_from_blank_images_empty_or_symmetric_masks():
    img, mask = _disc_off_centre()
    assert transpose_fit(np.full_like(img, 7), mask).reason == "blank image"
    assert transpose_fit(img, np.zeros_like(mask)).reason == "empty mask"
    sym = np.zeros_like(mask)
    cv2.circle(sym, (48, 48), 20, 1, -1)  # a disc on the diagonal is its own transpose
    assert transpose_fit(img, sym).reason == "mask symmetric about the diagonal"
    assert edge_map(np.zeros((8, 8), np.uint16)) is None


def test_boundary_is_inner_and_ignores_the_frame():
    m = np.zeros((10, 10), np.uint8)
    m[:, :4] = 1  # touches three sides of the frame: only its right edge is a boundary
    assert np.array_equal(np.flatnonzero(boundary(m).any(0)), [3]) and boundary(m).sum() == 10


def test_large_images_are_downscaled_and_non_square_refused():
    img, mask = _disc_off_centre(96)
    big_img = cv2.resize(img, (1536, 1536), interpolation=cv2.INTER_LINEAR)
    big_mask = cv2.resize(mask, (1536, 1536), interpolation=cv2.INTER_NEAREST)
    assert transpose_fit(big_img, big_mask).ratio < 0.3
    with pytest.raises(ValueError, match="square image"):
        transpose_fit(np.zeros((4, 6)), np.zeros((4, 6)))


# --------------------------------------------------------------------------------------------- #
# `competition folds` on the synthetic hands written as an RLE CSV
# --------------------------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def hands_rle(tmp_path_factory) -> Path:
    """The built-in synthetic hands (128 px, square) as an rle_csv data folder whose train.csv is
    row-major: images/<subject>/<stem>.png and train.csv (id, class, rle)."""
    root = tmp_path_factory.mktemp("hands-rle")
    import os
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = validate(CompetitionConfig, tiny_competition(name="gen", size=SIZE), "gen")
        polygons = make_adapter(cfg)  # generates data/gen
        out = root / "rle"
        rows = []
        for i in polygons.ids:
            (out / "images" / i).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(polygons.image_path(i), out / "images" / f"{i}.png")
            for c, m in zip(cfg.classes, polygons.load_mask(i)):
                if m.any():
                    rows.append((i, c, encode(m, "row-major")))
        pd.DataFrame(rows, columns=["id", "class", "rle"]).to_csv(out / "train.csv", index=False)
        return out
    finally:
        os.chdir(cwd)


def rle_config(proj: Path, data: Path, order: str, name: str = "hands-rle") -> CompetitionConfig:
    from competition.data.synthetic import CLASSES
    comp = {"name": name, "data_root": str(data), "format": "rle_csv", "classes": CLASSES,
            "groups": {"source": "folder"}, "folds": 3,
            "rle_csv": {"images": "images", "csv": "train.csv", "pixel_order": order, "test_images": None}}
    (proj / "configs/competitions" / f"{name}.yaml").write_text(yaml.safe_dump(comp))
    return load_competition(name)


def test_folds_refuses_the_transposed_order_with_the_evidence(project, hands_rle, capsys):
    from competition.cli import main
    cfg = rle_config(project, hands_rle, "column-major")
    with pytest.raises(LabelFitError, match=r"train\.csv: the masks fit their images better transposed: boundary "
                                            r"edge strength \d+\.\dx higher with row-major than the configured "
                                            r"column-major on [678] of 8 sampled square images \(ids ID0.*\); "
                                            r"set `rle_csv.pixel_order: row-major` in configs/competitions/"
                                            r"hands-rle.yaml"):
        run(cfg, make_adapter(cfg))
    assert not (project / "folds/hands-rle.csv").exists()
    assert main(["folds", "--comp", "hands-rle"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "fit their images better transposed" in err
    # The escape hatch skips only this check.
    path, _, created = run(cfg, make_adapter(cfg), label_check=False)
    assert created and path.is_file()


def test_folds_accepts_the_right_order(project, hands_rle, capsys):
    from competition.cli import main
    cfg = rle_config(project, hands_rle, "row-major")
    ev = check_pixel_order(cfg, make_adapter(cfg))
    assert ev is not None and ev.configured_fits_better and len(ev.fits) == 8
    other, mine = ev.prefer()
    assert not other and ev.ratio(list(ev.informative)) < 0.8
    assert main(["folds", "--comp", "hands-rle"]) == 0
    assert "no group spans two folds" in capsys.readouterr().out


def test_blank_images_are_not_refused(project, hands_rle, tmp_path):
    data = tmp_path / "blank"
    shutil.copytree(hands_rle, data)
    for p in (data / "images").rglob("*.png"):
        cv2.imwrite(str(p), np.zeros((SIZE, SIZE), np.uint8))
    cfg = rle_config(project, data, "column-major", name="blank")
    ev = order_evidence(cfg, make_adapter(cfg))
    assert ev is not None and not ev.informative and {f.reason for f in ev.fits.values()} == {"blank image"}
    path, _, created = run(cfg, make_adapter(cfg))
    assert created and path.is_file()


def test_formats_without_an_order_and_non_square_images_are_not_checked(tiny_project, tmp_path):
    cfg = load_competition("tiny-hands")  # polygon_json: no pixel-order setting
    assert order_evidence(cfg, make_adapter(cfg)) is None
    (tmp_path / "d/images").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "d/images/a.png"), np.zeros((8, 10), np.uint8))
    pd.DataFrame({"id": ["a"], "rle": ["1 3"]}).to_csv(tmp_path / "d/train.csv", index=False)
    cfg = CompetitionConfig(name="ns", data_root=str(tmp_path / "d"), format="rle_csv", classes=["x"],
                            rle_csv={"images": "images", "test_images": None})
    assert order_evidence(cfg, make_adapter(cfg)) is None
