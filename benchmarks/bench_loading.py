"""Sample loading: a 2048² grayscale PNG with 29 polygon labels -> a 1024² training sample.

Every side returns the same thing: the 1-channel float32 (1, 1024, 1024) image tensor, normalised by
``competition.data.dataset.to_tensor``, and a uint8 {0, 1} (29, 1024, 1024) mask tensor.

- ours (the ``polygon_json`` adapter): decode as grayscale uint8, ``resize_image`` (INTER_AREA),
  each polygon rasterised directly at 1024² from sub-pixel coordinates, 4x supersampled inside its
  bounding box, a pixel set when at least half covered.
- notebook: the usual hand-bone dataset code made to return our types: every annotation rasterised
  into its own full-size channel of an (H, W, 29) label, image and label resized by albumentations
  (INTER_AREA for the image, as ours; nearest for the mask, albumentations' rule for masks).
- careful: the definition ours approximates, in plain OpenCV: each class filled at 2048² from
  sub-pixel coordinates into one reused buffer, area-downsampled to 1024² and thresholded at half.

The images are identical; the masks are not (the line names the difference and the agreement).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch

from benchmarks.harness import compare
from competition.config import CompetitionConfig
from competition.data.adapters import make_adapter
from competition.data.dataset import resize_image, to_tensor

N_CLASSES, SIZE, OUT = 29, 2048, 1024
SHIFT = 8  # fractional bits for cv2.fillPoly's sub-pixel vertices


def make_case(root: Path) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    img = 60 + 80 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.6) ** 2) * 6)  # soft tissue, smooth like an X-ray
    anns = []
    for c in range(N_CLASSES):
        cx, cy = rng.uniform(300, 1750, 2)
        # Semi-axes of hand-bone classes at 2048²: ~30 px (distal phalanges, pisiform) to ~300 px (radius).
        ax, ay = rng.uniform(30, 150), rng.uniform(45, 300)
        t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
        a = rng.uniform(0, np.pi)
        pts = np.c_[ax * np.cos(t), ay * np.sin(t)] @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
        pts += [cx, cy]
        anns.append({"label": f"c{c}", "points": np.round(pts, 1).tolist()})
        cv2.fillPoly(img, [pts.astype(np.int32)], float(rng.uniform(150, 220)))
    img = cv2.GaussianBlur(img, (0, 0), 2) + rng.normal(0, 2, img.shape)
    (root / "train/DCM/ID000").mkdir(parents=True)
    (root / "train/outputs_json/ID000").mkdir(parents=True)
    cv2.imwrite(str(root / "train/DCM/ID000/image0.png"), np.clip(img, 0, 255).astype(np.uint8))
    (root / "train/outputs_json/ID000/image0.json").write_text(json.dumps({"annotations": anns}))


def notebook(root: Path, classes: list[str]):
    image = cv2.imread(str(root / "train/DCM/ID000/image0.png"), cv2.IMREAD_GRAYSCALE)
    anns = json.loads((root / "train/outputs_json/ID000/image0.json").read_text())["annotations"]
    label = np.zeros(image.shape[:2] + (len(classes),), dtype=np.uint8)
    for ann in anns:
        class_label = np.zeros(image.shape[:2], dtype=np.uint8)
        cv2.fillPoly(class_label, [np.array(ann["points"], dtype=np.int32)], 1)
        label[..., classes.index(ann["label"])] = class_label
    out = A.Resize(OUT, OUT, interpolation=cv2.INTER_AREA)(image=image, mask=label)
    return to_tensor(out["image"]), torch.from_numpy(np.ascontiguousarray(out["mask"].transpose(2, 0, 1)))


def careful(root: Path, classes: list[str]):
    image = cv2.imread(str(root / "train/DCM/ID000/image0.png"), cv2.IMREAD_GRAYSCALE)
    anns = json.loads((root / "train/outputs_json/ID000/image0.json").read_text())["annotations"]
    index = {c: k for k, c in enumerate(classes)}
    by_class: dict[int, list[np.ndarray]] = {}
    for ann in anns:
        by_class.setdefault(index[ann["label"]], []).append(np.array(ann["points"], np.float64))
    full = np.empty(image.shape[:2], np.uint8)
    small = np.empty((OUT, OUT), np.uint8)
    mask = np.zeros((len(classes), OUT, OUT), np.uint8)
    for k, polys in by_class.items():
        full[:] = 0
        cv2.fillPoly(full, [np.round(p * (1 << SHIFT)).astype(np.int32) for p in polys], 255, shift=SHIFT)
        cv2.resize(full, (OUT, OUT), dst=small, interpolation=cv2.INTER_AREA)
        np.greater_equal(small, 128, out=mask[k], casting="unsafe")
    return to_tensor(resize_image(image, (OUT, OUT))), torch.from_numpy(mask)


def ours(adapter, image_id: str):
    img = resize_image(adapter.load_image(image_id), (OUT, OUT))
    return to_tensor(img), torch.from_numpy(adapter.load_mask(image_id, (OUT, OUT)))


def same_sample(how: str):
    def check(a, b) -> str:
        (img_a, mask_a), (img_b, mask_b) = a, b
        assert img_a.shape == img_b.shape == (1, OUT, OUT) and img_a.dtype == img_b.dtype == torch.float32
        assert mask_a.shape == mask_b.shape == (N_CLASSES, OUT, OUT) and mask_a.dtype == mask_b.dtype == torch.uint8
        img_diff = (img_a - img_b).abs().max().item()
        assert img_diff <= 1e-6, f"images differ by {img_diff}"
        x, y = mask_a.bool(), mask_b.bool()
        iou = ((x & y).sum((1, 2)).double() / (x | y).sum((1, 2)).clamp(min=1).double())
        differ = (x != y).double().mean().item()
        assert iou.mean().item() >= 0.99, f"mean IoU {iou.mean().item():.4f} < 0.99"
        return (f"same types and shapes (float32 (1, {OUT}, {OUT}) image, uint8 ({N_CLASSES}, {OUT}, {OUT}) mask); "
                f"images identical; masks differ ({how}): mean IoU per class {iou.mean().item():.4f} (min "
                f"{iou.min().item():.4f}, required mean >= 0.99), {differ:.3%} of mask pixels differ")
    return check


def main() -> None:
    classes = [f"c{c}" for c in range(N_CLASSES)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_case(root)
        cfg = CompetitionConfig(name="bench", data_root=str(root), format="polygon_json", classes=classes)
        adapter = make_adapter(cfg)
        image_id = adapter.ids[0]
        checks = {
            "notebook": same_sample("peer: integer vertices at 2048², nearest-neighbour downsizing"),
            "careful": same_sample("peer: exact 2048²-pixel coverage >= 1/2; ours: coverage on a 4x supersampled "
                                   "1024² grid"),
        }
        compare(f"sample loading {SIZE}² + {N_CLASSES} polygons -> {OUT}² (1-channel image, uint8 mask)",
                lambda: ours(adapter, image_id),
                {"notebook": lambda: notebook(root, classes), "careful": lambda: careful(root, classes)},
                rounds=5, check=checks)


if __name__ == "__main__":
    main()
