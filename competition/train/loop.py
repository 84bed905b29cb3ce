"""``competition train``: one fold of one experiment, resumable, single process or torchrun DDP.

    runs/<exp>/fold<k>/config.yaml    the resolved experiment + competition (written first)
    runs/<exp>/fold<k>/last.pt        full state every epoch: resume by re-running the same command
    runs/<exp>/fold<k>/best.pt        weights of the best epoch by the competition metric
    runs/<exp>/fold<k>/history.csv    one row per epoch
    runs/<exp>/fold<k>/metrics.json   best validation Dice per class and mean, timings
    runs/<exp>/fold<k>/oof/           the fold's out-of-fold probabilities (see competition.store.tiles)

``fold`` = ``all-data`` (:data:`competition.paths.ALL_DATA`) trains on every image of the folds file, with
no validation and no OOF, into ``runs/<exp>/all-data/`` (:mod:`competition.train.alldata`).
``model.init_from`` starts a fresh run from another run's weights (:mod:`competition.train.initfrom`).
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass

import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from competition import checkpoint as ckpt
from competition import convergence, locks, paths, tracking, viz
from competition.config import (
    CompetitionConfig,
    ExperimentConfig,
    atomic_write_text,
    dump_yaml,
    to_plain,
)
from competition.cv import oofscore
from competition.cv import views as store
from competition.cv.heldout import predict_fold
from competition.data.dataset import EpochSampler, SegDataset, rare_class_weights
from competition.data.pseudo import add_pseudo
from competition.folds import excluded, presence_matrix, training_ids, validation_ids
from competition.io import clean_stale_temps
from competition.metrics import pair_metric, summarize
from competition.models import build_model
from competition.predict.tta import variant_name
from competition.store import tiles
from competition.store.tiles import clean_stale
from competition.train import alldata, initfrom
from competition.train import distributed as dd
from competition.train.averaging import Swa, TopK
from competition.train.budget import out_of_time
from competition.train.check import check_run, class_weights, oof_variants
from competition.train.engine import Engine, TrainingDiverged, build_engine, seed_everything
from competition.train.foldrun import FoldRun, FoldState
from competition.train.rundir import check_run_dir as _check_run_dir

__all__ = ["fit", "TrainingDiverged"]


def _run_config(exp: ExperimentConfig, comp: CompetitionConfig, fold: int | str) -> dict:
    return {"experiment": to_plain(exp), "competition": to_plain(comp), "fold": fold}


@dataclass(frozen=True)
class _Prepared:
    """What ``fit`` settles before it takes the lock: ``check_run``'s (comp, adapter, folds), and for the
    all-data run its epoch plan (None for a CV fold)."""

    comp: CompetitionConfig
    adapter: object
    folds: pd.DataFrame
    plan: alldata.EpochPlan | None = None
    deadline: float | None = None  # --budget: when the fold must be done (time.time())


def compact_samples(workers: int) -> bool:
    """Worker processes hand over compact samples, expanded on the trainer's device
    (competition.data.transfer): on a CPU trainer too, where unpacking measured 2.6x faster than
    receiving the plain sample (bench_cache: one worker, cached 1024² hand-bone samples, 75 vs 29/s)."""
    return workers > 0


def make_loader(ds, exp: ExperimentConfig, sampler=None, shuffle_free: bool = True) -> DataLoader:
    workers = exp.data.workers
    if compact_samples(workers):
        for d in getattr(ds, "datasets", None) or [getattr(ds, "dataset", ds)]:
            d.compact = True
    return DataLoader(ds, batch_size=exp.data.batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), drop_last=False,
                      persistent_workers=False, prefetch_factor=2 if workers else None)


def training_loader(exp: ExperimentConfig, comp: CompetitionConfig, adapter, train_ids: list[str], d, fold: int):
    """(dataset, sampler, loader) of a fold's training images: augmentations, rare-class oversampling,
    fold ``fold``'s pseudo-labelled test images (``data.pseudo``), DDP shards; what ``train`` and
    ``--dry-run`` both use."""
    train_ds = SegDataset(adapter, train_ids, exp, comp.task, "train")
    weights = None
    if exp.data.rare_class_oversample > 0:
        pres = presence_matrix(adapter)[[adapter.ids.index(i) for i in train_ids]]
        weights = rare_class_weights(pres, exp.data.rare_class_oversample, exp.data.rare_class_quantile)
    train_ds, weights = add_pseudo(train_ds, weights, exp, comp, adapter, fold)
    sampler = EpochSampler(len(train_ds), exp.train.seed, weights, d.rank, d.world)
    return train_ds, sampler, make_loader(train_ds, exp, sampler)


def fit(exp: ExperimentConfig, fold: int | str, restart: bool = False, log=tqdm.write, on_epoch=None,
        deadline: float | None = None) -> dict:
    """Train one fold (resuming from last.pt when present), then write its OOF and metrics.json; with
    ``fold`` = ``all-data``, the full-data model (no validation, no OOF).

    ``on_epoch(epoch, val_dice)`` is called after every epoch's checkpoint is written (tuning reports
    to Optuna there and may raise ``optuna.TrialPruned``, which stops the fold cleanly).

    The run folder is locked for the whole run: a second ``train`` of the same experiment and fold
    is refused at once, naming this process.

    ``deadline`` (``--budget``): no epoch is started that would, by the epochs so far, end past it
    (with room for the OOF); the fold then finishes as usual from the epochs it ran, its ``last.pt``
    complete, so running it again without the budget continues where it stopped.
    """
    d = dd.setup()
    plan = None
    if fold == paths.ALL_DATA:
        exp, plan = alldata.prepare(exp, restart)
        if d.main:
            log(plan.line)
    # Everything that can be checked without a model or a loader, first: a typo costs seconds.
    checked = _Prepared(*check_run(exp, fold, lock=d.main, restart=restart), plan=plan, deadline=deadline)
    rp = paths.run(exp.name, fold)
    with locks.hold(rp.lock, True, f"run folder {rp.root}") if d.main else contextlib.nullcontext():
        return _fit(exp, fold, d, checked, restart, log, on_epoch)


def _fit(exp: ExperimentConfig, fold: int | str, d: dd.Dist, checked: _Prepared, restart: bool, log,
         on_epoch) -> dict:
    """The locked part of ``fit``."""
    run = _start(exp, fold, d, checked, restart, log)
    t0 = time.time()
    bar = tqdm(total=exp.train.epochs, initial=run.state.epoch, desc=f"{exp.name} fold {fold}", unit="epoch",
               position=0, dynamic_ncols=True, disable=not (d.main and exp.train.progress))
    saver = ckpt.AsyncSaver()
    try:
        _epochs(run, bar, saver, on_epoch)
    finally:
        saver.close()  # every queued checkpoint is on disk before anything reads it (or we stop)
    bar.close()
    dd.barrier(d)
    if checked.plan is None:  # an all-data run has no validation to score averages by (alldata.finish)
        run.state.averaging = _averaged(run)
    train_seconds = time.time() - t0
    if d.enabled:
        same = dd.same_on_all_ranks(torch.cat([p.detach().double().flatten() for p in run.engine.raw.parameters()]), d)
        if not same:
            raise RuntimeError("DDP ranks hold different weights after training; refusing to write results")
        if d.main:
            log(f"weights identical on all {d.world} ranks")

    result = {}
    if d.main:
        result = _finish(run, train_seconds) if checked.plan is None else alldata.finish(run, train_seconds,
                                                                                           checked.plan)
    run.tracker.finish()
    dd.barrier(d)
    return result


def _start(exp: ExperimentConfig, fold: int | str, d: dd.Dist, checked: _Prepared, restart: bool, log) -> FoldRun:
    """Build the fold's run: the model first (unavailable weights fail before any data is loaded) and the
    parent's weights in it (``model.init_from``, not when resuming), the run folder, the data, the engine,
    then the state, resumed from last.pt when there is one."""
    comp, adapter, folds = checked.comp, checked.adapter, checked.folds
    excl = excluded(exp.data.exclude, folds)  # read and checked before the model is built
    seed_everything(exp.train.seed, exp.train.deterministic)
    model = build_model(exp.model, comp.out_channels, comp.in_channels, exp.data.input_hw)
    rp = paths.run(exp.name, fold)
    # A resumed run goes on from last.pt's weights: its parent is the one config.yaml recorded at its start.
    if rp.last.is_file() and not restart:
        lineage = initfrom.recorded(rp.config)
    else:
        parent = initfrom.apply(exp, fold, model, comp.out_channels, log if d.main else None)
        lineage = parent.record() if parent is not None else {}
    run_cfg = {**_run_config(exp, comp, fold), **lineage,
               **({"all_data": checked.plan.as_dict()} if checked.plan is not None else {})}
    if len(excl):  # only then: runs from before data.exclude resume with their config unchanged
        run_cfg["exclude"] = excl.record()
    if d.main:
        # We hold the folder's lock, so any temp file in it was left by a killed run of ours.
        for t in clean_stale_temps(rp.root, 0) + clean_stale(rp.root):
            log(f"removed {t.name}, left by an interrupted run")
        extend = _check_run_dir(rp, run_cfg, restart)
        if extend:
            log(f"extending {exp.name} fold {fold}: train.epochs {extend[0]} -> {extend[1]}; continuing from "
                f"{rp.last.name} with the learning-rate schedule recomputed for {extend[1]} epochs")
        dump_yaml(run_cfg, rp.config)
    dd.barrier(d)

    device = dd.device_for(d)
    train_ids = training_ids(folds, None if fold == paths.ALL_DATA else fold, excl.ids)
    val_ids = folds.loc[folds["fold"] == fold, "id"].tolist()  # all predicted into the OOF, excluded or not
    train_ds, sampler, train_loader = training_loader(exp, comp, adapter, train_ids, d, fold)
    if exp.data.pseudo is not None:
        log(f"data.pseudo: {len(train_ds) - len(train_ids)} pseudo-labelled test images of {exp.data.pseudo.name!r} "
            f"(fold {fold}'s, drawn with weight {exp.data.pseudo.weight:g}) beside {len(train_ids)} training images")
    # Best-epoch selection is on clean labels: the excluded images are left out of the validation Dice.
    val_ds = SegDataset(adapter, validation_ids(folds, fold, excl.ids), exp, comp.task, "val")
    # Validation shards are disjoint (no padding), so reduced sums count every image exactly once.
    val_shard = torch.utils.data.Subset(val_ds, list(range(d.rank, len(val_ds), d.world)))
    val_loader = make_loader(val_shard, exp)

    engine = build_engine(exp, comp, model, device, d, math.ceil(len(train_loader) / exp.train.grad_accum),
                          class_weights(exp, comp, adapter, train_ids))

    state, saved = _resume(exp, fold, d, engine, rp, restart, log)
    dd.require_same(state.epoch, d, "the epoch to start from (last.pt)")
    topk = TopK(exp.train.average_top_k, rp, state.top_k) if exp.train.average_top_k else None
    swa = Swa(exp.train.swa, engine.raw, device) if exp.train.swa else None
    if swa is not None and saved is not None and saved.get("swa") is not None:
        swa.load_state_dict(saved["swa"])
    tracker = tracking.for_training(exp, comp, fold, run_cfg) if d.main else tracking.Tracker(False)
    if "init_from" in lineage:
        tracking.log_parent(tracker, paths.project() / lineage["init_from"], lineage.get("init_from_sha256"))
    return FoldRun(exp=exp, comp=comp, adapter=adapter, fold=fold, d=d, rp=rp, run_cfg=run_cfg, engine=engine,
                   train_ds=train_ds, sampler=sampler, train_loader=train_loader, val_ids=val_ids, val_ds=val_ds,
                   val_loader=val_loader, tracker=tracker, log=log, state=state, topk=topk, swa=swa,
                   deadline=checked.deadline)


def _resume(exp: ExperimentConfig, fold: int | str, d: dd.Dist, engine: Engine, rp: paths.RunPaths, restart: bool,
            log) -> tuple[FoldState, dict | None]:
    """-> (the state to start from, last.pt's contents or None): a fresh state without last.pt or with
    ``restart``; else the engine loaded from last.pt and its state."""
    if not rp.last.is_file() or restart:
        return FoldState(), None
    saved = ckpt.load(rp.last)
    # A longer schedule (extending a run): the schedule is rebuilt for the new length and only
    # its position is restored.
    longer = (saved.get("config") or {}).get("experiment", {}).get("train", {}).get("epochs") != exp.train.epochs
    state = FoldState.from_dict(engine.load_state(saved, recompute_schedule=longer))
    if longer:  # an extended run trains its new epochs even if it had stopped early
        state.bad_epochs = 0
    if d.main:  # history.csv may lag last.pt by an epoch after a kill between the two writes
        atomic_write_text(rp.history, pd.DataFrame(state.history).to_csv(index=False))
        log(f"resuming {exp.name} fold {fold} from {rp.last} at epoch {state.epoch + 1}")
    return state, saved


def _averaged(run: FoldRun) -> dict:
    """Validate the weight averages like an epoch; the best one becomes best.pt if it beats every epoch."""
    engine, state, topk, swa = run.engine, run.state, run.topk, run.swa
    candidates = []
    if topk is not None and (avg := topk.average()) is not None:
        model = copy.deepcopy(engine.raw)
        model.load_state_dict(avg)
        candidates.append((f"top{len(topk.kept)}", model))
    if swa is not None and (model := swa.finalize(run.train_loader, engine.device)) is not None:
        candidates.append(("swa", model))
    out = {}
    for name, model in candidates:
        scores = engine.validate(run.val_loader, len(run.val_ds), model)
        out[name] = float(scores.mean())
        if run.d.main:
            run.log(f"{name}: averaged weights score val dice {out[name]:.4f} (best epoch {state.best_score:.4f})")
        if out[name] > state.best_score:
            state.best_score, state.best_averaged = out[name], name
            if run.d.main:
                ckpt.save({"model": model.state_dict(), "epoch": state.best_epoch, "score": out[name],
                           "averaged": name, "config": run.run_cfg,
                           "val_dice_per_class": {c: float(v) for c, v in zip(run.comp.classes, scores)}}, run.rp.best)
    return out


def _epochs(run: FoldRun, bar: tqdm, saver: ckpt.AsyncSaver, on_epoch) -> None:
    """The epochs still to run; checkpoints go to ``saver`` (written in the background)."""
    exp, d, engine, state, topk, swa = run.exp, run.d, run.engine, run.state, run.topk, run.swa
    while state.epoch < exp.train.epochs and not _stopped_early(exp, state) and not out_of_time(run):
        epoch = state.epoch + 1
        if swa is not None and swa.active(epoch):
            engine.scheduler.hold(swa.cfg.lr)
        # Reseed per epoch so a resumed epoch draws exactly what the uninterrupted run drew.
        seed_everything(exp.train.seed * 1000 + epoch, exp.train.deterministic)
        run.sampler.set_epoch(epoch)
        run.train_ds.set_epoch(epoch)
        te = time.time()
        train_loss, n_train = engine.train_epoch(run.train_loader, epoch)
        row, improved = _scored(run, epoch, (train_loss, n_train), te)
        state.epoch = epoch
        if swa is not None and swa.active(epoch):
            swa.update(engine.raw)
        if d.main:
            saver.wait()  # the previous epoch's checkpoints are on disk before this epoch's are queued
        if topk is not None:  # every rank keeps the list; rank 0 writes the files
            topk.offer(epoch, row["val_dice"], engine.model_for_eval().state_dict(), saver if d.main else None)
            state.top_k = [list(x) for x in topk.kept]
        if d.main:
            _record(run, saver, row, improved)
        if on_epoch is not None:
            try:
                on_epoch(epoch, row.get("val_dice"))
            except BaseException as e:  # e.g. optuna.TrialPruned: the W&B run says why it stopped
                saver.wait()
                run.tracker.summary({"stopped_by": type(e).__name__, "epochs_run": epoch})
                run.tracker.finish()
                bar.close()
                raise
        bar.update(1)
        bar.set_postfix(**({"best": f"{state.best_score:.4f}"} if "val_dice" in row
                           else {"loss": f"{row['train_loss']:.4f}"}))
        dd.barrier(d)


def _scored(run: FoldRun, epoch: int, trained: tuple[float, int], te: float) -> tuple[dict, bool]:
    """The epoch's history row (appended to the state) and whether it is the best so far. ``trained``:
    (train loss, images). The all-data run has no validation: its row is the training loss and the
    images trained on, and no epoch is "best" (best.pt is the final weights)."""
    engine, state = run.engine, run.state
    train_loss, n_train = trained
    if run.rp.is_all_data:
        engine.scheduler.step_epoch()
        row = {"epoch": epoch, "train_loss": train_loss, "train_images": n_train, "lr": engine.lr,
               "seconds": time.time() - te, "train_images_per_s": n_train / (time.time() - te)}
        state.history.append(row)
        return row, False
    scores = engine.validate(run.val_loader, len(run.val_ds))
    engine.scheduler.step_epoch(float(scores.mean()))
    row = {"epoch": epoch, "train_loss": train_loss, "val_dice": float(scores.mean()),
           "lr": engine.lr, "seconds": time.time() - te, "train_images_per_s": n_train / (time.time() - te),
           **{f"dice/{c}": float(s) for c, s in zip(run.comp.classes, scores)}}
    state.history.append(row)
    improved = row["val_dice"] > state.best_score
    if improved:
        state.best_score, state.best_epoch, state.bad_epochs = row["val_dice"], epoch, 0
    else:
        state.bad_epochs += 1
    return row, improved


def _record(run: FoldRun, saver: ckpt.AsyncSaver, row: dict, improved: bool) -> None:
    """Rank 0's record of a finished epoch: best.pt if it improved, last.pt, history.csv, tracker, log."""
    state, epoch = run.state, row["epoch"]
    if improved:
        saver.save(run.engine.best_payload(run.run_cfg, epoch, row["val_dice"]), run.rp.best)
    payload = run.engine.full_state(run.run_cfg, state.as_dict())
    if run.swa is not None:
        payload["swa"] = run.swa.state_dict()
    saver.save(payload, run.rp.last)
    atomic_write_text(run.rp.history, pd.DataFrame(state.history).to_csv(index=False))
    run.tracker.log(row, step=epoch)
    if "val_dice" not in row:  # the all-data run
        run.log(f"epoch {epoch:3d}/{run.exp.train.epochs}  loss {row['train_loss']:.4f}  on {row['train_images']} "
                f"images (all data, no validation)  lr {row['lr']:.2e}  {row['seconds']:.1f}s")
        return
    run.log(f"epoch {epoch:3d}/{run.exp.train.epochs}  loss {row['train_loss']:.4f}  val dice {row['val_dice']:.4f}"
            f"{' *' if improved else '  '}  best {state.best_score:.4f} (epoch {state.best_epoch})"
            f"  lr {row['lr']:.2e}  {row['seconds']:.1f}s")


def _stopped_early(exp: ExperimentConfig, state: FoldState) -> bool:
    p = exp.train.early_stopping
    return p is not None and state.bad_epochs >= p


def _finish(run: FoldRun, train_seconds: float) -> dict:
    """Predict the held-out fold from best.pt through the submission's inference path (every OOF
    variant), then metrics.json: the OOF score at each image's original size."""
    exp, comp, adapter, fold, val_ids, state = run.exp, run.comp, run.adapter, run.fold, run.val_ids, run.state
    rp, tracker = run.rp, run.tracker
    best = ckpt.load(rp.best)
    variants = oof_variants(exp, comp)
    t = time.time()
    for views, scales in variants:
        store_dir = predict_fold(exp.name, fold, comp, adapter, val_ids, (views, scales), device=run.engine.device)
    pred_seconds = time.time() - t
    # This fold's rows only, in the order they were predicted (the folds file was read by fit); the
    # truth of these images alone, in memory.
    view = store.open_experiment(exp.name, pd.DataFrame({"id": val_ids, "fold": fold}), comp.classes, comp.task)
    truth = store.MemoryTruth(adapter, view.ids, comp.classes)
    # data.exclude: predicted into the OOF above, left out of its score (as `competition oof` does).
    excl = run.run_cfg.get("exclude") or {"count": 0, "ids": []}
    images = store.Images([view], truth, adapter, comp.task).without(set(excl["ids"]))
    view, truth = images.members[0], images.truth
    held_out = len(val_ids) - len(view.ids)  # this fold's excluded images
    scores = oofscore.per_image(images, comp.task, exp.train.threshold, pair_metric(comp.metric), workers=1)
    also = oofscore.report_metrics(images, comp.task, exp.train.threshold, comp.metric)
    summ = summarize(scores, comp.classes)
    metrics = {"experiment": exp.name, "fold": fold, "competition": comp.name,
               "best_epoch": best["epoch"], "epochs_run": state.epoch,
               "val_dice": state.best_score, "val_dice_per_class": dict(zip(
                   comp.classes, [state.history[best["epoch"] - 1][f"dice/{c}"] for c in comp.classes]))
               if "val_dice_per_class" not in best else best["val_dice_per_class"],
               "averaging": state.averaging, "best_is": best.get("averaged") or f"epoch {best['epoch']}",
               # One resolution: the OOF is scored at each image's original size (``oof_dice_native`` is
               # the same figure, kept under its earlier name for readers of older runs).
               "oof_dice": summ["mean"], "oof_dice_per_class": summ["per_class"], "oof_size": "original",
               "oof_dice_native": summ["mean"], "oof_dice_native_per_class": summ["per_class"],
               "oof_store_bytes": sum(tiles.open_store(rp.oof(variant_name(v, s))).nbytes for v, s in variants),
               "oof_variants": [variant_name(v, s) or "plain" for v, s in variants],
               "metric": comp.metric.name, "oof_report": also,  # metric.report at the original sizes
               "first_epoch_val_dice": state.history[0]["val_dice"] if state.history else None,
               "train_seconds": round(train_seconds, 2),
               "predict_images_per_s": round(len(val_ids) * len(variants) / max(pred_seconds, 1e-9), 2),
               "n_train": len(adapter.ids) - len(val_ids) - (excl["count"] - held_out), "n_val": len(view.ids),
               "excluded": {k: excl.get(k) for k in ("count", "sha256", "source")} | {"in_fold": held_out}}
    metrics.update(initfrom.recorded_in(run.run_cfg))  # the parent (model.init_from), when there is one
    verdict = convergence.judge([r["val_dice"] for r in state.history], exp.train.epochs, _stopped_early(exp, state))
    metrics["convergence"] = verdict.as_dict()
    if run.stopped_by_budget:
        metrics["stopped_by_budget"] = True
    atomic_write_text(rp.metrics, pd.Series(metrics).to_json(indent=1))
    tracker.table("val_dice_per_class", ["class", "val_dice", "oof_dice", "oof_dice_native"],
                  [[c, metrics["val_dice_per_class"][c], summ["per_class"][c], summ["per_class"][c]]
                   for c in comp.classes])
    show = list(range(min(3, len(view.ids))))
    level = oofscore.pass_level(exp.train.threshold)
    tracker.images("val_overlays", [viz.panels(adapter.load_image(view.ids[i]), truth.image(i) > 0,
                                               view.image(i) >= level)
                                    for i in show], [f"{view.ids[i]}: image | truth | prediction" for i in show])
    # After the last log: W&B commits the last epoch's row (and its val_dice) on the next log call,
    # which would overwrite a summary written earlier with the last epoch's values.
    tracker.summary({**{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))},
                     **{f"best_dice/{c}": v for c, v in metrics["val_dice_per_class"].items()},
                     **{f"oof_report/{k}": v for k, v in also.items()}, "convergence": verdict.status})
    tracking.log_fold(tracker, exp, fold, metrics)  # best.pt + metrics.json + OOF summary as a W&B artifact
    run.log(f"fold {fold}: best val dice {metrics['val_dice']:.4f} at epoch {metrics['best_epoch']}; "
            f"OOF dice {metrics['oof_dice']:.4f} at the original size "
            f"-> {store_dir.parent}")
    run.log(f"fold {fold}: {verdict.message}")
    return metrics
