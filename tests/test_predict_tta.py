"""TTA views: known answers against numpy, de-augment o augment = identity for every view, the
batched forward (one call per scale), and exact averages for a model that is not equivariant."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from competition.predict.tta import VIEWS, augment, deaugment, scaled_size, shape_groups, tta_predict

NUMPY = {"identity": lambda a: a, "hflip": lambda a: a[..., ::-1], "vflip": lambda a: a[..., ::-1, :],
         "rot90": lambda a: np.rot90(a, 1, (-2, -1)), "rot180": lambda a: np.rot90(a, 2, (-2, -1)),
         "rot270": lambda a: np.rot90(a, 3, (-2, -1))}


@pytest.mark.parametrize("view", VIEWS)
def test_augment_matches_numpy_and_deaugment_inverts_it(view):
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)  # non-square: turns swap H, W
    a = augment(x, view)
    np.testing.assert_array_equal(a.numpy(), NUMPY[view](x.numpy()))
    assert torch.equal(deaugment(a, view), x)


def test_known_answer_on_a_2x2_image():
    x = torch.tensor([[1, 2], [3, 4]])
    assert augment(x, "hflip").tolist() == [[2, 1], [4, 3]]
    assert augment(x, "vflip").tolist() == [[3, 4], [1, 2]]
    assert augment(x, "rot90").tolist() == [[2, 4], [1, 3]]  # counter-clockwise, as np.rot90
    assert augment(x, "rot270").tolist() == [[3, 1], [4, 2]]


def test_unknown_view_is_an_error():
    with pytest.raises(ValueError, match="unknown TTA view 'transpose'"):
        tta_predict(lambda t: t, torch.zeros(1, 1, 4, 4), ["identity", "transpose"])


def test_identity_model_is_unchanged_under_every_view_and_views_share_one_forward():
    x = torch.randn(3, 2, 8, 8)
    calls = []

    def model(batch):
        calls.append(batch.shape[0])
        return batch

    out = tta_predict(model, x, VIEWS)
    torch.testing.assert_close(out, x)
    assert calls == [3 * len(VIEWS)]  # all six views of the three images in ONE call


def test_non_equivariant_model_gives_the_exact_average():
    """f(x) = x + ramp (a column ramp): hflip TTA = x + (ramp + mirrored ramp) / 2 = x + mean."""
    x = torch.randn(2, 1, 4, 6)
    ramp = torch.arange(6.0).view(1, 1, 1, 6)
    out = tta_predict(lambda t: t + ramp, x, ["identity", "hflip"])
    torch.testing.assert_close(out, x + 2.5)
    # vflip does not touch a column ramp: the average keeps it.
    torch.testing.assert_close(tta_predict(lambda t: t + ramp, x, ["identity", "vflip"]), x + ramp)


def test_non_square_turns_run_as_a_second_group():
    x = torch.randn(1, 1, 4, 6)
    calls = []

    def model(batch):
        calls.append(tuple(batch.shape))
        return batch * 2

    torch.testing.assert_close(tta_predict(model, x, ["identity", "rot90", "hflip", "rot270"]), x * 2)
    assert calls == [(2, 1, 4, 6), (2, 1, 6, 4)]
    assert shape_groups(["identity", "rot90", "hflip"], 4, 6) == [["identity", "hflip"], ["rot90"]]


def test_output_scale_and_multi_scale_are_resized_back():
    x = torch.rand(1, 1, 32, 32)
    up = torch.nn.Upsample(scale_factor=2, mode="nearest")  # a model with output scale 2
    out = tta_predict(up, x, ["identity", "hflip"], scales=[1.0, 2.0])
    assert out.shape == (1, 1, 64, 64)
    constant = torch.full((1, 1, 32, 32), 0.25)
    torch.testing.assert_close(tta_predict(up, constant, ["identity"], scales=[0.5, 1.0, 1.5]),
                               torch.full((1, 1, 64, 64), 0.25))
    assert scaled_size(100, 64, 1.5) == (160, 96) and scaled_size(20, 20, 0.5) == (32, 32)


def test_the_views_are_defined_once():
    """One list (config.TTAView) feeds the schema, predict.tta, init's comment and the errors; each
    listed view has a transform here (test above: deaugment inverts it)."""
    import typing

    from competition.config import TTA_VIEWS, CompetitionConfig, TTAView
    from competition.init.render import DOC
    assert VIEWS == TTA_VIEWS == typing.get_args(TTAView)
    schema = CompetitionConfig.model_json_schema()
    assert tuple(schema["properties"]["tta"]["items"]["enum"]) == TTA_VIEWS
    assert all(v in DOC["tta"] for v in TTA_VIEWS)
    x = torch.arange(6.0).reshape(1, 2, 3)
    for v in TTA_VIEWS:
        augment(x, v)  # no "unknown TTA view"
