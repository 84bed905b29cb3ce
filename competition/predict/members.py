"""The models of a recipe: checkpoints verified against the recipe's hashes, then loaded once each.

A model is rebuilt from the resolved experiment stored INSIDE its checkpoint (``config.experiment``:
``model.*``, and ``data.input_size``, from which ``nnunet`` plans its network; a plug-in architecture is
imported again by its ``model.arch``), never from ``configs/experiments/``, so a submission still works
after those files have changed or on a machine that never had them (the offline bundle).

A member's checkpoints are its fold models (one per fold of ``folds``, averaged), or with ``full_data``
its one model trained on every training image (``runs/<exp>/all-data/best.pt``), while its weight
still comes from the folds' OOF: :func:`checkpoint_labels` names them either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from competition import checkpoint as ckpt
from competition import paths
from competition.checkpoint import CheckpointError
from competition.config import ConfigError, ExperimentConfig, Recipe, RecipeCheckpoint, RecipeMember, validate
from competition.data.base import safe_join
from competition.io import file_hash
from competition.models import build_model
from competition.models.precision import autocast_dtype


@dataclass
class LoadedModel:
    path: Path
    experiment: ExperimentConfig
    model: torch.nn.Module
    amp: torch.dtype | None  # autocast dtype on this device (None: full precision)


def check_recipe(recipe: Recipe, classes: list[str], task: str, source: str) -> None:
    """The recipe fits the competition: classes, task, one threshold and weight vector per class."""
    if list(recipe.classes) != list(classes):
        raise ConfigError(f"{source}: classes {recipe.classes} differ from the competition's {classes}")
    if recipe.task != task:
        raise ConfigError(f"{source}: task {recipe.task!r} differs from the competition's {task!r}")
    c = len(classes)
    if task == "multilabel" and len(recipe.thresholds) != c:
        raise ConfigError(f"{source}: thresholds has {len(recipe.thresholds)} values; expected one per class ({c})")
    for m in recipe.members:
        if len(m.weights) not in (1, c):
            raise ConfigError(f"{source}: member {m.experiment}: weights has {len(m.weights)} values; "
                              f"expected 1 (global) or {c} (one per class)")
        if m.full_data and len(m.checkpoints) != 1:
            raise ConfigError(f"{source}: member {m.experiment}: full_data with {len(m.checkpoints)} checkpoints; "
                              f"expected one (the all-data model)")
        if not m.full_data and (len(m.folds) != len(m.checkpoints) or not m.checkpoints):
            raise ConfigError(f"{source}: member {m.experiment}: {len(m.folds)} folds but "
                              f"{len(m.checkpoints)} checkpoints; expected one checkpoint per fold")
    unknown = sorted(set(recipe.postprocess) - set(classes))
    if unknown:
        raise ConfigError(f"{source}: postprocess names unknown class(es) {unknown}; classes are {classes}")


def member_weights(recipe: Recipe, source: str) -> np.ndarray:
    """(M, C) float64: every member's weight per class, normalised so each class's weights sum to 1.
    A member's fold models are averaged inside the member (as its OOF stands for their average)."""
    c = len(recipe.classes)
    w = np.array([np.broadcast_to(np.asarray(m.weights, np.float64), (c,)) for m in recipe.members])
    if (w < 0).any():
        raise ConfigError(f"{source}: member weights must be non-negative")
    total = w.sum(0)
    if (total <= 0).any():
        bad = [recipe.classes[k] for k in np.flatnonzero(total <= 0)]
        raise ConfigError(f"{source}: the members' weights sum to 0 for class(es) {bad}")
    return w / total


def checkpoint_labels(member: RecipeMember) -> list[str]:
    """What each of the member's checkpoints is, in order: ``fold<k>`` per fold, or ``all-data``."""
    if member.full_data:
        return [paths.ALL_DATA]
    return [paths.fold_label(k) for k in member.folds]


def checkpoint_paths(recipe: Recipe, root: Path, source: str) -> list[Path]:
    """Every checkpoint's path, checked: present, inside ``root``, and with the recipe's sha256."""
    out = []
    for m in recipe.members:
        folds = [paths.ALL_DATA] if m.full_data else m.folds
        for fold, c in zip(folds, m.checkpoints):
            out.append(verify_checkpoint(m, fold, c, root, source))
    return out


