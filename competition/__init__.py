"""competition: a runner for Kaggle-style image-segmentation competitions."""
import os as _os

# Set before albumentations or huggingface_hub are imported anywhere: albumentations otherwise checks
# for updates over the network on import, and hub look-ups retry for 25-50 s offline instead of failing.
_os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
