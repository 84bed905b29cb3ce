"""``ensembles/<name>.yaml`` (the :class:`~competition.config.Recipe` that ``competition submit`` reads)
and ``ensembles/<name>.md`` (the same choice and its scores, per class, for people).

A member runs its fold models at submit time, or with ``--full-data`` (when its experiment has a
finished ``runs/<exp>/all-data/`` run) its one full-data model; its weight, the thresholds and the
post-processing are chosen on the folds' OOF either way, and every score is the fold models'.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from competition import paths
from competition.config import (
    ConfigError,
    Recipe,
    RecipeCheckpoint,
    atomic_write_text,
    dump_yaml,
    read_yaml,
    validate,
)
from competition.cv.blend import normalized, threshold_value
from competition.ensemble.members import Members
from competition.io import file_hash

# What may differ between an experiment's all-data run and its fold runs (config.yaml's experiment):
# the epoch count (the all-data rule) and what never changes a result.
ALL_DATA_MAY_DIFFER = ("train.epochs", "train.early_stopping", "train.progress", "data.workers", "data.cache")


@dataclass(frozen=True)
class MemberModels:
    """What submit runs for one experiment: its fold models, or its all-data model (``full_data``), and
    the checkpoint each started from (``model.init_from``), by run (``fold<k>`` / ``all-data``)."""

    checkpoints: list[RecipeCheckpoint]
    full_data: bool = False
    init_from: dict[str, RecipeCheckpoint] = field(default_factory=dict)


def _checkpoint(rp: paths.RunPaths) -> RecipeCheckpoint:
    return RecipeCheckpoint(path=rp.best.relative_to(paths.project()).as_posix(), sha256=file_hash(rp.best))


def _parents(runs: list[paths.RunPaths]) -> dict[str, RecipeCheckpoint]:
    """The parent each run's config.yaml records (``init_from``, ``init_from_sha256``), by run label."""
    out = {}
    for rp in runs:
        cfg = read_yaml(rp.config) if rp.config.is_file() else {}
        if isinstance(cfg.get("init_from"), str) and isinstance(cfg.get("init_from_sha256"), str):
            out[rp.label] = RecipeCheckpoint(path=cfg["init_from"], sha256=cfg["init_from_sha256"])
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _same_experiment(all_data: paths.RunPaths, fold: paths.RunPaths) -> None:
    """The all-data model is the fold models' recipe trained on all the data: the same experiment but for
    its epoch count. Anything else means the OOF that chose its weight is of another model."""
    if not (all_data.config.is_file() and fold.config.is_file()):
        return
    a = _flat(read_yaml(all_data.config).get("experiment") or {})
    b = _flat(read_yaml(fold.config).get("experiment") or {})
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ALL_DATA_MAY_DIFFER
                     and not k.startswith("tracking."))
    if changed:
        raise ConfigError(f"--full-data: {all_data.root} was trained with another configuration than "
                          f"{fold.root} (changed: {changed[:10]}{' ...' if len(changed) > 10 else ''}); its weight "
                          f"would be chosen on another model's OOF: retrain it (make train EXP={all_data.experiment} "
                          f"FOLD={paths.ALL_DATA} RESTART=1) or leave out --full-data")


def checkpoints(experiments: list[str], folds: list[int], full_data: bool = False,
                log=print) -> dict[str, MemberModels]:
    """Every member's models with their content hashes: its ``best.pt`` per fold (a missing one is an
    error), or with ``full_data`` its all-data run's ``best.pt`` where that run has finished."""
    out, missing = {}, []
    for e in experiments:
        whole = paths.all_data_run(e)
        if full_data and whole.metrics.is_file() and whole.best.is_file():
            _same_experiment(whole, paths.run(e, folds[0]))
            out[e] = MemberModels([_checkpoint(whole)], True, _parents([whole]))
            continue
        if full_data:
            log(f"--full-data: {e} has no finished all-data run ({whole.metrics.relative_to(paths.project())}); "
                f"submit uses its fold models")
        runs = [paths.run(e, k) for k in folds]
        missing += [str(rp.best.relative_to(paths.project())) for rp in runs if not rp.best.is_file()]
        if not missing:
            out[e] = MemberModels([_checkpoint(rp) for rp in runs], False, _parents(runs))
    if missing:
        raise ConfigError(f"checkpoint(s) {missing} not found: a recipe must name every fold model "
                          f"(train the fold, or copy the runs/ folder it came from)")
    if full_data and not any(m.full_data for m in out.values()):
        raise ConfigError(f"--full-data: none of {experiments} has a finished all-data run; train one first "
                          f"(make train EXP={experiments[0]} FOLD={paths.ALL_DATA})")
    return out


