"""competition: a runner for Kaggle-style image-segmentation competitions."""
import os as _os

# Set before albumentations is imported anywhere: it otherwise checks for updates over the network on
# import. The hub's HF_HUB_OFFLINE is left to the user: pretrained weights download where the hub is
# reachable, and competition.models.hub fails fast (or uses the local cache) where it is not.
_os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"

__version__ = "0.1.0"
