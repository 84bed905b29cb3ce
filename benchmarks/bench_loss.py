"""The training loss of the default UNet 3+ step: ours against smp's own loss terms, in one process.

The case: ``configs/experiments/unet3plus.yaml``'s loss (BCE + Dice, five deep-supervision outputs
weighted 1, 0.5, 0.25, 0.125, 0.0625) for a batch of 8 x 12 classes at 128², forward and backward, on
the outputs as the model hands them over: the final one at 128², the auxiliary ones at strides 4, 8,
16 and 32 (32² ... 4²), channels_last, from a bf16 autocast forward. Ours:
``competition.losses.build_loss`` through the engine's ``_float`` (one fp32-contiguous copy per output;
our ``dice`` takes the sigmoid itself; the target brought down to each auxiliary output). Peer: smp's
``SoftBCEWithLogitsLoss`` + ``DiceLoss(from_logits=True)``, the same weights and the same downsampled
targets, on the fp32 logits in the model's layout (what the loop did before). Loss values and input
gradients must agree within 1e-5.
"""
from __future__ import annotations

import torch
from segmentation_models_pytorch import losses as smp_losses

from benchmarks.harness import allclose, compare
from competition.config import load_experiment
from competition.losses import build_loss, downsample_target
from competition.models import build_model
from competition.train.engine import _float

SHAPE = (8, 12, 128, 128)


def main() -> None:
    exp = load_experiment("unet3plus")
    ds = exp.loss.deep_supervision_weights
    ours_loss = build_loss(exp.loss, "multilabel", SHAPE[1])
    bce, dice = smp_losses.SoftBCEWithLogitsLoss(), smp_losses.DiceLoss("multilabel", from_logits=True)
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(SHAPE, generator=g) > 0.6).float()
    model = build_model(exp.model, SHAPE[1], 1).train()
    with torch.no_grad():  # the sizes the model hands over, finest first
        shapes = [tuple(o.shape) for o in model(torch.zeros(SHAPE[0], 1, *SHAPE[2:]))]
    logits = [torch.randn(s, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
              for s in shapes]

    def ours():
        outs = [o.float().requires_grad_() for o in logits]  # leaves in the model's layout, as autograd sees them
        loss = ours_loss(_float(outs), y)
        loss.backward()
        return torch.cat([loss.detach().view(1)] + [o.grad.flatten() for o in outs])  # loss, then gradients

    def peer():
        outs = [o.float().requires_grad_() for o in logits]
        targets = [y if o.shape == y.shape else downsample_target(y, o.shape[-2:]) for o in outs]
        loss = sum(w * (bce(o, t) + dice(o, t)) for w, o, t in zip(ds, outs, targets)) / sum(ds)
        loss.backward()
        return torch.cat([loss.detach().view(1)] + [o.grad.flatten() for o in outs])  # loss, then gradients

    check = allclose(1e-5, why="the same sums in another order")
    compare(f"UNet 3+ loss, forward + backward: bce + dice on {len(ds)} outputs "
            f"({', '.join('x'.join(map(str, s)) for s in shapes)}), channels_last bf16-computed logits",
            ours, {"smp terms as-is": peer}, check=check, rounds=7)


if __name__ == "__main__":
    main()
