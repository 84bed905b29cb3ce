"""Plug-in architectures (``model.arch: package.module:factory`` or an entry point): a tiny net written
into the project folder -- outside the package -- is checked, trained, predicted, submitted and bundled
through the CLI; its deep-supervision outputs (the dict form) reach the loss; every way of naming it
wrongly is one ConfigError naming the key."""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from competition.cli import main
from competition.config import ConfigError, ModelConfig, dump_yaml
from competition.models import PluginModel, build_model, plugin

TINY_NET = '''
"""A tiny U-Net-like net: the kind of module a user writes beside configs/ and names in model.arch."""
import torch
import torch.nn.functional as F
from torch import nn


def block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Tiny(nn.Module):
    def __init__(self, in_channels, classes, width, aux):
        super().__init__()
        w = width
        self.e1, self.e2, self.e3 = block(in_channels, w), block(w, 2 * w, 2), block(2 * w, 4 * w, 2)
        self.d2, self.d1 = block(6 * w, 2 * w), block(3 * w, w)
        self.head = nn.Conv2d(w, classes, 1)
        self.aux = nn.ModuleList([nn.Conv2d(2 * w, classes, 1), nn.Conv2d(4 * w, classes, 1)]) if aux else None

    def forward(self, x):
        x1 = self.e1(x)
        x2 = self.e2(x1)
        x3 = self.e3(x2)
        d2 = self.d2(torch.cat([F.interpolate(x3, size=x2.shape[-2:]), x2], 1))
        d1 = self.d1(torch.cat([F.interpolate(d2, size=x1.shape[-2:]), x1], 1))
        out = self.head(d1)
        if self.aux is None:
            return out
        return {"out": out, "aux": [self.aux[0](d2), self.aux[1](x3)]}  # strides 2 and 4, finest first


def build(in_channels, classes, width=8):
    return Tiny(in_channels, classes, width, aux=False)


def build_ds(in_channels, classes, width=8):
    return Tiny(in_channels, classes, width, aux=True)


def not_a_model(in_channels, classes):
    return 42
'''

EXP = {"competition": "tiny-hands", "model": {"arch": "mynets.tiny:build", "kwargs": {"width": 16}},
       "optimizer": {"name": "adamw", "lr": 0.003}, "scheduler": {"name": "cosine", "warmup_epochs": 0},
       "data": {"input_size": 64, "batch_size": 2, "workers": 0},
       "train": {"epochs": 8, "progress": False, "seed": 0}, "tracking": {"wandb": False}}

pytestmark = pytest.mark.usefixtures("one_thread")


def forget_mynets() -> None:
    for name in [n for n in sys.modules if n == "mynets" or n.startswith("mynets.")]:
        del sys.modules[name]


@pytest.fixture
def nets(tiny_project):
    """The tiny project, with the package ``mynets/`` in its folder (not installed, not on sys.path)."""
    (tiny_project / "mynets").mkdir()
    (tiny_project / "mynets/__init__.py").write_text("")
    (tiny_project / "mynets/tiny.py").write_text(TINY_NET)
    (tiny_project / "mynets/broken.py").write_text("import a_dependency_nobody_installed_xyz\n")
    forget_mynets()
    importlib.invalidate_caches()
    yield tiny_project
    forget_mynets()


def write_exp(root: Path, name: str, **model) -> None:
    data = {**EXP, "model": {**EXP["model"], **model}}
    (root / "configs/experiments" / f"{name}.yaml").write_text(yaml.safe_dump(data))


