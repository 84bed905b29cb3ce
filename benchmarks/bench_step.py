"""One training step of the default UNet 3+: deep supervision scored as nnU-Net does it, or upsampled.

The case: ``configs/experiments/unet3plus.yaml``'s model and loss (ResNet-10-T, five outputs, BCE +
Dice), a batch of 8 at 128², bf16 autocast and channels_last as the engine runs them: forward, loss,
backward, AdamW step, from the same weights every call. Ours: the auxiliary outputs at their own
stride (32² ... 4²) and the target brought down to each (``competition.losses``). Peer: the contract
before (the paper's and smp-style deep supervision), the auxiliary outputs upsampled bilinearly to 128²
and scored there. The two steps optimise different losses by design, so the check is on what they
share: the forward's final output (identical), and each side's loss finite.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from benchmarks.harness import compare
from competition.config import load_experiment
from competition.losses import build_loss
from competition.models import build_model
from competition.train.engine import _float

BATCH, SIZE, CLASSES = 8, 128, 12


def main() -> None:
    exp = load_experiment("unet3plus")
    torch.manual_seed(0)
    model = build_model(exp.model, CLASSES, 1).to(memory_format=torch.channels_last)
    loss_fn = build_loss(exp.loss, "multilabel", CLASSES)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 1, SIZE, SIZE, generator=g).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(BATCH, CLASSES, SIZE, SIZE, generator=g) > 0.6).float()

    def step(upsampled: bool):
        m = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
        if upsampled:
            out = [out[0]] + [F.interpolate(o, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
                              for o in out[1:]]
        loss = loss_fn(_float(out), y)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss), f"loss {loss.item()}"
        return out[0].detach().float()  # the final output: the same forward on both sides

    def check(ours, peer) -> str:
        assert torch.equal(ours, peer), "the final outputs differ"
        return ("the same forward (final output identical); the losses differ by design: the auxiliary "
                "outputs are scored at their own size vs at 128²")

    compare(f"UNet 3+ training step (unet3plus.yaml: ResNet-10-T, {len(exp.loss.deep_supervision_weights)} "
            f"outputs, batch {BATCH} x {CLASSES} classes at {SIZE}², bf16, channels_last): forward + loss + "
            f"backward + AdamW", lambda: step(False), {"auxiliaries upsampled to 128²": lambda: step(True)},
            ours_label="auxiliaries at their own stride", check=check, rounds=7)


if __name__ == "__main__":
    main()
