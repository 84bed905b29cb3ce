"""``competition submit`` and ``competition predict``: a recipe (or one experiment's folds) -> a
validated submission CSV in the competition's exact format, and a ledger row.

    submissions/<YYYYmmdd-HHMMSS>-<name>.csv

The CSV is written to a hidden temp file beside it, validated, and only then renamed: a failed run
or a failed validation leaves no file named as a submission.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from competition import checkpoint as ckpt
from competition import ledger, locks, paths, tracking
from competition.checkpoint import CheckpointError
from competition.config import (
    CompetitionConfig,
    ConfigError,
    ExperimentConfig,
    Recipe,
    RecipeCheckpoint,
    RecipeMember,
    apply_overrides,
    load_competition,
    load_recipe,
    validate,
)
from competition.data.adapters import make_adapter
from competition.errors import UserError
from competition.folds import load_folds
from competition.io import STALE_AFTER_S, atomic_path, clean_stale_temps, file_hash, read_json
from competition.predict import plausible, saved
from competition.predict.export import load_onnx_models
from competition.predict.infer import EnsemblePredictor, MemberPredictor, TestInputs, batch_size_for, masks_for_writer
from competition.predict.members import check_recipe, load_models, member_weights
from competition.predict.options import Inference
from competition.predict.recipes import resolve_recipe
from competition.predict.runtime import compile_networks
from competition.predict.submit import SubmissionWriter, expected_rows, validate_submission


@dataclass
class SubmitResult:
    path: Path
    images: int
    rows: int
    seconds: float
    competition: str = ""

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None


def submission_path(name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while paths.submission(name, stamp, n).exists():  # two submissions in one second keep both files
        n += 1
    return paths.submission(name, stamp, n)


def build_predictor(recipe: Recipe, comp: CompetitionConfig, root: Path, source: str,
                    dev: torch.device, inference: Inference = Inference(), log=print) -> EnsemblePredictor:
    """The recipe's members (fold models x TTA variant) and weights, as the OOF was predicted.
    ``inference.runtime`` / ``inference.compile`` say what runs the networks (:mod:`.runtime`); the
    code around them is the same."""
    check_recipe(recipe, comp.classes, comp.task, source)
    in_ch = comp.in_channels
    if inference.runtime == "onnx":
        models = load_onnx_models(recipe, comp, root, source, dev, log)
    else:
        models = load_models(recipe, root, source, dev, in_ch)
    if inference.compile:
        n = compile_networks(models, dev)
        log(f"--compile: {n} network(s) compiled with torch.compile (the first batches of each shape compile)")
        if dev.type == "cpu":
            log("--compile on the CPU: inductor builds C++ for each network at its first batch and again at the "
                "first of another shape (about 2 min each for the default UNet 3+ on 2 cores, which then ran "
                "1.5x faster): worth it for long runs with few networks only")
    members = [MemberPredictor(ms, comp.task, m.tta, m.tta_scales, dev)
               for ms, m in zip(models, recipe.members)]
    return EnsemblePredictor(members, member_weights(recipe, source), comp.task, recipe.thresholds, dev)


def run_recipe(recipe: Recipe, comp: CompetitionConfig, root: Path, out: Path, source: str,
               inference: Inference = Inference(), on_probs=None) -> SubmitResult:
    """Predict every test image with the recipe and write a validated CSV to ``out``.

    Checkpoint paths in the recipe are relative to ``root`` (the project folder, or a bundle);
    ``inference`` says how (device, batch size, ...: :class:`Inference`).
    ``on_probs(test id, [uint8 (C, H, W) per member])`` sees each image's member probabilities at its
    original size (what an OOF row holds for a held-out image). ``inference.save_probs`` keeps them under
    ``runs/<exp>/test[-<variant>]/``; ``inference.from_probs`` blends saved ones instead of running the
    models. A CSV that passes the format but cannot be right (:mod:`competition.predict.plausible`) is
    not written unless ``inference.force``.
    """
    inference.check()
    dev = pick_device(inference.device)
    adapter = make_adapter(comp)
    ids, expected = expected_rows(comp, adapter)
    sub_ids = [adapter.submission_id(i, "test") for i in ids]
    if inference.from_probs:
        check_recipe(recipe, comp.classes, comp.task, source)
        predictor = EnsemblePredictor([], member_weights(recipe, source), comp.task, recipe.thresholds, dev)
        stores = saved.open_saved(recipe, ids)
        loader = ({"index": torch.arange(s, min(s + 8, len(ids))),
                   "size": torch.tensor([adapter.image_size(i, "test") for i in ids[s:s + 8]])}
                  for s in range(0, len(ids), 8))
    else:
        predictor = build_predictor(recipe, comp, root, source, dev, inference)
        loader = inputs_loader(adapter, ids, predictor, inference)
    saver = None
    if inference.save_probs:
        saver = saved.Saver(recipe, ids, comp.classes, {i: tuple(adapter.image_size(i, "test")) for i in ids})
        on_probs = _both(on_probs, saver)
    def member_probs(batch) -> list[list[torch.Tensor]]:
        if not inference.from_probs:
            return predictor.member_probs(batch["inputs"], batch["size"])
        return [[torch.from_numpy(st(int(r))) for r in batch["index"]] for st in stores]

    out = Path(out)
    t0 = time.time()
    try:
        with atomic_path(out) as tmp:
            with SubmissionWriter(tmp, comp, recipe.postprocess, inference.rle_workers) as writer, \
                    tqdm(total=len(ids), unit="img", desc=f"predict {recipe.name}", disable=not inference.progress,
                         dynamic_ncols=True) as bar:
                for batch in loader:
                    sizes = [tuple(s) for s in batch["size"].tolist()]
                    us = member_probs(batch)
                    if on_probs is not None:
                        for j, i in enumerate(batch["index"].tolist()):
                            on_probs(ids[i], [u[j].cpu().numpy() for u in us])
                    for i, p in zip(batch["index"].tolist(), predictor.probabilities(us)):
                        writer.add(sub_ids[i], *masks_for_writer(predictor, p))
                    bar.update(len(sizes))
            rows = validate_submission(tmp, comp, expected)
            _plausible(writer.counts, recipe, out, source, inference.force)
            if saver is not None:
                saver.close()
    finally:
        if saver is not None:
            saver.abort()  # a no-op once published; removes the temp stores of a failed run
    return SubmitResult(out, len(ids), rows, time.time() - t0, comp.name)


def inputs_loader(adapter, ids: list[str], predictor: EnsemblePredictor, inference: Inference,
                split: str = "test") -> DataLoader:
    """The members' network inputs of images ``ids`` of ``split``, batched as the experiments say
    (``inference.batch_size`` / ``workers`` win where given)."""
    exps = [m.experiment for m in predictor.members]
    auto = batch_size_for(exps)  # 1 when images keep their native, differing sizes
    bs = inference.batch_size if inference.batch_size is not None and auto > 1 else auto
    nw = inference.workers if inference.workers is not None else min(e.data.workers for e in exps)
    return DataLoader(TestInputs(adapter, ids, predictor.inputs, predictor.task, split), batch_size=bs,
                      shuffle=False, num_workers=nw, pin_memory=predictor.device.type == "cuda")


class Implausible(UserError):
    """The submission passed the format checks but cannot be right; nothing was written."""


def _plausible(counts, recipe: Recipe, out: Path, source: str, force: bool) -> None:
    share = recipe.scores.get("truth_share")
    found = plausible.problems(counts, share if isinstance(share, dict) else None)
    if found and not force:
        raise Implausible(f"{out} not written: it cannot be right: {'; '.join(found)} (recipe {source}: check its "
                          f"thresholds and weights, or the models; --force writes it anyway)")


def _both(first, second):
    if first is None:
        return second

    def call(image_id, member_probs):
        first(image_id, member_probs)
        second(image_id, member_probs)
    return call


def submit(ensemble: str | None = None, out: Path | None = None, inference: Inference = Inference(),
           log=print) -> SubmitResult:
    """``competition submit``: the recipe's CSV under ``submissions/`` plus a ledger row (both or neither)."""
    source = resolve_recipe(ensemble)
    if ensemble is None:
        log(f"no --ensemble given: using the newest recipe, {source}")
    recipe = load_recipe(source)
    comp = load_competition(recipe.competition)
    clean_stale_temps(paths.submissions_dir(), STALE_AFTER_S)  # CSVs of killed submits
    with hold_recipe_runs(recipe):  # shared: no fold is retrained while it is read
        result = run_recipe(recipe, comp, paths.project(), Path(out) if out else submission_path(recipe.name),
                            str(source), inference)
    _record(ledger.row_for(result, recipe, file_hash(source), comp.name), recipe, source, result.path)
    return result


