"""Loss terms: known answers, weighted sums, per-class weights, deep supervision, inverse frequency."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segmentation_models_pytorch import losses as smp_losses

from competition.config import ConfigError, LossConfig, LossTerm
from competition.losses import LOSS_TERMS, build_loss, inverse_frequency_weights

TERMS = ["bce", "dice", "focal", "tversky", "jaccard", "lovasz"]


def loss(*terms, mode="multilabel", C=3, weights=None, ds=None, **term_kwargs):
    cfg = LossConfig(terms=[LossTerm(name=t, **term_kwargs) for t in terms], deep_supervision_weights=ds)
    return build_loss(cfg, mode, C, None if weights is None else torch.tensor(weights, dtype=torch.float32))


@pytest.fixture
def ml():
    """Multilabel logits and targets (every class present in the batch)."""
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(2, 3, 16, 16, generator=g) > 0.6).float()
    return torch.randn(2, 3, 16, 16, generator=g), y


@pytest.fixture
def mc():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.randint(0, 4, (2, 16, 16), generator=g)


@pytest.mark.parametrize("term", ["dice", "jaccard", "tversky", "lovasz"])
@pytest.mark.parametrize("mode", ["multilabel", "multiclass"])
def test_perfect_prediction_gives_zero_region_loss(term, mode, ml, mc):
    if mode == "multilabel":
        y = ml[1]
        logits = (y * 2 - 1) * 30
    else:
        y = mc[1]
        logits = F.one_hot(y, 4).permute(0, 3, 1, 2).float() * 60 - 30
    assert loss(term, mode=mode, C=4 if mode == "multiclass" else 3)(logits, y).item() == pytest.approx(0, abs=1e-4)


def test_bce_is_torch_bce_and_multiclass_bce_is_cross_entropy(ml, mc):
    x, y = ml
    assert loss("bce")(x, y).item() == pytest.approx(F.binary_cross_entropy_with_logits(x, y).item(), rel=1e-6)
    x, y = mc
    assert loss("bce", mode="multiclass", C=4)(x, y).item() == pytest.approx(F.cross_entropy(x, y).item(), rel=1e-6)


@pytest.mark.parametrize("ignore", [False, True])
def test_dice_equals_smp_dice_from_logits_value_and_gradient(ml, mc, ignore):
    """Our dice takes the sigmoid itself (speed); the loss and its gradient are smp's from-logits Dice."""
    x, y = ml
    if ignore:
        y = y.clone()
        y[:, :, 3:7, 2:9] = 255
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = build_loss(LossConfig(terms=[LossTerm(name="dice")]), "multilabel", 3, ignore_index=255 if ignore else None)
    ref = smp_losses.DiceLoss("multilabel", from_logits=True, ignore_index=255 if ignore else None)
    a, b = ours(ours_x, y), ref(ref_x, y)
    a.backward(), b.backward()
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=1e-5, atol=1e-7)
    x, y = mc
    assert loss("dice", mode="multiclass", C=4)(x, y).item() == \
        pytest.approx(smp_losses.DiceLoss("multiclass", from_logits=True)(x, y).item(), rel=1e-6)


def test_weighted_sum_equals_sum_of_parts(ml):
    x, y = ml
    cfg = LossConfig(terms=[LossTerm(name="bce", weight=0.3), LossTerm(name="dice", weight=2.0),
                            LossTerm(name="focal", weight=1.5, kwargs={"gamma": 1.0})])
    total = build_loss(cfg, "multilabel", 3)(x, y)
    parts = 0.3 * loss("bce")(x, y) + 2.0 * loss("dice")(x, y) + 1.5 * loss("focal", kwargs={"gamma": 1.0})(x, y)
    assert total.item() == pytest.approx(parts.item(), rel=1e-6)


@pytest.mark.parametrize("term", TERMS)
def test_one_hot_class_weights_give_that_class_alone(term, ml):
    """Weights (0, 1, 0) must equal the unweighted loss of channel 1 alone: a known answer for the
    weighting of every term (smp's own for dice/jaccard/tversky/focal, ours for bce and lovasz)."""
    x, y = ml
    weighted = loss(term, weights=[0.0, 1.0, 0.0])(x, y)
    alone = loss(term, C=1)(x[:, 1:2], y[:, 1:2])
    assert weighted.item() == pytest.approx(alone.item(), rel=1e-5)
    assert weighted.item() != pytest.approx(loss(term)(x, y).item(), rel=1e-3)  # weights change the loss


def test_multiclass_class_weights(mc):
    x, y = mc
    w = torch.tensor([1.0, 2.0, 0.5, 1.5])
    assert loss("bce", mode="multiclass", C=4, weights=w.tolist())(x, y).item() == pytest.approx(
        F.cross_entropy(x, y, weight=w).item(), rel=1e-6)
    # C foreground weights (as the loop computes them): background gets 1.
    three = loss("dice", mode="multiclass", C=4, weights=[2.0, 0.5, 1.5])(x, y)
    four = loss("dice", mode="multiclass", C=4, weights=w.tolist())(x, y)
    assert three.item() == pytest.approx(four.item(), rel=1e-6)
    assert four.item() != pytest.approx(loss("dice", mode="multiclass", C=4)(x, y).item(), rel=1e-3)


