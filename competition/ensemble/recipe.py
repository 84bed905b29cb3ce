"""``ensembles/<name>.yaml`` (the :class:`~competition.config.Recipe` that ``competition submit`` reads)
and ``ensembles/<name>.md`` (the same choice and its scores, per class, for people)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from competition import paths
from competition.config import ConfigError, Recipe, RecipeCheckpoint, atomic_write_text, dump_yaml, validate
from competition.ensemble.blend import normalized, threshold_value


def checkpoints(experiments: list[str], folds: list[int]) -> dict[str, list[RecipeCheckpoint]]:
    """Every member's ``best.pt`` per fold, with its content hash; a missing one is an error."""
    from competition.train.checkpoint import file_hash
    out, missing = {}, []
    for e in experiments:
        out[e] = []
        for k in folds:
            p = paths.run_dir(e, k) / "best.pt"
            if not p.is_file():
                missing.append(str(p.relative_to(paths.project())))
                continue
            out[e].append(RecipeCheckpoint(path=p.relative_to(paths.project()).as_posix(), sha256=file_hash(p)))
    if missing:
        raise ConfigError(f"checkpoint(s) {missing} not found: a recipe must name every fold model "
                          f"(train the fold, or copy the runs/ folder it came from)")
    return out


def _r(x) -> float | None:
    return None if x is None else round(float(x), 6)


def _per_class_means(d: np.ndarray | None) -> np.ndarray | None:
    return None if d is None else d.mean(0)


def build(name: str, comp, folds_sha: str, experiments: list[str], ckpts: dict, out, *, tta, search: dict,
          oof_size: list[int]) -> Recipe:
    plan = out.plans[("ensemble", None)]
    W = normalized(plan.weights)
    used = [m for m in range(W.shape[1]) if W[:, m].any()]
    glob = bool(np.all(W == W[0]))
    folds = sorted({int(f) for f in out.fold_of})
    members = [{"experiment": experiments[m], "folds": folds,
                "checkpoints": [c.model_dump() for c in ckpts[experiments[m]]],
                "weights": [float(W[0, m])] if glob else [float(x) for x in W[:, m]]} for m in used]
    single = int(np.argmax(out.plans[("single", None)].weights[0]))
    nested = bool(out.nested)
    pc = {p: _per_class_means(out.plans[(p, None)].dice) for p in ("ensemble", "single", "equal")}
    pn = {p: _per_class_means(out.nested_dice.get(p)) for p in ("ensemble", "single", "equal")}

    def both(p):
        return {"in_sample": _r(out.in_sample[p]), "nested": _r(out.nested.get(p))}

    scores = {
        "metric": f"{comp.metric.name}: mean over image x class pairs (empty_score {comp.metric.empty_score})",
        "oof_size": oof_size, "images": int(len(out.fold_of)), "folds": len(folds), "search": search,
        "chosen": plan.source,
        "in_sample": _r(out.in_sample["ensemble"]), "nested": _r(out.nested.get("ensemble")),
        "nested_per_fold": {f: _r(v) for f, v in out.nested_per_fold.get("ensemble", {}).items()},
        "best_single": {"experiment": experiments[single], "oof_at_threshold": _r(out.singles[single]),
                        **both("single")},
        "equal_weights": both("equal"),
        "gain_over_best_single": {k: _r(out.in_sample["ensemble"] - out.in_sample["single"]) if k == "in_sample"
                                  else (_r(out.nested["ensemble"] - out.nested["single"]) if nested else None)
                                  for k in ("in_sample", "nested")},
        "gain_over_equal_weights": {k: _r(out.in_sample["ensemble"] - out.in_sample["equal"]) if k == "in_sample"
                                    else (_r(out.nested["ensemble"] - out.nested["equal"]) if nested else None)
                                    for k in ("in_sample", "nested")},
        "members_at_threshold": {e: _r(s) for e, s in zip(experiments, out.singles)},
        "dropped_members": [experiments[m] for m in range(W.shape[1]) if m not in used],
        "per_class": {c: {"in_sample": _r(pc["ensemble"][i]), "nested": _r(pn["ensemble"][i]) if nested else None,
                          "best_single": _r(pc["single"][i]), "equal_weights": _r(pc["equal"][i])}
                      for i, c in enumerate(comp.classes)},
    }
    data = {
        "name": name, "competition": comp.name, "task": comp.task, "classes": list(comp.classes),
        "folds_sha256": folds_sha, "members": members,
        "thresholds": [round(threshold_value(k), 6) for k in plan.levels] if comp.task == "multilabel"
        else [0.5] * len(comp.classes),
        "postprocess": {comp.classes[c]: r.model_dump(exclude_defaults=True) for c, r in sorted(plan.rules.items())},
        "tta": list(tta) if tta else list(comp.tta), "tta_scales": [1.0], "scores": scores,
    }
    return validate(Recipe, data, "--tta" if tta else f"ensemble {name}")


