"""Model building: every architecture honours the forward contract, UNet 3+ deep supervision, the
high-resolution head, encoder-weight handling (offline failure, local files) and config errors; the
nnU-Net 2D U-Net (its plan from the input size) and the HRNetV2 head. Plug-ins: test_plugin_arch.py."""
import time
import warnings

import pytest
import torch

from competition.config import ConfigError, LossConfig, ModelConfig
from competition.losses import build_loss
from competition.models import ARCHITECTURES, HighResHead, build_model


def out_of(model, x, train=False):
    model.train(train)
    with torch.set_grad_enabled(train):
        return model(x)


def encoder_for(arch: str) -> str:
    return "tu-test_vit" if arch.lower() == "dpt" else "tu-test_resnet"  # DPT takes ViT encoders only


# Tested below with the encoders and options they take (nnunet: none; hrnetv2: a timm HRNet).
OWN_ENCODER = {"nnunet": ModelConfig(arch="nnunet", kwargs={"base_features": 4, "max_features": 16}),
               "hrnetv2": ModelConfig(arch="hrnetv2", encoder="tu-hrnet_w18_small")}


@pytest.mark.parametrize("arch", ARCHITECTURES.names())
def test_every_architecture_returns_logits_at_input_size(arch):
    size = 128 if arch == "PAN" else 64  # PAN's pyramid pooling needs >= 4 px at stride 32
    if arch == "nnunet":
        pytest.importorskip("dynamic_network_architectures")
    cfg = OWN_ENCODER.get(arch) or ModelConfig(arch=arch, encoder=encoder_for(arch))
    model = build_model(cfg, num_classes=3, in_channels=1, input_size=(size, size))
    y = out_of(model, torch.randn(2, 1, size, size))
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, size, size)


@pytest.mark.parametrize("arch", ["Unet", "FPN", "UnetPlusPlus", "DeepLabV3Plus", "Segformer", "unet3plus"])
def test_smp_encoder_rgb(arch):
    model = build_model(ModelConfig(arch=arch, encoder="resnet18"), num_classes=4, in_channels=3)
    assert out_of(model, torch.randn(1, 3, 64, 64)).shape == (1, 4, 64, 64)


def test_arch_names_case_insensitive_and_shallower_encoder():
    model = build_model(ModelConfig(arch="unetplusplus", encoder="tu-test_convnext", encoder_depth=4), 2, 1)
    assert out_of(model, torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)
    model = build_model(ModelConfig(arch="pspnet", encoder="resnet18", encoder_depth=4), 2, 1)
    assert out_of(model, torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)