CANDIDATE_NAMES = {"search": "weighted ensemble", "single": "best single", "equal": "equal weights"}


def _r(x) -> float | None:
    return None if x is None else round(float(x), 6)


def build(name: str, members: Members, ckpts: dict, out, nat, choice: tuple[str, str], *, search: dict) -> Recipe:
    """The recipe for the chosen candidate: its in-sample weights with the thresholds and post-processing
    chosen on them (all at the images' original sizes), and every score beside it.

    ``ckpts``: :func:`checkpoints` of the members (:class:`MemberModels`); ``out`` / ``nat``: the searches
    (:class:`~competition.ensemble.nested.Searched`) and their native-resolution outcome; ``choice``:
    (candidate, why) from :func:`competition.ensemble.pipeline.choose`; ``search``: the search's
    settings, as the recipe records them.
    """
    comp, exps, views = members.comp, members.exps, members.views
    chosen, why = choice
    plan = nat.plans[(chosen, None)]
    W = normalized(plan.weights)
    used = [m for m in range(W.shape[1]) if W[:, m].any()]
    glob = bool(np.all(W == W[0]))
    folds = sorted({int(f) for f in out.fold_of})
    recipe_members = [{"experiment": exps[m].name, "folds": folds,
                "checkpoints": [c.model_dump() for c in ckpts[exps[m].name].checkpoints],
                "full_data": ckpts[exps[m].name].full_data,
                "init_from": {k: c.model_dump() for k, c in ckpts[exps[m].name].init_from.items()},
                "weights": [float(W[0, m])] if glob else [float(x) for x in W[:, m]],
                "tta": list(views[m].tta), "tta_scales": list(views[m].tta_scales)} for m in used]
    single = int(np.argmax(out.weights[("single", None)][0]))
    has_nested = bool(nat.nested)

    def pair(p, where):
        return {"in_sample": _r(where.in_sample[p]), "nested": _r(where.nested.get(p))}

    def weights_of(p):  # every candidate's weights, so a search that lost is still on record
        Wp = normalized(nat.plans[(p, None)].weights)
        return {v.label: _r(Wp[:, m].mean()) for m, v in enumerate(views) if Wp[:, m].any()}

    candidates = {p: {"native": pair(p, nat), "weights": weights_of(p),
                      **({"experiment": views[single].label} if p == "single" else {})}
                  for p in ("search", "single", "equal")}
    pn = {p: nat.plans[(p, None)].dice.mean(0) for p in ("search", "single", "equal")}
    nested_pc = nat.nested_dice.get(chosen)
    kept = {views[m].label: (float(W[:, m].mean()) if m in used else 0.0) for m in range(W.shape[1])}
    scores = {
        "metric": f"{comp.metric.name}: mean over image x class pairs (empty_score {comp.metric.empty_score})",
        "resolution": "native: each training image at its original size, through the submission's resize, "
                      "thresholds and post-processing",
        "images": int(len(out.fold_of)), "folds": len(folds), "search": search,
        "chosen": chosen, "chosen_because": why,
        # Unrounded: `competition score` of the recipe's OOF CSV reproduces in_sample to 1e-9.
        "in_sample": float(nat.in_sample[chosen]),
        "nested": None if nat.nested.get(chosen) is None else float(nat.nested[chosen]),
        "nested_per_fold": {f: _r(v) for f, v in nat.nested_per_fold.get(chosen, {}).items()},
        "candidates": candidates,
        "best_single": {"experiment": views[single].label, "oof_at_threshold": _r(out.singles[single]),
                        **pair("single", nat)},
        "equal_weights": pair("equal", nat),
        "gain_over_best_single": _gain(nat, chosen, "single", has_nested),
        "gain_over_equal_weights": _gain(nat, chosen, "equal", has_nested),
        "variants": [{"member": v.label, "oof_at_threshold": _r(out.singles[m]), "weight": _r(kept[v.label])}
                     for m, v in enumerate(views)],
        "dropped_members": [views[m].label for m in range(W.shape[1]) if m not in used],
        "native_seconds": round(nat.seconds, 1),
        "per_class": {c: {"in_sample": _r(nat.plans[(chosen, None)].dice[:, i].mean()),
                          "nested": _r(nested_pc[:, i].mean()) if nested_pc is not None else None,
                          "best_single": _r(pn["single"][i]), "equal_weights": _r(pn["equal"][i])}
                      for i, c in enumerate(comp.classes)},
    }
    if nat.truth_share is not None:  # what `submit` judges a test prediction against (predict/plausible.py)
        scores["truth_share"] = {c: _r(v) for c, v in zip(comp.classes, nat.truth_share)}
    data = {
        "name": name, "competition": comp.name, "task": comp.task, "classes": list(comp.classes),
        "folds_sha256": members.folds_sha, "members": recipe_members,
        # Unrounded: the submission compares float32(p) >= float32(t) exactly as native CV did.
        "thresholds": [threshold_value(int(k)) for k in plan.levels] if comp.task == "multilabel"
        else [0.5] * len(comp.classes),
        "postprocess": {comp.classes[c]: r.model_dump(exclude_defaults=True) for c, r in sorted(plan.rules.items())},
        "scores": scores,
        "pseudo_labels": sorted({exps[m].data.pseudo.name for m in used if exps[m].data.pseudo is not None}),
    }
    return validate(Recipe, data, f"ensemble {name}")


