"""``competition ensemble`` end to end: open the members, search the weights on the compact view,
re-choose and score at native resolution, pick the candidate, write the recipe (and its CSVs).

Every choice and score leaves out the members' ``data.exclude`` images (their union), unless
``--include-excluded``; the recipe records their count and hash (``excluded``)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NamedTuple

from competition import locks, paths, tracking
from competition.config import ConfigError, RecipeExclusion, load_experiment, to_plain
from competition.cv import compact, native, postprocess
from competition.cv import views as store
from competition.ensemble import nested, recipe
from competition.ensemble.members import Members, member_runs, open_members, original_areas, parse_member
from competition.ensemble.options import EnsembleOptions
from competition.folds import Exclusion, excluded
from competition.io import STALE_AFTER_S, clean_stale_temps
from competition.metrics import pair_metric


class Choice(NamedTuple):
    """The candidate the recipe is written for, and why (as the recipe and its report say it)."""
    candidate: str
    why: str


def run(name: str, experiments: list[str], options: EnsembleOptions = EnsembleOptions(),
        log=print, *, include_excluded: bool = False) -> tuple[Path, Path, dict]:
    """Choose the ensemble on OOF at each image's original size (weights, thresholds, post-processing),
    estimate it honestly, write ``ensembles/<name>.yaml`` and ``.md``. ``include_excluded``: choose
    and score on the members' ``data.exclude`` images too."""
    search = options.search
    paths.check_name("ensemble", name)
    if not 0.0 < search.threshold < 1.0:
        raise ConfigError(f"--threshold must be in (0, 1), got {search.threshold}")
    paths.ensembles_dir().mkdir(parents=True, exist_ok=True)
    clean_stale_temps(paths.ensembles_dir(), STALE_AFTER_S)  # recipes of killed ensembles
    _check_writable(paths.ensembles_dir(), options.csv, options.truth_csv)
    # Shared locks: no member fold (nor, with --full-data, all-data run) is retrained meanwhile; two
    # ordered sets, as a fold number and "all-data" have no order between them.
    whole = [paths.all_data_run(e) for e in _experiment_names(experiments)] if options.full_data else []
    with locks.hold_runs(member_runs(experiments)), locks.hold_runs([r for r in whole if r.root.is_dir()]):
        members = open_members(experiments, log)
        comp, views = members.comp, members.views
        if search.per_class and comp.task == "multiclass":
            raise ConfigError("--per-class: per-class weights are for multilabel tasks (the argmax of a multiclass "
                              "task couples the classes, so members take one weight each)")
        checkpoints = recipe.checkpoints(sorted({e.name for e in members.exps}), sorted(set(members.folds["fold"])),
                                         options.full_data, log)
        excl = _exclusion(members, log)
        images = store.Images(views, members.truth, members.adapter, comp.task)
        if not include_excluded:
            images = images.without(excl.ids)
        if len(excl):
            log(f"data.exclude: {len(excl)} image(s), sha256 {excl.sha256}: "
                + ("chosen and scored on too (--include-excluded)" if include_excluded
                   else "left out of the choice and the scores"))
        log(f"OOF of {', '.join(v.label for v in views)}: {len(images)} images x {len(comp.classes)} classes at "
            f"their original sizes, {len(set(members.folds['fold']))} folds")
        out, uncertain = _search(images, members, options, log)
        rules = postprocess.candidate_rules(original_areas(images.members[0], members.adapter))
        nat = native.evaluate(images, out.weights, images.members[0].fold_of, pair_metric(comp.metric),
                              rules=rules if options.postprocess else None, log=log, workers=options.workers)
        choice = choose(nat, options.force_blend)
        rec = recipe.build(name, members, checkpoints, out, nat, choice,
                           search={"method": search.method, "per_class": search.per_class,
                                   "threshold": search.threshold,
                                   "steps": len(out.search.path) if search.method == "caruana" else search.trials,
                                   "uncertain_fraction": round(uncertain, 6)})
        rec = rec.model_copy(update={"excluded": RecipeExclusion(count=len(excl), sha256=excl.sha256,
                                                                 scored=include_excluded and len(excl) > 0)})
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


def _experiment_names(specs: list[str]) -> list[str]:
    """The experiments of ``EXP`` / ``EXP:VARIANT`` specs, as their run folders name them."""
    return sorted({load_experiment(parse_member(s)[0]).name for s in specs})


def _search(images: store.Images, members: Members, options: EnsembleOptions, log) -> tuple[nested.Searched, float]:
    """Every candidate's weights on every selection set, searched on the compact view (built and
    dropped here, so its memory is free again for the native pass); -> (searches, the share of
    pixels the weights can change)."""
    comp = members.comp
    ev = compact.from_images(images, options.search.threshold, options.workers)
    total = int(sum(h * w for h, w in images.truth.sizes)) * (len(comp.classes) if comp.task == "multilabel" else 1)
    uncertain = ev.uncertain / max(total, 1)
    log(f"search view: {uncertain:.3%} of pixels can change with the weights")
    out = nested.search_all(ev, images.members[0].fold_of, pair_metric(comp.metric), options.search, log)
    return out, uncertain


def _exclusion(members: Members, log) -> Exclusion:
    """The union of the members' ``data.exclude`` images: an image any member's owner found mislabelled
    is not one to choose weights on (each list checked against the folds file)."""
    per = {e.name: excluded(e.data.exclude, members.folds) for e in members.exps}
    ids = frozenset().union(*(x.ids for x in per.values()))
    if len({x.ids for x in per.values()}) > 1:
        log("members exclude different images (" + ", ".join(f"{n}: {len(x)}" for n, x in per.items())
            + f"); their union counts, {len(ids)} image(s)")
    return Exclusion(ids, "the members' data.exclude")


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
