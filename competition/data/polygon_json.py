"""Adapter (a): polygon JSON in the hand-bone layout.

    train/DCM/<ID>/<img>.png           the images; <ID> (the subject) is the group
    train/outputs_json/<ID>/<img>.json {"annotations": [{"label": ..., "points": [[x, y], ...]}, ...]}
    test/DCM/<ID>/<img>.png

Several polygons may share a label (they are unioned); classes overlap. Polygons are rasterized
directly at the requested size with scaled sub-pixel coordinates, which is both faster and sharper
than rasterizing 29 full-size channels and resizing them (the hand-bone teams' usual path).
Many-polygon label files are rasterised once per size and read back from the polygon mask cache
(:mod:`competition.data.polycache`).
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from competition.config import ConfigError
from competition.data.base import ADAPTERS, Adapter, DataError, check_unique, read_data_text, safe_join, walk_files
from competition.data.polycache import PolygonMaskCache

_SHIFT = 4  # cv2.fillPoly fixed-point bits: polygon vertices keep 1/16 px precision after scaling
_SS = 4  # supersampling factor when rasterizing at a size other than the image's own


def _list_images(folder: Path, ext: str, root: Path) -> dict[str, Path]:
    """``<ID>/<stem>`` -> file for every ``<ID>/<stem><ext>`` in ``folder``; symlinks must stay in ``root``."""
    if not folder.is_dir():
        return {}
    files = walk_files(folder, root, lambda name: name.endswith(ext), max_depth=1)
    found = dict(sorted((f"{p.parent.name}/{p.stem}", p) for p in files if p.parent != folder))
    check_unique([p.name for p in found.values()], str(folder))  # submissions name images by file name
    return found


_EXPECTED = '{"annotations": [{"label": ..., "points": [[x, y], ...]}, ...]}'
# Exact types: bool is a subclass of int, and true/false as coordinates is a broken export, not 1/0.
_NUMBER_TYPES = (int, float)


def _annotations(path: Path) -> list:
    """The ``annotations`` list of a label file, or a DataError naming the file and the expected shape."""
    text = read_data_text(path, "label file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: expected JSON {_EXPECTED}, but it is not valid JSON ({e.msg} at line "
                        f"{e.lineno})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected JSON {_EXPECTED}, but the top level is a JSON {_json_type(data)}, "
                        f"not an object")
    anns = data.get("annotations")
    if not isinstance(anns, list):
        got = "missing" if "annotations" not in data else f"a JSON {_json_type(anns)}"
        raise DataError(f'{path}: expected JSON {_EXPECTED}, but "annotations" is {got}')
    return anns


def _json_type(value) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _points(raw, where: str) -> np.ndarray:
    """(k, 2) float64 of an annotation's ``points``: JSON numbers only, at least 3 finite [x, y] pairs.

    Strings ("12.5") and booleans would pass a plain float conversion; they mean a broken export,
    so they are refused rather than silently converted.
    """
    if isinstance(raw, list):
        for k, pt in enumerate(raw):
            if isinstance(pt, list) and any(type(v) not in _NUMBER_TYPES for v in pt):
                raise DataError(f"{where} has non-numeric points: point {k} is {pt!r}; coordinates must "
                                f"be JSON numbers (not strings, booleans or null)")
    try:
        pts = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{where} has non-numeric points or points that are not [x, y] pairs; "
                        f"expected [[x, y], ...] with numbers") from None
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3 or not np.isfinite(pts).all():
        raise DataError(f"{where} needs at least 3 finite [x, y] points, got shape {pts.shape}")
    return pts


def rasterize(polygons: list[tuple[int, np.ndarray]], src: tuple[int, int], dst: tuple[int, int],
              num_classes: int) -> np.ndarray:
    """(C, h, w) uint8 mask of (class index, points in ``src`` = (H, W) pixels) polygons at ``dst``.

    At the native size this is plain ``cv2.fillPoly``, the convention competition truths are made
    with. Scaled, each polygon is filled 4x supersampled inside its own bounding box and a pixel is
    set when the polygon covers at least half of it: the area-downsampled full-size mask, at a cost
    proportional to the polygon's area rather than to 29 full-size channels.
    """
    (h0, w0), (h, w) = src, dst
    mask = np.zeros((num_classes, h, w), np.uint8)
    if (h, w) == (h0, w0):
        for k, pts in polygons:
            cv2.fillPoly(mask[k], [np.round(pts * (1 << _SHIFT)).astype(np.int32)], 1, shift=_SHIFT)
        return mask
    # Pixel-centre aligned scaling, the convention cv2.resize uses, so masks line up with resized images.
    scale = np.array([w / w0, h / h0])
    for k, pts in polygons:
        p = (pts + 0.5) * scale - 0.5
        x0, y0 = np.maximum(np.floor(p.min(0)).astype(int), 0)
        x1, y1 = np.minimum(np.ceil(p.max(0)).astype(int) + 1, (w, h))
        if x1 <= x0 or y1 <= y0:
            continue
        patch = np.zeros(((y1 - y0) * _SS, (x1 - x0) * _SS), np.uint8)
        q = ((p - (x0, y0)) + 0.5) * _SS - 0.5
        cv2.fillPoly(patch, [np.round(q * (1 << _SHIFT)).astype(np.int32)], 255, shift=_SHIFT)
        cover = cv2.resize(patch, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
        mask[k, y0:y1, x0:x1] |= (cover >= 128).astype(np.uint8)
    return mask


@ADAPTERS.register("polygon_json")
class PolygonJsonAdapter(Adapter):
    @cached_property
    def _train(self) -> dict[str, Path]:
        spec = self.cfg.polygon_json
        folder = safe_join(self.root, spec.train_images, "polygon_json.train_images")
        images = _list_images(folder, spec.image_ext, self.root)
        if not images:
            raise DataError(f"{folder}: no training images found (expected <ID>/<image>{spec.image_ext})")
        return images

    @cached_property
    def _test(self) -> dict[str, Path]:
        spec = self.cfg.polygon_json
        return _list_images(safe_join(self.root, spec.test_images, "polygon_json.test_images"), spec.image_ext,
                            self.root)

    def groups(self) -> dict[str, str]:
        src = self.cfg.groups.source
        if src == "folder":
            return {i: i.split("/", 1)[0] for i in self.ids}
        if src == "none":
            return {i: i for i in self.ids}
        raise DataError(f"groups.source {src!r} is not supported by the polygon_json format "
                        f"(valid: folder, none)")

    def label_path(self, image_id: str) -> Path:
        spec = self.cfg.polygon_json
        return safe_join(self.root, Path(spec.train_labels) / f"{image_id}.json", "label file")

    def polygons(self, image_id: str, void: bool = False) -> list[tuple[int, np.ndarray]]:
        """(class index, (k, 2) float64 points in image pixels) per annotation, validated; ``void``: the
        void polygons (label ``ignore.value``) instead, each as class 0."""
        path = self.label_path(image_id)
        if not path.is_file():
            raise DataError(f"{path}: label file not found for image {image_id!r}")
        anns = _annotations(path)
        h, w = self.image_size(image_id)
        index = {c: k for k, c in enumerate(self.classes)}
        void_label = self._void_label()
        out = []
        for n, ann in enumerate(anns):
            label = ann.get("label") if isinstance(ann, dict) else None
            is_void = void_label is not None and label == void_label
            if not is_void and (not isinstance(label, str) or label not in index):  # a list label would not even hash
                raise DataError(f"{path}: annotation {n} has unknown label {label!r}; "
                                f"valid: {', '.join(self.classes)}")
            pts = _points(ann.get("points"), f"{path}: annotation {n} ({label})")
            if (pts < 0).any() or (pts[:, 0] > w).any() or (pts[:, 1] > h).any():
                raise DataError(f"{path}: annotation {n} ({label}) has points outside the {w}x{h} image "
                                f"(x in [0, {w}], y in [0, {h}] expected)")
            if is_void == void:
                out.append((0 if is_void else index[label], pts))
        return out

    def _void_label(self) -> str | None:
        """``ignore.value``: the label of the void polygons (not a class)."""
        if self.cfg.ignore is None:
            return None
        v = str(self.cfg.ignore.value)
        if v in self.classes:
            raise ConfigError(f"{self.cfg.name}: ignore.value {v!r} is a class name; it names the label of "
                              f"the void polygons, so it must differ from every class")
        return v

    def void_region(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray:
        """The union of the image's void polygons, rasterised as class polygons are."""
        src = self.image_size(image_id)
        dst = (int(size[0]), int(size[1])) if size else src
        void = self._mask_cache.load(image_id, self.label_path(image_id), src, dst,
                                     lambda: rasterize(self.polygons(image_id, void=True), src, dst, 1),
                                     kind="void", channels=1)
        return void[0].astype(bool)

    def presence(self, image_id: str) -> np.ndarray:
        out = np.zeros(len(self.classes), bool)
        out[[k for k, _ in self.polygons(image_id)]] = True
        return out

    def load_mask(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray:
        src = self.image_size(image_id)
        dst = (int(size[0]), int(size[1])) if size else src
        return self._mask_cache.load(image_id, self.label_path(image_id), src, dst,
                                     lambda: self._rasterize_mask(image_id, src, dst))

    # -- the polygon mask cache (competition.data.polycache) ------------------------------------
    @cached_property
    def _mask_cache(self):
        return PolygonMaskCache(self.cfg, Path(__file__))

    def _rasterize_mask(self, image_id: str, src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
        """The uncached mask: the label file parsed and validated, its polygons rasterised at ``dst``."""
        return rasterize(self.polygons(image_id), src, dst, len(self.classes))
