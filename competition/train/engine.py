"""One epoch of training, one validation pass, prediction: AMP, channels_last, gradient accumulation
and clipping, weight EMA, DDP. The loop in ``loop.py`` decides *when*; this decides *how*."""
from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from competition import checkpoint as ckpt
from competition.config import IGNORE_INDEX, CompetitionConfig, ConfigError, ExperimentConfig
from competition.data import mixing, transfer
from competition.errors import UserError
from competition.losses import build_loss, ignore_index_for
from competition.metrics import pair_metric, score_counts
from competition.models.precision import autocast_dtype
from competition.optim import build_optimizer, build_scheduler
from competition.train import distributed as dd


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or inf; nothing was written for the epoch in progress."""


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def use_sync_bn(exp: ExperimentConfig, d: dd.Dist, device: torch.device) -> bool:
    """``train.sync_bn``: null means on under multi-GPU DDP; SyncBatchNorm needs CUDA."""
    want = exp.train.sync_bn if exp.train.sync_bn is not None else (d.enabled and d.world > 1 and device.type == "cuda")
    if want and device.type != "cuda":
        raise ConfigError("train.sync_bn: SyncBatchNorm needs CUDA devices; set it to null or false on the CPU")
    return bool(want and d.enabled)


class Engine:
    def __init__(self, model: torch.nn.Module, loss_fn, exp: ExperimentConfig, comp: CompetitionConfig,
                 device: torch.device, d: dd.Dist):
        self.exp, self.comp, self.device, self.dist = exp, comp, device, d
        self.memory_format = torch.channels_last if exp.train.channels_last else torch.contiguous_format
        if use_sync_bn(exp, d, device):
            # Batch statistics over the global batch: at 1-2 images per GPU (2048² inputs) per-GPU
            # statistics are too noisy to train on.
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.raw = model.to(device=device, memory_format=self.memory_format)
        self.model = DistributedDataParallel(self.raw, device_ids=[device.index] if device.type == "cuda"
                                             else None) if d.enabled else self.raw
        if exp.train.compile:
            self.model = torch.compile(self.model)  # the training forward only; raw stays for eval/state
        self.loss_fn = loss_fn
        self.amp = autocast_dtype(exp.train.precision, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.ema = None
        if exp.train.ema:
            self.ema = ModelEmaV3(self.raw, decay=exp.train.ema, device=device)
        self.optimizer = None
        self.scheduler = None

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def model_for_eval(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.raw

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        if "image_raw" in batch:  # compact samples from worker processes, expanded here
            x, y = transfer.unpack(batch, self.device, self.comp.task)
            return x.contiguous(memory_format=self.memory_format), y
        x = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        y = batch.get("mask")
        return x, (y.to(self.device, non_blocking=True) if y is not None else None)

    def train_epoch(self, loader, epoch: int) -> tuple[float, int]:
        self.model.train()
        accum, clip = self.exp.train.grad_accum, self.exp.train.grad_clip
        total, count, n_images = 0.0, 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, position=1, unit="batch",
                   disable=not (self.dist.main and self.exp.train.progress))
        self.optimizer.zero_grad(set_to_none=True)
        # augment.batch (mixup, cutmix, copy_paste): built once, on the first epoch this engine trains;
        # rare classes are counted on the loader's dataset (the training fold) when it has one.
        if self.exp.augment.batch and getattr(self, "batch_mixer", None) is None:
            self.batch_mixer = mixing.BatchMixer.for_training(self.exp, self.comp, getattr(loader, "dataset", None),
                                                              self.dist.rank)
        mixer = getattr(self, "batch_mixer", None) if self.exp.augment.batch else None
        for step, batch in enumerate(bar, 1):
            x, y = self._to_device(batch)
            targets = [(1.0, y)]
            if mixer is not None:  # seeded from (seed, epoch, step, op, rank): a resumed run mixes the same
                x, targets = mixer(x, y, epoch, step)
                x = x.contiguous(memory_format=self.memory_format)
            targets = [(w, t.float() if self.comp.task == "multilabel" else t) for w, t in targets]
            sync = step % accum == 0 or step == len(loader)
            no_sync = self.model.no_sync() if (self.dist.enabled and not sync) else contextlib.nullcontext()
            with no_sync:
                with self._autocast():
                    out = self.model(x)
                loss = mixing.mixed_loss(self.loss_fn, _float(out), targets)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch}, step {step}; "
                                           f"stopping without writing this epoch (lower optimizer.lr, set "
                                           f"train.grad_clip, or train.precision: fp32)")
                self.scaler.scale(loss / accum).backward()
            if sync:
                self.scaler.unscale_(self.optimizer)
                norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), clip or float("inf"))
                # fp16's scaler skips steps with inf gradients by design; anywhere else they are divergence.
                if not torch.isfinite(norm) and not self.scaler.is_enabled():
                    raise TrainingDiverged(f"gradient norm is {norm.item()} at epoch {epoch}, step {step}; "
                                           f"stopping without writing this epoch (lower optimizer.lr or set "
                                           f"train.grad_clip)")
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step_batch()
                if self.ema is not None:
                    self.ema.update(self.raw)
            total += loss.item() * len(x)
            count += len(x)
            n_images += len(x)
            bar.set_postfix(loss=f"{total / count:.4f}")
        bad = [n for n, t in self.raw.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise TrainingDiverged(f"weights became non-finite during epoch {epoch} ({bad[0]}, ...); "
                                   f"stopping without writing this epoch")
        stats = dd.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64), self.dist)
        return float(stats[0] / stats[1]), int(stats[1])

    @torch.no_grad()
    def validate(self, loader, n_images: int, model: torch.nn.Module | None = None) -> np.ndarray:
        """Per-class mean Dice over the held-out images at the model's output resolution (of the
        evaluation weights, or of ``model``: an averaged candidate)."""
        model = (model or self.model_for_eval()).eval()
        C = self.comp.num_classes
        sums = torch.zeros(C, dtype=torch.float64, device=self.device)
        for batch in loader:
            x, y = self._to_device(batch)
            with self._autocast():
                logits = model(x)
            pred, truth = self._binarize(logits.float(), y)
            inter = (pred & truth).flatten(2).sum(-1)
            scores = score_counts(inter, pred.flatten(2).sum(-1), truth.flatten(2).sum(-1),
                                  pair_metric(self.comp.metric))
            sums += scores.double().sum(0)
        sums = dd.all_reduce_sum(sums, self.dist)
        return (sums / max(n_images, 1)).cpu().numpy()

    def _binarize(self, logits: torch.Tensor, y: torch.Tensor):
        """(pred, truth) (N, C, h, w) bool. Ignored pixels (IGNORE_INDEX in ``y``) are never truth; with
        ``ignore.metric: exclude`` they are no prediction either, i.e. out of the Dice counts."""
        if logits.shape[-2:] != y.shape[-2:]:
            logits = torch.nn.functional.interpolate(logits, size=y.shape[-2:], mode="bilinear")
        if self.comp.task == "multilabel":
            pred, truth = logits > math.log(self.exp.train.threshold / (1 - self.exp.train.threshold)), y == 1
        else:
            C = self.comp.num_classes
            k = torch.arange(1, C + 1, device=y.device).view(1, C, 1, 1)
            pred, truth = logits.argmax(1, keepdim=True) == k, y.unsqueeze(1) == k
        ignore = self.comp.ignore
        if ignore is not None and ignore.metric == "exclude":
            pred &= (y != IGNORE_INDEX) if self.comp.task == "multilabel" else (y != IGNORE_INDEX).unsqueeze(1)
        return pred, truth

    # -- state ------------------------------------------------------------------------------------
    def full_state(self, run_cfg: dict, state: dict) -> dict:
        return {"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
                "state": state, "rng": ckpt.rng_state(), "config": run_cfg}

    def best_payload(self, run_cfg: dict, epoch: int, score: float) -> dict:
        return {"model": self.model_for_eval().state_dict(), "epoch": epoch, "score": score, "config": run_cfg}

    def load_state(self, s: dict, recompute_schedule: bool = False) -> dict:
        self.raw.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"], recompute=recompute_schedule)
        self.scaler.load_state_dict(s["scaler"])
        if self.ema is not None and s.get("ema") is not None:
            self.ema.module.load_state_dict(s["ema"])
        ckpt.set_rng_state(s["rng"])
        return s["state"]


def _float(out):
    """Loss in fp32 and in the contiguous layout, whatever the autocast dtype and memory format (deep
    supervision returns a list): on channels_last logits smp's loss terms each copy again; one copy
    here and our dice's own sigmoid made a 5-output UNet 3+ loss 1.4-1.7x faster on the CPU (bench_loss)."""
    def f(o):
        return o.to(torch.float32, memory_format=torch.contiguous_format)
    return [f(o) for o in out] if isinstance(out, (list, tuple)) else f(out)


def build_engine(exp: ExperimentConfig, comp: CompetitionConfig, model: torch.nn.Module, device: torch.device,
                 d: dd.Dist, steps: int, class_weights: torch.Tensor | None = None) -> Engine:
    """``model`` with the experiment's loss (``class_weights``: ``loss.class_weights`` resolved), optimizer
    and schedule over ``steps`` optimizer steps an epoch: the engine train, ``--dry-run`` and
    ``init --budget`` all run."""
    loss_fn = build_loss(exp.loss, comp.task, comp.out_channels, class_weights, ignore_index_for(comp))
    engine = Engine(model, loss_fn, exp, comp, device, d)
    engine.optimizer = build_optimizer(engine.model, exp.optimizer)
    engine.scheduler = build_scheduler(engine.optimizer, exp.scheduler, exp.train.epochs, steps)
    return engine