def _gain(nat, chosen: str, other: str, has_nested: bool) -> dict:
    return {"in_sample": _r(nat.in_sample[chosen] - nat.in_sample[other]),
            "nested": _r(nat.nested[chosen] - nat.nested[other]) if has_nested else None}


def _rule_text(rule) -> str:
    if rule is None:
        return "—"
    parts = (["keep largest"] if rule.keep_largest else []) + \
        ([f"min area {rule.min_area} px"] if rule.min_area else [])
    return ", ".join(parts)


def _members_text(rec: Recipe) -> str:
    per_class_w = any(len(m.weights) > 1 for m in rec.members)
    return ", ".join(f"{m.experiment} [TTA {'+'.join(m.tta)}"
                     f"{'' if m.tta_scales == [1.0] else ' @ ' + '+'.join(f'{s:g}' for s in m.tta_scales)}]"
                     + (" [all-data model]" if m.full_data else "")
                     + ("" if per_class_w else f" ({m.weights[0]:.3f})") for m in rec.members)


def _models_lines(rec: Recipe) -> list[str]:
    """The markdown section on what submit runs (full-data members) and where the models came from
    (``model.init_from``); [] when every member runs its fold models, trained from scratch."""
    lines = []
    whole = list({m.experiment: m for m in rec.members if m.full_data}.values())  # TTA variants: once
    if whole:
        lines += ["", "## Full-data members", "",
                  "Submit runs one model per member below, trained on every training image "
                  "(`make train FOLD=all-data`), instead of its fold models. Its weight, the thresholds and the "
                  "post-processing were chosen on the fold models' OOF, and every CV score on this page is the fold "
                  "models': the full-data model has no held-out image to be scored on.", ""]
        lines += [f"- {m.experiment}: `{m.checkpoints[0].path}` (sha256 {m.checkpoints[0].sha256}); weight chosen "
                  f"on the OOF of folds {', '.join(map(str, m.folds))}" for m in whole]
    parents = list({(m.experiment, label): (m, label, c) for m in rec.members for label, c in m.init_from.items()}
                   .values())
    if parents:
        lines += ["", "## Lineage (model.init_from)", "", "| member | model | started from | sha256 |",
                  "|---|---|---|---|"]
        lines += [f"| {m.experiment} | {label} | `{c.path}` | {c.sha256} |" for m, label, c in parents]
    return lines


def _candidate_rows(s: dict):
    """(candidate, label, [native in-sample, native nested])."""
    cand = s["candidates"]
    for p in ("search", "single", "equal"):
        label = CANDIDATE_NAMES[p] + (f" ({cand[p]['experiment']})" if p == "single" else "")
        yield p, label, [cand[p]["native"]["in_sample"], cand[p]["native"]["nested"]]