def test_multiclass_lovasz_equals_smp_when_unweighted(mc):
    x, y = mc
    ours = loss("lovasz", mode="multiclass", C=4)(x, y)
    assert ours.item() == pytest.approx(smp_losses.LovaszLoss("multiclass")(x, y).item(), rel=1e-5)


def test_term_kwargs_pass_through(ml):
    x, y = ml
    smoothed = loss("dice", kwargs={"smooth": 100.0})(x, y)
    assert smoothed.item() == pytest.approx(smp_losses.DiceLoss("multilabel", smooth=100.0)(x, y).item(), rel=1e-6)
    pw = loss("bce", kwargs={"pos_weight": [1.0, 5.0, 1.0]})(x, y)
    ref = F.binary_cross_entropy_with_logits(x, y, pos_weight=torch.tensor([1.0, 5.0, 1.0]).view(3, 1, 1))
    assert pw.item() == pytest.approx(ref.item(), rel=1e-6)


def test_deep_supervision_weighting(ml):
    x, y = ml
    a, b = x, x.flip(-1)
    single = loss("bce", "dice")
    la, lb = single(a, y).item(), single(b, y).item()
    assert loss("bce", "dice")([a, b], y).item() == pytest.approx((la + lb) / 2, rel=1e-6)
    assert loss("bce", "dice", ds=[3.0, 1.0])([a, b], y).item() == pytest.approx((3 * la + lb) / 4, rel=1e-6)
    # A coarser output is scored against the target at its size: each 2x2 block's pixel nearest the
    # block centre (index 1 of 0..1), not its top-left one.
    half = F.avg_pool2d(b, 2)
    expected = (la + single(half, y[..., 1::2, 1::2]).item()) / 2
    assert loss("bce", "dice")([a, half], y).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ConfigError, match="deep_supervision_weights has 3 values but the model returns 2"):
        loss("bce", ds=[1.0, 1.0, 1.0])([a, b], y)


def test_deep_supervision_target_keeps_classes_and_void_exact(mc):
    from competition.config import IGNORE_INDEX
    from competition.losses import downsample_target
    t = torch.randint(0, 4, (2, 16, 16))
    t[:, :8, :8] = IGNORE_INDEX
    d = downsample_target(t, (4, 4))
    # Each 4x4 block's pixel nearest its centre (index 2 of 0..3); class indices and void unchanged.
    assert d.dtype == t.dtype and torch.equal(d, t[:, 2::4, 2::4]) and (d[:, :2, :2] == IGNORE_INDEX).all()
    y = (torch.rand(2, 3, 16, 16) > 0.5).float()
    y[0, :, :4] = IGNORE_INDEX
    assert torch.equal(downsample_target(y, (8, 8)), y[..., 1::2, 1::2])
    # A coarse multiclass output with void in its target: the void pixels count nothing there too.
    x, _ = mc
    coarse = x[..., ::4, ::4].clone().requires_grad_()
    cfg = LossConfig(terms=[LossTerm(name="bce"), LossTerm(name="dice")])
    total = build_loss(cfg, "multiclass", 4, ignore_index=IGNORE_INDEX)([x, coarse], t)
    total.backward()
    assert torch.isfinite(total) and coarse.grad[:, :, :2, :2].abs().sum() == 0


def test_gradients_flow_for_every_term(ml, mc):
    for mode, (x, y), C in [("multilabel", ml, 3), ("multiclass", mc, 4)]:
        for term in TERMS:
            leaf = x.clone().requires_grad_(True)
            loss(term, mode=mode, C=C, weights=[1.0] * C)(leaf, y).backward()
            assert torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0, (mode, term)


def test_errors_list_valid_names():
    with pytest.raises(ConfigError, match=r"loss.terms\[0\].name: unknown loss term 'dise'; valid: bce, dice, "
                                          r"focal, jaccard, lovasz, tversky"):
        loss("dise")
    assert LOSS_TERMS.names() == sorted(TERMS)
    with pytest.raises(ConfigError, match=r"loss.terms\[0\] \(dice\).kwargs: .*smoth.*valid: \[.*'smooth'"):
        loss("dice", kwargs={"smoth": 1.0})
    with pytest.raises(ConfigError, match=r"may not set \['mode'\]"):
        loss("dice", kwargs={"mode": "binary"})
    with pytest.raises(ConfigError, match=r"class_weights has 2 values; expected 3"):
        loss("dice", weights=[1.0, 1.0])


def test_inverse_frequency_weights():
    w = inverse_frequency_weights(np.array([10, 50, 0]), 100)
    assert w.dtype == torch.float32 and w.shape == (3,)
    assert torch.allclose(w, torch.tensor([0.9, 0.5, 1.0]) / 0.8)
    assert w.mean().item() == pytest.approx(1.0)
    assert torch.equal(inverse_frequency_weights(np.array([4, 4]), 4), torch.ones(2))
    with pytest.raises(ValueError):
        inverse_frequency_weights(np.array([5, 1]), 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_class_weight_buffers_follow_the_logits_to_the_gpu(ml):
    x, y = ml[0].cuda(), ml[1].cuda()
    for term in TERMS:
        assert torch.isfinite(loss(term, weights=[1.0, 2.0, 0.5])(x, y))
