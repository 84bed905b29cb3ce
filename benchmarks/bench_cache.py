"""The sample cache (``data.cache``): samples/s of the hand-bone training loader, cached vs uncached.

The case: the full-size twin ``synthetic-hands-2048`` (2048² 8-bit grayscale PNGs, 29 polygon classes
with the hand-bone names; 4 subjects, one hand each, generated into a temp project in ~2 s). Every side
is the project's ``SegDataset`` in training mode (no augmentation: the data path alone), each image
drawn 3 times per round:

- cached (``data.cache: true``): filled during the warm-up round, then every sample is a memory-mapped
  row: the working-size image copied out and the bit-packed mask unpacked.
- uncached (``data.cache: false``): every sample decodes the PNG, resizes it to the working size and
  rasterises its 29 polygons there.

First the loading work in one process (``data.workers: 0``) at two geometries: 1024² input (the
``eff`` / SegFormer recipes: image and mask at 1024²) and 512² input with ``output_scale: 4``
(``handbone-unet3plus-2048``: the 2048 head, so the working size and the mask are 2048², the image
shrunk to 512² for the network). Then the same at 1024² through a DataLoader with **one worker**
process (persistent, batch 1) as a GPU run uses it: compact samples (``competition.data.transfer``:
the 8-bit image and the bit-packed mask, 4.6 MiB instead of 33 MiB), which the trainer unpacks on its
device (here the CPU, inside the timing). A cached row without transforms goes out as stored, bits
and all; an uncached sample is decoded, rasterised and packed in the worker. A third side hands over
ready-made compact samples: the hand-over and unpack alone, the floor of any loader; a fourth the
cached rows as plain samples (float image, uint8 mask: torch's default hand-over). The samples are
asserted bit-identical to in-process loading on every side. Beside them, the PNG decode alone: the
most an uncached loader could reach.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from benchmarks.harness import Side, cached_vs_uncached, compare, measure, rates, temp_project
from competition.config import CompetitionConfig, ExperimentConfig, validate
from competition.data.adapters import make_adapter
from competition.data.dataset import SegDataset
from competition.data.transfer import unpack

REPO = Path(__file__).resolve().parent.parent
REPEAT = 3  # draws of each image per round
CPU = torch.device("cpu")


def make_competition(root: Path) -> CompetitionConfig:
    data = yaml.safe_load((REPO / "configs/competitions/synthetic-hands-2048.yaml").read_text())
    data.update(name="bench-hands-2048", data_root=str(root / "data"))
    data["synthetic"] = {**data["synthetic"], "subjects": 4, "test_subjects": 1, "images_per_subject": 1}
    return validate(CompetitionConfig, data, "bench: synthetic-hands-2048, 4 subjects")


def dataset(adapter, input_size: int, scale: int, cache: bool, compact: bool = False) -> SegDataset:
    exp = ExperimentConfig.model_validate({
        "name": "bench-cache", "competition": adapter.cfg.name, "model": {"output_scale": scale},
        "data": {"input_size": input_size, "batch_size": 1, "workers": int(compact), "cache": cache}})
    ds = SegDataset(adapter, adapter.ids, exp, adapter.cfg.task, "train")
    ds.compact = compact  # what the training loader sets when its workers feed a GPU
    return ds


def in_process(ds: SegDataset):
    """One pass in this process (``data.workers: 0``, the CPU default): every image drawn REPEAT times."""
    n = len(ds)
    out = []
    for k in range(n * REPEAT):
        s = ds[k % n]
        if k < n:
            out.append((s["image"], s["mask"]))
    return out


class Ready(Dataset):
    """The same samples, already built: what moving them from a worker to the trainer costs alone."""

    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def worker_loader(ds) -> DataLoader:
    order = list(range(len(ds))) * REPEAT
    return DataLoader(ds, batch_size=1, sampler=order, num_workers=1, persistent_workers=True, prefetch_factor=2)


def plain_through_worker(loader: DataLoader, keep: int):
    """The same pass with plain samples (float image, uint8 mask): torch's default hand-over."""
    out = []
    for k, batch in enumerate(loader):
        if k < keep:
            out.append((batch["image"][0], batch["mask"][0]))
    return out