@pytest.mark.parametrize("encoder", ["tu-test_resnet", "tu-test_convnext"])
def test_unet3plus_deep_supervision_train_list_eval_tensor(encoder):
    model = build_model(ModelConfig(arch="unet3plus", encoder=encoder, deep_supervision=True,
                                    kwargs={"cat_channels": 8}), 3, 1)
    x = torch.randn(2, 1, 64, 64)
    outs = out_of(model, x, train=True)
    # The final output at the input size, then one per coarser stage at its own stride (convnext has
    # no stride-2 stage; its finest decoder stage is at stride 4 and still ends at the input size).
    strides = [1, 4, 8, 16, 32] if encoder == "tu-test_resnet" else [1, 8, 16, 32]
    assert isinstance(outs, list) and [o.shape for o in outs] == [(2, 3, 64 // s, 64 // s) for s in strides]
    assert out_of(model, x).shape == (2, 3, 64, 64)
    # The loss takes the list and trains every head.
    y = (torch.rand(2, 3, 64, 64) > 0.5).float()
    build_loss(LossConfig(), "multilabel", 3)(out_of(model, x, train=True), y).backward()
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in model.heads)


def test_unet3plus_upsample_last_same_parameters_coarse_branches_at_their_own_size():
    def build(upsample_last):
        torch.manual_seed(0)
        return build_model(ModelConfig(arch="unet3plus", encoder="tu-test_resnet", deep_supervision=True,
                                       kwargs={"cat_channels": 8, "upsample_last": upsample_last}), 3, 1)
    paper, fast = build(False), build(True)
    assert [(k, v.shape) for k, v in paper.state_dict().items()] == \
        [(k, v.shape) for k, v in fast.state_dict().items()]
    fast.load_state_dict(paper.state_dict())  # checkpoints move between the two orders
    seen = {}
    finest = fast.stages[-1]  # the stride-2 stage: every input but the first is coarser
    for i, branch in enumerate(finest.branches):
        branch.register_forward_pre_hook(lambda m, inp, i=i: seen.update({i: tuple(inp[0].shape[-2:])}))
    x = torch.randn(2, 1, 64, 64)
    outs = out_of(fast, x, train=True)
    assert [o.shape[-1] for o in outs] == [64, 16, 8, 4, 2]
    assert seen[0] == (32, 32) and seen[1] == (16, 16) and seen[len(seen) - 1] == (2, 2)
    # The same weights compute a different (not merely re-ordered) function.
    assert not torch.allclose(out_of(paper, x), out_of(fast, x))


def test_unet3plus_without_deep_supervision_returns_tensor_in_training():
    model = build_model(ModelConfig(arch="unet3plus", encoder="tu-test_resnet", kwargs={"cat_channels": 8}), 2, 1)
    assert out_of(model, torch.randn(1, 1, 64, 64), train=True).shape == (1, 2, 64, 64)
    # Every parameter gets a gradient (DDP refuses unused parameters).
    out_of(model, torch.randn(2, 1, 64, 64), train=True).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_high_res_head_doubles_size_and_starts_as_bilinear():
    model = build_model(ModelConfig(arch="Unet", encoder="tu-test_resnet", output_scale=2), 3, 1)
    assert isinstance(model, HighResHead)
    x = torch.randn(2, 1, 64, 64)
    y = out_of(model, x)
    assert y.shape == (2, 3, 128, 128)
    bilinear = torch.nn.functional.interpolate(out_of(model.model, x), scale_factor=2, mode="bilinear")
    assert torch.allclose(y, bilinear, atol=1e-6)


def test_high_res_head_passes_deep_supervision_lists():
    model = build_model(ModelConfig(arch="unet3plus", encoder="tu-test_resnet", deep_supervision=True,
                                    output_scale=2, kwargs={"cat_channels": 8}), 3, 1)
    outs = out_of(model, torch.randn(1, 1, 64, 64), train=True)
    # The final output through the head; the auxiliary ones as the network gave them (the loss brings
    # the target down to them).
    assert [o.shape for o in outs] == [(1, 3, 128, 128)] + [(1, 3, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    assert out_of(model, torch.randn(1, 1, 64, 64)).shape == (1, 3, 128, 128)


@pytest.mark.parametrize("cfg, match", [
    (ModelConfig(arch="Unett"), r"model.arch: unknown architecture 'Unett'; valid: .*DeepLabV3Plus.*Unet.*unet3plus"),
    (ModelConfig(encoder="resnet19"), r"unknown encoder 'resnet19'.*get_encoder_names.*tu-<name>"),
    (ModelConfig(encoder="tu-not_a_model"), r"unknown timm model 'not_a_model'.*timm.list_models"),
    (ModelConfig(arch="Unet", deep_supervision=True),
     r"deep_supervision is supported by nnunet, unet3plus and plug-ins only, not Unet"),
    (ModelConfig(kwargs={"decoder_chanels": [8]}), r"Unet does not take \['decoder_chanels'\].*decoder_channels"),
    (ModelConfig(kwargs={"in_channels": 3}), r"may not set \['in_channels'\]"),
    (ModelConfig(arch="FPN", decoder_channels=[8, 8]), r"does not apply to FPN.*decoder_pyramid_channels"),
    (ModelConfig(arch="unet3plus", kwargs={"cat_chanels": 8}), r"unknown \['cat_chanels'\]; valid: cat_channels"),
    (ModelConfig(encoder_weights="instagram"), r"no weights 'instagram'; valid: \['imagenet'"),
    (ModelConfig(arch="hrnetv2", encoder="tu-resnet18"), r"model.encoder: hrnetv2 takes a timm HRNet encoder "
                                                         r"\(.*tu-hrnet_w48.*\), got 'tu-resnet18'"),
    (ModelConfig(arch="hrnetv2", encoder="tu-hrnet_w18_small", encoder_depth=4),
     r"model.encoder_depth does not apply to hrnetv2"),
    (ModelConfig(arch="hrnetv2", encoder="tu-hrnet_w18_small", deep_supervision=True),
     r"deep_supervision is supported by .* only, not hrnetv2"),
    (ModelConfig(arch="hrnetv2", encoder="tu-hrnet_w18_small", kwargs={"head_chanels": 8}),
     r"model.kwargs for hrnetv2: unknown \['head_chanels'\]; valid: head_channels \(default None\)"),
])
def test_config_errors_name_the_key_and_valid_values(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_model(cfg, 3, 1)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, so a warm cache on this machine cannot make the download succeed."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("encoder", ["resnet18", "tu-resnet18"])
def test_imagenet_offline_fails_fast_with_the_remedy(encoder, monkeypatch, empty_hub_cache):
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as the hub reads HF_HUB_OFFLINE=1 at import
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=r"encoder_weights 'imagenet' could not be downloaded \(offline\?\)\. "
                                          r"Put a local weights file on disk and set model.encoder_weights: "
                                          r"path/to/weights.pth \(a state_dict of the encoder"):
        build_model(ModelConfig(encoder=encoder, encoder_weights="imagenet"), 3, 1)
    assert time.perf_counter() - t < 10


def test_unreachable_hub_fails_fast_without_hf_hub_offline(monkeypatch, empty_hub_cache):
    """No HF_HUB_OFFLINE and no network: the hub alone would retry for ~25 s; the probe stops that."""
    from huggingface_hub import constants

    from competition.models import hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=1.0: False)
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=r"could not be downloaded \(offline\?\).*could not be reached"):
        build_model(ModelConfig(arch="unet3plus", encoder="resnet18", encoder_weights="imagenet"), 3, 1)
    assert time.perf_counter() - t < 10


@pytest.mark.parametrize("encoder", ["resnet18", "tu-resnet18"])
def test_a_reachable_hub_downloads_imagenet_weights_out_of_the_box(encoder, monkeypatch, empty_hub_cache):
    """No HF_HUB_OFFLINE default: where the hub answers, `encoder_weights: imagenet` goes to the hub
    (the download itself is mocked: this machine has no network)."""
    import huggingface_hub
    from huggingface_hub import constants

    from competition.models import hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not huggingface_hub.is_offline_mode()
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=1.0: True)
    asked = []

    def fake_download(repo_id, filename, *args, **kwargs):
        asked.append((repo_id, filename))
        raise OSError("mocked network: the test only checks that the download is attempted")

    import segmentation_models_pytorch.encoders as smp_encoders
    import timm.models._hub as timm_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    for mod in (smp_encoders, timm_hub):
        if hasattr(mod, "hf_hub_download"):
            monkeypatch.setattr(mod, "hf_hub_download", fake_download)
    with pytest.raises(ConfigError, match=r"could not be downloaded.*mocked network"):
        build_model(ModelConfig(encoder=encoder, encoder_weights="imagenet"), 3, 1)
    assert asked, "the hub was never asked for the weights"


