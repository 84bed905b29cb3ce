"""W&B, offline as in CI: what a training run, an ensemble and a submission record, read back from the
files W&B wrote; an unreachable server falls back to offline; ``tracking.wandb: false`` writes nothing."""
import json
import socket
import time
import warnings

import pytest
import yaml

from competition.config import load_experiment
from competition.tracking import Tracker, log_ensemble, log_submission, read_offline_run

CLASSES = ["thumb", "index", "middle", "ring", "little", "metacarpals", "scaphoid", "lunate", "trapezium",
           "radius", "ulna", "sesamoid"]


def only_run(project):
    runs = sorted((project / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def recorded(project) -> dict:
    """The single offline run, once W&B's service has written all of it (it writes behind the run)."""
    deadline = time.time() + 60
    while not (rec := read_offline_run(only_run(project)))["finished"] and time.time() < deadline:
        time.sleep(0.1)
    assert rec["finished"], "W&B never wrote the run's exit record"
    return rec


@pytest.fixture
def folded(tiny_project):
    import torch
    from competition.cli import main
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_project
    torch.set_num_threads(threads)


def test_training_run_records_per_class_history_table_overlays_and_best_summary(folded):
    from competition.train.loop import fit
    exp = {"competition": "tiny-hands", "model": {"arch": "Unet", "encoder": "tu-test_resnet",
                                                  "decoder_channels": [16, 16, 8, 8, 8]},
           "data": {"input_size": 32, "batch_size": 4, "workers": 0},
           "train": {"epochs": 2, "progress": False}, "tracking": {"wandb": True}}
    (folded / "configs/experiments/wb.yaml").write_text(yaml.safe_dump(exp))
    m = fit(load_experiment("wb"), fold=1, log=lambda *_: None)
    rec = recorded(folded)
    assert rec["run"] == {**rec["run"], "project": "tiny-hands", "group": "wb", "job_type": "fold1", "name": "wb-fold1"}
    assert rec["config"]["experiment"]["name"] == "wb" and rec["config"]["fold"] == 1
    assert rec["config"]["competition"]["classes"] == CLASSES
    epochs = [r for r in rec["history"] if "epoch" in r]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert {"train_loss", "lr", "val_dice", *(f"dice/{c}" for c in CLASSES)} <= set(r)
    assert epochs[m["best_epoch"] - 1]["val_dice"] == pytest.approx(m["val_dice"])
    s = rec["summary"]
    assert s["val_dice"] == pytest.approx(m["val_dice"]) and s["best_epoch"] == m["best_epoch"]
    assert {f"best_dice/{c}" for c in CLASSES} <= set(s)
    assert s["best_dice/thumb"] == pytest.approx(m["val_dice_per_class"]["thumb"])
    assert s["val_dice_per_class"]["_type"] == "table-file" and s["val_overlays"]["count"] == 3
    table = json.loads((only_run(folded) / "files" / s["val_dice_per_class"]["path"]).read_text())
    assert table["columns"] == ["class", "val_dice", "oof_dice", "oof_dice_native"] and [r[0] for r in table["data"]] == CLASSES
    assert len(list((only_run(folded) / "files/media/images").glob("val_overlays_*.png"))) == 3


def test_disabled_tracking_writes_nothing(project):
    t = Tracker(False, project="p", name="n")
    t.log({"a": 1.0})
    t.table("t", ["a"], [[1]])
    t.finish()
    assert t.run is None and not (project / "wandb").exists()


def test_unreachable_server_records_offline_without_failing(project, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = Tracker(True, project="p", name="n", config={"k": 1})
        t.log({"val_dice": 0.5}, step=1)
        t.finish()
    assert any("unreachable; recording runs offline" in str(w.message) for w in caught)
    rec = recorded(project)
    assert rec["history"][0]["val_dice"] == 0.5 and rec["config"] == {"k": 1}


def test_ensemble_run_holds_weights_and_per_class_scores(project):
    recipe = {"name": "blend", "competition": "tiny-hands", "task": "multilabel", "classes": ["a", "b"],
              "members": [{"experiment": "e1", "folds": [0, 1], "weights": [0.7, 0.2]},
                          {"experiment": "e2", "folds": [0, 1], "weights": [0.3, 0.8]}],
              "thresholds": [0.5, 0.4], "scores": {"in_sample": 0.81, "nested": 0.79}}
    log_ensemble(recipe, {"a": 0.9, "b": 0.7})
    run = only_run(project)
    rec = recorded(project)
    assert rec["run"]["job_type"] == "ensemble" and rec["run"]["name"] == "blend"
    assert rec["run"]["project"] == "tiny-hands" and rec["run"]["group"] == "ensembles"
    assert rec["config"]["thresholds"] == [0.5, 0.4] and rec["config"]["members"][1]["experiment"] == "e2"
    s = rec["summary"]
    assert s["dice/a"] == 0.9 and s["in_sample"] == 0.81 and s["nested"] == 0.79 and s["members"] == 2
    weights = json.loads((run / "files" / s["ensemble_weights"]["path"]).read_text())
    assert weights["data"] == [["e1", "[0, 1]", "a", 0.7], ["e1", "[0, 1]", "b", 0.2],
                               ["e2", "[0, 1]", "a", 0.3], ["e2", "[0, 1]", "b", 0.8]]


def test_submission_run_holds_the_ledger_row(project):
    import numpy as np
    row = {"time": "2026-01-01T00:00", "file": "submissions/20260101-blend.csv", "competition": "tiny-hands",
           "recipe": "blend", "cv": np.float64(0.81), "lb": None, "sha256": "abc"}
    log_submission(row)
    rec = recorded(project)
    assert rec["run"]["job_type"] == "submission" and rec["run"]["name"] == "20260101-blend"
    assert rec["config"]["cv"] == 0.81 and rec["config"]["recipe"] == "blend"
    assert rec["summary"]["cv"] == 0.81 and rec["summary"]["sha256"] == "abc"


def test_helpers_never_raise_and_respect_enabled(project):
    log_ensemble({"name": "x"}, {}, enabled=False)
    log_submission({"file": "x.csv"}, enabled=False)
    assert not (project / "wandb").exists()
    log_ensemble({"name": "odd", "members": [{"weights": []}]}, {"a": 1.0})  # malformed: still no exception


def test_read_offline_run_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .wandb file"):
        read_offline_run(tmp_path)
