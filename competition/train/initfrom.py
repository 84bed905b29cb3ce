"""``model.init_from``: a run that starts from another run's weights (nnU-Net's ``-pretrained_weights``,
progressive resizing 256 -> 512 -> 1024, a second pseudo-label round, fine-tuning a finished run).

Only the weights are taken: the optimizer, the schedule and the epoch count start fresh. They go into
the freshly built model before anything else is built from it (the optimizer, the EMA copy), and
never into a resumed run (its ``last.pt`` holds the weights it got to; the parent is not read again).

The leak rule: a CV fold k may only start from fold k's own model, so the path must name the fold
(``{fold}``). Every other fold's model, and a full-data model, was trained on fold k's validation
images; starting from one puts them into fold k's training and inflates its OOF score. Where the
parent is one of our checkpoints of the same competition, the fold recorded inside it is checked too.

``model.init_skip_head`` leaves the head out (a changed class count). The head is the model's
segmentation head (modules named ``segmentation_head``, ``heads``, ``head``, ``classification_head``,
``seg_layers``; the high-resolution head's ``up``/``refine``; for a model with none of these, its last
convolution with one output channel per class) plus every tensor whose shape differs from the
parent's. Anything else that does not fit is an error listing the keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from competition import checkpoint as ckpt
from competition import paths
from competition.config import ConfigError, ExperimentConfig, read_yaml
from competition.io import file_hash
from competition.models.heads import HighResHead

# smp's segmentation_head, UNet 3+'s heads, hrnetv2's head, nnU-Net's seg_layers (one per deep-supervision stage)
HEAD_NAMES = frozenset({"segmentation_head", "heads", "head", "classification_head", "seg_layers"})
SHOW = 10  # keys shown per list in an error; the count says how many there are


@dataclass(frozen=True)
class Parent:
    """The checkpoint a run starts from, as its config.yaml and metrics.json record it."""

    path: Path  # where it was read
    shown: str  # relative to the project folder when inside it (as recorded), else absolute
    sha256: str  # file_hash: the first 16 hex digits, as recipes record checkpoints

    def record(self) -> dict:
        """What config.yaml, metrics.json and best.pt's config say of it (:data:`RECORD_KEYS`)."""
        return {"init_from": self.shown, "init_from_sha256": self.sha256}


def _shown(path: Path) -> str:
    try:
        return path.resolve().relative_to(paths.project().resolve()).as_posix()
    except ValueError:
        return str(path)


def leak_message(spec: str, fold) -> str:
    return (f"model.init_from {spec!r} does not contain {{fold}}, but fold {fold} is a CV fold: fold k may only "
            f"start from fold k's own model (e.g. runs/<exp>/fold{{fold}}/best.pt, {{fold}} replaced by the fold "
            f"being trained). Any other fold's model, or a full-data model, was trained on fold {fold}'s "
            f"validation images: starting from it leaks them into fold {fold}'s training and inflates its OOF score. "
            f"A path without {{fold}} is only for --fold all-data (no OOF to leak into)")


def resolve(exp: ExperimentConfig, fold: int | str) -> Path | None:
    """The parent checkpoint's path for ``fold`` (not checked to exist), or None without init_from.
    ``{fold}`` becomes the fold number; for the all-data run ``fold{fold}`` (a run folder's name)
    becomes ``all-data``, so ``runs/E/fold{fold}/best.pt`` names ``runs/E/all-data/best.pt``."""
    spec = exp.model.init_from
    if spec is None:
        return None
    if fold == paths.ALL_DATA:
        text = spec.replace("fold{fold}", paths.ALL_DATA).replace("{fold}", paths.ALL_DATA)
    elif "{fold}" not in spec:
        raise ConfigError(leak_message(spec, fold))
    else:
        text = spec.replace("{fold}", str(int(fold)))
    p = Path(text).expanduser()
    return p if p.is_absolute() else paths.project() / p


