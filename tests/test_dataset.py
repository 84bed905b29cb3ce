import numpy as np
import pytest
import torch

from competition.config import ConfigError, ExperimentConfig, load_competition
from competition.data.adapters import make_adapter
from competition.data.dataset import EpochSampler, SegDataset, rare_class_weights
from competition.data.transforms import build_pipeline


def exp(**kw) -> ExperimentConfig:
    base = {"name": "t", "competition": "tiny-hands", "data": {"input_size": 32, "batch_size": 2, "workers": 0}}
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v}
    return ExperimentConfig.model_validate(base)


AUG = {"train": [{"name": "Affine", "p": 1.0, "rotate": [-30, 30]}, {"name": "RandomBrightnessContrast", "p": 1.0}]}


def test_resize_policy_shapes_and_alignment(tiny_project):
    ad = make_adapter(load_competition("tiny-hands"))
    ds = SegDataset(ad, ad.ids, exp(), "multilabel", "val")
    s = ds[0]
    assert s["image"].shape == (1, 32, 32) and s["image"].dtype == torch.float32
    assert s["mask"].shape == (12, 32, 32) and s["mask"].dtype == torch.uint8
    np.testing.assert_array_equal(s["mask"].numpy(), ad.load_mask(ad.ids[0], (32, 32)))


def test_output_scale_targets_at_k_times_the_input(tiny_project):
    ad = make_adapter(load_competition("tiny-hands"))
    ds = SegDataset(ad, ad.ids, exp(model={"output_scale": 2}, augment=AUG), "multilabel", "train")
    s = ds[1]
    assert s["image"].shape == (1, 32, 32) and s["mask"].shape == (12, 64, 64)


def test_crop_policy(tiny_project):
    ad = make_adapter(load_competition("tiny-hands"))
    e = exp(data={"policy": "crop", "crop_from": 48})
    tr = SegDataset(ad, ad.ids, e, "multilabel", "train")[0]
    va = SegDataset(ad, ad.ids, e, "multilabel", "val")[0]
    assert tr["image"].shape == (1, 32, 32) and tr["mask"].shape == (12, 32, 32)
    assert va["image"].shape == (1, 48, 48) and va["mask"].shape == (12, 48, 48)


def test_augmentation_is_seeded_per_epoch_and_index(tiny_project):
    ad = make_adapter(load_competition("tiny-hands"))
    a = SegDataset(ad, ad.ids, exp(augment=AUG), "multilabel", "train")
    b = SegDataset(ad, ad.ids, exp(augment=AUG), "multilabel", "train")
    a.set_epoch(3), b.set_epoch(3)
    assert torch.equal(a[2]["image"], b[2]["image"]) and torch.equal(a[2]["mask"], b[2]["mask"])
    b.set_epoch(4)
    assert not torch.equal(a[2]["image"], b[2]["image"])
    # Geometry moves image and mask together: the rotated mask still covers the bright bones.
    s = a[2]
    bone = s["mask"].bool().any(0)
    assert s["image"][0][bone].mean() > s["image"][0][~bone].mean()


def test_multiclass_target_is_an_index_map(tiny_project):
    ad = make_adapter(load_competition("tiny-hands"))
    s = SegDataset(ad, ad.ids, exp(), "multiclass", "val")[0]
    assert s["mask"].dtype == torch.int64 and s["mask"].shape == (32, 32)
    assert s["mask"].max() <= 12 and (s["mask"] == 0).any()


def test_unknown_transform_and_bad_params_name_the_key():
    from competition.config import Transform
    with pytest.raises(ConfigError,
                       match=r"augment.train\[0\]: unknown albumentations transform 'Flipp'.*HorizontalFlip"):
        build_pipeline([Transform(name="Flipp")], "augment.train")
    with pytest.raises(ConfigError, match=r"augment.train\[0\]: invalid parameters for Affine"):
        build_pipeline([Transform(name="Affine", rotatee=3)], "augment.train")


@pytest.mark.parametrize("name, params", [
    ("HorizontalFlip", {}), ("Affine", {"rotate": [-30, 30]}), ("GridDropout", {"ratio": 0.3}),
    ("CoarseDropout", {}), ("ElasticTransform", {}), ("ImageCompression", {"quality_range": [50, 90]}),
    ("RandomBrightnessContrast", {}), ("RandomGamma", {}), ("Sharpen", {}), ("CLAHE", {})])
def test_report_augmentations_build_and_run(name, params):
    from competition.config import Transform
    pipe = build_pipeline([Transform(name=name, p=1.0, **params)], "augment.train")
    img = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    mask = np.zeros((64, 64, 12), np.uint8)
    mask[10:30, 10:30, 3] = 1
    out = pipe(image=img, mask=mask)
    assert out["image"].shape == (64, 64) and out["mask"].shape == (64, 64, 12)


def test_sampler_shards_cover_everything_and_resume_identically():
    s0, s1 = EpochSampler(7, seed=1, rank=0, world=2), EpochSampler(7, seed=1, rank=1, world=2)
    for s in (s0, s1):
        s.set_epoch(5)
    a, b = list(s0), list(s1)
    assert len(a) == len(b) == 4 and set(a) | set(b) == set(range(7))
    again = EpochSampler(7, seed=1, rank=0, world=2)
    again.set_epoch(5)
    assert list(again) == a


def test_rare_class_oversampling_draws_rare_images_more_often():
    pres = np.zeros((100, 3), bool)
    pres[:, 0] = True
    pres[:5, 2] = True  # class 2 is rare: 5 images
    w = rare_class_weights(pres, oversample=9.0, quantile=0.34)
    assert w[:5].tolist() == [10.0] * 5 and (w[5:] == 1).all()
    s = EpochSampler(100, seed=0, weights=w)
    drawn = np.array(list(s))
    assert (drawn < 5).mean() > 0.25  # ~ 50/145 expected; 5% without oversampling
    assert rare_class_weights(pres, 0.0, 0.25) is None