# timm's repos are fetched at "main", which an unreachable hub would look up: only HF_HUB_OFFLINE for them.
@pytest.mark.parametrize("encoder, offline", [("resnet18", True), ("resnet18", False), ("tu-test_resnet", True)])
def test_weights_in_the_local_hub_cache_load_without_the_hub(encoder, offline, monkeypatch, tmp_path):
    """Offline (HF_HUB_OFFLINE, or the hub unreachable), named weights already in the cache still load."""
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    from competition.models import hub
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout=1.0: False)
    torch.manual_seed(3)
    saved = (timm.create_model(encoder[3:]) if encoder.startswith("tu-")
             else build_model(ModelConfig(encoder=encoder), 3, 3).encoder).state_dict()
    for repo, rev, names in hub._hub_files(encoder, "imagenet"):  # what smp / timm will ask the hub for
        repo_dir = tmp_path / f"models--{repo.replace('/', '--')}"
        if rev is None:  # a branch: the cache maps it to a commit
            rev = "0" * 40
            (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
            (repo_dir / "refs/main").write_text(rev)
        (repo_dir / "snapshots" / rev).mkdir(parents=True, exist_ok=True)
        if names[0].endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in saved.items()}, str(repo_dir / "snapshots" / rev / names[0]))
        else:
            (repo_dir / "snapshots" / rev / names[0]).write_text("{}")
    model = build_model(ModelConfig(encoder=encoder, encoder_weights="imagenet"), 3, 3)
    convs = {round(v.sum().item(), 3) for v in saved.values() if v.ndim == 4}
    assert {round(v.sum().item(), 3) for v in model.encoder.state_dict().values() if v.ndim == 4} <= convs


