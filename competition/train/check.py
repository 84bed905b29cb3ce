"""``competition train --check``: the whole configuration of a run, validated before any model, data
loader or search is built, so a typo costs seconds, not a model build.

Checked: the architecture and encoder names, loss terms, optimizer, scheduler against the epochs,
every augmentation (built, so bad parameters fail here), the folds file against the data (groups
recomputed, the fold exists, both sides non-empty), the OOF TTA views, that the run folder is
writable and not locked by another ``train``. ``fit`` runs the same checks first.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from competition import locks, paths
from competition.config import CompetitionConfig, ConfigError, ExperimentConfig


def _encoder(exp: ExperimentConfig) -> None:
    name = exp.model.encoder
    if name.startswith("tu-"):
        import timm
        if not timm.is_model(name[3:]):
            raise ConfigError(f"model.encoder: {name!r} is not a timm model (timm.list_models() lists them; "
                              f"e.g. tu-resnet18, tu-convnext_tiny, tu-hrnet_w48)")
        return
    from segmentation_models_pytorch.encoders import get_encoder_names
    valid = get_encoder_names()
    if name not in valid:
        raise ConfigError(f"model.encoder: unknown smp encoder {name!r}; valid: {', '.join(sorted(valid))}, "
                          f"or any timm model as tu-<name>")


def _writable(folder: Path) -> None:
    probe = folder
    while not probe.exists():  # the nearest existing parent decides whether the run folder can be made
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{folder}: cannot write the run folder here ({probe} is not a writable folder)")


def check_run(exp: ExperimentConfig, fold: int, comp: CompetitionConfig | None = None, *,
              adapter=None, lock: bool = True):
    """Raise a ConfigError/DataError naming the key or file on the first problem; -> (comp, adapter, folds)."""
    from competition.config import load_competition
    from competition.data.adapters import make_adapter
    from competition.data.transforms import build_pipeline
    from competition.folds import load_folds
    from competition.losses import build_loss
    from competition.models import ARCHITECTURES
    from competition.optim import build_optimizer, build_scheduler
    from competition.train.loop import oof_variants

    comp = comp or load_competition(exp.competition)
    rp = paths.run(exp.name, fold)
    try:
        ARCHITECTURES.get(exp.model.arch)
    except KeyError as e:
        raise ConfigError(f"model.arch: {e.args[0]}") from None
    _encoder(exp)
    out_ch = comp.num_classes + (1 if comp.task == "multiclass" else 0)
    build_loss(exp.loss, comp.task, out_ch)
    build_scheduler(build_optimizer(torch.nn.Linear(1, 1), exp.optimizer), exp.scheduler, exp.train.epochs, 1)
    build_pipeline(exp.augment.preprocess, "augment.preprocess")
    build_pipeline(exp.augment.train, "augment.train")
    from competition.data.mixing import check as check_batch_mix
    check_batch_mix(exp, comp)
    oof_variants(exp, comp)
    adapter = adapter or make_adapter(comp)
    folds = load_folds(comp, adapter)
    known = sorted(set(folds["fold"]))
    if fold not in known:
        raise ConfigError(f"fold {fold} does not exist; {paths.folds_file(comp.name)} has folds {known}")
    n_val = int((folds["fold"] == fold).sum())
    if n_val == 0 or n_val == len(folds):
        raise ConfigError(f"fold {fold} of {paths.folds_file(comp.name)} holds {n_val} of {len(folds)} images: "
                          f"training needs images on both sides (make folds COMP={comp.name} FORCE=1)")
    _writable(rp.root)
    if lock and rp.root.is_dir():
        with locks.hold(rp.lock, True, f"run folder {rp.root}"):
            pass
    return comp, adapter, folds
