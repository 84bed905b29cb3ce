"""``model.init_from`` on the tiny synthetic competition: the leak rule (a CV fold starts only from its
own fold's model), fold k's weights in the model before the optimizer is built, mismatches listed,
``init_skip_head`` for a changed class count, and a resumed run that never reads its parent again.
Parents are built here (a model of the parent experiment, saved as training saves best.pt), so only
the child runs train: one epoch at 32 px."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from competition import paths
from competition.config import ConfigError, load_experiment, to_plain
from competition.io import file_hash

MODEL = {"arch": "Unet", "encoder": "tu-test_resnet", "decoder_channels": [8, 8, 8, 8, 8]}
TINY = {"competition": "tiny-hands", "model": MODEL,
        "optimizer": {"name": "adamw", "lr": 0.003}, "scheduler": {"name": "cosine", "warmup_epochs": 0},
        "data": {"input_size": 32, "batch_size": 4, "workers": 0},
        "train": {"epochs": 1, "progress": False, "seed": 0}, "oof": {"tta": []}, "tracking": {"wandb": False}}

pytestmark = pytest.mark.usefixtures("one_thread")


def write_exp(project, name: str, base: dict = TINY, **sections) -> None:
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v}
    (project / "configs/experiments" / f"{name}.yaml").write_text(yaml.safe_dump(data))


def save_parent(name: str, fold, seed: int, out_ch: int = 12, edit=None) -> dict:
    """A best.pt of experiment ``name``'s model for ``fold`` (as training writes it); -> its state dict.
    ``edit(state)`` may change the state dict before it is saved."""
    from competition.models import build_model
    exp = load_experiment(name)
    torch.manual_seed(seed)
    state = build_model(exp.model, out_ch, 1).state_dict()  # tiny-hands is grayscale
    if edit is not None:
        edit(state)
    rp = paths.run(name, fold)
    rp.root.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "epoch": 1, "score": 0.5,
                "config": {"experiment": to_plain(exp), "competition": {"name": "tiny-hands"}, "fold": fold}}, rp.best)
    return state


@pytest.fixture
def folded(tiny_project):
    from competition.cli import main
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    write_exp(tiny_project, "parent")
    return tiny_project


def test_a_cv_fold_without_fold_in_the_path_is_refused_with_the_leak_explained(folded, capsys):
    from competition.cli import main
    from competition.train.check import check_run
    save_parent("parent", 0, seed=0)
    write_exp(folded, "child", model={"init_from": "runs/parent/fold0/best.pt"})
    with pytest.raises(ConfigError) as e:
        check_run(load_experiment("child"), 1)
    msg = str(e.value)
    assert "model.init_from 'runs/parent/fold0/best.pt' does not contain {fold}" in msg
    assert "fold k may only start from fold k's own model" in msg
    assert "was trained on fold 1's validation images" in msg and "inflates its OOF score" in msg
    # The CLI says it in one line, before anything is built or trained.
    assert main(["train", "--exp", "child", "--fold", "1"]) == 2
    err = capsys.readouterr().err
    assert "does not contain {fold}" in err and "Traceback" not in err
    assert not (folded / "runs/child").exists()
    # The all-data run has no OOF to leak into: the same path is fine there (fold{fold} -> all-data too).
    from competition.train import initfrom
    assert initfrom.resolve(load_experiment("child"), paths.ALL_DATA) == folded / "runs/parent/fold0/best.pt"
    write_exp(folded, "child2", model={"init_from": "runs/parent/fold{fold}/best.pt"})
    assert initfrom.resolve(load_experiment("child2"), paths.ALL_DATA) == folded / "runs/parent/all-data/best.pt"


def test_a_parent_trained_as_another_fold_is_refused(folded):
    """{fold} in the path is not enough when the file says it is another fold's model."""
    from competition.train.check import check_run
    save_parent("parent", 0, seed=0)
    rp = paths.run("parent", 1)
    rp.root.mkdir(parents=True)
    rp.best.write_bytes(paths.run("parent", 0).best.read_bytes())  # fold 0's model copied as fold 1's
    write_exp(folded, "child", model={"init_from": "runs/parent/fold{fold}/best.pt"})
    with pytest.raises(ConfigError, match=r"was trained as fold0 of tiny-hands, and this is fold 1"):
        check_run(load_experiment("child"), 1)
    with pytest.raises(ConfigError, match=r"runs/parent/fold2/best.pt \(for fold2\) not found; train it first "
                                          r"\(make train EXP=parent FOLD=2\)"):
        check_run(load_experiment("child"), 2)


def test_fold_k_starts_from_fold_k_weights_before_the_optimizer_is_built(folded, monkeypatch):
    from competition.train import engine, loop
    parents = {k: save_parent("parent", k, seed=10 + k) for k in (0, 1)}
    write_exp(folded, "child", model={"init_from": "runs/parent/fold{fold}/best.pt"})
    seen = {}
    real = engine.build_optimizer

    def spy(model, cfg):  # the weights as the optimizer first sees them
        seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return real(model, cfg)
    monkeypatch.setattr(engine, "build_optimizer", spy)  # build_engine's, which the run calls
    logs = []
    m = loop.fit(load_experiment("child"), 1, log=logs.append)
    got, want, other = seen["state"], parents[1], parents[0]
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    w = next(k for k in want if k.endswith(".weight") and want[k].dim() == 4)  # a convolution's: seeded init
    assert not torch.equal(got[w], other[w])  # fold 0's weights differ: fold 1 took its own
    # The run records its parent, in config.yaml, metrics.json and best.pt's config.
    rel, sha = "runs/parent/fold1/best.pt", file_hash(folded / "runs/parent/fold1/best.pt")
    cfg = yaml.safe_load((folded / "runs/child/fold1/config.yaml").read_text())
    assert cfg["init_from"] == rel and cfg["init_from_sha256"] == sha
    metrics = json.loads((folded / "runs/child/fold1/metrics.json").read_text())
    assert metrics["init_from"] == rel and metrics["init_from_sha256"] == sha and m["init_from"] == rel
    best = torch.load(folded / "runs/child/fold1/best.pt", weights_only=True)
    assert best["config"]["init_from"] == rel
    assert any(line.startswith(f"model.init_from: {len(want)} tensors from {rel}") for line in logs)


