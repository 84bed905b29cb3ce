"""`competition train --check` builds what the run builds -- the model (on the meta device, no weights
downloaded), the loss, the optimizer over the model's parameter groups, the scheduler -- so what only
the run used to reject (an unknown model kwarg, class weights of the wrong length, deep-supervision
weights that do not match the outputs, a batch the model cannot train on) is rejected in seconds,
with one line naming the key."""
from __future__ import annotations

import pytest
import torch
from test_train import write_exp

from competition.cli import main


@pytest.fixture
def folded(tiny_project):
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    return tiny_project


def check(name: str, *extra: str) -> int:
    return main(["train", "--exp", name, "--fold", "0", "--check", *extra])


def rejected(capsys, name: str, *extra: str) -> str:
    assert check(name, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_an_unknown_model_kwarg_is_rejected_by_check(folded, capsys):
    write_exp(folded, "ok")
    assert check("ok") == 0
    assert "configuration ok" in capsys.readouterr().out
    # smp encoder: the architecture's own list; the run's message, from the run's build_model
    err = rejected(capsys, "ok", "--set", "model.kwargs.nonsense.deep=1")
    assert "model.kwargs" in err and "nonsense" in err, err
    # timm encoder: extra kwargs go to the encoder, which rejects this one
    write_exp(folded, "tu", model={"encoder": "tu-resnet18"})
    assert check("tu") == 0
    capsys.readouterr()
    err = rejected(capsys, "tu", "--set", "model.kwargs.nonsense.deep=1")
    assert "model.kwargs" in err and "unexpected keyword argument 'nonsense'" in err, err
    # unet3plus (the default experiment's architecture)
    write_exp(folded, "u3", model={"arch": "unet3plus", "encoder": "resnet18", "encoder_depth": 4,
                                   "deep_supervision": True, "kwargs": {"cat_channels": 8}})
    assert check("u3") == 0
    capsys.readouterr()
    err = rejected(capsys, "u3", "--set", "model.kwargs.nonsense.deep=1")
    assert "model.kwargs" in err and "nonsense" in err, err
    assert not (folded / "runs").exists()  # a check writes nothing


def test_a_value_the_architecture_rejects_is_a_config_error_naming_model_kwargs(folded, capsys):
    write_exp(folded, "att", model={"kwargs": {"decoder_attention_type": "nonsense"}})
    err = rejected(capsys, "att")
    assert err.startswith("error: model.kwargs") and "nonsense" in err, err


def test_the_model_is_built_on_meta_with_random_init_and_nothing_downloaded(folded, capsys, monkeypatch):
    import competition.models as models
    built = []
    real = models.build_model

    def spy(cfg, *a, **k):
        built.append((cfg.encoder_weights, torch.get_default_device().type))
        return real(cfg, *a, **k)
    monkeypatch.setattr(models, "build_model", spy)
    from competition.models import build
    monkeypatch.setattr(build, "download_guard", lambda *a, **k: pytest.fail("weights were fetched"))
    write_exp(folded, "inet", model={"encoder_weights": "imagenet"})
    assert check("inet") == 0
    assert built == [(None, "meta")]
    write_exp(folded, "badtag", model={"encoder_weights": "imagenet22k"})
    assert "model.encoder_weights" in rejected(capsys, "badtag")
    write_exp(folded, "nofile", model={"encoder_weights": "weights/missing.pth"})
    err = rejected(capsys, "nofile")
    assert "model.encoder_weights" in err and "missing.pth" in err


def test_run_time_only_rejections_now_fail_the_check(folded, capsys):
    # class weights of the wrong length: the run used to find out when it counted them
    write_exp(folded, "cw", loss={"class_weights": [1.0, 2.0]})
    err = rejected(capsys, "cw")
    assert "loss.class_weights has 2 values" in err, err
    # deep-supervision weights that do not match the model's outputs: the run's first step refused
    write_exp(folded, "ds", model={"arch": "unet3plus", "encoder": "resnet18", "encoder_depth": 4,
                                   "deep_supervision": True, "kwargs": {"cat_channels": 8}},
              loss={"deep_supervision_weights": [1.0, 0.5]})
    err = rejected(capsys, "ds")
    assert "loss.deep_supervision_weights has 2 values" in err and "4 outputs" in err, err
    # a batch the model cannot train on: one image of 32 px leaves batch norm one value per channel at
    # the encoder's 1x1 bottom, which the first training step refused
    write_exp(folded, "size", data={"input_size": 32, "batch_size": 1})
    err = rejected(capsys, "size")
    assert "data.input_size 32x32 (batch 1)" in err and "Expected more than 1 value per channel" in err, err
    # an optimizer kwarg the optimizer rejects
    write_exp(folded, "ok")
    err = rejected(capsys, "ok", "--set", "optimizer.kwargs.bogus=1")
    assert "optimizer.kwargs" in err and "bogus" in err, err
    # a value the optimizer rejects with a ValueError: one line naming the section, not a traceback
    err = rejected(capsys, "ok", "--set", "optimizer.kwargs.betas=[2,0.9]")
    assert err.startswith("error: optimizer:") and "Invalid beta parameter" in err, err
    # the same through the real run: refused before anything is written
    assert main(["train", "--exp", "cw", "--fold", "0"]) == 2
    assert "loss.class_weights" in capsys.readouterr().err
    assert not (folded / "runs").exists()


def test_a_model_that_cannot_be_built_on_meta_is_built_on_the_cpu(folded, capsys, monkeypatch):
    """Some encoders call .item() in __init__ (timm's drop-path rates); the check then builds them for
    real, with random init, and still passes or fails on the configuration alone."""
    import competition.models as models
    real = models.build_model

    def item_in_init(cfg, *a, **k):
        torch.linspace(0, 0.1, 3)[1].item()  # raises on the meta device
        return real(cfg, *a, **k)
    monkeypatch.setattr(models, "build_model", item_in_init)
    write_exp(folded, "ok")
    assert check("ok") == 0
    capsys.readouterr()
    assert "model.kwargs" in rejected(capsys, "ok", "--set", "model.kwargs.nonsense=1")
