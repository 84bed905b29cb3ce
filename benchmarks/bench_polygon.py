"""The polygon mask cache: samples/s on many-polygon labels, cached vs uncached.

The case: 4 microscopy-like 1024x768 8-bit grayscale PNGs, each labelled with 2,400 small polygons
(6-13 vertices, radius 3-9 px) over 3 overlapping classes: ~455 KiB of JSON per image, generated
into a temp project in a few seconds. Sides, every image once per round:

- cached: ``PolygonJsonAdapter.load_mask`` with the polygon mask cache (``runs/_cache/_polygons/``),
  filled in the warm-up round: a hit reads the label file (its hash is the key) and the packed mask.
- uncached: what ``load_mask`` did before the cache, ``rasterize(adapter.polygons(id), ...)``: the
  label parsed and validated, then every polygon rasterised at the requested size.

Masks alone at the 256² working size of a 256 px model and at the native 768x1024 (native OOF
scoring), then whole training samples (``SegDataset``, 256 px input, the baseline augmentations,
``data.workers: 0``): the epoch's data cost that remains is decode + resize + augment. Last, the
first epoch: a cold pass that rasterises and writes every file, against the uncached pass. The
outputs are asserted identical on every side.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np

from benchmarks.harness import Side, cached_vs_uncached, compare, temp_project
from competition.config import CompetitionConfig, ExperimentConfig
from competition.data.cache import cache_root
from competition.data.dataset import SegDataset
from competition.data.polycache import FOLDER
from competition.data.polygon_json import PolygonJsonAdapter, rasterize

CLASSES = ["nucleus", "cell", "vesicle"]
H, W, N_IMAGES, N_POLYGONS = 768, 1024, 4, 2400
WORK = (256, 256)
AUGMENT = [{"name": "Affine", "p": 0.5, "rotate": [-15, 15], "scale": [0.9, 1.1]},
           {"name": "RandomBrightnessContrast", "p": 0.5}]


def make_case(root: Path) -> None:
    rng = np.random.default_rng(0)
    for n in range(N_IMAGES):
        img = rng.normal(90, 12, (H, W)).astype(np.float32)
        anns = []
        for _ in range(N_POLYGONS):
            k = int(rng.integers(6, 14))
            r, a = rng.uniform(3, 9, k), np.sort(rng.uniform(0, 2 * np.pi, k))
            c = rng.uniform((10, 10), (W - 10, H - 10))
            pts = np.clip(c + np.c_[r * np.cos(a), r * np.sin(a)], 0, (W, H))
            label = CLASSES[int(rng.integers(0, len(CLASSES)))]
            anns.append({"label": label, "points": np.round(pts, 2).tolist()})
            cv2.fillPoly(img, [pts.astype(np.int32)], float(140 + 40 * CLASSES.index(label)))
        stem = f"S{n // 2}/slice{n}"
        (root / "train/DCM" / stem).parent.mkdir(parents=True, exist_ok=True)
        (root / "train/outputs_json" / stem).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "train/DCM" / f"{stem}.png"), np.clip(img, 0, 255).astype(np.uint8))
        (root / "train/outputs_json" / f"{stem}.json").write_text(json.dumps({"annotations": anns}))


class Uncached(PolygonJsonAdapter):
    """The adapter as it was before the cache: every mask parsed and rasterised on every call."""

    def load_mask(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray:
        src = self.image_size(image_id)
        return rasterize(self.polygons(image_id), src, size or src, len(self.classes))


def masks(adapter, size) -> list[np.ndarray]:
    return [adapter.load_mask(i, size) for i in adapter.ids]


def samples(ds: SegDataset) -> list:
    return [(s["image"], s["mask"]) for s in (ds[k] for k in range(len(ds)))]


def dataset(adapter) -> SegDataset:
    exp = ExperimentConfig.model_validate({
        "name": "bench-polygon", "competition": adapter.cfg.name, "augment": {"train": AUGMENT},
        "data": {"input_size": WORK[0], "batch_size": 1, "workers": 0}})
    return SegDataset(adapter, adapter.ids, exp, adapter.cfg.task, "train")


def main() -> None:
    with temp_project() as root:  # the cache lives in <project>/runs/_cache: here, the temp project
        make_case(root / "data")
        cfg = CompetitionConfig(name="bench-polygons", data_root=str(root / "data"), format="polygon_json",
                                classes=CLASSES)
        _main(PolygonJsonAdapter(cfg), Uncached(cfg))


def _main(cached, plain) -> None:
    n = len(cached.ids)
    label = cached.label_path(cached.ids[0])
    print(f"   {n} images {W}x{H}, {N_POLYGONS} polygons each over {len(CLASSES)} classes "
          f"({label.stat().st_size / 1024:.0f} KiB of JSON per image); every image once per round", flush=True)
    summary = []
    for size, what in ((WORK, f"{WORK[0]}² working size"), ((H, W), f"native {H}x{W}")):
        _, ratio = cached_vs_uncached(f"polygon masks at the {what}: {N_POLYGONS} polygons per image",
                                      Side(lambda: masks(cached, size), note="label hashed + packed mask read"),
                                      Side(lambda: masks(plain, size), note="label parsed + polygons rasterised"), n)
        summary.append(f"masks at {what} {ratio:.0f}x")

    ds_cached, ds_plain = dataset(cached), dataset(plain)
    _, ratio = cached_vs_uncached(f"training samples, {W}x{H} PNG + {N_POLYGONS} polygons -> {WORK[0]}² "
                                  f"(baseline augment, data.workers 0)",
                                  Side(lambda: samples(ds_cached),
                                       note="decode + resize + augment; mask from the cache"),
                                  Side(lambda: samples(ds_plain), note="+ parse and rasterise every epoch"), n)
    summary.append(f"training samples {ratio:.1f}x")

    folder = cache_root() / FOLDER

    def cold() -> list[np.ndarray]:
        shutil.rmtree(folder, ignore_errors=True)
        return masks(cached, WORK)

    res = compare(f"the first epoch: masks at {WORK[0]}², every file written (packbits + atomic write + fsync)",
                  Side(cold, note="cache emptied before each round"), {"uncached": lambda: masks(plain, WORK)},
                  ours_label="cold cache", rounds=5)
    summary.append(f"first epoch {res.min('cold cache') / res.min('uncached') - 1:+.0%} vs uncached")
    print("   polygon mask cache: " + "; ".join(summary), flush=True)


if __name__ == "__main__":
    main()