@contextmanager
def hold_recipe_runs(recipe: Recipe):
    """Shared locks on the run folders of a recipe's checkpoints: the CV folds' set, then the all-data
    runs' (two ordered sets, as a fold number and ``all-data`` have no order between them)."""
    runs = recipe_runs(recipe)
    with locks.hold_runs([r for r in runs if not r.is_all_data]), locks.hold_runs([r for r in runs if r.is_all_data]):
        yield


def recipe_runs(recipe: Recipe) -> list:
    """The run folders holding a recipe's checkpoints (those inside runs/: CV folds, and all-data runs
    for full-data members)."""
    out = []
    for m in recipe.members:
        for c in m.checkpoints:
            rp = paths.RunPaths.of((paths.project() / c.path).parent)
            if rp is not None and rp not in out:
                out.append(rp)
    return out


# What `predict --set` may change: how the trained folds are applied, never what they learned.
PREDICT_KEYS = ("train.threshold", "oof.tta", "oof.tta_scales", "data.batch_size", "data.workers")


def predict_experiment(experiment: str, out: Path | None = None, inference: Inference = Inference(),
                       overrides: dict | None = None) -> SubmitResult:
    """``competition predict --exp E``: all folds' best.pt, equal weights, the experiment's threshold
    (``overrides``: ``--set`` of the :data:`PREDICT_KEYS`; ``inference.batch_size`` and ``workers``, when
    given, win over their ``data.*`` keys)."""
    recipe, comp = experiment_recipe(experiment, overrides)
    overrides = overrides or {}  # the flags win over --set data.batch_size / data.workers
    inference = replace(
        inference,
        batch_size=overrides.get("data.batch_size") if inference.batch_size is None else inference.batch_size,
        workers=overrides.get("data.workers") if inference.workers is None else inference.workers)
    result = run_recipe(recipe, comp, paths.project(), Path(out) if out else submission_path(experiment),
                        f"runs/{experiment}", inference)
    _record(ledger.row_for(result, recipe, "", comp.name), recipe, None, result.path)
    return result


