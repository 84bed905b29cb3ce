"""The candidate members of an ensemble: ``EXP`` / ``EXP:VARIANT`` specs opened into OOF views that
cover the folds file, with the competition, the folds and the truth they are scored against."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from competition import paths
from competition.config import (
    CompetitionConfig,
    ConfigError,
    ExperimentConfig,
    load_competition,
    load_experiment,
)
from competition.cv import views as store
from competition.data.adapters import make_adapter
from competition.folds import load_folds
from competition.io import file_hash
from competition.predict.tta import check_views
from competition.store import tiles


@dataclass(frozen=True)
class Members:
    """Every candidate member (experiment x TTA variant) and what they are all scored against.

    ``exps[m]`` and ``views[m]`` describe candidate m, in the order the search numbers the members.
    """
    comp: CompetitionConfig
    adapter: object
    folds: pd.DataFrame
    folds_sha: str  # sha256 of the folds file, written into the recipe
    exps: list[ExperimentConfig]
    views: list[store.MemberOOF]
    truth: tiles.Store


def parse_member(spec: str) -> tuple[str, str | None]:
    """``EXP`` (every complete OOF variant of the experiment) or ``EXP:VARIANT`` (one; ``EXP:plain``
    for the OOF without TTA)."""
    name, sep, variant = spec.partition(":")
    if not sep:
        return name, None
    return name, "" if variant in ("", "plain") else variant


def complete_variants(experiment: str, folds) -> list[str]:
    """Variants ("" = plain) whose OOF exists for every fold of the folds file, plain first."""
    per_fold = [set(paths.oof_variants(experiment, int(k))) for k in sorted(set(folds["fold"]))]
    common = set.intersection(*per_fold) if per_fold else set()
    return sorted(common, key=lambda v: (v != "", v))


def open_members(specs: list[str], log=print) -> Members:
    """Open every candidate member of ``specs`` and the truth store.

    Every (experiment, TTA variant) pair is a candidate member: the search decides whether a view
    helps exactly as it decides whether an experiment helps.
    """
    if not specs:
        raise ConfigError("name at least one experiment to ensemble")
    parsed = [parse_member(s) for s in specs]
    if len(set(parsed)) != len(parsed):
        raise ConfigError(f"member listed twice: {sorted({s for s in specs if specs.count(s) > 1})}")
    loaded = {}
    for name, _ in parsed:
        if name not in loaded:
            loaded[name] = load_experiment(name)
    comps = sorted({e.competition for e in loaded.values()})
    if len(comps) != 1:
        raise ConfigError(f"members belong to different competitions {comps}; an ensemble has one")
    comp = load_competition(comps[0])
    adapter = make_adapter(comp)
    folds = load_folds(comp, adapter)
    folds_sha = file_hash(paths.folds_file(comp.name))
    exps, views, seen = [], [], set()
    for (name, variant), spec in zip(parsed, specs):
        exp = loaded[name]
        variants = [variant] if variant is not None else (complete_variants(exp.name, folds) or [""])
        for v in variants:
            if (exp.name, v) in seen:
                continue
            view = store.open_experiment(exp.name, folds, comp.classes, comp.task, v)
            try:
                check_views(view.tta, comp.tta, f"{spec}: OOF variant {v or 'plain'}")
            except ConfigError as e:
                if variant is not None:
                    raise
                log(f"skipping {view.label}: {e}")
                continue
            seen.add((exp.name, v))
            exps.append(exp)
            views.append(view)
    truth = store.truth_store(comp, adapter, views[0].ids, folds_sha, log=log)
    return Members(comp, adapter, folds, folds_sha, exps, views, truth)


def original_areas(view, adapter) -> np.ndarray:
    """(N,) H x W of the original images (OOF meta, else the image file)."""
    return np.array([np.prod(view.original_sizes.get(i) or adapter.image_size(i)) for i in view.ids], np.float64)


def member_runs(specs: list[str]) -> list:
    """The run folders an ensemble reads (shared locks: a fold being trained is refused)."""
    names = sorted({parse_member(s)[0] for s in specs})
    out = []
    for n in names:
        exp = load_experiment(n)
        root = paths.experiment_dir(exp.name)
        out += [r for r in (paths.RunPaths.of(d) for d in sorted(root.glob("fold*"))) if r is not None] \
            if root.is_dir() else []
    return out