def _encoder_state(seed: int, encoder="resnet18", in_channels=1):
    torch.manual_seed(seed)
    return build_model(ModelConfig(encoder=encoder), 3, in_channels).encoder.state_dict()


@pytest.mark.parametrize("wrap", ["plain", "prefixed", "checkpoint", "safetensors"])
def test_local_weights_file_loads_into_the_encoder(tmp_path, wrap):
    saved = _encoder_state(seed=1)
    path = tmp_path / ("enc.safetensors" if wrap == "safetensors" else "enc.pth")
    if wrap == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in saved.items()}, str(path))
    else:
        obj = {"plain": saved, "prefixed": {f"encoder.{k}": v for k, v in saved.items()},
               "checkpoint": {"state_dict": {f"module.encoder.{k}": v for k, v in saved.items()}, "epoch": 3}}[wrap]
        torch.save(obj, path)
    torch.manual_seed(2)
    model = build_model(ModelConfig(arch="FPN", encoder="resnet18", encoder_weights=str(path)), 3, 1)
    loaded = model.encoder.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_rgb_weights_adapt_to_grayscale_and_extra_keys_warn(tmp_path):
    import timm
    torch.manual_seed(0)
    timm_model = timm.create_model("test_resnet")  # a plain timm state_dict: no "model." prefix, has a head
    torch.save(timm_model.state_dict(), tmp_path / "timm.pt")
    with pytest.warns(UserWarning, match=r"unexpected 2 \['model.fc.bias', 'model.fc.weight'\]"):
        model = build_model(ModelConfig(encoder="tu-test_resnet", encoder_weights=str(tmp_path / "timm.pt")), 3, 1)
    first = model.encoder.model.conv1[0].weight
    assert first.shape[1] == 1 and torch.allclose(first, timm_model.conv1[0].weight.sum(1, keepdim=True))


def test_local_weights_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"model.encoder_weights: file not found: 'weights/enc.pth'"):
        build_model(ModelConfig(encoder_weights="weights/enc.pth"), 3, 1)
    torch.save({"something": torch.zeros(2)}, tmp_path / "junk.pth")
    with pytest.raises(ConfigError, match=r"nothing in .*junk.pth matches the encoder"):
        build_model(ModelConfig(encoder_weights="junk.pth"), 3, 1)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"bad.pth cannot be read as weights"):
        build_model(ModelConfig(encoder_weights="bad.pth"), 3, 1)


def test_random_init_emits_no_download_and_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        build_model(ModelConfig(encoder="tu-test_resnet", encoder_weights=None), 3, 1)


# -- nnU-Net ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, stages, bottleneck", [((64, 64), 5, 4), ((512, 512), 8, 4), ((1024, 1024), 9, 4),
                                                      ((100, 120), 5, 6), ((8, 8), 2, 4), ((2048, 1024), 9, 4)])