def read(exp: ExperimentConfig, fold: int | str) -> tuple[Parent, dict[str, torch.Tensor]] | None:
    """(the parent, its state dict) for ``fold``, or None without init_from; a ConfigError names
    ``model.init_from`` when the file is missing or is another fold's model."""
    path = resolve(exp, fold)
    if path is None:
        return None
    label = paths.fold_label(fold)
    own = paths.run(exp.name, fold).root
    if path.resolve().parent == own.resolve():
        raise ConfigError(f"model.init_from: {_shown(path)} lies in this run's own folder {_shown(own)}, which "
                          f"training overwrites; fine-tune it under a new experiment name")
    if not path.is_file():
        hint = ""
        rp = paths.RunPaths.of(path.parent)
        if rp is not None:
            hint = f"; train it first (make train EXP={rp.experiment} FOLD={rp.fold})"
        raise ConfigError(f"model.init_from: {_shown(path)} (for {label}) not found{hint}")
    data = ckpt.load(path)  # torch.load(weights_only=True); a CheckpointError names the file
    state = data.get("model") if isinstance(data, dict) and isinstance(data.get("model"), dict) else data
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.init_from: {_shown(path)} holds no model weights (expected one of our checkpoints, "
                          f"with 'model', or a plain state dict of tensors)")
    _check_parent_fold(exp, fold, data, path)
    return Parent(path, _shown(path), file_hash(path)), state


def _check_parent_fold(exp: ExperimentConfig, fold: int | str, data: dict, path: Path) -> None:
    """A CV fold's parent, if it is one of our runs of the same competition, was trained as that fold."""
    cfg = data.get("config") if isinstance(data, dict) else None
    if fold == paths.ALL_DATA or not isinstance(cfg, dict) or "fold" not in cfg:
        return
    comp = (cfg.get("competition") or {}).get("name") if isinstance(cfg.get("competition"), dict) else None
    if comp != exp.competition or cfg["fold"] == fold:
        return
    was = paths.fold_label(cfg["fold"]) if cfg["fold"] == paths.ALL_DATA or isinstance(cfg["fold"], int) \
        else repr(cfg["fold"])
    raise ConfigError(f"model.init_from: {_shown(path)} was trained as {was} of {comp}, and this is fold {fold}: "
                      f"a model that was not trained as fold {fold} has seen fold {fold}'s validation images, which "
                      f"would leak into its training and inflate its OOF score; start fold k from fold k's own model")


# -- which tensors fit ---------------------------------------------------------------------------- #
def head_prefixes(model: nn.Module, out_ch: int) -> list[str]:
    """Module names (``name.``-prefixes of state-dict keys) that make up the model's head."""
    found = [name for name, m in model.named_modules() if name and name.rsplit(".", 1)[-1] in HEAD_NAMES]
    for name, m in model.named_modules():
        if isinstance(m, HighResHead):  # its layers after the wrapped model's head are head too
            found += [f"{name}.up" if name else "up", f"{name}.refine" if name else "refine"]
    if not found:  # an architecture without a named head: its last convolution with one channel per output
        convs = [name for name, m in model.named_modules()
                 if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.out_channels == out_ch]
        found = convs[-1:]
    return found


def _in(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


@dataclass
class Fit:
    """How a parent's state dict fits a model: what loads, what is skipped, what does not fit."""

    load: dict[str, torch.Tensor]
    skipped: list[str]  # "key (parent shape -> model shape)" or "key"
    missing: list[str]  # in the model, not in the parent
    unexpected: list[str]  # in the parent, not in the model
    shapes: list[str]  # "key: checkpoint (..) vs model (..)"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shapes)


def match(model: nn.Module, state: dict[str, torch.Tensor], skip_head: bool, out_ch: int) -> Fit:
    own = model.state_dict()
    head = head_prefixes(model, out_ch) if skip_head else []
    fit = Fit({}, [], [], [], [])
    for k, t in own.items():
        if k not in state:
            (fit.skipped if _in(k, head) else fit.missing).append(k)
        elif tuple(state[k].shape) != tuple(t.shape):
            text = f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(t.shape)}"
            (fit.skipped if skip_head else fit.shapes).append(text)
        else:
            fit.load[k] = state[k]
    for k in state:
        if k not in own:
            (fit.skipped if _in(k, head) else fit.unexpected).append(k)
    return fit


