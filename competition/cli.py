"""The command line: one subcommand per pipeline stage. Thin: parse, call one function, print."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pandas as pd

from competition.config import (
    DEFAULT_COMPETITION,
    DEFAULT_EXPERIMENT,
    ConfigError,
    find_config,
    load_competition,
    load_experiment,
    parse_overrides,
)
from competition.data.adapters import make_adapter
from competition.data.base import safe_join
from competition.durations import parse_budget
from competition.errors import UserError, describe_error
from competition.installs import missing_extra
from competition.paths import ALL_DATA

# Each verb imports its stage (folds, score, train, tune, ...) inside its cmd_* function, when it runs:
# so the core works without the optional extras (optuna, wandb, matplotlib) and `competition --help`
# answers without importing torch. Those imports are the only ones kept inside functions here.


def _comp(p: argparse.ArgumentParser) -> None:
    p.add_argument("--comp", default=DEFAULT_COMPETITION,
                   help="competition name (configs/competitions/<name>.yaml) or a YAML path")


def cmd_folds(args) -> int:
    from competition import folds  # noqa: PLC0415 (stage, imported when its verb runs)
    cfg = load_competition(args.comp)
    adapter = make_adapter(cfg)
    path, df, created = folds.run(cfg, adapter, k=args.k, seed=args.seed, force=args.force,
                                  label_check=not args.no_label_check)
    if created:
        print(f"wrote {path}: {len(df)} images, {df['group'].nunique()} groups, {df['fold'].nunique()} folds; "
              f"no group spans two folds")
    else:
        print(f"{path} exists and matches the dataset; kept it (teammates share it through git). "
              f"Use --force (make folds FORCE=1) to regenerate.")
    print(folds.summary(df, adapter))
    return 0


def cmd_init(args) -> int:
    from competition.init import init  # noqa: PLC0415 (stage, imported when its verb runs)
    result = init(args.data_dir, name=args.name, force=args.force, budget=args.budget, gpus=args.gpus)
    print(result.format())
    return 1 if result.problems else 0


def cmd_score(args) -> int:
    from competition import score  # noqa: PLC0415 (stage, imported when its verb runs)
    if args.size is not None and args.sizes_from is not None:
        raise ConfigError("give --size HxW (one size for every image) or --sizes-from DIR, not both")
    size = score.parse_size(args.size) if args.size is not None else None
    cfg = load_competition(args.comp)
    truth = args.truth
    if truth is None:
        if not cfg.submission.test_truth:
            raise ConfigError(f"{cfg.name}: no --truth given and submission.test_truth is not set")
        make_adapter(cfg)  # generates the embedded data (and its truth) on first use
        truth = safe_join(cfg.root(), cfg.submission.test_truth, "submission.test_truth")
    result = score.score_files(args.submission, truth, cfg, sizes=size, lenient=args.lenient,
                               sizes_from=args.sizes_from)
    print(result.format())
    return 0


def cmd_train(args) -> int:
    from competition.folds import load_folds  # noqa: PLC0415 (stage, imported when its verb runs)
    from competition.train import distributed as dd  # noqa: PLC0415 (stage, imported when its verb runs)
    from competition.train.loop import fit  # noqa: PLC0415 (stage, imported when its verb runs)
    exp = load_experiment(args.exp, parse_overrides(args.set))
    overrides = {"--batch-size": args.batch_size, "--input-size": args.input_size, "--workers": args.workers}
    if not args.dry_run:
        given = [flag for flag, value in overrides.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to --dry-run only; to train with other values, use "
                              f"--set (e.g. --set data.batch_size=4) or a variant experiment (`extends: {exp.name}`)")
        if args.comp is not None and not args.check:
            raise ConfigError(f"--comp applies to --check and --dry-run only; to train {exp.name} on {args.comp}, "
                              f"write an experiment that names it (`extends: {exp.name}` and "
                              f"`competition: {args.comp}`)")
    elif args.restart:
        raise ConfigError("--restart does nothing with --dry-run (a dry run never reads or writes a run folder)")
    comp = None
    if args.comp is not None:
        from competition.train.dryrun import resolve_competition  # noqa: PLC0415 (stage, imported when its verb runs)
        comp = resolve_competition(exp, args.comp)  # refused unless it has the experiment's classes
    if args.fold == "all":  # the CV folds; the all-data run is asked for by name
        folds = sorted(set(load_folds(comp or load_competition(exp.competition))["fold"]))
    elif args.fold == ALL_DATA:
        folds = [ALL_DATA]
    else:
        try:
            folds = [int(args.fold)]
        except ValueError:
            raise ConfigError(f"--fold expects a fold number, 'all' (every CV fold) or '{ALL_DATA}' (one model "
                              f"on every training image, runs/<exp>/{ALL_DATA}/), got {args.fold!r}") from None
    if args.dry_run:
        from competition.train.dryrun import dry_run  # noqa: PLC0415 (stage, imported when its verb runs)
        for k in folds:
            dry_run(exp, k, comp, batch_size=args.batch_size, input_size=args.input_size, workers=args.workers)
        return 0
    if args.check:
        from competition.train.check import check_run  # noqa: PLC0415 (stage, imported when its verb runs)
        t0 = time.time()
        for k in folds:
            check_run(exp, k, comp, restart=args.restart)
        print(f"configuration ok: {exp.name} fold(s) {', '.join(map(str, folds))}"
              f"{f' on {comp.name}' if comp is not None else ''} "
              f"({time.time() - t0:.1f}s; the model was built without weights, nothing was written)")
        return 0
    budget_s = parse_budget(args.budget) if args.budget else None
    t0 = time.time()
    try:
        for i, k in enumerate(folds):
            # --budget over several folds: each fold gets an equal share of what is left when it starts.
            deadline = None if budget_s is None else time.time() + (t0 + budget_s - time.time()) / (len(folds) - i)
            fit(exp, k, restart=args.restart, deadline=deadline)
    finally:
        dd.teardown(dd.setup())
    return 0


def cmd_pseudo(args) -> int:
    from competition import pseudo  # noqa: PLC0415 (stage, imported when its verb runs)
    pseudo.produce(args.ensemble, args.name, args.min_confidence, args.device)
    return 0


def cmd_tune(args) -> int:
    from competition import tune  # noqa: PLC0415 (stage, imported when its verb runs; optuna: the tune extra)
    space = args.space or _default_space(args.exp)
    if args.report:
        tune.show_report(args.exp, space, storage=args.storage, study=args.study)
        return 0
    folds = None
    if args.fold is not None:
        try:
            folds = [int(f) for f in args.fold.split(",")]
        except ValueError:
            raise ConfigError(f"--fold expects fold numbers separated by commas, got {args.fold!r}") from None
    if args.workers < 1:
        raise ConfigError(f"--workers expects a number >= 1, got {args.workers}")
    tune.tune(args.exp, space, tune.Options(trials=args.trials, folds=folds, workers=args.workers,
                                            storage=args.storage, study=args.study,
                                            overrides=parse_overrides(args.set)))
    return 0


def _default_space(exp: str) -> str:
    """configs/search/<exp>.yaml when there is one, else configs/search/default.yaml."""
    try:
        find_config("search", Path(exp).stem)
        return Path(exp).stem
    except ConfigError:
        return "default"


def cmd_runs(args) -> int:
    from competition import runs_table  # noqa: PLC0415 (stage, imported when its verb runs)
    df, per_class = runs_table.collect(pattern=args.exp)
    if df.empty:
        print(f"no finished runs{f' matching {args.exp!r}' if args.exp != '*' else ''} under runs/ "
              f"(metrics.json is written when a fold finishes training)")
        return 0
    t = runs_table.table(df, sort=args.sort, ascending=args.ascending)
    with pd.option_context("display.max_columns", None, "display.width", 250, "display.max_colwidth", 60,
                           "display.float_format", "{:.4g}".format):
        print(t.to_string(index=False))
    if args.plot:
        path = runs_table.plot(df, per_class, Path(args.plot))
        print(f"wrote {path}")
    return 0


def _report_submission(r, upload: bool, message: str | None, competition: str) -> None:
    print(f"wrote {r.path}: {r.rows} rows, validated; {r.images} images in {r.seconds:.1f}s "
          f"({r.images_per_s:.2f} img/s); row added to submissions/ledger.csv")
    if upload:
        from competition import ledger  # noqa: PLC0415 (the lb verb's stage, imported for --upload only)
        print(ledger.upload(r.path, load_competition(competition), message or r.path.name))


def cmd_submit(args) -> int:
    from competition.predict.options import Inference  # noqa: PLC0415 (stage, imported when its verb runs)
    from competition.predict.run import submit  # noqa: PLC0415 (stage, imported when its verb runs)
    inference = Inference(device=args.device, batch_size=args.batch_size, workers=args.workers,
                          progress=not args.no_progress, force=args.force, save_probs=args.save_probs,
                          from_probs=args.from_probs, runtime=args.runtime, compile=args.compile)
    r = submit(args.ensemble, args.out, inference)
    _report_submission(r, args.upload, args.message, r.competition)
    return 0


def cmd_predict(args) -> int:
    from competition.predict.options import Inference  # noqa: PLC0415 (stage, imported when its verb runs)
    from competition.predict.run import predict_experiment  # noqa: PLC0415 (stage, imported when its verb runs)
    inference = Inference(device=args.device, batch_size=args.batch_size, workers=args.workers,
                          progress=not args.no_progress, force=args.force, runtime=args.runtime, compile=args.compile)
    r = predict_experiment(args.exp, args.out, inference, overrides=parse_overrides(args.set))
    _report_submission(r, args.upload, args.message, r.competition)
    return 0


def cmd_lb(args) -> int:
    from competition import ledger  # noqa: PLC0415 (stage, imported when its verb runs)
    if args.submission is None and (args.public is not None or args.private is not None or args.upload):
        raise ConfigError("--public, --private and --upload need the SUBMISSION they are about")
    if args.fetch and (args.public is not None or args.private is not None):
        raise ConfigError("--fetch reads the scores from Kaggle; give --public/--private without it")
    if args.fetch:
        from competition import lbfetch  # noqa: PLC0415 (stage, imported when its flag is given)
        for line in lbfetch.fetch().lines():
            print(line)
    if args.upload:
        print(ledger.upload_recorded(args.submission, args.message))
    if args.public is not None or args.private is not None:
        ledger.record(args.submission, args.public, args.private)
    df = ledger.read()
    print(ledger.format_table(df))
    png = ledger.scatter(df)
    print(f"wrote {png}" if png
          else "no leaderboard scores yet: record one with `competition lb SUBMISSION --public X`")
    return 0


def cmd_bundle(args) -> int:
    from competition.predict.bundle import make_bundle  # noqa: PLC0415 (stage, imported when its verb runs)
    from competition.predict.estimate import estimate_bundle  # noqa: PLC0415 (stage, imported when its verb runs)
    from competition.predict.options import Inference  # noqa: PLC0415 (stage, imported when its verb runs)
    if args.test_images is not None and args.test_images < 1:
        raise ConfigError(f"--test-images {args.test_images}: expected a number of images >= 1")
    out = make_bundle(args.ensemble, args.out, wheels=args.wheels, wheels_torch=args.wheels_torch,
                      wheels_python=args.wheels_python, runtime=args.runtime)
    if not args.no_estimate:
        for line in estimate_bundle(out, Inference(progress=False, runtime=args.runtime), args.test_images):
            print(line)
    return 0


def cmd_export(args) -> int:
    from competition.predict.export import export_recipe  # noqa: PLC0415 (stage, imported when its verb runs)
    export_recipe(args.ensemble, args.format, Path(args.out) if args.out else None)
    return 0


def cmd_oof(args) -> int:
    from competition.cv import oofscore  # noqa: PLC0415 (stage, imported when its verb runs)
    oofscore.run(args.exp, overrides=parse_overrides(args.set), options=oofscore.OofOptions(
        tta=args.tta, scales=args.scales, suspects=args.suspects, top=args.top, csv=args.csv, truth_csv=args.truth_csv,
        workers=args.workers, include_excluded=args.include_excluded, write_exclude=args.write_exclude,
        force=args.force))
    return 0


def cmd_ensemble(args) -> int:
    from competition import ensemble  # noqa: PLC0415 (stage, imported when its verb runs)
    search = ensemble.SearchOptions(method=args.method, per_class=args.per_class, steps=args.steps,
                                    trials=args.trials, nested=not args.no_nested, threshold=args.threshold)
    ensemble.run(args.name, args.experiments, ensemble.EnsembleOptions(
        search=search, postprocess=not args.no_postprocess, force_blend=args.force_blend, workers=args.workers,
        csv=args.csv, truth_csv=args.truth_csv, full_data=args.full_data), include_excluded=args.include_excluded)
    return 0


def _inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="CSV path (default: submissions/<YYYYmmdd-HHMMSS>-<name>.csv)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the experiments')")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the experiments')")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--upload", action="store_true",
                   help="then submit it with the Kaggle CLI (needs submission.kaggle and a configured CLI)")
    p.add_argument("-m", "--message", default=None, help="Kaggle submission message (default: the file name)")
    p.add_argument("--force", action="store_true",
                   help="write the CSV even when it cannot be right (a class empty in every test image though "
                        "training has it in most, every mask empty, a class covering every pixel)")
    _runtime_flag(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the networks first (--runtime torch; for a GPU: compiling takes a while)")


def _runtime_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                   help="what runs the networks: torch (default) or onnx (ONNX Runtime on their ONNX export; needs "
                        "the export extra); TTA, resizing and thresholds are the same code either way")


def _set_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="override an experiment key, e.g. --set train.epochs=3 (repeatable; validated like the "
                        "YAML and recorded in the run's resolved config)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="competition", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("folds", help="write folds/<competition>.csv with (Stratified)GroupKFold")
    _comp(p)
    p.add_argument("-k", type=int, default=None, help="number of folds (default: the config's `folds`)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the config's `fold_seed`)")
    p.add_argument("--force", action="store_true", help="overwrite an existing folds file")
    p.add_argument("--no-label-check", action="store_true",
                   help="skip the check that the masks fit their images (a transposed RLE pixel order); "
                        "the RLE format checks still run")
    p.set_defaults(fn=cmd_folds)

    p = sub.add_parser("init", help="inspect a data folder; write configs/competitions/<name>.yaml (commented) "
                                    "and a starter experiment configs/experiments/<name>-baseline.yaml")
    p.add_argument("data_dir", metavar="DATA_DIR", help="the competition's data folder")
    p.add_argument("--name", default=None, help="competition name (default: the folder's name)")
    p.add_argument("--force", action="store_true", help="overwrite existing config files of that name")
    p.add_argument("--budget", default=None, metavar="TIME",
                   help="plan the starter experiment so that all its folds train within TIME (30m, 4h, 1h30m), "
                        "from training steps measured on this machine")
    p.add_argument("--gpus", type=int, default=1, help="GPUs the budget's runs will use (DDP; default 1)")
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser("score", help="score a submission CSV with the competition's metric")
    _comp(p)
    p.add_argument("submission")
    p.add_argument("--truth", default=None, help="truth CSV (default: the competition's submission.test_truth)")
    p.add_argument("--lenient", action="store_true",
                   help="score missing/malformed rows as empty, as a leaderboard would, and report them")
    p.add_argument("--sizes-from", default=None, metavar="DIR",
                   help="a truth without height/width columns: read each image's size from its file in DIR "
                        "(found by id, with or without the extension, searched recursively)")
    p.add_argument("--size", default=None, metavar="HxW",
                   help="a truth without height/width columns: one size for every image, height first (360x480)")
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("train", help="train one fold (or all) of an experiment; resumes from last.pt")
    p.add_argument("--exp", default=DEFAULT_EXPERIMENT,
                   help="experiment name (configs/experiments/<name>.yaml) or a YAML path")
    p.add_argument("--fold", default="0", help="fold number, 'all' to train every CV fold in turn, or 'all-data': "
                   "one model on every training image (no validation, no OOF) -> runs/<exp>/all-data/")
    p.add_argument("--restart", action="store_true", help="ignore last.pt and start the fold over")
    p.add_argument("--budget", default=None, metavar="TIME",
                   help="stop cleanly (a complete last.pt; train again to continue) before TIME runs out, e.g. 30m, "
                        "4h; with --fold all, shared out over the folds")
    _set_flag(p)
    p.add_argument("--check", action="store_true",
                   help="validate the whole configuration (names, augmentations, scheduler, folds vs data, output "
                        "folder, lock) and exit: builds and writes nothing")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything, build the model (random init) and the training loader, run ONE real "
                        "batch forward + backward + optimizer step at the configured sizes on this machine's device, "
                        "print parameters, shapes, seconds and peak memory; writes nothing")
    p.add_argument("--comp", default=None,
                   help="with --dry-run or --check: run against this competition instead of the experiment's own; "
                        "it must have the same classes (e.g. handbone-* recipes on synthetic-hands-2048)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="with --dry-run: override data.batch_size (e.g. 1 on a CPU)")
    p.add_argument("--input-size", type=int, default=None, metavar="PX",
                   help="with --dry-run: override data.input_size (the network input; crops keep data.crop_from)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --dry-run: override data.workers (0 loads the batch in this process)")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("tune", help="Optuna search over configs/search/<space>.yaml; resumable, many workers")
    p.add_argument("--exp", default=DEFAULT_EXPERIMENT, help="the base experiment (name or YAML path)")
    p.add_argument("--space", default=None,
                   help="search space: configs/search/<name>.yaml or a path (default: <exp> if present, else default)")
    p.add_argument("--trials", type=int, default=None,
                   help="finished trials the study should hold (default: the space's `trials`)")
    p.add_argument("--fold", default=None,
                   help="fold(s) each trial trains, e.g. 0 or 0,1 (default: the space's budget)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes sharing the study")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL, e.g. postgresql://user@host/db (default: sqlite under runs/studies/)")
    p.add_argument("--study", default=None, help="study name (default: <exp>-<space>)")
    p.add_argument("--report", action="store_true",
                   help="print the trials table and importances and save the plots; run nothing")
    _set_flag(p)
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("runs", help="a table of every finished run (runs/*/*/metrics.json); --plot for a PNG")
    p.add_argument("--exp", default="*", help="only experiments matching this glob, e.g. 'baseline*'")
    p.add_argument("--sort", default="val_dice", help="column to sort by (default: val_dice, best first)")
    p.add_argument("--ascending", action="store_true", help="sort ascending")
    p.add_argument("--plot", nargs="?", const="runs/per_class_dice.png", default=None, metavar="PNG",
                   help="write per-class Dice bars per experiment (default path: runs/per_class_dice.png)")
    p.set_defaults(fn=cmd_runs)


    p = sub.add_parser("oof", help="an experiment's OOF score (per class, per fold, per image); --suspects")
    p.add_argument("exp", help="experiment name or YAML path; trained folds without OOF get it from best.pt")
    p.add_argument("--suspects", action="store_true",
                   help="list the images x classes where the OOF most confidently disagrees with the truth, "
                        "with overlay PNGs in runs/<exp>/suspects/")
    p.add_argument("--top", type=int, default=20, help="how many suspects to list and draw (default 20)")
    p.add_argument("--write-exclude", default=None, metavar="FILE.csv",
                   help="also write the top suspects' images (each once, most suspect first) as an id,reason CSV "
                        "to review and then point data.exclude at (implies --suspects; an existing FILE is refused "
                        "unless --force)")
    p.add_argument("--force", action="store_true", help="with --write-exclude: overwrite an existing FILE")
    p.add_argument("--include-excluded", action="store_true",
                   help="also score the experiment's data.exclude images (always predicted into the OOF; left out "
                        "of the score, the table and the suspects by default)")
    p.add_argument("--tta", nargs="+", default=None, metavar="VIEW",
                   help="write and score a TTA variant of every trained fold (views from the competition's "
                        "`tta` list), runs/<exp>/fold<k>/oof-<variant>/; `competition ensemble` uses it")
    p.add_argument("--scales", nargs="+", type=float, default=None, metavar="S",
                   help="with --tta: multi-scale TTA, e.g. 1 1.25 (default 1)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes for the passes over the images (default: every core)")
    _set_flag(p)
    p.add_argument("--csv", default=None, metavar="OUT.csv",
                   help="also write the OOF as a submission CSV at native size (the competition's format)")
    p.add_argument("--truth-csv", default=None, metavar="TRUTH.csv",
                   help="also write the training truth in the competition's format (with height, width)")
    p.set_defaults(fn=cmd_oof)

    p = sub.add_parser("pseudo", help="pseudo-labels of the test images from a recipe, one set per fold "
                                      "(fold k's from the recipe's fold-k models) -> runs/_pseudo/<name>/")
    p.add_argument("--ensemble", default=None, help="recipe name or YAML path (default: the newest recipe)")
    p.add_argument("--name", default=None, help="the pseudo-label set's name (default: the recipe's name)")
    p.add_argument("--min-confidence", type=float, default=0.0,
                   help="keep only test images whose mean certainty (0 = a coin flip, 1 = certain) is at least "
                        "this (default 0: keep all)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    p.set_defaults(fn=cmd_pseudo)

    p = sub.add_parser("ensemble", help="choose soft-voting weights, thresholds, post-processing on OOF "
                                        "-> ensembles/<name>.yaml + .md, with a nested-CV estimate")
    p.add_argument("experiments", nargs="+", metavar="EXP",
                   help="member experiments (all folds trained): EXP uses every complete OOF variant of it as a "
                        "candidate member, EXP:VARIANT one (EXP:plain = no TTA)")
    p.add_argument("--name", default="blend", help="recipe name: ensembles/<name>.yaml (default blend)")
    p.add_argument("--method", choices=["caruana", "optuna"], default="caruana",
                   help="caruana: greedy selection with replacement (default); optuna: continuous TPE search")
    p.add_argument("--per-class", action="store_true", help="one weight per member and class (multilabel only)")
    p.add_argument("--steps", type=int, default=50, help="Caruana: most selection steps (default 50)")
    p.add_argument("--trials", type=int, default=100, help="optuna: trials per study (default 100)")
    p.add_argument("--threshold", type=float, default=0.5, help="threshold the weights are chosen at (default 0.5)")
    p.add_argument("--no-postprocess", action="store_true", help="skip the per-class post-processing search")
    p.add_argument("--no-nested", action="store_true", help="skip the nested-CV estimate (in-sample only)")
    p.add_argument("--include-excluded", action="store_true",
                   help="choose and score on the members' data.exclude images too (by default the weights, "
                        "thresholds and scores leave out the union of the members' excluded images)")
    p.add_argument("--force-blend", action="store_true",
                   help="write the weighted ensemble even when the best single member or equal weights has the "
                        "better nested estimate")
    p.add_argument("--csv", default=None, metavar="OUT.csv",
                   help="also write the recipe's OOF predictions of the training images as a submission CSV")
    p.add_argument("--truth-csv", default=None, metavar="TRUTH.csv",
                   help="also write the training truth in the competition's format (with height, width)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes for the passes over the images (default: every core; memory grows with it)")
    p.add_argument("--full-data", action="store_true",
                   help="members whose experiment has a finished all-data run (train --fold all-data) submit with "
                        "that one model; weights, thresholds and post-processing are still chosen on the folds' OOF")
    p.set_defaults(fn=cmd_ensemble)

    p = sub.add_parser("submit", help="TTA inference with an ensemble recipe -> validated submission CSV + ledger row")
    p.add_argument("--ensemble", default=None,
                   help="recipe name (ensembles/<name>.yaml) or a YAML path (default: the newest recipe)")
    _inference_flags(p)
    p.add_argument("--save-probs", action="store_true",
                   help="also keep every member's test probabilities (uint8, the OOF store's format) under "
                        "runs/<exp>/test[-<variant>]/ for re-blending")
    p.add_argument("--from-probs", action="store_true",
                   help="blend the members' saved test probabilities instead of running the models")
    p.set_defaults(fn=cmd_submit)

    p = sub.add_parser("predict", help="like submit, for all folds of one experiment without a recipe")
    p.add_argument("--exp", default=DEFAULT_EXPERIMENT, help="experiment name (runs/<exp>/fold*/best.pt)")
    _inference_flags(p)
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="change how the folds are applied: train.threshold, oof.tta, oof.tta_scales, "
                        "data.batch_size, data.workers (repeatable; e.g. --set train.threshold=0.4)")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("lb", help="record leaderboard scores; CV vs leaderboard table + submissions/cv_vs_lb.png")
    p.add_argument("submission", nargs="?", default=None, help="a submission in the ledger (path or file name)")
    p.add_argument("--public", type=float, default=None, help="its public leaderboard score")
    p.add_argument("--private", type=float, default=None, help="its private leaderboard score")
    p.add_argument("--upload", action="store_true", help="submit it with the Kaggle CLI")
    p.add_argument("--fetch", action="store_true",
                   help="read every ledger submission's public/private score from Kaggle (the kaggle package's API)")
    p.add_argument("-m", "--message", default=None, help="Kaggle submission message (default: the file name)")
    p.set_defaults(fn=cmd_lb)

    p = sub.add_parser("bundle", help="pack an ensemble into an offline inference folder (code competitions)")
    p.add_argument("ensemble", nargs="?", default=None, help="recipe name or YAML path (default: the newest recipe)")
    p.add_argument("--out", required=True, help="the bundle folder to write")
    p.add_argument("--wheels", action="store_true",
                   help="add wheels/: the package and every runtime dependency but torch/torchvision (needs internet "
                        "now, none where it runs)")
    p.add_argument("--wheels-torch", action="store_true",
                   help="include torch and torchvision in wheels/ (GBs; implies --wheels)")
    p.add_argument("--wheels-python", default=None, metavar="X.Y",
                   help="wheels for this Python version (default: this interpreter's; implies --wheels)")
    _runtime_flag(p)
    p.add_argument("--no-estimate", action="store_true",
                   help="skip the run-time estimate (a few images predicted with the bundle on this machine)")
    p.add_argument("--test-images", type=int, default=None, metavar="N",
                   help="the hidden test set's size, for the run-time estimate (default: the local test images)")
    p.set_defaults(fn=cmd_bundle)

    p = sub.add_parser("export", help="a recipe's fold models as ONNX or TorchScript files, each checked against "
                                      "torch, plus export.json (input size, normalisation, TTA, thresholds)")
    p.add_argument("--ensemble", default=None,
                   help="recipe name (ensembles/<name>.yaml) or a YAML path (default: the newest recipe)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="default: onnx")
    p.add_argument("--out", default=None, help="the folder to write (default: runs/_export/<recipe>-<format>/)")
    p.set_defaults(fn=cmd_export)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:  # `competition ... | head`: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ModuleNotFoundError as e:  # an optional extra (optuna, wandb, matplotlib) is not installed
        if (err := missing_extra(e, args.command)) is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (UserError, OSError) as e:
        # Expected failures (bad config or data, a diverged run, a full disk, a held lock): one clear
        # line, exit 2. Anything else is a bug and keeps its traceback.
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return 2