def test_nnunet_plans_as_nnunet_plans_2d(size, stages, bottleneck):
    from competition.models.nnunet import Options, plan
    p = plan(size)
    # n_stages = 1 + floor(log2(min edge / 4)); 32 * 2**i features capped at 512; the first stage at stride 1
    assert p.n_stages == stages and p.strides == (1,) + (2,) * (stages - 1)
    assert p.features == tuple(min(32 * 2 ** i, 512) for i in range(stages))
    assert min(size) // p.total_stride == bottleneck
    assert p.encoder_blocks == (2,) * stages and p.decoder_convs == (2,) * (stages - 1)
    r = plan(size, Options(variant="resenc"))
    assert r.features == p.features and r.encoder_blocks[:4] == (1, 3, 4, 6)[:stages]
    assert set(r.encoder_blocks[4:]) <= {6} and r.decoder_convs == (1,) * (stages - 1)
    assert f"{stages} stages" in p.describe() and "features 32-64" in p.describe()


def test_nnunet_plan_refuses_an_input_too_small():
    from competition.models.nnunet import plan
    with pytest.raises(ConfigError, match=r"data.input_size 7x64: nnunet .* needs an input of at least 8 px"):
        plan((7, 64))


@pytest.fixture
def dna():
    return pytest.importorskip("dynamic_network_architectures")


@pytest.mark.parametrize("variant", ["plain", "resenc"])
def test_nnunet_deep_supervision_every_decoder_stage_finest_first(dna, variant):
    cfg = ModelConfig(arch="nnunet", deep_supervision=True,
                      kwargs={"variant": variant, "base_features": 4, "max_features": 16})
    model = build_model(cfg, 3, 1, input_size=(64, 64))
    net = model.net
    assert type(net).__name__ == ("PlainConvUNet" if variant == "plain" else "ResidualEncoderUNet")
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert norms and all(m.eps == 1e-5 and m.affine for m in norms)
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in net.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {m.kernel_size for m in convs} <= {(3, 3), (1, 1)}
    # conv bias everywhere but the package's 1x1 residual projections (ResEnc's skips: bias-free by design)
    assert all(m.bias is not None for n, m in net.named_modules()
               if isinstance(m, torch.nn.Conv2d) and ".skip." not in n)
    x = torch.randn(2, 1, 64, 64)
    outs = out_of(model, x, train=True)
    assert [o.shape for o in outs] == [(2, 3, 64 // s, 64 // s) for s in (1, 2, 4, 8)]  # 5 stages: 4 decoder
    y = (torch.rand(2, 3, 64, 64) > 0.5).float()
    build_loss(LossConfig(), "multilabel", 3)(outs, y).backward()
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in net.decoder.seg_layers)
    assert out_of(model, x).shape == (2, 3, 64, 64)
    # an edge that is not a multiple of the total stride (16): padded, and cropped back
    assert out_of(model, torch.randn(1, 1, 72, 56)).shape == (1, 3, 72, 56)
    assert [o.shape[-2:] for o in out_of(model, torch.randn(1, 1, 72, 56), train=True)] == [
        (72, 56), (36, 28), (18, 14), (9, 7)]


def test_nnunet_without_deep_supervision_trains_every_parameter(dna):
    """No auxiliary head is left without a gradient (DDP refuses parameters no loss reaches)."""
    model = build_model(ModelConfig(arch="nnunet", kwargs={"base_features": 4, "max_features": 8}), 2, 1,
                        input_size=(32, 32))
    out = out_of(model, torch.randn(2, 1, 32, 32), train=True)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 32, 32)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert len(model.net.decoder.seg_layers) == 1


def test_nnunet_checkpoint_round_trip_on_meta(dna):
    """predict rebuilds a model on the meta device and assigns the checkpoint's weights to it."""
    cfg = ModelConfig(arch="nnunet", deep_supervision=True, kwargs={"base_features": 4, "max_features": 8})
    torch.manual_seed(0)
    model = build_model(cfg, 2, 1, input_size=(32, 32)).eval()
    with torch.device("meta"):
        again = build_model(cfg, 2, 1, input_size=(32, 32))
    again.load_state_dict(model.state_dict(), assign=True)
    x = torch.randn(1, 1, 32, 32)
    assert torch.equal(out_of(model, x), out_of(again.eval(), x))


