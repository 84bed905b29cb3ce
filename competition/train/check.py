"""``competition train --check``: the whole configuration of a run, validated before any data loader is
built or any weight is downloaded, so a typo costs seconds, not a failed run.

Checked, cheapest first: the architecture and encoder names, loss terms, optimizer, scheduler against
the epochs, every augmentation (built, so bad parameters fail here), the folds file against the data
(groups recomputed, the fold exists, both sides non-empty), the OOF TTA views. Then what the run
builds, built by the run's own functions (:func:`competition.models.build_model`, ``build_loss``,
``build_optimizer``, ``build_scheduler``): the model with every ``model.*`` key (kwargs, encoder,
depth, decoder, deep supervision, output scale) on ``torch.device("meta")`` -- shapes only, no memory
and no time even for a 2048² model -- with ``encoder_weights`` replaced by random init (a named
weights tag is checked against the encoder's list, a weights file for existence; nothing is
downloaded or read); the loss with the class weights; the optimizer over the model's real parameter
groups; the scheduler at the fold's steps per epoch; one training-mode forward of a meta batch of
``data.batch_size`` x ``data.input_size`` (a batch the model cannot train on -- one image whose
encoder bottom is 1x1 under batch norm -- or deep-supervision weights that do not match the model's
outputs fail here). A model that cannot be built on the meta device (an ``.item()`` in an
``__init__``: timm's drop-path rates in mit_b*) is built on the CPU instead, with random init, and
its forward is left to ``--dry-run``. Any exception from these builds becomes a :class:`ConfigError`
naming the section (``model.kwargs``, ``loss``, ``optimizer``, ``scheduler``, ``data.input_size``).
``model.init_from``: the fold's parent checkpoint exists, may be used by this fold (the leak rule of
:mod:`competition.train.initfrom`) and fits the built model, key for key and shape for shape.
Last: that the run folder is writable and not locked by
another ``train`` (a probe that leaves the holder's record alone). ``fit`` runs the same checks first.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from competition import locks, models, paths
from competition.config import CompetitionConfig, ConfigError, ExperimentConfig, load_competition
from competition.data.adapters import make_adapter
from competition.data.mixing import check as check_batch_mix
from competition.data.transforms import build_pipeline
from competition.folds import excluded, load_folds, training_ids, validation_ids
from competition.losses import build_loss, ignore_index_for, inverse_frequency_weights
from competition.optim import build_optimizer, build_scheduler
from competition.predict.tta import check_views, variant_name
from competition.train import alldata, initfrom


def _writable(folder: Path) -> None:
    probe = folder
    while not probe.exists():  # the nearest existing parent decides whether the run folder can be made
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{folder}: cannot write the run folder here ({probe} is not a writable folder)")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# Failures that come from building on the meta device itself (an op without a meta kernel, a
# ``.item()`` in an __init__), not from the configuration: the build is retried on the CPU, a forward
# check is skipped.
def _meta_only(e: BaseException) -> bool:
    return isinstance(e, NotImplementedError) or "meta" in str(e).lower()


def _build_model(exp: ExperimentConfig, out_ch: int, in_ch: int):
    """The run's model (:func:`competition.models.build_model`) with random init, on the meta device;
    -> (model, on_meta)."""
    cfg = exp.model
    w = cfg.encoder_weights
    kind = models.weights_kind(w)
    if kind == "named":
        models.check_named_weights(cfg.encoder, w)  # the tag against the encoder's list: no download
    elif kind == "file":
        p = Path(w).expanduser()
        if not p.is_file():
            raise ConfigError(f"model.encoder_weights: file not found: {w!r} (looked at {p.resolve()})")
    cfg = cfg.model_copy(update={"encoder_weights": None})

    def build(device: str):
        try:
            with torch.device(device):
                return models.build_model(cfg, out_ch, in_ch, exp.data.input_hw)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure of the build is the configuration's
            if device == "meta" and _meta_only(e):
                raise
            keys = f"model.kwargs ({', '.join(map(str, cfg.kwargs))})" if cfg.kwargs else "model"
            raise ConfigError(f"{keys}: {exp.model.arch} on {exp.model.encoder} cannot be built: "
                              f"{type(e).__name__}: {_one_line(e)}; fix the model section (model.kwargs go "
                              f"to the architecture, and to the encoder for tu- encoders)") from None
    try:
        # smp's first conv for other than 3 input channels is made with torch.Tensor(), on the CPU
        return build("meta").to("meta"), True
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - this model cannot be built on meta: build it for real (random init)
        return build("cpu"), False


def class_weights(exp, comp, adapter, train_ids) -> torch.Tensor | None:
    cw = exp.loss.class_weights
    if cw is None:
        return None
    if isinstance(cw, list):
        if len(cw) != comp.num_classes:
            raise ConfigError(f"loss.class_weights has {len(cw)} values; the competition has "
                              f"{comp.num_classes} classes ({', '.join(comp.classes)})")
        return torch.tensor(cw, dtype=torch.float32)
    # "1 - pixel frequency on the training fold" (report 000), counted at a small size: it is a ratio.
    counts, total = np.zeros(comp.num_classes), 0
    for i in train_ids:
        m = adapter.load_mask(i, (64, 64))
        counts += m.reshape(len(m), -1).sum(1)
        total += m.shape[1] * m.shape[2]
    return inverse_frequency_weights(counts, total)


def oof_variants(exp: ExperimentConfig, comp: CompetitionConfig) -> list[tuple[list[str], list[float]]]:
    """The OOF variants training writes: the plain one, and ``oof.tta`` (default: the competition's
    ``tta``) when it differs, so TTA is measured on OOF without a second command."""
    views = comp.tta if exp.oof.tta is None else exp.oof.tta
    out = [(["identity"], [1.0])]
    if views:
        extra = (check_views(views, comp.tta, "oof.tta"), [float(s) for s in exp.oof.tta_scales])
        if variant_name(*extra):
            out.append(extra)
    return out


class _MetaOnly(Exception):
    pass


def _built(section: str, build, meta: bool = False):
    """``build()``; any exception but a ConfigError (already naming its key) becomes one naming
    ``section``; with ``meta``, a failure of the meta device itself raises :class:`_MetaOnly`."""
    try:
        return build()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure of the build is the configuration's
        if meta and _meta_only(e):
            raise _MetaOnly() from e
        raise ConfigError(f"{section}: cannot be built as configured: {type(e).__name__}: {_one_line(e)}") from None


def _build_run(exp: ExperimentConfig, comp: CompetitionConfig, n_train: int) -> torch.nn.Module:
    """Build what ``fit`` builds before it loads data (see the module docstring); raise ConfigError.
    -> the model (on the meta device when it can be built there)."""
    out_ch, in_ch = comp.out_channels, comp.in_channels
    model, on_meta = _build_model(exp, out_ch, in_ch)
    cw = exp.loss.class_weights
    weights = (class_weights(exp, comp, None, []) if isinstance(cw, list)  # its length checked as the run does
               else torch.ones(comp.num_classes) if cw is not None else None)  # counted on the data by the run
    _built("loss", lambda: build_loss(exp.loss, comp.task, out_ch, weights, ignore_index_for(comp)))
    try:
        optimizer = _built("optimizer", lambda: build_optimizer(model, exp.optimizer), meta=on_meta)
    except _MetaOnly:  # checked over a plain layer already
        optimizer = build_optimizer(torch.nn.Linear(1, 1), exp.optimizer)
    steps = max(1, math.ceil(math.ceil(n_train / exp.data.batch_size) / exp.train.grad_accum))
    _built("scheduler", lambda: build_scheduler(optimizer, exp.scheduler, exp.train.epochs, steps))
    if not on_meta:
        return model  # a real forward at the run's sizes costs what the run costs: --dry-run measures it
    h, w = exp.data.input_hw
    model.train()
    try:
        with torch.device("meta"):
            x = torch.zeros(exp.data.batch_size, in_ch, h, w)
            pred = model(x)
    except ConfigError:  # a plug-in's output contract, naming its key
        raise
    except Exception as e:  # noqa: BLE001
        if _meta_only(e):
            return model
        raise ConfigError(f"data.input_size {h}x{w} (batch {exp.data.batch_size}) does not fit the model "
                          f"{exp.model.arch} on {exp.model.encoder}: {type(e).__name__}: {_one_line(e)}; change "
                          f"data.input_size or data.batch_size, or the model") from None
    n = len(pred) if isinstance(pred, (list, tuple)) else None
    ds = exp.loss.deep_supervision_weights
    if n is not None and ds is not None and len(ds) != n:  # what SegLoss refuses at the first step
        raise ConfigError(f"loss.deep_supervision_weights has {len(ds)} values but the model returns {n} "
                          f"outputs (finest first)")
    return model


def check_run(exp: ExperimentConfig, fold: int | str, comp: CompetitionConfig | None = None, *,
              adapter=None, lock: bool = True, build: bool = True, restart: bool = False):
    """Raise a ConfigError/DataError naming the key or file on the first problem; -> (comp, adapter, folds).
    ``build``: also build the model (on the meta device), loss, optimizer and scheduler as the run does,
    and check that ``model.init_from``'s checkpoint fits it (unless the run resumes from its last.pt
    and ``restart`` is not given: a resumed run does not read its parent again). ``fold``: a CV fold,
    or ``all-data``."""
    comp = comp or load_competition(exp.competition)
    rp = paths.run(exp.name, fold)
    initfrom.resolve(exp, fold)  # the leak rule first: it needs no file
    models.check_model(exp.model)  # the architecture (a plug-in is imported here), the encoder, every model.* key
    _built("loss", lambda: build_loss(exp.loss, comp.task, comp.out_channels))
    optimizer = _built("optimizer", lambda: build_optimizer(torch.nn.Linear(1, 1), exp.optimizer))
    _built("scheduler", lambda: build_scheduler(optimizer, exp.scheduler, exp.train.epochs, 1))
    build_pipeline(exp.augment.preprocess, "augment.preprocess")
    build_pipeline(exp.augment.train, "augment.train")
    check_batch_mix(exp, comp)
    oof_variants(exp, comp)
    adapter = adapter or make_adapter(comp)
    folds = load_folds(comp, adapter)
    known = sorted(set(folds["fold"]))
    if fold == paths.ALL_DATA:
        alldata.check(exp)
        n_val = 0
    elif fold not in known:
        raise ConfigError(f"fold {fold} does not exist; {paths.folds_file(comp.name)} has folds {known} "
                          f"(or {paths.ALL_DATA}: one model on every image)")
    else:
        n_val = int((folds["fold"] == fold).sum())
        if n_val == 0 or n_val == len(folds):
            raise ConfigError(f"fold {fold} of {paths.folds_file(comp.name)} holds {n_val} of {len(folds)} images: "
                              f"training needs images on both sides (make folds COMP={comp.name} FORCE=1)")
    exclusion = excluded(exp.data.exclude, folds)  # unknown ids name data.exclude before any training
    if fold != paths.ALL_DATA:
        training_ids(folds, fold, exclusion.ids)  # a fold left empty by the exclusion is an error here
        validation_ids(folds, fold, exclusion.ids)
    if build:
        model = _build_run(exp, comp, len(folds) - n_val)
        if restart or not rp.last.is_file():
            initfrom.check(exp, fold, model, comp.out_channels)
    _writable(rp.root)
    if lock and rp.root.is_dir():
        locks.probe(rp.lock, f"run folder {rp.root}")  # leaves the holder's record as it is
    return comp, adapter, folds
