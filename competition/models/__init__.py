"""``build_model(cfg, num_classes, in_channels, input_size)``: any smp architecture, or ours
(``unet3plus``, ``nnunet``, ``hrnetv2``), on any smp encoder or timm ``tu-<name>`` encoder, or a plug-in
(``model.arch: package.module:factory`` or an entry point), optionally wrapped by the high-resolution head.

Forward contract (every architecture): (N, in_channels, H, W) -> logits (N, num_classes, H*s, W*s)
with ``s = model.output_scale``. ``num_classes`` is the number of OUTPUT CHANNELS: the caller passes
``C`` for multilabel and ``C + 1`` for multiclass (channel 0 = background). With
``model.deep_supervision`` (unet3plus, nnunet, plug-ins) the training-mode forward returns a list of logits, finest
(the final output, at (H*s, W*s)) first, then the auxiliary outputs at their own, coarser resolutions
(the loss brings the target down to them); eval mode returns the final logits tensor only.

Encoder weights: null -> random init; a weights name (``imagenet``, ``ssl``, ...) -> downloaded by
smp/timm through the Hugging Face hub (or taken from its local cache), failing within about a second
when the hub cannot be reached; a path -> random init, then the file is loaded into the encoder.

    build.py      the architecture registry (ARCHITECTURES), the model.* checks, build_model
    plugin.py     plug-in architectures (import path or entry point) and their output contract
    nnunet.py     nnU-Net's 2D U-Net (dynamic-network-architectures), planned from the input size
    hrnet.py      the HRNetV2 head on timm HRNet encoders
    weights.py    encoder_weights: null, a name or a file; load_encoder_weights
    hub.py        named weights from the Hugging Face hub: the reachability probe and cache check
    unet3plus.py  UNet 3+ (ours) and its decoder options (model.kwargs)
    heads.py      the high-resolution head (model.output_scale)
    precision.py  the autocast dtype for a device
"""
from competition.models.build import (
    ARCHITECTURES,
    build_model,
    check_encoder,
    check_model,
    model_summary,
    resolve_arch,
    uses_encoder,
)
from competition.models.heads import HighResHead
from competition.models.hrnet import HRNetV2
from competition.models.nnunet import NNUNet
from competition.models.plugin import PluginModel, source_files
from competition.models.unet3plus import UNet3Plus
from competition.models.weights import check_named_weights, load_encoder_weights, weights_kind

__all__ = ["ARCHITECTURES", "build_model", "check_encoder", "check_model", "check_named_weights",
           "load_encoder_weights", "model_summary", "resolve_arch", "source_files", "uses_encoder", "weights_kind",
           "HighResHead", "HRNetV2", "NNUNet", "PluginModel", "UNet3Plus"]