@pytest.mark.parametrize("cfg, size, match", [
    (ModelConfig(arch="nnunet", encoder="resnet34"), (64, 64), r"model.encoder does not apply to nnunet"),
    (ModelConfig(arch="nnunet", encoder_weights="imagenet"), (64, 64), r"model.encoder_weights does not apply"),
    (ModelConfig(arch="nnunet", decoder_channels=[8]), (64, 64), r"model.decoder_channels does not apply"),
    (ModelConfig(arch="nnunet", kwargs={"variant": "resnet"}), (64, 64), r"variant for nnunet: 'plain' or 'resenc'"),
    (ModelConfig(arch="nnunet", kwargs={"features": 8}), (64, 64),
     r"model.kwargs for nnunet: unknown \['features'\]; valid: variant .*base_features"),
    (ModelConfig(arch="nnunet"), None, r"nnunet plans its network from data.input_size"),
])
def test_nnunet_config_errors(dna, cfg, size, match):
    with pytest.raises(ConfigError, match=match):
        build_model(cfg, 3, 1, input_size=size)


def test_nnunet_without_its_package_names_it(monkeypatch):
    import sys
    for name in ("dynamic_network_architectures", "dynamic_network_architectures.architectures.unet"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it fails
    with pytest.raises(ConfigError, match=r"nnunet needs the package dynamic-network-architectures .* pip install "
                                          r"--no-deps 'dynamic-network-architectures>=0.4,<0.5'"):
        build_model(ModelConfig(arch="nnunet"), 3, 1, input_size=(64, 64))


# -- HRNetV2 ----------------------------------------------------------------------------------------

def test_hrnetv2_concatenates_all_four_branches_at_stride_4():
    from competition.models import HRNetV2, model_summary
    model = build_model(ModelConfig(arch="hrnetv2", encoder="tu-hrnet_w18_small"), 3, 1)
    assert isinstance(model, HRNetV2) and model.strides == [4, 8, 16, 32]
    width = sum(model.branch_channels)  # 16 + 32 + 64 + 128 for hrnet_w18_small
    assert width == 240 and model.head[0].in_channels == width and model.head[-1].out_channels == 3
    assert "branches 16+32+64+128 at strides 4-8-16-32" in model_summary(model)
    seen = []
    model.head.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape))
    assert out_of(model, torch.randn(2, 1, 64, 64)).shape == (2, 3, 64, 64)
    assert seen == [(2, 240, 16, 16)]
    assert out_of(model, torch.randn(1, 1, 96, 64), train=True).shape == (1, 3, 96, 64)
    assert out_of(model, torch.randn(1, 1, 80, 72)).shape == (1, 3, 80, 72)  # padded to 96 x 96, cropped back
    small = build_model(ModelConfig(arch="hrnetv2", encoder="tu-hrnet_w18_small", kwargs={"head_channels": 8}), 2, 3)
    assert small.head[0].out_channels == 8 and small.encoder.conv1.in_channels == 3


def test_hrnetv2_loads_a_local_encoder_weights_file(tmp_path):
    import timm
    torch.manual_seed(1)
    source = timm.create_model("hrnet_w18_small")  # a plain timm checkpoint: classifier and all
    torch.save(source.state_dict(), tmp_path / "hrnet.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the classification head's keys are unexpected
        model = build_model(ModelConfig(arch="hrnetv2", encoder="tu-hrnet_w18_small",
                                        encoder_weights=str(tmp_path / "hrnet.pth")), 3, 3)
    assert torch.equal(model.encoder.conv1.weight, source.conv1.weight)
    assert torch.equal(model.encoder.stage4[0].branches[3][0].conv1.weight,
                       source.stage4[0].branches[3][0].conv1.weight)
