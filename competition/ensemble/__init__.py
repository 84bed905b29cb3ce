"""``competition ensemble``: weighted soft voting chosen on out-of-fold predictions.

    search.py       Caruana's greedy selection with replacement; an Optuna alternative
    nested.py       the searches in-sample and under nested CV
    recipe.py       ensembles/<name>.yaml and .md

Everything that reads, blends and scores the OOF lives in :mod:`competition.cv`. An experiment at test
time is the average of its fold models, so its OOF (each image predicted by the one fold model that did
not train on it) stands for it; every member must cover the folds file.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from competition import locks, paths, tracking
from competition.config import ConfigError, load_competition, load_experiment, to_plain
from competition.cv import compact, native, postprocess
from competition.cv import views as store
from competition.data.adapters import make_adapter
from competition.ensemble import nested, recipe
from competition.folds import load_folds
from competition.io import STALE_AFTER_S, clean_stale_temps, file_hash
from competition.metrics import pair_metric
from competition.predict.tta import check_views


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


def open_members(specs: list[str], log=print):
    """(competition, adapter, folds, folds hash, per candidate: experiment config, OOF views, truth store).

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
    return comp, adapter, folds, folds_sha, exps, views, truth


def original_areas(view, adapter) -> np.ndarray:
    """(N,) H x W of the original images (OOF meta, else the image file)."""
    return np.array([np.prod(view.original_sizes.get(i) or adapter.image_size(i)) for i in view.ids], np.float64)


def run(name: str, experiments: list[str], *, method: str = "caruana", per_class: bool = False,
        steps: int = 50, trials: int = 100, postprocess_: bool = True, nested_cv: bool = True,
        threshold: float = 0.5, force_blend: bool = False, workers: int | None = None,
        csv: str | None = None, truth_csv: str | None = None, log=print) -> tuple[Path, Path, dict]:
    """Choose the ensemble on OOF at each image's original size (weights, thresholds, post-processing),
    estimate it honestly, write ``ensembles/<name>.yaml`` and ``.md``. ``workers``: processes for the
    passes over the images (default: every core)."""
    paths.check_name("ensemble", name)
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"--threshold must be in (0, 1), got {threshold}")
    paths.ensembles_dir().mkdir(parents=True, exist_ok=True)
    clean_stale_temps(paths.ensembles_dir(), STALE_AFTER_S)  # recipes of killed ensembles
    _check_writable(paths.ensembles_dir(), csv, truth_csv)
    with locks.hold_runs(_member_runs(experiments)):  # shared: no member fold is retrained meanwhile
        comp, adapter, folds, folds_sha, exps, views, truth = open_members(experiments, log)
        if per_class and comp.task == "multiclass":
            raise ConfigError("--per-class: per-class weights are for multilabel tasks (the argmax of a multiclass "
                              "task couples the classes, so members take one weight each)")
        checkpoints = recipe.checkpoints(sorted({e.name for e in exps}), sorted(set(folds["fold"])))
        images = store.Images(views, truth, adapter, comp.task)
        N, C = len(images), len(comp.classes)
        log(f"OOF of {', '.join(v.label for v in views)}: {N} images x {C} classes at their original sizes, "
            f"{len(set(folds['fold']))} folds")
        ev = compact.from_images(images, threshold, workers)
        total = int(sum(h * w for h, w in truth.sizes)) * (C if comp.task == "multilabel" else 1)
        log(f"search view: {ev.uncertain / max(total, 1):.3%} of pixels can change with the weights")
        areas = original_areas(views[0], adapter)
        out = nested.search_all(ev, views[0].fold_of, pair_metric(comp.metric), method=method, per_class=per_class,
                                steps=steps, trials=trials, nested=nested_cv, log=log)
        ev_uncertain = ev.uncertain
        del ev
        nat = native.evaluate(images, out.weights, views[0].fold_of, comp.task, pair_metric(comp.metric),
                              postprocess=postprocess_, rules=postprocess.candidate_rules(areas), log=log,
                              workers=workers)
        chosen, why = choose(nat, force_blend)
        rec = recipe.build(name, comp, folds_sha, exps, views, checkpoints, out, nat, chosen, why,
                           search={"method": method, "per_class": per_class, "threshold": threshold,
                                   "steps": len(out.search.path) if method == "caruana" else trials,
                                   "uncertain_fraction": round(ev_uncertain / max(total, 1), 6)})
        yaml_path, md_path = recipe.write(rec)
        # W&B run (offline by default; never fatal) if any member tracks
        tracking.log_ensemble(to_plain(rec), {c: v["in_sample"] for c, v in rec.scores["per_class"].items()},
                              (yaml_path, md_path), exps[0].tracking, enabled=any(e.tracking.wandb for e in exps))
        for line in recipe.summary(rec):
            log(line)
        log(f"wrote {yaml_path.relative_to(paths.project())} and {md_path.relative_to(paths.project())}")
        if csv or truth_csv:
            plan = nat.plans[(chosen, None)]
            if csv:
                native.write_csv(csv, images, plan.weights, list(rec.thresholds), plan.rules, comp)
                log(f"wrote {csv}: the recipe's OOF predictions of the training images at native size")
            if truth_csv:
                native.write_truth_csv(truth_csv, adapter, views[0].ids, comp)
                log(f"wrote {truth_csv}: the training truth; `competition score {csv or 'OOF.csv'} --truth "
                    f"{truth_csv}` gives the in-sample native-resolution CV")
        return yaml_path, md_path, {"oof": out, "native": nat, "recipe": rec}


def _member_runs(specs: list[str]) -> list:
    """The run folders an ensemble reads (shared locks: a fold being trained is refused)."""
    names = sorted({parse_member(s)[0] for s in specs})
    out = []
    for n in names:
        exp = load_experiment(n)
        root = paths.experiment_dir(exp.name)
        out += [r for r in (paths.RunPaths.of(d) for d in sorted(root.glob("fold*"))) if r is not None] \
            if root.is_dir() else []
    return out


def choose(nat: native.NativeOutcome, force_blend: bool) -> tuple[str, str]:
    """The candidate the recipe is written for, and why: the best nested native-resolution estimate
    (the honest one; in-sample when nested CV was skipped), unless the weighted blend is forced."""
    if force_blend:
        return "search", "forced by --force-blend"
    scores = nat.nested or nat.in_sample
    kind = "nested" if nat.nested else "in-sample (nested CV skipped)"
    best = max(nested.CANDIDATES, key=lambda p: (round(scores[p], 12), p == "search"))
    others = ", ".join(f"{recipe.CANDIDATE_NAMES[p]} {scores[p]:.4f}" for p in nested.CANDIDATES if p != best)
    return best, f"best {kind} native-resolution estimate: {scores[best]:.4f} (vs {others})"


def _check_writable(folder: Path, *files) -> None:
    """Fail before any search when an output cannot be written (read-only file system, permissions,
    missing folder): a real probe file, since permission bits alone say nothing on a read-only mount."""
    targets = [folder] + [Path(f).resolve().parent for f in files if f]
    for t in targets:
        if not t.is_dir():
            raise ConfigError(f"{t}: output folder does not exist")
        try:
            with tempfile.TemporaryFile(dir=t):
                pass
        except OSError as e:
            raise ConfigError(f"{t}: cannot write the outputs there ({e.strerror}); nothing was searched") from None
