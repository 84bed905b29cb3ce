"""Torch datasets over an adapter, and the epoch sampler (shuffling, rare-class oversampling, DDP shards).

Geometry: augmentation runs at the *target* resolution (input size x the model's output scale) so
image and mask stay aligned through every geometric transform; the image is then shrunk to the
network input. Every sample's randomness is seeded from (seed, epoch, index), so a resumed run sees
exactly the batches an uninterrupted run would have, whatever the number of workers.

Sizes are (h, w): ``data.input_size`` may be non-square. ``data.resize`` says how a whole image
reaches its canvas (:meth:`Geometry.whole`): ``stretch`` resizes it to the canvas; ``letterbox``
keeps its aspect ratio, resizing it to fit (:meth:`Geometry.content`) and padding the bottom and
right with zeros (image) and background (mask), for training, validation and test alike (one
geometry: augmentations see the padded canvas). Predictions are brought back by
:func:`unletterbox`: the content region cropped, then resized.

Ignored pixels (the competition's ``ignore``; :meth:`Adapter.load_ignore`) travel *in band*: the
target holds ``IGNORE_INDEX`` (255) there. Multiclass targets are int64 (h, w) class indices (0 =
background) with 255 where ignored; multilabel targets are uint8 (C, h, w) in {0, 1} with 255 on
every channel of an ignored pixel. Masks keep that encoding through albumentations (nearest
interpolation keeps values), batch mixing and the losses (``ignore_index``); the sample cache
stores the ignore region as one more bit-packed channel.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from competition.config import IGNORE_INDEX, ExperimentConfig
from competition.data import cache as sample_cache  # log_once looked up when called, as before: tests replace it
from competition.data.base import Adapter
from competition.data.cache import CacheDamaged, SampleCache, uniform_work_size
from competition.data.transfer import from_bits, normalize, pack
from competition.data.transforms import build_pipeline


@dataclass(frozen=True)
class Geometry:
    """Sizes (h, w) in pixels: the network input, the target/output, and the whole-image canvas."""

    input_size: tuple[int, int]
    output_scale: int
    policy: str
    crop_from: int | None
    resize: str = "stretch"

    @classmethod
    def from_config(cls, exp: ExperimentConfig) -> "Geometry":
        return cls(exp.data.input_hw, exp.model.output_scale, exp.data.policy, exp.data.crop_from,
                   exp.data.resize)

    @property
    def output_size(self) -> tuple[int, int]:
        return self.input_size[0] * self.output_scale, self.input_size[1] * self.output_scale

    def whole(self, native: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the canvas a whole image is brought to before the network (validation, OOF, test)."""
        if self.policy == "crop":
            return (self.crop_from, self.crop_from) if self.crop_from else tuple(native)
        return tuple(self.input_size)

    def content(self, native: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the part of ``canvas`` the image fills: all of it (stretch), or the image's
        aspect ratio fitted inside it (letterbox, top-left; the rest is padding)."""
        if self.resize == "stretch":
            return tuple(canvas)
        return fit(native, canvas)


def fit(native: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """The largest (h, w) of ``native``'s aspect ratio inside ``canvas`` (one side equals the canvas')."""
    (H, W), (h, w) = native, canvas
    s = min(h / H, w / W)
    return min(h, max(1, round(H * s))), min(w, max(1, round(W * s)))


def pad_to(arr: np.ndarray, canvas: tuple[int, int], channels_first: bool = False) -> np.ndarray:
    """Zero-pad the bottom and right of an (h, w[, c]) image or a (C, h, w) mask up to ``canvas``."""
    h, w = arr.shape[1:3] if channels_first else arr.shape[:2]
    ph, pw = canvas[0] - h, canvas[1] - w
    if not (ph or pw):
        return arr
    if ph < 0 or pw < 0:
        raise ValueError(f"pad_to: {(h, w)} does not fit in {tuple(canvas)}")
    pads = [(0, ph), (0, pw)]
    pads = [(0, 0)] + pads if channels_first else pads + [(0, 0)] * (arr.ndim - 2)
    return np.pad(arr, pads)


def unletterbox(probs: torch.Tensor, content: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(..., C, h, w) predictions on a canvas -> the content region (top-left ``content``) resized
    (bilinear, half-pixel centres) to ``size``: what undoes :meth:`Geometry.content` + :func:`pad_to`."""
    ch, cw = content
    p = probs[..., :ch, :cw]
    if tuple(p.shape[-2:]) == tuple(size):
        return p
    lead = p.shape[:-3]
    flat = p.reshape(-1, *p.shape[-3:])
    out = F.interpolate(flat.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, *out.shape[-3:])


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    shrink = h < img.shape[0] and w < img.shape[1]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8/uint16 (H, W[, 3]) -> normalised float32 (C, H, W) (:func:`competition.data.transfer.normalize`)."""
    return normalize(torch.from_numpy(np.ascontiguousarray(img))[None])[0]


def with_ignore(mask: np.ndarray, ignore: np.ndarray | None) -> np.ndarray:
    """(C, h, w) {0, 1} mask and (h, w) ignore region -> the in-band mask: IGNORE_INDEX on every
    channel where ignored (the module docstring)."""
    if ignore is None or not ignore.any():
        return mask
    out = mask.copy()
    out[:, ignore.astype(bool)] = IGNORE_INDEX
    return out


def to_target(mask: np.ndarray, task: str) -> torch.Tensor:
    """(C, h, w) uint8 (in-band ignore) -> the loss target: uint8 (C, h, w) multilabel, int64 (h, w)
    multiclass (0 = background); IGNORE_INDEX stays where ignored."""
    if task == "multilabel":
        return torch.from_numpy(np.ascontiguousarray(mask))
    idx = np.zeros(mask.shape[1:], np.int64)
    for k in range(len(mask)):  # later classes win where exclusive labels were drawn overlapping
        idx[mask[k] == 1] = k + 1
    if len(mask):
        idx[mask[0] == IGNORE_INDEX] = IGNORE_INDEX
    return torch.from_numpy(idx)


class SegDataset(Dataset):
    """``mode``: ``train`` (augment, crop policy crops), ``val`` (whole images + masks), ``test`` (images)."""

    def __init__(self, adapter: Adapter, ids: list[str], exp: ExperimentConfig, task: str, mode: str,
                 split: str = "train"):
        self.adapter, self.ids, self.task, self.mode, self.split = adapter, list(ids), task, mode, split
        self.geo = Geometry.from_config(exp)
        self.ignore = getattr(adapter.cfg, "ignore", None) is not None
        self.seed = exp.train.seed
        self.epoch = 0
        # Compact samples (competition.data.transfer) for loaders with worker processes: set by the loader.
        self.compact = False
        self.pre = build_pipeline(exp.augment.preprocess, "augment.preprocess")
        self.aug = build_pipeline(exp.augment.train, "augment.train") if mode == "train" else None
        # data.cache: decoded + resized images and rasterised masks at the working size, memory-mapped
        # (competition.data.cache); preprocess and augmentations still run on every access.
        self.cache = self._open_cache() if exp.data.cache else None

    def _open_cache(self):
        s = self.geo.output_scale
        if self.geo.policy == "resize" or self.geo.crop_from:
            h, w = self.geo.whole((1, 1))
            work = (h * s, w * s)
        else:  # crop at native sizes: one cache only if every image of the split has the same size
            all_ids = self.adapter.ids if self.split == "train" else self.adapter.test_ids
            work = uniform_work_size(self.adapter, self.split, all_ids, self.geo.whole, s)
            if work is None:
                sample_cache.log_once(f"data.cache: skipped for {self.adapter.cfg.name} ({self.split}): with "
                                      f"data.policy crop and no data.crop_from every image is worked at its own "
                                      f"size, and these sizes differ; set data.crop_from (or policy: resize) to "
                                      f"cache; loading without a cache")
                return None
        return SampleCache.for_dataset(self.adapter, self.split, work, resize=self.geo.resize)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def _passthrough(self) -> bool:
        """Compact samples can go from the cache row to the trainer as stored: nothing transforms the
        pixels (no preprocess, augmentation or random crop) and the mask is multilabel with no void."""
        return (self.compact and self.cache is not None and self.task == "multilabel" and not self.ignore
                and self.mode != "test" and not self.pre.transforms
                and (self.aug is None or (not self.aug.transforms and self.geo.policy != "crop")))

    def _from_cache_bits(self, image_id: str, index: int) -> dict | None:
        """:meth:`__getitem__`'s compact sample built from the cache row's bits (no unpack and re-pack:
        a 29 x 1024² mask is 3.6 MiB packed, 29 MiB unpacked); None when the row is not filled yet."""
        row = self.cache.row_of.get(image_id)
        if row is None:
            return None
        try:
            img, bits = self.cache.image(row), self.cache.mask_bits(row)
        except (OSError, ValueError, CacheDamaged):
            return None  # _cached decides what an unreadable cache means
        if img is None or bits is None:
            return None
        s = self.geo.output_scale
        out_hw = (img.shape[0] // s, img.shape[1] // s)
        return {**from_bits(resize_image(img, out_hw), bits, self.cache.work[1]), "index": index}

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        if self._passthrough() and (sample := self._from_cache_bits(image_id, index)) is not None:
            return sample
        s = self.geo.output_scale
        img, mask = self._cached(image_id) if self.cache is not None else (None, None)
        if img is None:
            img, mask = self._decode(image_id, self.mode != "test")
        seed = [self.seed, self.epoch, index]
        img, mask = self._apply(self.pre, img, mask, seed + [0])
        if self.aug is not None:
            img, mask = self._apply(self.aug, img, mask, seed + [1])
            if self.geo.policy == "crop":
                img, mask = self._crop(img, mask, np.random.default_rng(seed + [2]))
        out_hw = (img.shape[0] // s, img.shape[1] // s)
        target = to_target(mask, self.task) if mask is not None else None
        if self.compact:  # for a worker process: competition.data.transfer
            return {**pack(resize_image(img, out_hw), target, self.task), "index": index}
        out = {"image": to_tensor(resize_image(img, out_hw)), "index": index}
        if target is not None:
            out["mask"] = target
        return out

    def _work_size(self, image_id: str) -> tuple[int, int]:
        # Work at the target resolution; the image is shrunk to the network input at the end.
        whole = self.geo.whole(self.adapter.image_size(image_id, self.split))
        s = self.geo.output_scale
        return whole[0] * s, whole[1] * s

    def _decode(self, image_id: str, with_mask: bool):
        """The deterministic, expensive part: decode + resize to the working size, mask rasterised there."""
        work = self._work_size(image_id)
        img = self._image_at(image_id, work)
        return img, (self._merged(self._labels_at(image_id, work)) if with_mask else None)

    def _content(self, image_id: str, work: tuple[int, int]) -> tuple[int, int]:
        return self.geo.content(self.adapter.image_size(image_id, self.split), work)

    def _image_at(self, image_id: str, work: tuple[int, int]) -> np.ndarray:
        """The image resized to its content size in ``work`` and padded to ``work`` (letterbox)."""
        img = resize_image(self.adapter.load_image(image_id, self.split), self._content(image_id, work))
        return pad_to(img, work)

    def _labels_at(self, image_id: str, work: tuple[int, int]) -> np.ndarray:
        """(C[+1], h, w) {0, 1} at ``work``: the mask, plus the ignore region as a last channel when the
        competition has one (the layout the sample cache stores)."""
        content = self._content(image_id, work)
        mask = self.adapter.load_mask(image_id, content)
        if self.ignore:
            ign = self.adapter.load_ignore(image_id, content, mask)
            ign = np.zeros(mask.shape[1:], bool) if ign is None else ign  # e.g. pseudo-labels: no void
            mask = np.concatenate([mask, ign[None].astype(np.uint8)])
        return pad_to(mask, work, channels_first=True)

    def _merged(self, labels: np.ndarray) -> np.ndarray:
        """:meth:`_labels_at`'s layout -> the in-band (C, h, w) mask."""
        return with_ignore(labels[:-1], labels[-1]) if self.ignore else labels

    def _cached(self, image_id: str):
        """(image, mask) through the cache, filling what is missing; (None, None) to load uncached."""
        c = self.cache
        row = c.row_of.get(image_id)
        if row is None:
            return None, None
        with_mask = self.mode != "test"
        try:
            img = c.image(row)
            mask = c.mask(row) if with_mask else None
            stored = True
            if img is None:  # not filled, or failed its checksum: fill it (another process may too: same bytes)
                img = self._image_at(image_id, c.work)
                stored = c.put_image(row, img)
            if with_mask and mask is None:
                mask = self._labels_at(image_id, c.work)
                stored = c.put_mask(row, mask) and stored
            if not stored:  # a layout the cache cannot hold exactly: never cache this dataset
                sample_cache.log_once(f"data.cache: disabled for {c.display()}: {image_id!r} gave an image "
                                      f"{img.dtype} {img.shape} / mask "
                                      f"{None if mask is None else (mask.dtype, mask.shape)} that does not fit "
                                      f"its layout ({c.image_dtype} {c.image_shape}, {{0, 1}} uint8 masks); "
                                      f"loading without a cache")
                self.cache = None
            return img, (None if mask is None else self._merged(mask))
        except (OSError, ValueError, CacheDamaged) as e:
            # An unreadable or vanished cache must not stop a run; CacheDamaged is a damaged folder
            # that could not be rebuilt (a read-only disk), its message naming the file.
            sample_cache.log_once(f"data.cache: disabled for {c.display()} after an error ({type(e).__name__}: {e}); "
                                  f"loading without a cache")
            self.cache = None
            return None, None

    def _apply(self, pipe, img, mask, seed):
        if not pipe.transforms:
            return img, mask
        pipe.set_random_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        if mask is None:
            return pipe(image=img)["image"], None
        r = pipe(image=img, mask=np.ascontiguousarray(mask.transpose(1, 2, 0)))
        return r["image"], np.ascontiguousarray(r["mask"].transpose(2, 0, 1))

    def _crop(self, img, mask, rng):
        ch, cw = self.geo.output_size
        h, w = img.shape[:2]
        if h < ch or w < cw:  # pad small images rather than fail
            py, px = max(0, ch - h), max(0, cw - w)
            img = np.pad(img, ((0, py), (0, px)) + ((0, 0),) * (img.ndim - 2))
            mask = np.pad(mask, ((0, 0), (0, py), (0, px)))
            h, w = img.shape[:2]
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        return img[y:y + ch, x:x + cw], mask[:, y:y + ch, x:x + cw]


class EpochSampler(Sampler):
    """Shuffled (or weighted, with replacement) indices for one epoch, seeded by (seed, epoch),
    then sharded across DDP ranks: every rank draws the same permutation and takes its slice."""

    def __init__(self, n: int, seed: int, weights: np.ndarray | None = None, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch = 0
        self.per_rank = -(-n // world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is None:
            idx = torch.randperm(self.n, generator=g)
        else:
            idx = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        idx = torch.cat([idx, idx[: self.per_rank * self.world - self.n]])  # equal shards for DDP
        return iter(idx[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return self.per_rank


def rare_class_weights(presence: np.ndarray, oversample: float, quantile: float) -> np.ndarray | None:
    """Sampling weight per image: 1 + ``oversample`` for images holding a rare class, else 1.

    A class is rare when it is present in at most the ``quantile``-quantile of per-class image counts.
    """
    if oversample <= 0:
        return None
    counts = presence.sum(0)
    seen = counts > 0  # a class absent from the training fold cannot be oversampled
    if not seen.any():
        return None
    rare = seen & (counts <= np.quantile(counts[seen], quantile))
    return 1.0 + oversample * presence[:, rare].any(1).astype(np.float64)