def verify_checkpoint(member: RecipeMember, fold: int | str, c: RecipeCheckpoint, root: Path, source: str) -> Path:
    """``c``'s path under ``root``, checked: present and with the recipe's sha256. ``fold``: the fold
    the checkpoint is the model of, or ``all-data``."""
    what = f"{source}: member {member.experiment} " + (paths.ALL_DATA if fold == paths.ALL_DATA else f"fold {fold}")
    path = safe_join(root, c.path, f"{what}: checkpoint path")
    if not path.is_file():
        raise CheckpointError(f"{what}: checkpoint {c.path} not found under {root}; the run is missing "
                              f"(train it: make train EXP={member.experiment} FOLD={fold}) or the recipe is stale")
    digest = file_hash(path, n=len(c.sha256))
    if digest != c.sha256.lower():
        raise CheckpointError(f"{what}: checkpoint {c.path} has sha256 {digest}, the recipe expects {c.sha256}; "
                              f"the file changed (retrained or corrupt) since the ensemble was built: "
                              f"rebuild the ensemble (make ensemble)")
    return path


def read_checkpoint(path: Path, classes: list[str], task: str) -> tuple[dict, ExperimentConfig]:
    """(the checkpoint dict, its resolved experiment), checked against the competition's classes."""
    data = ckpt.load(path)  # CheckpointError naming the path when unreadable
    cfg = data.get("config") if isinstance(data, dict) else None
    if not isinstance(cfg, dict) or "experiment" not in cfg or "model" not in data:
        raise CheckpointError(f"{path}: not a training checkpoint (expected 'model' and 'config.experiment')")
    exp = validate(ExperimentConfig, cfg["experiment"], f"{path} (config.experiment)")
    comp = cfg.get("competition") or {}
    if comp.get("classes") is not None and list(comp["classes"]) != list(classes):
        raise CheckpointError(f"{path}: trained on classes {comp['classes']}, the recipe has {classes}")
    if comp.get("task") not in (None, task):
        raise CheckpointError(f"{path}: trained for task {comp['task']!r}, the recipe is {task!r}")
    return data, exp


def build_from_checkpoint(data: dict, exp: ExperimentConfig, path: Path, num_classes: int, task: str,
                          in_channels: int) -> torch.nn.Module:
    # Every weight comes from the checkpoint: never download or read pretrained encoder weights here
    # (the offline bundle has neither internet nor the original weights file).
    model_cfg = exp.model.model_copy(update={"encoder_weights": None})
    out_ch = num_classes + (1 if task == "multiclass" else 0)
    # Built on the meta device: no time spent initialising weights the checkpoint replaces at once.
    with torch.device("meta"):
        model = build_model(model_cfg, out_ch, in_channels, exp.data.input_hw)
    try:
        model.load_state_dict(data["model"], assign=True)
    except (RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: weights do not fit the model its config describes ({e})") from None
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = build_model(model_cfg, out_ch, in_channels, exp.data.input_hw)  # a buffer the state dict does not hold
        model.load_state_dict(data["model"])
    return model.eval()


def load_model(path: Path, classes: list[str], task: str, device: torch.device, in_channels: int) -> LoadedModel:
    """One checkpoint, rebuilt from its own resolved experiment, on ``device``, in eval mode."""
    data, exp = read_checkpoint(path, classes, task)
    model = build_from_checkpoint(data, exp, path, len(classes), task, in_channels)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return LoadedModel(path, exp, model.to(device=device, memory_format=fmt),
                       autocast_dtype(exp.train.precision, device))


def load_models(recipe: Recipe, root: Path, source: str, device: torch.device,
                in_channels: int) -> list[list[LoadedModel]]:
    """Per member, its fold models (or its one all-data model). Every checkpoint is verified first (a
    missing or changed file fails before any work), then loaded once even when two members (TTA
    variants) share it."""
    found = checkpoint_paths(recipe, root, source)
    loaded: dict[Path, LoadedModel] = {}
    out, i = [], 0
    for m in recipe.members:
        models = []
        for path in found[i:i + len(m.checkpoints)]:
            if path not in loaded:
                loaded[path] = load_model(path, recipe.classes, recipe.task, device, in_channels)
            models.append(loaded[path])
        out.append(models)
        i += len(m.checkpoints)
    return out