def _record(row: dict, recipe: Recipe, source: Path | None, csv: Path) -> None:
    """The ledger row, and the same row as a W&B run (the CSV an artifact made from the recipe's).
    A ledger that cannot be written (a full disk) takes the CSV with it: a submission the ledger
    does not list would reach the leaderboard without its CV beside it."""
    try:
        ledger.append(row)
    except BaseException:
        Path(csv).unlink(missing_ok=True)
        raise
    tracking.log_submission(row, recipe, source)


def experiment_recipe(experiment: str, overrides: dict | None = None) -> tuple[Recipe, CompetitionConfig]:
    """A one-member recipe over every fold of ``runs/<experiment>/`` (every fold of the folds file
    must have its best.pt), thresholds from the run's own ``train.threshold``, the competition's TTA
    (or ``oof.tta``/``oof.tta_scales`` when ``--set`` gives them)."""
    run_root = paths.experiment_dir(experiment)
    runs = paths.trained_folds(experiment)
    found = {k: rp.best for k, rp in runs.items()}
    if not found:
        raise CheckpointError(f"{run_root}: no trained fold (no {paths.run(experiment, 0).best.name}) of experiment "
                              f"{experiment!r}; train it first (make train-all EXP={experiment})")
    first = found[min(found)]
    cfg = ckpt.load(first).get("config") or {}
    comp_name = (cfg.get("competition") or {}).get("name")
    if not comp_name or "experiment" not in cfg:
        raise CheckpointError(f"{first}: no config.competition.name / config.experiment in the checkpoint")
    comp = load_competition(comp_name)
    exp = validate(ExperimentConfig, cfg["experiment"], f"{first} (config.experiment)")
    if overrides:
        bad = sorted(k for k in overrides if k not in PREDICT_KEYS)
        if bad:
            raise ConfigError(f"predict --set {', '.join(bad)}: the trained models fix every other key; "
                              f"predict may change {', '.join(PREDICT_KEYS)}")
        exp = validate(ExperimentConfig, apply_overrides(cfg["experiment"], overrides),
                       f"{first} (config.experiment) with --set {', '.join(overrides)}")
    folds_file = paths.folds_file(comp.name)
    if folds_file.is_file():
        wanted = sorted(set(load_folds(comp)["fold"]))
    else:
        wanted = sorted(found)
    missing = [k for k in wanted if k not in found]
    if missing:
        raise CheckpointError(f"experiment {experiment!r}: no best.pt for fold(s) {missing} "
                              f"({', '.join(str(paths.run(experiment, k).best) for k in missing)}); "
                              f"train them first (make train EXP={experiment} FOLD=k)")
    rel = {k: found[k].relative_to(paths.project()).as_posix() for k in wanted}
    metrics = [read_json(runs[k].metrics, "metrics file") for k in wanted if runs[k].metrics.is_file()]

    def pooled(key: str) -> float | None:
        """Each fold's score weighted by its held-out images: the mean over every training image, as
        `competition oof` and the recipes define CV (an unweighted mean of folds is not)."""
        pairs = [(m.get(key), m.get("n_val")) for m in metrics]
        if len(pairs) != len(wanted) or any(not isinstance(v, float | int) or not isinstance(n, int) or n <= 0
                                            for v, n in pairs):
            return None
        return sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
    native = pooled("oof_dice_native")
    recipe = Recipe(
        name=experiment, competition=comp.name, task=comp.task, classes=comp.classes,
        folds_sha256=file_hash(folds_file) if folds_file.is_file() else "",
        members=[RecipeMember(experiment=experiment, folds=wanted, weights=[1.0],
                              tta=comp.tta if not overrides or exp.oof.tta is None else exp.oof.tta,
                              tta_scales=exp.oof.tta_scales if overrides else [1.0],
                              checkpoints=[RecipeCheckpoint(path=rel[k], sha256=file_hash(found[k]))
                                           for k in wanted])],
        thresholds=[exp.train.threshold] * comp.num_classes,
        scores={"in_sample": native} if native is not None else {})
    return recipe, comp
