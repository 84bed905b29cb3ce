"""``competition train --exp E --fold k --dry-run``: one real training step at the configured sizes,
then exit having written nothing.

Everything ``train --check`` validates is checked first (:func:`competition.train.check.check_run`).
Then the model and the training DataLoader are built exactly as ``fit`` builds them (the same
``SegDataset``, ``EpochSampler`` and loader, :func:`competition.train.loop.training_loader`; the
same loss, optimizer, scheduler and ``Engine``, :func:`competition.train.engine.build_engine`), one
batch of epoch 1 is drawn and put through one ``Engine.train_epoch`` step (forward, loss, backward,
clipping, optimizer step) on the device ``train`` would use. Printed: parameters, input/target/output
shapes, the seconds to load the batch and for the step, peak memory (CUDA, and the process's host
memory). No run folder, checkpoint, W&B run or file of any kind is written.

Pretrained encoder weights are replaced by random init (said on the output): a dry run measures
sizes and speed, and must work offline. ``--comp C`` runs the experiment against another competition
with the same classes (a ``handbone-*`` recipe names ``hand-bone``; on any machine it runs on the
full-size twin ``synthetic-hands-2048``); that competition's folds file must exist.
``--batch-size``, ``--input-size`` and ``--workers`` override the experiment for the dry run only.
"""
from __future__ import annotations

import math
import resource
import shutil
import sys
import time

import torch

from competition import paths
from competition.config import CompetitionConfig, ConfigError, ExperimentConfig, load_competition, to_plain, validate
from competition.folds import FoldsError, excluded, training_ids
from competition.models import build_model, check_model, model_summary, uses_encoder
from competition.models.precision import autocast_dtype
from competition.store import tiles
from competition.train import distributed as dd
from competition.train.check import check_run, class_weights, oof_variants
from competition.train.engine import build_engine, seed_everything
from competition.train.loop import training_loader

__all__ = ["dry_run", "resolve_competition", "same_classes"]


def same_classes(exp: ExperimentConfig, comp: CompetitionConfig) -> None:
    """Refuse ``comp`` unless it has exactly the classes (names and order) and task of the
    experiment's own competition: the model's output channels and the loss depend on them."""
    own = load_competition(exp.competition)
    if own.name == comp.name:
        return
    if list(own.classes) != list(comp.classes):
        raise ConfigError(
            f"--comp {comp.name}: its classes differ from those of {own.name}, the competition experiment "
            f"{exp.name} names; a model for one cannot be run on the other.\n"
            f"  {own.name} ({own.num_classes}): {', '.join(own.classes)}\n"
            f"  {comp.name} ({comp.num_classes}): {', '.join(comp.classes)}")
    if own.task != comp.task:
        raise ConfigError(f"--comp {comp.name}: its task is {comp.task}, {own.name}'s (the competition "
                          f"experiment {exp.name} names) is {own.task}; the outputs and loss differ")


def resolve_competition(exp: ExperimentConfig, name: str) -> CompetitionConfig:
    """``--comp NAME`` for experiment ``exp``: the competition, refused when its classes differ."""
    comp = load_competition(name)
    same_classes(exp, comp)
    return comp


def _dry_experiment(exp: ExperimentConfig, batch_size: int | None, input_size: int | None,
                    workers: int | None) -> ExperimentConfig:
    """The experiment as the dry run builds it: random-init encoder, the CLI overrides, no progress bar."""
    data = to_plain(exp)
    data["model"]["encoder_weights"] = None
    data["train"]["progress"] = False
    data["data"]["cache"] = False  # a dry run writes nothing, not even a sample cache
    for key, value in (("batch_size", batch_size), ("input_size", input_size), ("workers", workers)):
        if value is not None:
            data["data"][key] = value
    return validate(ExperimentConfig, data, f"experiment {exp.name} with the --dry-run overrides")


def _shapes(out) -> list[tuple[int, ...]]:
    return [tuple(o.shape) for o in out] if isinstance(out, (list, tuple)) else [tuple(out.shape)]


