"""``competition ensemble`` end to end: open the members, search the weights on the compact view,
re-choose and score at native resolution, pick the candidate, write the recipe (and its CSVs)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NamedTuple

from competition import locks, paths, tracking
from competition.config import ConfigError, to_plain
from competition.cv import compact, native, postprocess
from competition.cv import views as store
from competition.ensemble import nested, recipe
from competition.ensemble.members import Members, member_runs, open_members, original_areas
from competition.ensemble.options import EnsembleOptions
from competition.io import STALE_AFTER_S, clean_stale_temps
from competition.metrics import pair_metric


class Choice(NamedTuple):
    """The candidate the recipe is written for, and why (as the recipe and its report say it)."""
    candidate: str
    why: str


def run(name: str, experiments: list[str], options: EnsembleOptions = EnsembleOptions(),
        log=print) -> tuple[Path, Path, dict]:
    """Choose the ensemble on OOF at each image's original size (weights, thresholds, post-processing),
    estimate it honestly, write ``ensembles/<name>.yaml`` and ``.md``."""
    search = options.search
    paths.check_name("ensemble", name)
    if not 0.0 < search.threshold < 1.0:
        raise ConfigError(f"--threshold must be in (0, 1), got {search.threshold}")
    paths.ensembles_dir().mkdir(parents=True, exist_ok=True)
    clean_stale_temps(paths.ensembles_dir(), STALE_AFTER_S)  # recipes of killed ensembles
    _check_writable(paths.ensembles_dir(), options.csv, options.truth_csv)
    with locks.hold_runs(member_runs(experiments)):  # shared: no member fold is retrained meanwhile
        members = open_members(experiments, log)
        comp, views = members.comp, members.views
        if search.per_class and comp.task == "multiclass":
            raise ConfigError("--per-class: per-class weights are for multilabel tasks (the argmax of a multiclass "
                              "task couples the classes, so members take one weight each)")
        checkpoints = recipe.checkpoints(sorted({e.name for e in members.exps}), sorted(set(members.folds["fold"])))
        images = store.Images(views, members.truth, members.adapter, comp.task)
        log(f"OOF of {', '.join(v.label for v in views)}: {len(images)} images x {len(comp.classes)} classes at "
            f"their original sizes, {len(set(members.folds['fold']))} folds")
        out, uncertain = _search(images, members, options, log)
        rules = postprocess.candidate_rules(original_areas(views[0], members.adapter))
        nat = native.evaluate(images, out.weights, views[0].fold_of, pair_metric(comp.metric),
                              rules=rules if options.postprocess else None, log=log, workers=options.workers)
        choice = choose(nat, options.force_blend)
        rec = recipe.build(name, members, checkpoints, out, nat, choice,
                           search={"method": search.method, "per_class": search.per_class,
                                   "threshold": search.threshold,
                                   "steps": len(out.search.path) if search.method == "caruana" else search.trials,
                                   "uncertain_fraction": round(uncertain, 6)})
        yaml_path, md_path = recipe.write(rec)
        # W&B run (offline by default; never fatal) if any member tracks
        tracking.log_ensemble(to_plain(rec), {c: v["in_sample"] for c, v in rec.scores["per_class"].items()},
                              (yaml_path, md_path), members.exps[0].tracking,
                              enabled=any(e.tracking.wandb for e in members.exps))
        for line in recipe.summary(rec):
            log(line)
        log(f"wrote {yaml_path.relative_to(paths.project())} and {md_path.relative_to(paths.project())}")
        _write_csvs(images, nat.plans[(choice.candidate, None)], list(rec.thresholds), comp, options, log)
        return yaml_path, md_path, {"oof": out, "native": nat, "recipe": rec}


def _search(images: store.Images, members: Members, options: EnsembleOptions, log) -> tuple[nested.Searched, float]:
    """Every candidate's weights on every selection set, searched on the compact view (built and
    dropped here, so its memory is free again for the native pass); -> (searches, the share of
    pixels the weights can change)."""
    comp = members.comp
    ev = compact.from_images(images, options.search.threshold, options.workers)
    total = int(sum(h * w for h, w in members.truth.sizes)) * (len(comp.classes) if comp.task == "multilabel" else 1)
    uncertain = ev.uncertain / max(total, 1)
    log(f"search view: {uncertain:.3%} of pixels can change with the weights")
    out = nested.search_all(ev, members.views[0].fold_of, pair_metric(comp.metric), options.search, log)
    return out, uncertain


def _write_csvs(images: store.Images, plan: native.NativePlan, thresholds: list[float], comp,
                options: EnsembleOptions, log) -> None:
    """``--csv`` (the recipe's OOF at native size) and ``--truth-csv`` (the training truth), if asked for."""
    csv, truth_csv = options.csv, options.truth_csv
    if csv:
        native.write_csv(csv, images, plan.weights, thresholds, plan.rules, comp)
        log(f"wrote {csv}: the recipe's OOF predictions of the training images at native size")
    if truth_csv:
        native.write_truth_csv(truth_csv, images.adapter, images.ids, comp)
        log(f"wrote {truth_csv}: the training truth; `competition score {csv or 'OOF.csv'} --truth "
            f"{truth_csv}` gives the in-sample native-resolution CV")


def choose(nat: native.NativeOutcome, force_blend: bool) -> Choice:
    """The candidate the recipe is written for, and why: the best nested native-resolution estimate
    (the honest one; in-sample when nested CV was skipped), unless the weighted blend is forced."""
    if force_blend:
        return Choice("search", "forced by --force-blend")
    scores = nat.nested or nat.in_sample
    kind = "nested" if nat.nested else "in-sample (nested CV skipped)"
    best = max(nested.CANDIDATES, key=lambda p: (round(scores[p], 12), p == "search"))
    others = ", ".join(f"{recipe.CANDIDATE_NAMES[p]} {scores[p]:.4f}" for p in nested.CANDIDATES if p != best)
    return Choice(best, f"best {kind} native-resolution estimate: {scores[best]:.4f} (vs {others})")


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
