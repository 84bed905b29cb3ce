"""``competition ensemble``: weighted soft voting chosen on out-of-fold predictions.

    store.py        every fold's OOF of an experiment as one (N, C, h, w) view; the cached truth
    blend.py        how members' uint8 probabilities are blended (shared by every stage below)
    compact.py      the search's view: only pixels whose blended prediction can change
    search.py       Caruana's greedy selection with replacement; an Optuna alternative
    thresholds.py   per-class thresholds from one histogram per blend
    postprocess.py  keep-largest / minimum-area per class, nnU-Net's acceptance rule
    nested.py       the whole procedure in-sample and under nested CV
    recipe.py       ensembles/<name>.yaml and .md
    oofscore.py     ``competition oof``: an experiment's OOF score, per-image table, missing OOF
    suspects.py     ``competition oof --suspects``: likely label errors, with overlays

An experiment at test time is the average of its fold models, so its OOF (each image predicted by the
one fold model that did not train on it) stands for it; every member must cover the folds file.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from competition import paths
from competition.config import ConfigError, load_competition, load_experiment
from competition.data.adapters import make_adapter
from competition.ensemble import compact, nested, postprocess, recipe, store
from competition.folds import load_folds

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def open_members(experiments: list[str], log=print):
    """(competition, adapter, folds, folds hash, experiment configs, OOF views, truth view)."""
    from competition.train.checkpoint import file_hash
    if not experiments:
        raise ConfigError("name at least one experiment to ensemble")
    exps = [load_experiment(e) for e in experiments]
    names = [e.name for e in exps]
    if len(set(names)) != len(names):
        raise ConfigError(f"experiment listed twice: {sorted({n for n in names if names.count(n) > 1})}")
    comps = sorted({e.competition for e in exps})
    if len(comps) != 1:
        raise ConfigError(f"members belong to different competitions {comps}; an ensemble has one")
    comp = load_competition(comps[0])
    adapter = make_adapter(comp)
    folds = load_folds(comp, adapter)
    folds_sha = file_hash(paths.folds_file(comp.name))
    views = [store.open_experiment(n, folds, comp.classes, comp.task) for n in names]
    sizes = {v.experiment: v.size for v in views}
    if len(set(sizes.values())) != 1:
        raise ConfigError(f"members' OOF sizes differ ({', '.join(f'{k} {h}x{w}' for k, (h, w) in sizes.items())}); "
                          f"set the same oof.size in their experiment YAMLs")
    truth = store.truth_cache(comp, adapter, views[0].ids, views[0].size, folds_sha, log=log)
    return comp, adapter, folds, folds_sha, exps, views, truth


def original_areas(view, adapter) -> np.ndarray:
    """(N,) H x W of the original images (OOF meta, else the image file)."""
    return np.array([np.prod(view.original_sizes.get(i) or adapter.image_size(i)) for i in view.ids], np.float64)


def run(name: str, experiments: list[str], *, method: str = "caruana", per_class: bool = False,
        steps: int = 50, trials: int = 100, postprocess_: bool = True, nested_cv: bool = True,
        tta: list[str] | None = None, threshold: float = 0.5, budget_mb: int = 128,
        log=print) -> tuple[Path, Path, nested.Outcome]:
    """Choose the ensemble, estimate it honestly, write ``ensembles/<name>.yaml`` and ``.md``."""
    if not NAME.fullmatch(name):
        raise ConfigError(f"ensemble name {name!r}: use letters, digits, '_', '-', '.' (it names a file)")
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"--threshold must be in (0, 1), got {threshold}")
    comp, adapter, folds, folds_sha, exps, views, truth = open_members(experiments, log)
    checkpoints = recipe.checkpoints([e.name for e in exps], sorted(set(folds["fold"])))
    budget = budget_mb << 20
    N, C = len(truth), len(comp.classes)
    log(f"OOF of {', '.join(v.experiment for v in views)}: {N} images x {C} classes at "
        f"{truth.size[0]}x{truth.size[1]}, {len(set(folds['fold']))} folds")
    ev = compact.build(views, truth, comp.task, threshold, budget)
    total = N * C * int(np.prod(truth.size)) // (1 if comp.task == "multilabel" else C)
    log(f"search view: {ev.uncertain / max(total, 1):.1%} of pixels can change with the weights")
    areas = original_areas(views[0], adapter)
    out = nested.evaluate(
        ev, views, truth, views[0].fold_of, comp.metric.empty_score, method=method, per_class=per_class,
        steps=steps, trials=trials, postprocess=postprocess_, rules=postprocess.candidate_rules(areas),
        scale=np.prod(truth.size) / areas, nested=nested_cv, budget_bytes=budget, log=log)
    rec = recipe.build(name, comp, folds_sha, [e.name for e in exps], checkpoints, out, tta=tta,
                       search={"method": method, "per_class": per_class, "threshold": threshold,
                               "steps": len(out.search.path) if method == "caruana" else trials,
                               "uncertain_fraction": round(ev.uncertain / max(total, 1), 4)},
                       oof_size=list(truth.size))
    yaml_path, md_path = recipe.write(rec, out)
    from competition import tracking  # W&B run (offline by default; never fatal) if any member tracks
    from competition.config import to_plain
    tracking.log_ensemble(to_plain(rec), {c: v["in_sample"] for c, v in rec.scores["per_class"].items()},
                          enabled=any(e.tracking.wandb for e in exps), project=exps[0].tracking.project)
    for line in recipe.summary(rec, out):
        log(line)
    log(f"wrote {yaml_path.relative_to(paths.project())} and {md_path.relative_to(paths.project())}")
    return yaml_path, md_path, out
