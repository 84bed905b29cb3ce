"""``build_model(cfg, num_classes, in_channels)``: any smp architecture, or ours (``unet3plus``), on any
smp encoder or timm ``tu-<name>`` encoder, optionally wrapped by the high-resolution head.

Forward contract (every architecture): (N, in_channels, H, W) -> logits (N, num_classes, H*s, W*s)
with ``s = model.output_scale``. ``num_classes`` is the number of OUTPUT CHANNELS: the caller passes
``C`` for multilabel and ``C + 1`` for multiclass (channel 0 = background). With
``model.deep_supervision`` (unet3plus only) the training-mode forward returns a list of logits, finest
(the final output, at (H*s, W*s)) first, then the auxiliary outputs at their own, coarser resolutions
(the loss brings the target down to them); eval mode returns the final logits tensor only.

Encoder weights: null -> random init; a weights name (``imagenet``, ``ssl``, ...) -> downloaded by
smp/timm through the Hugging Face hub (or taken from its local cache), failing within about a second
when the hub cannot be reached; a path -> random init, then the file is loaded into the encoder.

    build.py      the architecture registry (ARCHITECTURES), the model.* checks, build_model
    weights.py    encoder_weights: null, a name or a file; load_encoder_weights
    hub.py        named weights from the Hugging Face hub: the reachability probe and cache check
    unet3plus.py  UNet 3+ (ours) and its decoder options (model.kwargs)
    heads.py      the high-resolution head (model.output_scale)
    precision.py  the autocast dtype for a device
"""
from competition.models.build import ARCHITECTURES, build_model, check_encoder
from competition.models.heads import HighResHead
from competition.models.unet3plus import UNet3Plus
from competition.models.weights import check_named_weights, load_encoder_weights, weights_kind

__all__ = ["ARCHITECTURES", "build_model", "check_encoder", "check_named_weights", "load_encoder_weights",
           "weights_kind", "HighResHead", "UNet3Plus"]