def markdown(rec: Recipe) -> str:
    s = rec.scores
    per_class_w = any(len(m.weights) > 1 for m in rec.members)
    srch = s["search"]

    def f(x):
        return "—" if x is None else f"{x:.4f}"
    lines = [f"# Ensemble `{rec.name}`", "",
             f"Competition `{rec.competition}` ({rec.task}) · members: {_members_text(rec)} · "
             f"{'per-class' if per_class_w else 'global'} weights by {srch['method']} "
             f"{_binarised(rec, srch)} on the OOF at the original sizes · {s['images']} images, "
             f"{s['folds']} folds · folds file sha256 {rec.folds_sha256}{_excluded_text(rec)}", "",
             f"**Chosen: {CANDIDATE_NAMES[s['chosen']]}** — {s['chosen_because']}.", "",
             "| candidate | native in-sample | native nested CV |",
             "|---|---|---|"]
    for p, label, nums in _candidate_rows(s):
        lines.append(f"| {label}{' ✔' if p == s['chosen'] else ''} | " + " | ".join(map(f, nums)) + " |")
    lines += ["", "Native: every training image scored at its original size through the submission's blend, "
              "thresholds and post-processing (all chosen there). In-sample: "
              "chosen and scored on the same OOF (optimistic). Nested CV: chosen on the other folds' OOF, "
              "scored on the held-out fold (the honest estimate).", "",
              "## Candidate members (experiment x TTA variant)", "",
              "| member | OOF Dice at the search threshold | weight |", "|---|---|---|"]
    lines += [f"| {v['member']} | {f(v['oof_at_threshold'])} | {v['weight']:.3f} |" for v in s["variants"]]
    lines += _models_lines(rec)
    lines += ["", "## Per class (native resolution)", ""]
    head = ["class", "threshold", "post-processing"]
    if per_class_w:
        head.append("weights (" + " / ".join(m.experiment for m in rec.members) + ")")
    head += ["in-sample", "nested", "best single", "equal"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, c in enumerate(rec.classes):
        pc = s["per_class"][c]
        row = [c, f"{rec.thresholds[i]:.4f}" if rec.task == "multilabel" else "argmax",
               _rule_text(rec.postprocess.get(c))]
        if per_class_w:
            row.append(" / ".join(f"{m.weights[i]:.2f}" for m in rec.members))
        row += [f(pc["in_sample"]), f(pc["nested"]), f(pc["best_single"]), f(pc["equal_weights"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write(rec: Recipe) -> tuple[Path, Path]:
    y, m = paths.recipe(rec.name), paths.recipe_report(rec.name)
    dump_yaml(rec, y)
    atomic_write_text(m, markdown(rec))
    return y, m


def _excluded_text(rec: Recipe) -> str:
    """The curated images (data.exclude) the choice left out, or scored knowingly; "" when none."""
    x = rec.excluded
    if x is None or not x.count:
        return ""
    return (f" · {x.count} data.exclude image(s) (sha256 {x.sha256}) "
            f"{'scored too' if x.scored else 'left out of the choice and the scores'}")


def _binarised(rec: Recipe, search: dict) -> str:
    """How the OOF was binarised: multiclass tasks take the argmax, whatever threshold was passed."""
    return "by argmax" if rec.task == "multiclass" else f"at threshold {search['threshold']}"


def summary(rec: Recipe) -> list[str]:
    s = rec.scores

    def f(x):
        return "   —  " if x is None else f"{x:.4f}"

    def g(x):
        return "   —   " if x is None else f"{x:+.4f}"
    lines = ["candidate members (experiment x TTA variant):"]
    for v in s["variants"]:
        lines.append(f"  variant {v['member']:<32} OOF {f(v['oof_at_threshold'])} {_binarised(rec, s['search'])} "
                     f"-> {'kept, weight ' + format(v['weight'], '.3f') if v['weight'] else 'not kept'}")
    rows = list(_candidate_rows(s))
    width = max([27] + [len(label) for _, label, _ in rows])  # whole member names, e.g. "exp[identity+hflip]"
    lines += [f"members: {_members_text(rec)}",
              " " * (width + 3) + "native in-sample  native nested"]
    for p, label, nums in rows:
        lines.append(f"  {'*' if p == s['chosen'] else ' '} {label:<{width}}" +
                     "".join(f"{f(x):>{w}}" for x, w in zip(nums, (10, 16))))
    lines.append("weights of each candidate:")
    for p, label, _ in rows:
        if "weights" in s["candidates"][p]:
            lines.append(f"    {label:<{width}}  "
                         + ", ".join(f"{k} {v:.3f}" for k, v in s["candidates"][p]["weights"].items()))
    lines += [f"chosen: {CANDIDATE_NAMES[s['chosen']]} ({s['chosen_because']})",
              f"native-resolution CV  in-sample {f(s['in_sample'])}  nested {f(s['nested'])}",
              f"  gain over best single {g(s['gain_over_best_single']['nested'])} nested, "
              f"over equal weights {g(s['gain_over_equal_weights']['nested'])} nested "
              f"(native pass {s['native_seconds']:.1f}s)"]
    if _excluded_text(rec):
        lines.append(f"curated data:{_excluded_text(rec).removeprefix(' ·')}")
    if rec.postprocess:
        lines.append("post-processing: " + "; ".join(f"{c}: {_rule_text(r)}" for c, r in rec.postprocess.items()))
    return lines
