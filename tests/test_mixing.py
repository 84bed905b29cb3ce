"""Batch mixing (augment.batch): known answers for mixup, cutmix and copy_paste (multilabel and
multiclass), seeding (pure function of seed/epoch/step/op/rank, never the global RNG), config
validation, and end to end: training with mixup (also interrupted and resumed) and with
copy_paste + cutmix on a multiclass competition."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from competition.config import BatchMix, ConfigError, load_experiment
from competition.data import mixing

MC = {"task": "multiclass"}


def _batch(task="multilabel", B=4, C=3, H=8, W=8, scale=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, H, W, generator=g)
    h, w = H * scale, W * scale
    if task == "multilabel":
        y = (torch.rand(B, C, h, w, generator=g) > 0.7).to(torch.uint8)
    else:
        y = torch.randint(0, C + 1, (B, h, w), generator=g)
    return x, y


def mixer(ops, task="multilabel", classes=("a", "b", "c"), seed=0, rank=0, rare=None):
    return mixing.BatchMixer([BatchMix(**o) for o in ops], task, list(classes), seed, rank, rare)


# -- known answers ---------------------------------------------------------------------------------
def test_mixup_with_fixed_lam_is_the_exact_convex_combination():
    x, y = _batch()
    perm = torch.tensor([2, 0, 3, 1])
    xm, ya, yb, lam = mixing.mixup(x, y, lam=0.3, perm=perm)
    assert lam == 0.3
    assert torch.equal(xm, 0.3 * x + 0.7 * x[perm])
    assert torch.equal(ya, y) and torch.equal(yb, y[perm])


def test_mixup_loss_is_the_lam_weighted_sum_also_for_deep_supervision():
    from competition.config import LossConfig
    from competition.losses import build_loss
    x, y = _batch(C=3)
    loss_fn = build_loss(LossConfig(terms=[{"name": "bce"}, {"name": "dice"}]), "multilabel", 3)
    out = torch.randn(4, 3, 8, 8)
    perm = torch.tensor([1, 0, 3, 2])
    t = [(0.25, y.float()), (0.75, y[perm].float())]
    want = 0.25 * loss_fn(out, y.float()) + 0.75 * loss_fn(out, y[perm].float())
    assert torch.allclose(mixing.mixed_loss(loss_fn, out, t), want, rtol=0, atol=1e-7)
    # a single target of weight 1 is the plain loss, bit for bit
    assert torch.equal(mixing.mixed_loss(loss_fn, out, [(1.0, y.float())]), loss_fn(out, y.float()))
    ds = [out, torch.randn(4, 3, 4, 4)]  # deep supervision: a list of outputs, the target brought down to coarser ones
    want = 0.25 * loss_fn(ds, y.float()) + 0.75 * loss_fn(ds, y[perm].float())
    assert torch.allclose(mixing.mixed_loss(loss_fn, ds, t), want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
@pytest.mark.parametrize("scale", [1, 2])
def test_cutmix_pastes_exactly_the_box_into_image_and_mask(task, scale):
    x, y = _batch(task, scale=scale)
    perm = torch.tensor([3, 2, 1, 0])
    box = (2, 6, 1, 4)  # y0, y1, x0, x1 in image pixels
    xm, ym = mixing.cutmix(x, y, box=box, perm=perm)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:6, 1:4] = True
    assert torch.equal(xm, torch.where(inside, x[perm], x))
    inside_m = inside.repeat_interleave(scale, 0).repeat_interleave(scale, 1)  # the box at mask resolution
    if task == "multilabel":
        assert ym.dtype == torch.uint8 and ym.shape == y.shape
        assert torch.equal(ym, torch.where(inside_m, y[perm], y))
    else:
        assert ym.dtype == torch.int64
        assert torch.equal(ym, torch.where(inside_m, y[perm], y))
    assert torch.equal(x, _batch(task, scale=scale)[0])  # the input is not modified in place


def test_cutmix_box_has_area_one_minus_lam_and_stays_inside():
    g = torch.Generator().manual_seed(0)
    for lam in (0.0, 0.25, 0.5, 0.9, 1.0):
        for _ in range(20):
            y0, y1, x0, x1 = mixing.cutmix_box(100, 60, lam, g)
            assert 0 <= y0 <= y1 <= 100 and 0 <= x0 <= x1 <= 60
            # never more than (1 - lam) of the image; exactly that (to the pixel) when not clipped
            assert (y1 - y0) * (x1 - x0) <= (1 - lam) * 6000 + 1e-9
    # unclipped (centre in the middle): the area is 1 - lam of the image, to the rounding of the sides
    y0, y1, x0, x1 = mixing.cutmix_box(100, 60, 0.75, _fixed_centre(50, 30))
    assert (y1 - y0, x1 - x0) == (50, 30)


def _fixed_centre(cy, cx):
    """A generator whose first two randint draws (cutmix_box's centre, 100 x 60 image) are (cy, cx)."""
    for s in range(100000):
        g = torch.Generator().manual_seed(s)
        if int(torch.randint(100, (1,), generator=g)) == cy and int(torch.randint(60, (1,), generator=g)) == cx:
            return torch.Generator().manual_seed(s)
    raise AssertionError("no seed found")


def test_copy_paste_multilabel_sets_exactly_the_donor_class_pixels():
    x, _ = _batch()
    y = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    y[1, 2, 2:5, 3:7] = 1  # image 1 holds class 2 (rare); its pixels go to image 0
    y[1, 0, 0:2, 0:2] = 1  # another class of the donor: not copied
    y[0, 0, :, :4] = 1  # the recipient's own labels stay
    donors = torch.tensor([1, 1, 2, 3])  # 1 -> 0; the others keep themselves
    xm, ym = mixing.copy_paste(x, y, "multilabel", [2], donors=donors)
    region = y[1, 2].bool()
    want_x = x.clone()
    want_x[0, :, region] = x[1, :, region]
    want_y = y.clone()
    want_y[0, 2, region] = 1
    assert torch.equal(xm, want_x) and torch.equal(ym, want_y)


def test_copy_paste_multiclass_sets_the_index_and_upsamples_nothing_else():
    x, _ = _batch("multiclass")
    y = torch.zeros(4, 16, 16, dtype=torch.long)  # the mask at 2x the image (output_scale 2)
    y[2, 4:10, 6:12] = 3  # class index 2 -> label 3, in image 2
    y[2, 0:4, 0:4] = 1  # class 0: not chosen
    y[3, :, :8] = 2
    donors = torch.tensor([0, 1, 3, 2])  # 2 -> 3 and 3 -> 2 (3 holds no class 2: nothing comes back)
    xm, ym = mixing.copy_paste(x, y, "multiclass", [2], donors=donors)
    want_y = y.clone()
    want_y[3][y[2] == 3] = 3
    assert torch.equal(ym, want_y)
    want_x = x.clone()
    want_x[3, :, 2:5, 3:6] = x[2, :, 2:5, 3:6]  # the region at image resolution
    assert torch.equal(xm, want_x)


def test_copy_paste_draws_donors_holding_the_class():
    x, _ = _batch(B=6)
    y = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    y[4, 1, 1:3, 1:3] = 1
    y[5, 1, 5:7, 5:7] = 1
    for s in range(10):
        xm, ym = mixing.copy_paste(x, y, "multilabel", [1], torch.Generator().manual_seed(s))
        for i in range(4):  # every image without the class gets one donor's instance
            got = ym[i, 1].bool()
            assert torch.equal(got, y[4, 1].bool()) or torch.equal(got, y[5, 1].bool())
        assert torch.equal(ym[4, 1].bool(), y[4, 1].bool() | y[5, 1].bool())  # 4 and 5 swap theirs
        assert torch.equal(ym[:, [0, 2]], y[:, [0, 2]])


def test_rare_classes_is_the_rare_class_weights_rule():
    from competition.data.dataset import rare_class_weights
    rng = np.random.default_rng(0)
    pres = rng.random((40, 7)) < np.linspace(0.05, 0.9, 7)
    pres[:, 3] = False  # absent from the fold: not rare
    for q in (0.1, 0.25, 0.5, 1.0):
        rare = mixing.rare_classes(pres, q)
        assert not rare[3]
        np.testing.assert_array_equal(pres[:, rare].any(1), rare_class_weights(pres, 1.0, q) > 1)


# -- the mixer: probability, order, seeding -------------------------------------------------------
@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_p_zero_leaves_the_batch_untouched(task):
    x, y = _batch(task)
    m = mixer([{"name": "mixup", "p": 0.0}, {"name": "cutmix", "p": 0.0}, {"name": "copy_paste", "p": 0.0}], task)
    for step in range(1, 20):
        xm, t = m(x, y, epoch=1, step=step)
        assert xm is x and len(t) == 1 and t[0][0] == 1.0 and t[0][1] is y


def test_same_seed_epoch_step_gives_the_same_mix_and_others_differ():
    x, y = _batch(B=8, H=16, W=16)
    ops = [{"name": "copy_paste", "p": 1.0, "classes": ["b"]}, {"name": "cutmix", "p": 1.0},
           {"name": "mixup", "p": 1.0, "alpha": 0.4}]
    state = torch.random.get_rng_state()
    a = mixer(ops)(x, y, 3, 7)
    b = mixer(ops)(x.clone(), y.clone(), 3, 7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is neither used nor moved
    assert torch.equal(a[0], b[0]) and len(a[1]) == len(b[1]) == 2
    assert all(wa == wb and torch.equal(ta, tb) for (wa, ta), (wb, tb) in zip(a[1], b[1]))
    assert a[1][0][0] + a[1][1][0] == pytest.approx(1.0)
    for other in (mixer(ops)(x, y, 3, 8), mixer(ops)(x, y, 4, 7), mixer(ops, seed=1)(x, y, 3, 7),
                  mixer(ops, rank=1)(x, y, 3, 7)):  # another step, epoch, seed or DDP rank
        assert not torch.equal(other[0], a[0])


def test_ops_apply_with_probability_p_in_the_listed_order():
    x, y = _batch()
    m = mixer([{"name": "mixup", "p": 0.5}])
    applied = sum(len(m(x, y, 1, s)[1]) == 2 for s in range(1, 401))
    assert 160 < applied < 240
    # cutmix after mixup pastes the same box into both weighted targets
    m = mixer([{"name": "mixup", "p": 1.0}, {"name": "cutmix", "p": 1.0}])
    xm, t = m(x, y, 1, 1)
    assert len(t) == 2 and all(tt.dtype == torch.uint8 for _, tt in t)


def test_beta_draws():
    g = torch.Generator().manual_seed(0)
    lams = np.array([mixing.sample_lam(0.4, g) for _ in range(2000)])
    assert ((lams >= 0) & (lams <= 1)).all()
    assert lams.mean() == pytest.approx(0.5, abs=0.03)
    assert lams.var() == pytest.approx(0.25 / (2 * 0.4 + 1), abs=0.02)  # Beta(a, a): 1 / (4 (2a + 1))


def test_rare_classes_come_from_the_training_set_when_the_loader_has_one():
    class Adapter:
        def presence(self, i):
            return np.array([True, i < 2, i == 0])  # counts 4, 2, 1

    class Dataset:
        adapter, ids, split = Adapter(), [0, 1, 2, 3], "train"

    exp, comp = _exp_comp(augment={"batch": [{"name": "copy_paste", "p": 1.0}]}, data={"rare_class_quantile": 0.5})
    m = mixing.BatchMixer.for_training(exp, comp.model_copy(update={"classes": ["a", "b", "c"]}), Dataset())
    assert m.rare.tolist() == [False, True, True]
    assert m._class_indices(m.ops[0], None) == [1, 2]


# -- config ----------------------------------------------------------------------------------------
def _exp_comp(**sections):
    from conftest import tiny_competition

    from competition.config import CompetitionConfig, ExperimentConfig, validate
    comp = validate(CompetitionConfig, tiny_competition(), "tiny-hands")
    exp = validate(ExperimentConfig, {"name": "e", "competition": "tiny-hands", **sections}, "e")
    return exp, comp


def test_unknown_copy_paste_class_is_a_config_error_listing_the_valid_names():
    exp, comp = _exp_comp(augment={"batch": [{"name": "mixup"}, {"name": "copy_paste", "classes": ["radius", "nope"]}]})
    with pytest.raises(ConfigError) as e:
        mixing.check(exp, comp)
    msg = str(e.value)
    assert msg.startswith("augment.batch[1].classes: unknown class 'nope'; valid: " + ", ".join(comp.classes))
    exp, _ = _exp_comp(augment={"batch": [{"name": "cutmix", "classes": [comp.classes[0]]}]})
    with pytest.raises(ConfigError, match=r"augment\.batch\[0\]\.classes: cutmix .* takes no classes"):
        mixing.check(exp, comp)
    exp, _ = _exp_comp(augment={"batch": [{"name": "copy_paste", "classes": []}]})
    with pytest.raises(ConfigError, match=r"augment\.batch\[0\]\.classes is empty"):
        mixing.check(exp, comp)
    exp, _ = _exp_comp(augment={"batch": [{"name": "copy_paste", "classes": comp.classes[:2]}, {"name": "cutmix"}]})
    mixing.check(exp, comp)


# -- end to end ------------------------------------------------------------------------------------
@pytest.fixture
def folded(tiny_project):
    from competition.cli import main
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    return tiny_project


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_mixup_trains_scores_and_resumes_exactly(folded, monkeypatch):
    """A tiny multilabel run with mixup at p=1 trains and scores; the same run stopped after epoch 1
    and resumed from last.pt reproduces it (the mix of every batch is seeded, not drawn globally)."""
    from test_train import write_exp

    from competition.train.loop import fit
    mix = {"batch": [{"name": "mixup", "p": 1.0, "alpha": 0.4}]}
    write_exp(folded, "mix", augment=mix, train={"epochs": 2}, tracking={"wandb": False})
    n_targets, loss = [], mixing.mixed_loss
    monkeypatch.setattr(mixing, "mixed_loss", lambda f, out, t: n_targets.append(len(t)) or loss(f, out, t))
    m = fit(load_experiment("mix"), fold=0, log=lambda *_: None)
    run = folded / "runs/mix/fold0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(metrics["val_dice"]) and np.isfinite(metrics["oof_dice"]) and m["epochs_run"] == 2
    ref = pd.read_csv(run / "history.csv")
    assert n_targets and set(n_targets) == {2}  # every training batch was mixed (p=1): two weighted targets
    assert yaml.safe_load((run / "config.yaml").read_text())["experiment"]["augment"]["batch"][0]["name"] == "mixup"

    (folded / "runs").rename(folded / "runs-ref")

    def stop(epoch, dice):
        if epoch == 1:
            raise _Stop
    with pytest.raises(_Stop):
        fit(load_experiment("mix"), fold=0, log=lambda *_: None, on_epoch=stop)
    assert len(pd.read_csv(run / "history.csv")) == 1
    logs = []
    fit(load_experiment("mix"), fold=0, log=logs.append)
    assert any("resuming mix fold 0" in s for s in logs)
    hist = pd.read_csv(run / "history.csv")
    np.testing.assert_allclose(hist["train_loss"], ref["train_loss"], rtol=1e-6)
    np.testing.assert_allclose(hist["val_dice"], ref["val_dice"], atol=1e-6)


@pytest.mark.slow
def test_copy_paste_and_cutmix_train_a_multiclass_competition(tiny_project, monkeypatch):
    from conftest import tiny_competition
    from test_train import write_exp

    from competition.cli import main
    from competition.train.loop import fit
    (tiny_project / "configs/competitions/tiny-hands.yaml").write_text(yaml.safe_dump(tiny_competition(**MC)))
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    write_exp(tiny_project, "mc", model={"arch": "Unet", "encoder": "tu-test_resnet"}, data={"input_size": 32},
              augment={"batch": [{"name": "copy_paste", "p": 1.0}, {"name": "cutmix", "p": 1.0, "alpha": 1.0}]},
              train={"epochs": 2}, tracking={"wandb": False})
    seen = []
    call = mixing.BatchMixer.__call__

    def spy(self, x, y, epoch, step):
        xm, t = call(self, x, y, epoch, step)
        seen.append((self.rare, epoch, torch.equal(xm, x)))
        return xm, t
    monkeypatch.setattr(mixing.BatchMixer, "__call__", spy)
    fit(load_experiment("mc"), fold=0, log=lambda *_: None)
    assert seen and {e for _, e, _ in seen} == {1, 2}
    assert all(r is not None and r.any() for r, _, _ in seen)  # rare classes counted on the training fold
    assert sum(not same for _, _, same in seen) >= len(seen) // 2  # the batches were mixed
    metrics = json.loads((tiny_project / "runs/mc/fold0/metrics.json").read_text())
    assert np.isfinite(metrics["val_dice"]) and np.isfinite(metrics["oof_dice"])
    assert len(pd.read_csv(tiny_project / "runs/mc/fold0/history.csv")) == 2


def test_unknown_class_fails_training_before_the_first_step(folded):
    from test_train import write_exp

    from competition.train.loop import fit
    write_exp(folded, "bad", augment={"batch": [{"name": "copy_paste", "classes": ["nope"]}]},
              train={"epochs": 1}, tracking={"wandb": False})
    with pytest.raises(ConfigError, match=r"augment\.batch\[0\]\.classes: unknown class 'nope'; valid: "):
        fit(load_experiment("bad"), fold=0, log=lambda *_: None)
    assert not (folded / "runs/bad/fold0/last.pt").exists()