def test_a_plugin_trains_predicts_submits_and_bundles_through_the_cli(nets, tmp_path_factory, capsys):
    root = nets
    write_exp(root, "plug")
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    assert main(["train", "--exp", "plug", "--fold", "0", "--check"]) == 0
    assert main(["train", "--exp", "plug", "--fold", "all"]) == 0
    hist = pd.read_csv(root / "runs/plug/fold0/history.csv")
    assert len(hist) == 8 and hist["val_dice"].max() > hist["val_dice"].iloc[0] + 0.05, hist["val_dice"].tolist()
    best = torch.load(root / "runs/plug/fold0/best.pt", weights_only=True)
    assert best["config"]["experiment"]["model"]["arch"] == "mynets.tiny:build"
    assert any(k.startswith("net.e1.") for k in best["model"])  # the factory's module, inside the wrapper

    # predict rebuilds every fold's model from its checkpoint's config (importing the plug-in again)
    capsys.readouterr()
    assert main(["predict", "--exp", "plug", "--no-progress", "--force"]) == 0
    sub = next((root / "submissions").glob("*-plug.csv"))
    df = pd.read_csv(sub, keep_default_na=False)
    assert len(df) == 4 * 12  # 4 test images x 12 classes
    capsys.readouterr()
    assert main(["score", "--comp", "tiny-hands", str(sub)]) == 0  # valid, and scored against the truth
    scored = re.search(r"mean Dice (\d\.\d{4}) over 48 image x class pairs", capsys.readouterr().out)
    assert scored and float(scored.group(1)) > 0, scored

    # The bundle carries the plug-in's package and runs it in a folder that has no project and no mynets/
    from competition.predict.run import experiment_recipe
    recipe, _ = experiment_recipe("plug")
    dump_yaml(recipe, root / "ensembles/plug.yaml")
    bundle = tmp_path_factory.mktemp("out") / "bundle"
    assert main(["bundle", "plug", "--out", str(bundle), "--no-estimate"]) == 0
    assert "plugins/ (mynets)" in capsys.readouterr().out
    assert (bundle / "plugins/mynets/tiny.py").read_text() == TINY_NET
    assert not list((bundle / "plugins").rglob("__pycache__"))
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(bundle / "run.py"), "--data-root", str(root / "data/tiny-hands"),
                        "--out", "submission.csv", "--no-progress", "--force"], cwd=elsewhere, capture_output=True,
                       text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (elsewhere / "submission.csv").read_bytes() == sub.read_bytes()