def _few(items: list[str]) -> str:
    more = f", ... ({len(items)} in all)" if len(items) > SHOW else ""
    return ", ".join(items[:SHOW]) + more


def _problems(fit: Fit, parent: Parent, exp: ExperimentConfig, out_ch: int) -> ConfigError:
    parts = []
    if fit.missing:
        parts.append(f"{len(fit.missing)} missing key(s) (in the model, not the checkpoint): {_few(fit.missing)}")
    if fit.unexpected:
        parts.append(f"{len(fit.unexpected)} unexpected key(s) (in the checkpoint, not the model): "
                     f"{_few(fit.unexpected)}")
    if fit.shapes:
        parts.append(f"{len(fit.shapes)} shape mismatch(es): {_few(fit.shapes)}")
    hint = ("these lie outside the head: start from a checkpoint of the same architecture and encoder"
            if exp.model.init_skip_head else
            "if only the classes changed, set model.init_skip_head: true (the head keeps its fresh init); "
            "otherwise start from a checkpoint of the same architecture and encoder")
    return ConfigError(f"model.init_from: {parent.shown} does not fit the model of model.* ({exp.model.arch} on "
                       f"{exp.model.encoder}, {out_ch} output channels): {'; '.join(parts)}; {hint}")


def _fitting(exp: ExperimentConfig, fold: int | str, model: nn.Module, out_ch: int):
    """(the parent, how its tensors map onto ``model``), the mismatches raised; None without init_from."""
    found = read(exp, fold)
    if found is None:
        return None
    parent, state = found
    fit = match(model, state, exp.model.init_skip_head, out_ch)
    if not fit.ok:
        raise _problems(fit, parent, exp, out_ch)
    return parent, fit


def check(exp: ExperimentConfig, fold: int | str, model: nn.Module, out_ch: int) -> Parent | None:
    """``train --check``: the parent exists for ``fold``, may be used, and fits ``model`` (which may be on
    the meta device: only names and shapes are compared); nothing is loaded into the model."""
    checked = _fitting(exp, fold, model, out_ch)
    return None if checked is None else checked[0]


def apply(exp: ExperimentConfig, fold: int | str, model: nn.Module, out_ch: int, log=None) -> Parent | None:
    """Load the parent's weights into the freshly built ``model`` (before the optimizer and the EMA copy
    are made from it); -> the parent, or None without init_from."""
    checked = _fitting(exp, fold, model, out_ch)
    if checked is None:
        return None
    parent, fit = checked
    with torch.no_grad():
        model.load_state_dict(fit.load, strict=False)  # strict=False: only the skipped head is left out
    if log is not None:
        skipped = f"; the head kept its fresh init (model.init_skip_head): {_few(fit.skipped)}" if fit.skipped else ""
        log(f"model.init_from: {len(fit.load)} tensors from {parent.shown} (sha256 {parent.sha256}){skipped}")
    return parent


RECORD_KEYS = ("init_from", "init_from_sha256")


def recorded_in(run_cfg: dict) -> dict:
    """The parent as a run configuration records it: {} when the run started from scratch."""
    return {k: run_cfg[k] for k in RECORD_KEYS if k in run_cfg}


def recorded(config_file: Path) -> dict:
    """The parent as a run's config.yaml records it (a resumed run keeps the parent it started from,
    without reading it again); {} when it started from scratch."""
    return recorded_in(read_yaml(config_file)) if Path(config_file).is_file() else {}