def test_mismatched_keys_are_listed_by_check(folded, capsys):
    from competition.cli import main

    def edit(state):
        for k in [k for k in state if k.startswith("decoder.")][:12]:  # 12 keys gone: the list is cut at 10
            del state[k]
        state["extra.weight"] = torch.zeros(3)
        k = next(k for k in state if k.startswith("encoder.") and k.endswith(".weight") and state[k].dim() == 4)
        state[k] = torch.zeros(state[k].shape[0] + 1, *state[k].shape[1:])
    save_parent("parent", 0, seed=0, edit=edit)
    write_exp(folded, "child", model={"init_from": "runs/parent/fold{fold}/best.pt"})
    assert main(["train", "--exp", "child", "--fold", "0", "--check"]) == 2
    err = capsys.readouterr().err
    assert "model.init_from: runs/parent/fold0/best.pt does not fit the model" in err and "Traceback" not in err
    assert "12 missing key(s) (in the model, not the checkpoint): decoder." in err and "(12 in all)" in err
    assert "1 unexpected key(s) (in the checkpoint, not the model): extra.weight" in err
    assert "1 shape mismatch(es): encoder." in err and "vs model (" in err
    assert "model.init_skip_head: true" in err
    assert not (folded / "runs/child").exists()  # --check builds nothing and writes nothing


def test_init_skip_head_with_another_class_count(folded):
    """A parent with 5 output channels (another competition's classes) initialises a 12-class model:
    without init_skip_head the head's shapes are the error; with it, everything but the head is the
    parent's, the head keeps its fresh init, and the run trains."""
    from competition.cli import main
    from competition.models import build_model
    from competition.train import initfrom
    from competition.train.loop import fit
    parent = save_parent("parent", 0, seed=3, out_ch=5)
    write_exp(folded, "child", model={"init_from": "runs/parent/fold{fold}/best.pt"})
    with pytest.raises(ConfigError, match=r"shape mismatch\(es\): segmentation_head\.0\.weight: checkpoint "
                                          r"\(5, 8, 3, 3\) vs model \(12, 8, 3, 3\)"):
        initfrom.check(load_experiment("child"), 0, build_model(load_experiment("child").model, 12, 1), 12)
    write_exp(folded, "child", model={"init_from": "runs/parent/fold{fold}/best.pt", "init_skip_head": True})
    exp = load_experiment("child")
    torch.manual_seed(99)
    model = build_model(exp.model, 12, 1)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    initfrom.apply(exp, 0, model, 12)
    head = initfrom.head_prefixes(model, 12)
    assert head == ["segmentation_head"]
    for k, v in model.state_dict().items():
        want = fresh[k] if k.startswith("segmentation_head.") else parent[k]
        torch.testing.assert_close(v, want, rtol=0, atol=0)
    assert main(["train", "--exp", "child", "--fold", "0", "--check"]) == 0
    m = fit(exp, 0, log=lambda *_: None)
    assert m["epochs_run"] == 1 and m["init_from"] == "runs/parent/fold0/best.pt"


def test_resume_does_not_read_the_parent_again(folded, monkeypatch):
    from competition.train import check, initfrom, loop
    save_parent("parent", 0, seed=5)
    write_exp(folded, "child", model={"init_from": "runs/parent/fold{fold}/best.pt"})
    loop.fit(load_experiment("child"), 0, log=lambda *_: None)
    sha = file_hash(folded / "runs/parent/fold0/best.pt")
    # The parent is gone (or retrained) after the run started; extending the run resumes from last.pt.
    (folded / "runs/parent/fold0/best.pt").unlink()

    def refuse(*a, **k):
        raise AssertionError("a resumed run read its parent")
    real = initfrom.read
    monkeypatch.setattr(initfrom, "read", refuse)
    logs = []
    write_exp(folded, "child", model={"init_from": "runs/parent/fold{fold}/best.pt"}, train={"epochs": 2})
    m = loop.fit(load_experiment("child"), 0, log=logs.append)
    assert m["epochs_run"] == 2 and any("resuming child fold 0" in line for line in logs)
    cfg = yaml.safe_load((folded / "runs/child/fold0/config.yaml").read_text())
    assert cfg["init_from"] == "runs/parent/fold0/best.pt" and cfg["init_from_sha256"] == sha
    assert m["init_from_sha256"] == sha
    # Starting over (--restart) does read it, and finds it gone.
    monkeypatch.setattr(initfrom, "read", real)
    with pytest.raises(ConfigError, match="runs/parent/fold0/best.pt \\(for fold0\\) not found"):
        check.check_run(load_experiment("child"), 0, restart=True)