def test_deep_supervision_dict_outputs_reach_the_loss(nets, capsys):
    write_exp(nets, "plugds", arch="mynets.tiny:build_ds", deep_supervision=True)
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    assert main(["train", "--exp", "plugds", "--fold", "0", "--check"]) == 0
    capsys.readouterr()
    assert main(["train", "--exp", "plugds", "--fold", "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "output: 3 deep-supervision outputs, finest first: 2x12x64x64, 2x12x32x32, 2x12x16x16" in out, out
    assert "model: mynets.tiny:build_ds, output_scale 1, deep supervision" in out  # no encoder: none shown
    assert "model plan: plug-in mynets.tiny:build_ds (mynets.tiny.Tiny)" in out
    # The same factory without deep supervision trains its final output only; a factory that returns one
    # tensor cannot do deep supervision: --check says so, naming the key.
    model = build_model(ModelConfig(arch="mynets.tiny:build_ds"), 3, 1).train()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3, 32, 32)
    write_exp(nets, "single", deep_supervision=True)
    assert main(["train", "--exp", "single", "--fold", "0", "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.deep_supervision is true, but mynets.tiny:build returned a " \
                                           "single output in training mode" in err, err


def test_dict_outputs_become_a_list_in_training_and_the_final_logits_in_eval(nets):
    model = build_model(ModelConfig(arch="mynets.tiny:build_ds", deep_supervision=True, kwargs={"width": 4}), 3, 2)
    assert isinstance(model, PluginModel)
    x = torch.randn(2, 2, 32, 32)
    outs = model.train()(x)
    assert isinstance(outs, list) and [o.shape for o in outs] == [(2, 3, 32, 32), (2, 3, 16, 16), (2, 3, 8, 8)]
    model.eval()
    with torch.no_grad():
        final = model(x)
    assert isinstance(final, torch.Tensor) and final.shape == (2, 3, 32, 32)
    assert torch.equal(final, model.net(x)["out"])
    # output_scale wraps a plug-in like any architecture
    hi = build_model(ModelConfig(arch="mynets.tiny:build", output_scale=2), 3, 1).eval()
    assert hi(torch.randn(1, 1, 32, 32)).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("cfg, match", [
    (dict(arch="nosuch.module:build"),
     r"model.arch 'nosuch.module:build': no module named 'nosuch.module', neither importable .* nor under the "
     r"project folder"),
    (dict(arch="mynets.tiny:biuld"), r"mynets.tiny has no attribute 'biuld'; close: \['build'"),
    (dict(arch="mynets.tiny:"), r"an import path is package.module:factory"),
    (dict(arch="mynets.broken:build"),
     r"importing mynets.broken failed: No module named 'a_dependency_nobody_installed_xyz'"),
    (dict(arch="mynets.tiny:build", kwargs={"widht": 8}),
     r"model.kwargs for mynets.tiny:build: got an unexpected keyword argument 'widht'; the factory takes "
     r"\(in_channels, classes, width=8\)"),
    (dict(arch="mynets.tiny:build", kwargs={"classes": 3}), r"model.kwargs may not set \['classes'\]"),
    (dict(arch="mynets.tiny:not_a_model"), r"the factory returned a int; expected a torch.nn.Module"),
    (dict(arch="mynets.tiny:build", encoder="resnet34"), r"model.encoder does not apply to mynets.tiny:build"),
    (dict(arch="mynets.tiny:build", encoder_weights="imagenet"), r"model.encoder_weights does not apply"),
    (dict(arch="mynets.tiny:build", encoder_depth=4), r"model.encoder_depth does not apply"),
    (dict(arch="mynets.tiny:build", decoder_channels=[8]), r"model.decoder_channels does not apply"),
    (dict(arch="nonet"), r"model.arch: unknown architecture 'nonet'; valid: .*Unet.*unet3plus.*; or a plug-in "
                         r"as package.module:factory"),
])
def test_naming_a_plugin_wrongly_is_one_config_error(nets, cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_model(ModelConfig(**cfg), 3, 1)


def test_the_project_folder_is_searched_only_when_the_module_is_not_importable(nets, tmp_path, monkeypatch):
    # importable otherwise (here: an earlier sys.path entry): that module wins, the project's is not used
    other = tmp_path / "elsewhere"
    (other / "mynets").mkdir(parents=True)
    (other / "mynets/__init__.py").write_text("")
    (other / "mynets/tiny.py").write_text(TINY_NET.replace("def build(in_channels, classes, width=8)",
                                                           "def build(in_channels, classes, width=3)"))
    monkeypatch.syspath_prepend(str(other))
    model = build_model(ModelConfig(arch="mynets.tiny:build"), 2, 1)
    assert model.net.head.in_channels == 3
    assert str(nets) not in sys.path  # the project folder was not left on sys.path


def test_an_entry_point_names_a_plugin(nets, monkeypatch):
    monkeypatch.syspath_prepend(str(nets))  # where an installed distribution's module would be
    ep = md.EntryPoint(name="tinynet", value="mynets.tiny:build", group=plugin.GROUP)
    monkeypatch.setattr(plugin, "entry_points", lambda: {"tinynet": ep})
    model = build_model(ModelConfig(arch="TinyNet", kwargs={"width": 4}), 2, 1)
    assert isinstance(model, PluginModel) and model.net.head.in_channels == 4
    with pytest.raises(ConfigError, match=r"valid: .*tinynet.*Unet"):
        build_model(ModelConfig(arch="tinynt"), 2, 1)


def test_bundle_source_of_each_kind_of_plugin(nets, tmp_path_factory, monkeypatch):
    assert plugin.source_files("Unet") is None and plugin.source_files("competition.models.hrnet:HRNetV2") is None
    assert plugin.source_files("mynets.tiny:build") == ("mynets", (nets / "mynets").resolve())
    (nets / "solo.py").write_text(textwrap.dedent("""
        from mynets.tiny import build
    """))
    assert plugin.source_files("solo:build") == ("solo.py", (nets / "solo.py").resolve())
    outside = tmp_path_factory.mktemp("site")  # not under the project folder (tmp_path is the project)
    (outside / "pkgx").mkdir(parents=True)
    (outside / "pkgx/__init__.py").write_text("")
    (outside / "pkgx/nets.py").write_text("from mynets.tiny import build\n")
    monkeypatch.syspath_prepend(str(outside))
    with pytest.raises(ConfigError, match=r"pkgx.nets is imported from .*outside the project folder"):
        plugin.source_files("pkgx.nets:build")
    for name in ("solo", "pkgx", "pkgx.nets"):
        sys.modules.pop(name, None)
