"""Sample loading: a 2048² grayscale PNG with 29 polygon labels -> a 1024² training sample.

Ours (adapter (a)): decode as grayscale uint8, resize once, rasterize the polygons directly at 1024²
with scaled sub-pixel coordinates, uint8 mask. Baseline (the usual hand-bone dataset code): decode as
float32 3-channel, rasterize every annotation into its own full-size channel of an (H, W, 29) label,
resize image and label to 1024 with albumentations, convert both to float tensors.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch

from competition.config import CompetitionConfig
from competition.data.adapters import make_adapter
from competition.data.dataset import resize_image, to_tensor

N_CLASSES, SIZE, OUT = 29, 2048, 1024


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


def baseline(root: Path, classes: list[str]):
    image = cv2.imread(str(root / "train/DCM/ID000/image0.png"))
    image = image / 255.0
    image = image.astype(np.float32)
    anns = json.loads((root / "train/outputs_json/ID000/image0.json").read_text())["annotations"]
    label = np.zeros(image.shape[:2] + (len(classes),), dtype=np.uint8)
    for ann in anns:
        class_label = np.zeros(image.shape[:2], dtype=np.uint8)
        cv2.fillPoly(class_label, [np.array(ann["points"], dtype=np.int32)], 1)
        label[..., classes.index(ann["label"])] = class_label
    out = A.Resize(OUT, OUT)(image=image, mask=label)
    image, label = out["image"].transpose(2, 0, 1), out["mask"].transpose(2, 0, 1)
    return torch.from_numpy(image).float(), torch.from_numpy(label).float()


def ours(adapter, image_id: str):
    img = resize_image(adapter.load_image(image_id), (OUT, OUT))
    return to_tensor(img), torch.from_numpy(adapter.load_mask(image_id, (OUT, OUT)))


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    classes = [f"c{c}" for c in range(N_CLASSES)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_case(root)
        cfg = CompetitionConfig(name="bench", data_root=str(root), format="polygon_json", classes=classes)
        adapter = make_adapter(cfg)
        image_id = adapter.ids[0]
        _, label_b = baseline(root, classes)
        _, mask_o = ours(adapter, image_id)
        a, b = mask_o.bool(), label_b.bool()
        iou = ((a & b).sum((1, 2)).double() / (a | b).sum((1, 2)).clamp(min=1).double()).mean().item()
        t_base = best_of(lambda: baseline(root, classes))
        t_ours = best_of(lambda: ours(adapter, image_id))
        t_decode = best_of(lambda: adapter.load_image(image_id))
    print(f"sample loading 2048² + 29 polygons -> 1024²: ours {t_ours * 1e3:.1f} ms, baseline "
          f"{t_base * 1e3:.1f} ms -> speed-up {t_base / t_ours:.1f}x (target >=8x); "
          f"PNG decode alone {t_decode * 1e3:.1f} ms; mean IoU of the two masks {iou:.4f} (must be >=0.99)")


if __name__ == "__main__":
    main()
