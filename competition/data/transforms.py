"""Albumentations pipelines declared in YAML: ``[{name: Affine, p: 0.5, rotate: [-15, 15]}, ...]``.

Any albumentations transform can be named; the ones the background reports compared are listed in
``KNOWN`` only to make the error for a typo useful. ``preprocess`` applies to train, validation and
test alike (report 001's sharpening was its largest single gain); ``train`` only while training.
"""
from __future__ import annotations

import inspect

import albumentations as A

from competition.config import ConfigError, Transform

KNOWN = ["HorizontalFlip", "VerticalFlip", "Affine", "ShiftScaleRotate", "GridDropout", "CoarseDropout",
         "ElasticTransform", "GridDistortion", "ImageCompression", "RandomBrightnessContrast", "RandomGamma",
         "Sharpen", "CLAHE", "GaussNoise", "GaussianBlur", "Equalize", "RandomResizedCrop"]


def _lists_to_tuples(v):
    # YAML has no tuples; albumentations' range parameters want them.
    if isinstance(v, list):
        return tuple(_lists_to_tuples(x) for x in v)
    if isinstance(v, dict):
        return {k: _lists_to_tuples(x) for k, x in v.items()}
    return v


def build_transform(t: Transform, key: str) -> A.BasicTransform:
    cls = getattr(A, t.name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        raise ConfigError(f"{key}: unknown albumentations transform {t.name!r}; common ones: "
                          f"{', '.join(KNOWN)} (any class in albumentations works)")
    params = {k: _lists_to_tuples(v) for k, v in t.model_dump().items() if k != "name"}
    sig = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in sig.values()):
        unknown = sorted(set(params) - set(sig))
        if unknown:  # albumentations only warns; a typo must not silently do nothing
            valid = [n for n in sig if n != "self"]
            raise ConfigError(f"{key}: invalid parameters for {t.name}: unknown {unknown}; valid: {', '.join(valid)}")
    try:
        return cls(**params)
    except Exception as e:  # pydantic ValidationError or TypeError from albumentations
        raise ConfigError(f"{key}: invalid parameters for {t.name}: {e}") from None


def build_pipeline(transforms: list[Transform], key: str) -> A.Compose:
    return A.Compose([build_transform(t, f"{key}[{i}]") for i, t in enumerate(transforms)])
