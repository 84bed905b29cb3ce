"""The command line: one subcommand per pipeline stage. Thin: parse, call one function, print."""
from __future__ import annotations

import argparse
import sys

from competition.config import DEFAULT_COMPETITION, DEFAULT_EXPERIMENT, ConfigError


def _comp(p: argparse.ArgumentParser) -> None:
    p.add_argument("--comp", default=DEFAULT_COMPETITION,
                   help="competition name (configs/competitions/<name>.yaml) or a YAML path")


def cmd_folds(args) -> int:
    from competition import folds
    from competition.config import load_competition
    from competition.data.adapters import make_adapter
    cfg = load_competition(args.comp)
    adapter = make_adapter(cfg)
    path, df, created = folds.run(cfg, adapter, k=args.k, seed=args.seed, force=args.force)
    if created:
        print(f"wrote {path}: {len(df)} images, {df['group'].nunique()} groups, {df['fold'].nunique()} folds; "
              f"no group spans two folds")
    else:
        print(f"{path} exists and matches the dataset; kept it (teammates share it through git). "
              f"Use --force (make folds FORCE=1) to regenerate.")
    print(folds.summary(df, adapter))
    return 0


def cmd_score(args) -> int:
    from competition import score
    from competition.config import load_competition
    from competition.data.base import safe_join
    cfg = load_competition(args.comp)
    truth = args.truth
    if truth is None:
        if not cfg.submission.test_truth:
            raise ConfigError(f"{cfg.name}: no --truth given and submission.test_truth is not set")
        from competition.data.adapters import make_adapter
        make_adapter(cfg)  # generates the embedded data (and its truth) on first use
        truth = safe_join(cfg.root(), cfg.submission.test_truth, "submission.test_truth")
    result = score.score_files(args.submission, truth, cfg, lenient=args.lenient)
    print(result.format())
    return 0


def cmd_train(args) -> int:
    from competition.config import load_competition, load_experiment
    from competition.folds import load_folds
    from competition.train import distributed as dd
    from competition.train.loop import fit
    exp = load_experiment(args.exp)
    if args.fold == "all":
        folds = sorted(set(load_folds(load_competition(exp.competition))["fold"]))
    else:
        try:
            folds = [int(args.fold)]
        except ValueError:
            raise ConfigError(f"--fold expects a fold number or 'all', got {args.fold!r}") from None
    try:
        for k in folds:
            fit(exp, k, restart=args.restart)
    finally:
        dd.teardown(dd.setup())
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="competition", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("folds", help="write folds/<competition>.csv with (Stratified)GroupKFold")
    _comp(p)
    p.add_argument("-k", type=int, default=None, help="number of folds (default: the config's `folds`)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the config's `fold_seed`)")
    p.add_argument("--force", action="store_true", help="overwrite an existing folds file")
    p.set_defaults(fn=cmd_folds)

    p = sub.add_parser("score", help="score a submission CSV with the competition's metric")
    _comp(p)
    p.add_argument("submission")
    p.add_argument("--truth", default=None, help="truth CSV (default: the competition's submission.test_truth)")
    p.add_argument("--lenient", action="store_true",
                   help="score missing/malformed rows as empty, as a leaderboard would, and report them")
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("train", help="train one fold (or all) of an experiment; resumes from last.pt")
    p.add_argument("--exp", default=DEFAULT_EXPERIMENT,
                   help="experiment name (configs/experiments/<name>.yaml) or a YAML path")
    p.add_argument("--fold", default="0", help="fold number, or 'all' to train every fold in turn")
    p.add_argument("--restart", action="store_true", help="ignore last.pt and start the fold over")
    p.set_defaults(fn=cmd_train)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from competition.data.base import DataError
    try:
        return args.fn(args)
    except (ConfigError, DataError, ValueError, KeyError, FileNotFoundError) as e:
        # Expected user errors: one clear message, no traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