def _fmt_shape(s) -> str:
    return "x".join(map(str, s))


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def _host_peak_bytes() -> int:
    """The process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _oof_estimate(exp: ExperimentConfig, comp: CompetitionConfig, adapter, folds, log) -> int:
    """Print (and return) what the experiment's OOF stores will take on disk: every fold's held-out
    images at their original sizes, once per OOF variant training writes."""
    sizes = [tuple(adapter.image_size(i)) for i in folds["id"]]
    n_var = len(oof_variants(exp, comp))
    per = tiles.estimate_sizes(sizes, comp.num_classes)
    dense = sum(h * w for h, w in sizes) * comp.num_classes
    folder = paths.runs_root() if paths.runs_root().exists() else paths.project()
    free = shutil.disk_usage(folder).free
    log(f"OOF: {len(sizes)} images x {comp.num_classes} classes at their original sizes, {n_var} variant(s): about "
        f"{per * n_var / 1e9:.2f} GB for the experiment's {folds['fold'].nunique()} folds (estimated at "
        f"{tiles.ESTIMATE_FRACTION:.0%} of the dense {dense * n_var / 1e9:.1f} GB; a trained model keeps ~1 %); "
        f"{free / 1e9:.0f} GB free under {folder}")
    return per * n_var


def dry_run(exp: ExperimentConfig, fold: int, comp: CompetitionConfig | None = None, *,
            batch_size: int | None = None, input_size: int | None = None, workers: int | None = None,
            log=print) -> dict:
    """One training step of ``exp`` fold ``fold`` (on ``comp``, default the experiment's own
    competition), building everything as ``fit`` does and writing nothing; returns the figures."""
    if comp is None:
        comp = load_competition(exp.competition)
    else:
        same_classes(exp, comp)
    weights_given = exp.model.encoder_weights
    check_model(exp.model)  # before the weights are replaced: an architecture that takes none refuses them
    exp = _dry_experiment(exp, batch_size, input_size, workers)
    folds_path = paths.folds_file(comp.name)
    if not folds_path.is_file():  # before the adapter, which would generate a synthetic competition's data
        raise FoldsError(f"{folds_path}: no folds file for {comp.name}; the dry run trains on fold {fold} of it: "
                         f"run `make folds COMP={comp.name}` (competition folds --comp {comp.name}) first")
    on = comp.name if comp.name == exp.competition else f"{comp.name} (the experiment names {exp.competition}; " \
                                                       f"same {comp.num_classes} classes)"
    log(f"dry run: {exp.name} fold {fold} on {on}")
    t = time.time()
    comp, adapter, folds = check_run(exp, fold, comp, lock=False)  # it writes nothing; no lock is needed
    log(f"configuration ok ({time.time() - t:.1f}s)")
    oof_bytes = _oof_estimate(exp, comp, adapter, folds, log)

    d = dd.Dist()  # one process: the step of one rank
    device = dd.device_for(d)
    seed_everything(exp.train.seed, exp.train.deterministic)
    if weights_given is not None:
        log(f"model.encoder_weights {weights_given!r} replaced by random init for the dry run "
            f"(sizes and speed do not depend on it; nothing is downloaded or read)")
    t = time.time()
    model = build_model(exp.model, comp.out_channels, comp.in_channels, exp.data.input_hw)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    m = exp.model
    log(f"model: {m.arch}{f' / {m.encoder}' if uses_encoder(m) else ''}, output_scale {m.output_scale}"
        f"{', deep supervision' if m.deep_supervision else ''}: {n_params:,} parameters "
        f"({n_train:,} trainable; built in {time.time() - t:.1f}s)")
    summary = model_summary(model)
    if summary:
        log(f"model plan: {summary}")

    train_ids = training_ids(folds, None if fold == paths.ALL_DATA else fold, excluded(exp.data.exclude, folds).ids)
    train_ds, sampler, train_loader = training_loader(exp, comp, adapter, train_ids, d, fold)
    steps = math.ceil(len(train_loader) / exp.train.grad_accum)
    engine = build_engine(exp, comp, model, device, d, steps, class_weights(exp, comp, adapter, train_ids))
    amp = autocast_dtype(exp.train.precision, device)
    log(f"device: {device}{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}, "
        f"precision {str(amp).replace('torch.', '') if amp else 'fp32'}, "
        f"{'channels_last' if exp.train.channels_last else 'contiguous'}")

    # Epoch 1, as fit seeds it; one batch of it.
    epoch = 1
    seed_everything(exp.train.seed * 1000 + epoch, exp.train.deterministic)
    sampler.set_epoch(epoch)
    train_ds.set_epoch(epoch)
    t = time.time()
    it = iter(train_loader)
    batch = next(it)
    del it  # stops any worker processes
    load_s = time.time() - t
    x, y = engine._to_device(batch)  # compact samples from workers expanded, as training does
    crop = f", crops of the image at {exp.data.crop_from or 'native'} px" if exp.data.policy == "crop" else ""
    log(f"loader: {len(train_ids)} training images, batch {exp.data.batch_size}, {exp.data.workers} workers"
        f"{crop}; first batch in {load_s:.1f}s")
    log(f"input:  {_fmt_shape(x.shape)} {str(x.dtype).replace('torch.', '')}    "
        f"target: {_fmt_shape(y.shape)} {str(y.dtype).replace('torch.', '')}")

    outputs: list = []
    hook = engine.raw.register_forward_hook(lambda _m, _i, out: outputs.append(_shapes(out)))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.time()
    try:
        loss, _ = engine.train_epoch([batch], epoch)  # forward, loss, backward, clip, optimizer step
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        hook.remove()
    step_s = time.time() - t
    out = outputs[0]
    if len(out) > 1:
        log(f"output: {len(out)} deep-supervision outputs, finest first: {', '.join(map(_fmt_shape, out))}")
    else:
        log(f"output: {_fmt_shape(out[0])}")
    log(f"step (forward + loss + backward + optimizer step, the first of the run): {step_s:.2f}s, "
        f"loss {loss:.4f}")
    figures = {"experiment": exp.name, "competition": comp.name, "fold": fold, "device": str(device),
               "parameters": n_params, "trainable_parameters": n_train, "model_summary": summary,
               "batch_size": exp.data.batch_size,
               "input_shape": list(x.shape), "target_shape": list(y.shape), "output_shapes": [list(s) for s in out],
               "load_seconds": round(load_s, 3), "step_seconds": round(step_s, 3), "loss": loss,
               "host_peak_bytes": _host_peak_bytes(), "oof_estimate_bytes": oof_bytes}
    mem = f"host (process peak RSS) {_gib(figures['host_peak_bytes'])}"
    if device.type == "cuda":
        figures["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        figures["cuda_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
        mem = (f"CUDA {_gib(figures['cuda_peak_bytes'])} allocated, {_gib(figures['cuda_peak_reserved_bytes'])} "
               f"reserved (at batch {exp.data.batch_size}); {mem}")
    log(f"peak memory: {mem}")
    log("dry run ok: nothing was written (no run folder, checkpoint or W&B run)")
    return figures