def through_worker(loader: DataLoader, keep: int):
    """One pass of a one-worker DataLoader of compact samples, each unpacked as the trainer does (on
    its device: here the CPU); the first ``keep`` samples (every image once) for the check."""
    out = []
    for k, batch in enumerate(loader):
        x, y = unpack(batch, CPU, "multilabel")
        if k < keep:
            out.append((x[0], y[0]))
    return out


def main() -> None:
    with temp_project() as root:  # the cache lives in <project>/runs/_cache: here, the temp project
        _main(make_adapter(make_competition(root)))


def _main(adapter) -> None:
    n = len(adapter.ids)
    samples = n * REPEAT
    png = adapter.image_path(adapter.ids[0])
    print(f"   {n} training images, {png.stat().st_size / 2**20:.1f} MiB PNG each "
          f"({adapter.image_size(adapter.ids[0])[0]}² 8-bit grayscale, 29 polygon classes); {samples} samples "
          f"per round (each image {REPEAT}x)", flush=True)
    times = measure("PNG decode alone, 2048² (cv2.imread: the floor without a cache)",
                    lambda: cv2.imread(str(png), cv2.IMREAD_UNCHANGED), rounds=5)
    floor = 1 / min(times)
    print(f"   -> at most {floor:.1f} samples/s for any uncached loader in one process", flush=True)
    summary = []
    for input_size, scale in ((1024, 1), (512, 4)):
        work = input_size * scale
        cached, plain = dataset(adapter, input_size, scale, True), dataset(adapter, input_size, scale, False)
        res, ratio = cached_vs_uncached(
            f"loading work in one process (data.workers 0): 2048² PNG + 29 polygons -> {input_size}² input, "
            f"{work}² work size and mask",
            Side(lambda: in_process(cached), note="memory-mapped rows, filled in the warm-up"),
            Side(lambda: in_process(plain), note="decode + resize + rasterise"), samples)
        print(f"   (target >= 3x); cached vs the PNG-decode floor {samples / res.min('cached') / floor:.1f}x",
              flush=True)
        summary.append(f"{input_size}² input / {work}² work: {ratio:.1f}x in one process")

    # One DataLoader worker process at 1024² input, compact samples as on a GPU (see the docstring).
    cached, plain = dataset(adapter, 1024, 1, True, compact=True), dataset(adapter, 1024, 1, False, compact=True)
    ready = Ready([cached[i] for i in range(n)])
    cached_plain = dataset(adapter, 1024, 1, True)
    loaders = {k: worker_loader(d) for k, d in (("cached", cached), ("uncached", plain), ("transfer only", ready),
                                                ("cached, plain samples", cached_plain))}
    res = compare("one DataLoader worker (batch 1, persistent, compact samples unpacked in the trainer): "
                  "2048² PNG + 29 polygons -> 1024² input and mask",
                  Side(lambda: through_worker(loaders["cached"], n), workers=1,
                       note="cache filled in the warm-up; rows go out as stored"),
                  {"uncached": Side(lambda: through_worker(loaders["uncached"], n), workers=1),
                   "transfer only": Side(lambda: through_worker(loaders["transfer only"], n), workers=1,
                                         note="ready-made compact samples: hand-over + unpack alone"),
                   "cached, plain samples": Side(lambda: plain_through_worker(loaders["cached, plain samples"], n),
                                                 workers=1, note="torch's default hand-over of the 33 MiB sample")},
                  ours_label="cached", rounds=5)
    reference = in_process(dataset(adapter, 1024, 1, False))[:n]
    for (x, y), (rx, ry) in zip(through_worker(loaders["cached"], n), reference):
        assert torch.equal(x, rx) and torch.equal(y, ry), "compact samples differ from in-process loading"
    ratio = res.speedup("uncached", "cached")
    print(f"   {rates(res, samples)}; cached/uncached {ratio:.2f}x; the hand-over alone is "
          f"{res.min('transfer only') / res.min('cached'):.0%} of the cached time", flush=True)
    summary.append(f"1024² through one worker (compact): {ratio:.1f}x")
    print("   cache speed-up: " + "; ".join(summary), flush=True)


if __name__ == "__main__":
    main()
