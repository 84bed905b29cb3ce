"""Compact samples from DataLoader workers (competition.data.transfer): what the trainer rebuilds is
exactly what in-process loading gives, for every target kind; training with a worker equals training
without one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import default_collate

from competition.config import IGNORE_INDEX
from competition.data.transfer import pack, unpack

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype, channels", [(np.uint8, 1), (np.uint16, 1), (np.uint8, 3)])
def test_known_multilabel_target_with_ignore_and_a_larger_mask(dtype, channels):
    """A 13-wide mask (not a multiple of 8, twice the image: output_scale 2) with void pixels."""
    rng = np.random.default_rng(0)
    hi = 65535 if dtype == np.uint16 else 255
    shape = (6, 7) if channels == 1 else (6, 7, 3)
    images = [rng.integers(0, hi + 1, shape).astype(dtype) for _ in range(2)]
    targets = []
    for _ in range(2):
        t = rng.integers(0, 2, (3, 12, 13)).astype(np.uint8)
        t[:, 2, 3:9] = IGNORE_INDEX  # the in-band ignore: every channel of an ignored pixel
        targets.append(torch.from_numpy(t))
    batch = default_collate([pack(i, t, "multilabel") for i, t in zip(images, targets)])
    x, y = unpack(batch, CPU, "multilabel")
    from competition.data.dataset import to_tensor
    assert torch.equal(x, torch.stack([to_tensor(i) for i in images]))
    assert y.dtype == torch.uint8 and torch.equal(y, torch.stack(targets))
    assert batch["mask_bits"].numel() + batch["ignore_bits"].numel() < torch.stack(targets).numel() / 2


def test_multiclass_targets_travel_as_bytes():
    t = torch.tensor([[0, 1, 2], [IGNORE_INDEX, 3, 0]], dtype=torch.int64)
    batch = default_collate([pack(np.zeros((2, 3), np.uint8), t, "multiclass")])
    assert batch["mask_u8"].dtype == torch.uint8
    _, y = unpack(batch, CPU, "multiclass")
    assert y.dtype == torch.int64 and torch.equal(y[0], t)
    x, none = unpack(default_collate([pack(np.zeros((2, 3), np.uint8), None, "multiclass")]), CPU, "multiclass")
    assert none is None and x.shape == (1, 1, 2, 3)


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_dataset_samples_compact_or_plain_give_the_same_batch(tiny_project, task):
    from conftest import tiny_competition

    from competition.config import load_competition, load_experiment
    from competition.data.adapters import make_adapter
    from competition.data.dataset import SegDataset
    (tiny_project / "configs/competitions/tiny-hands.yaml").write_text(yaml.safe_dump(tiny_competition(task=task)))
    (tiny_project / "configs/experiments/t.yaml").write_text(yaml.safe_dump(
        {"competition": "tiny-hands", "model": {"output_scale": 2}, "data": {"input_size": 32}}))
    comp, exp = load_competition("tiny-hands"), load_experiment("t")
    adapter = make_adapter(comp)
    plain = SegDataset(adapter, adapter.ids[:3], exp, comp.task, "train")
    compact = SegDataset(adapter, adapter.ids[:3], exp, comp.task, "train")
    compact.compact = True
    ref = default_collate([plain[i] for i in range(3)])
    x, y = unpack(default_collate([compact[i] for i in range(3)]), CPU, comp.task)
    assert torch.equal(x, ref["image"]) and torch.equal(y, ref["mask"]) and y.shape[-1] == 2 * x.shape[-1]


def test_training_with_a_worker_process_equals_training_without(tiny_project):
    """A worker hands over compact samples (the default with workers), in-process loading plain ones:
    the same scores."""
    from competition.cli import main
    from competition.config import load_experiment
    from competition.train.loop import compact_samples, fit
    assert compact_samples(1) and not compact_samples(0)
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    base = {"competition": "tiny-hands", "model": {"arch": "Unet", "encoder": "tu-test_resnet",
                                                   "decoder_channels": [16, 16, 8, 8, 8]},
            "scheduler": {"name": "cosine", "warmup_epochs": 0}, "data": {"input_size": 32, "batch_size": 4},
            "train": {"epochs": 2, "progress": False}, "tracking": {"wandb": False}}
    scores = {}
    for workers in (0, 1):
        name = f"w{workers}"
        (tiny_project / f"configs/experiments/{name}.yaml").write_text(
            yaml.safe_dump({**base, "data": {**base["data"], "workers": workers}}))
        m = fit(load_experiment(name), 0, log=lambda *_: None)
        scores[workers] = (m["val_dice"], m["oof_dice"])
    assert scores[0] == scores[1]


@pytest.mark.parametrize("scale", [1, 2])
def test_cached_rows_pass_through_as_stored_bits_and_equal_the_packed_sample(tiny_project, scale, monkeypatch):
    """Without transforms a cached compact sample is the cache row's bits (no unpack + re-pack), and
    it is exactly what packing the unpacked sample gives; with an augmentation the row is unpacked."""
    import competition.data.dataset as dataset_mod
    from competition.config import load_competition, load_experiment
    from competition.data import transfer
    from competition.data.adapters import make_adapter
    from competition.data.dataset import SegDataset
    (tiny_project / "configs/experiments/c.yaml").write_text(yaml.safe_dump(
        {"competition": "tiny-hands", "model": {"output_scale": scale},
         "data": {"input_size": 32, "cache": True}, "augment": {"train": []}}))
    comp, exp = load_competition("tiny-hands"), load_experiment("c")
    adapter = make_adapter(comp)
    ids = adapter.ids[:3]
    packed = SegDataset(adapter, ids, exp, comp.task, "val")
    packed.compact = True
    first = [packed[i] for i in range(3)]  # fills the cache rows (the packing path)
    calls = []
    ds = SegDataset(adapter, ids, exp, comp.task, "val")
    ds.compact = True
    assert ds._passthrough()
    monkeypatch.setattr(dataset_mod, "pack", lambda *a, **k: calls.append(1) or transfer.pack(*a, **k))
    again = [ds[i] for i in range(3)]
    assert calls == []  # served from the stored bits
    for a, b in zip(first, again):
        assert a.keys() == b.keys() and a.pop("index") == b.pop("index") and all(torch.equal(a[k], b[k]) for k in a)
    plain = SegDataset(adapter, ids, exp, comp.task, "val")
    ref = default_collate([plain[i] for i in range(3)])
    x, y = unpack(default_collate(again), CPU, comp.task)
    assert torch.equal(x, ref["image"]) and torch.equal(y, ref["mask"])
    (tiny_project / "configs/experiments/a.yaml").write_text(yaml.safe_dump(
        {"competition": "tiny-hands", "data": {"input_size": 32, "cache": True},
         "augment": {"train": [{"name": "HorizontalFlip", "p": 1.0}]}}))
    aug = SegDataset(adapter, ids, load_experiment("a"), comp.task, "train")
    aug.compact = True
    assert not aug._passthrough()