def _rule_text(rule) -> str:
    if rule is None:
        return "—"
    parts = (["keep largest"] if rule.keep_largest else []) + \
        ([f"min area {rule.min_area} px"] if rule.min_area else [])
    return ", ".join(parts)


def markdown(rec: Recipe, out) -> str:
    s = rec.scores
    per_class_w = any(len(m.weights) > 1 for m in rec.members)
    ws = ", ".join(f"{m.experiment}" + ("" if per_class_w else f" ({m.weights[0]:.3f})") for m in rec.members)
    srch = s["search"]

    def f(x):
        return "—" if x is None else f"{x:.4f}"
    lines = [f"# Ensemble `{rec.name}`", "",
             f"Competition `{rec.competition}` ({rec.task}) · members: {ws} · "
             f"{'per-class' if per_class_w else 'global'} weights by {srch['method']} at threshold "
             f"{srch['threshold']} · chosen: {s['chosen']} · TTA: {', '.join(rec.tta)} · OOF {s['oof_size'][0]}x"
             f"{s['oof_size'][1]}, {s['images']} images, {s['folds']} folds · folds file sha256 {rec.folds_sha256}",
             "", "| | in-sample | nested CV |", "|---|---|---|",
             f"| ensemble | {f(s['in_sample'])} | {f(s['nested'])} |",
             f"| best single ({s['best_single']['experiment']}) | {f(s['best_single']['in_sample'])} | "
             f"{f(s['best_single']['nested'])} |",
             f"| equal weights | {f(s['equal_weights']['in_sample'])} | {f(s['equal_weights']['nested'])} |",
             "", "In-sample: weights, thresholds and post-processing chosen and scored on the same OOF "
             "(optimistic). Nested CV: chosen on the other folds' OOF, scored on the held-out fold "
             "(the honest estimate). Baselines get the same threshold and post-processing tuning.", "",
             "## Per class", ""]
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


def write(rec: Recipe, out) -> tuple[Path, Path]:
    folder = paths.ensembles_dir()
    y, m = folder / f"{rec.name}.yaml", folder / f"{rec.name}.md"
    dump_yaml(rec, y)
    atomic_write_text(m, markdown(rec, out))
    return y, m


def summary(rec: Recipe, out) -> list[str]:
    s = rec.scores

    def f(x):
        return "   —  " if x is None else f"{x:.4f}"

    def g(x):
        return "   —   " if x is None else f"{x:+.4f}"
    members = ", ".join(f"{m.experiment} {m.weights[0]:.3f}" if len(m.weights) == 1 else
                        f"{m.experiment} (per class, mean {np.mean(m.weights):.3f})" for m in rec.members)
    lines = [f"weights: {members} ({s['search']['method']}; chosen: {s['chosen']})"]
    if s["dropped_members"]:
        lines.append(f"weight 0, left out of the recipe: {', '.join(s['dropped_members'])}")
    lines += ["                          in-sample   nested CV",
              f"  ensemble                  {f(s['in_sample'])}     {f(s['nested'])}",
              f"  best single ({s['best_single']['experiment']})".ljust(28) +
              f"{f(s['best_single']['in_sample'])}     {f(s['best_single']['nested'])}",
              f"  equal weights             {f(s['equal_weights']['in_sample'])}     {f(s['equal_weights']['nested'])}",
              f"  gain over best single     {g(s['gain_over_best_single']['in_sample'])}    "
              f"{g(s['gain_over_best_single']['nested'])}",
              f"  gain over equal weights   {g(s['gain_over_equal_weights']['in_sample'])}    "
              f"{g(s['gain_over_equal_weights']['nested'])}",
              f"  (best single at threshold {s['search']['threshold']}, untuned: "
              f"{f(s['best_single']['oof_at_threshold'])})"]
    if rec.postprocess:
        lines.append("post-processing: " + "; ".join(f"{c}: {_rule_text(r)}" for c, r in rec.postprocess.items()))
    return lines
