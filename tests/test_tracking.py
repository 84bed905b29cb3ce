"""W&B, offline as in CI: what a training run, an ensemble and a submission record (runs, artifacts and
their lineage), read back from the files W&B wrote; where runs go (env > config > default); when a
login counts as configured; an unreachable server falls back to offline; ``tracking.wandb: false``
or a missing wandb writes nothing and fails nothing."""
import json
import socket
import sys
import time
import warnings
from types import SimpleNamespace

import pytest
import yaml
from wandb_offline import read_offline_run

from competition import tracking
from competition.config import Recipe, TrackingConfig, load_experiment, to_plain
from competition.tracking import Tracker, artifact_name, log_ensemble, log_submission

CLASSES = ["thumb", "index", "middle", "ring", "little", "metacarpals", "scaphoid", "lunate", "trapezium",
           "radius", "ulna", "sesamoid"]
WANDB_VARS = ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_CONFIG_DIR", "WANDB_IDENTITY_TOKEN_FILE", "NETRC",
           "WANDB_PROJECT", "WANDB_ENTITY")


@pytest.fixture(autouse=True)
def wandb_home(tmp_path, monkeypatch):
    """No login, no W&B variables, and W&B's staging folder (artifact copies) inside the test's folder."""
    for k in WANDB_VARS:
        monkeypatch.delenv(k, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    return home


def only_run(project):
    runs = sorted((project / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def finished(run_dir) -> dict:
    """An offline run, once W&B's service has written all of it (it writes behind the run)."""
    deadline = time.time() + 60
    while not (rec := read_offline_run(run_dir))["finished"] and time.time() < deadline:
        time.sleep(0.1)
    assert rec["finished"], "W&B never wrote the run's exit record"
    return rec


def recorded(project) -> dict:
    return finished(only_run(project))


def ours(rec: dict) -> list[dict]:
    """The artifacts we log (W&B stores each logged table as a ``run_table`` artifact too)."""
    return [a for a in rec["artifacts"] if a["type"] != "run_table"]


def by_job(project) -> dict:
    return {r["run"]["job_type"]: r for r in map(finished, sorted((project / "wandb").glob("offline-run-*")))}


@pytest.fixture
def folded(tiny_project):
    import torch

    from competition.cli import main
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_project
    torch.set_num_threads(threads)


def test_training_run_is_a_train_job_with_history_tables_summary_and_a_model_artifact(folded):
    from competition.train.loop import fit
    exp = {"competition": "tiny-hands", "model": {"arch": "Unet", "encoder": "tu-test_resnet",
                                                  "decoder_channels": [16, 16, 8, 8, 8]},
           "data": {"input_size": 32, "batch_size": 4, "workers": 0},
           "train": {"epochs": 2, "progress": False}, "tracking": {"wandb": True}}
    (folded / "configs/experiments/wb.yaml").write_text(yaml.safe_dump(exp))
    m = fit(load_experiment("wb"), fold=1, log=lambda *_: None)
    rec = recorded(folded)
    assert rec["run"] == {**rec["run"], "project": "tiny-hands", "group": "wb", "job_type": "train",
                          "name": "wb-fold1", "tags": ["tiny-hands", "fold1"]}
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
    assert (table["columns"] == ["class", "val_dice", "oof_dice", "oof_dice_native"]
            and [r[0] for r in table["data"]] == CLASSES)
    assert len(list((only_run(folded) / "files/media/images").glob("val_overlays_*.png"))) == 3
    # The fold's model artifact: recorded in the offline run, its files staged for `wandb sync`.
    [art] = ours(rec)
    assert (art["type"], art["name"], art["used"]) == ("model", "model-wb-fold1", False)
    assert art["files"] == ["best.pt", "config.yaml", "metrics.json", "oof/ids.json", "oof/meta.json"]
    assert art["metadata"]["val_dice"] == pytest.approx(m["val_dice"]) and art["metadata"]["fold"] == 1
    run = folded / "runs/wb/fold1"
    for name in art["files"]:
        assert open(art["staged"][name], "rb").read() == (run / name).read_bytes(), name


def test_where_runs_go_env_beats_config_beats_default(monkeypatch):
    cfg = TrackingConfig(project="team-proj", entity="team")
    assert tracking.target(None, "comp") == {"project": "comp"}  # no entity: the login's default
    assert tracking.target(TrackingConfig(), "comp") == {"project": "comp"}
    assert tracking.target(cfg, "comp") == {"project": "team-proj", "entity": "team"}
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    assert tracking.target(cfg, "comp") == {"project": "mine", "entity": "team"}
    monkeypatch.setenv("WANDB_ENTITY", "me")
    assert tracking.target(cfg, "comp") == {"project": "mine", "entity": "me"}
    assert tracking.target(None, "comp") == {"project": "mine", "entity": "me"}


def test_env_project_and_entity_reach_the_run(project, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    exp = SimpleNamespace(name="e", tracking=TrackingConfig(project="from-config", entity="acme"))
    t = tracking.for_training(exp, SimpleNamespace(name="tiny-hands"), 0, {"k": 1})
    t.finish()
    run = recorded(project)["run"]
    assert run == {**run, "project": "from-env", "entity": "acme", "job_type": "train", "name": "e-fold0",
                   "tags": ["tiny-hands", "fold0"]}


def listening():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_login_detection(project, wandb_home, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    netrc = wandb_home / ".netrc"
    assert not tracking.logged_in() and tracking.mode() == "offline"  # nothing configured
    # A self-hosted server (WANDB_BASE_URL) with a `wandb login --host` key for it: online.
    with listening() as server:
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("WANDB_BASE_URL", url)
        assert tracking.server_url() == url and not tracking.logged_in(url)
        netrc.write_text("machine api.wandb.ai\n  login user\n  password cloudkey\n")
        assert not tracking.logged_in(url)  # a cloud key is no login for another server
        assert tracking.mode() == "offline"
        netrc.write_text(f"machine 127.0.0.1:{server.getsockname()[1]}\n  login user\n  password k\n")
        assert tracking.logged_in(url) and tracking.mode() is None  # None: online, W&B's default
        # The same login, with the host saved by `wandb login --host` instead of the variable.
        monkeypatch.delenv("WANDB_BASE_URL")
        settings = wandb_home / ".config/wandb/settings"
        settings.parent.mkdir(parents=True)
        settings.write_text(f"[default]\nbase_url = {url}\n")
        assert tracking.server_url() == url and tracking.mode() is None
    settings.unlink()
    # W&B's cloud: a .netrc entry for api.wandb.ai, or an API key, with no server named.
    netrc.write_text("machine api.wandb.ai\n  login user\n  password cloudkey\n")
    assert tracking.server_url() is None and tracking.logged_in()
    netrc.unlink()
    assert not tracking.logged_in()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.logged_in()


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


def fake_fold(project, exp: str, fold: int, wandb: bool = True):
    """A finished run folder with the files a fold's artifact holds (contents are arbitrary bytes)."""
    run = project / f"runs/{exp}/fold{fold}"
    (run / "oof").mkdir(parents=True)
    (run / "best.pt").write_bytes(f"weights {exp} {fold}".encode())
    (run / "metrics.json").write_text(json.dumps({"experiment": exp, "fold": fold, "val_dice": 0.5 + fold / 10}))
    (run / "config.yaml").write_text(yaml.safe_dump({"experiment": {"name": exp, "tracking": {"wandb": wandb}}}))
    (run / "oof/ids.json").write_text('["a", "b"]')
    (run / "oof/meta.json").write_text('{"size": [32, 32]}')
    (run / "oof/probs.npy").write_bytes(b"not in the artifact")
    return run


def blend(project, wandb: bool = True) -> Recipe:
    for e in ("e1", "e2"):
        for k in (0, 1):
            fake_fold(project, e, k, wandb)
    return Recipe.model_validate({
        "name": "blend", "competition": "tiny-hands", "task": "multilabel", "classes": ["a", "b"],
        "folds_sha256": "f" * 64, "thresholds": [0.5, 0.4], "scores": {"in_sample": 0.81, "nested": 0.79},
        "members": [{"experiment": e, "folds": [0, 1], "weights": w,
                     "checkpoints": [{"path": f"runs/{e}/fold{k}/best.pt", "sha256": "0" * 64} for k in (0, 1)]}
                    for e, w in (("e1", [0.7, 0.2]), ("e2", [0.3, 0.8]))]})


def test_ensemble_run_holds_weights_scores_and_the_recipe_artifact(project):
    recipe = blend(project)
    yml, md = project / "ensembles/blend.yaml", project / "ensembles/blend.md"
    yml.parent.mkdir()
    yml.write_text(yaml.safe_dump(to_plain(recipe)))
    md.write_text("# blend\n")
    log_ensemble(to_plain(recipe), {"a": 0.9, "b": 0.7}, (yml, md), TrackingConfig())
    rec = recorded(project)
    assert rec["run"] == {**rec["run"], "job_type": "ensemble", "name": "blend", "group": "blend",
                          "project": "tiny-hands", "tags": ["tiny-hands"]}
    assert rec["config"]["thresholds"] == [0.5, 0.4] and rec["config"]["members"][1]["experiment"] == "e2"
    s = rec["summary"]
    assert s["dice/a"] == 0.9 and s["in_sample"] == 0.81 and s["nested"] == 0.79 and s["members"] == 2
    weights = json.loads((only_run(project) / "files" / s["ensemble_weights"]["path"]).read_text())
    assert weights["data"] == [["e1", "[0, 1]", "a", 0.7], ["e1", "[0, 1]", "b", 0.2],
                               ["e2", "[0, 1]", "a", 0.3], ["e2", "[0, 1]", "b", 0.8]]
    [out] = ours(rec)  # offline, W&B declares no inputs: the config records them (name -> digest)
    assert list(rec["config"]["input_artifacts"]) == [f"model-{e}-fold{k}" for e in ("e1", "e2") for k in (0, 1)]
    assert (out["type"], out["name"], out["used"], out["files"]) == ("recipe", "recipe-blend", False,
                                                                     ["blend.md", "blend.yaml"])
    assert out["metadata"] == {"in_sample": 0.81, "nested": 0.79}


def test_lineage_submission_recipe_checkpoints_by_content(project):
    """Each input is the very version its producer logged (same digest), offline: the graph W&B draws
    after `wandb sync` is submission <- recipe <- fold checkpoints."""
    recipe = blend(project)
    for e in ("e1", "e2"):
        for k in (0, 1):  # what training logs for each fold
            t = Tracker(True, project="tiny-hands", job_type="train", name=f"{e}-fold{k}")
            tracking.log_fold(t, SimpleNamespace(name=e, tracking=TrackingConfig()), k, {"fold": k})
            t.finish()
    trained = {a["name"]: a["digest"] for r in map(finished, (project / "wandb").glob("offline-run-*"))
               for a in r["artifacts"]}
    yml, md = project / "ensembles/blend.yaml", project / "ensembles/blend.md"
    yml.parent.mkdir()
    yml.write_text(yaml.safe_dump(to_plain(recipe)))
    md.write_text("# blend\n")
    log_ensemble(to_plain(recipe), {"a": 0.9, "b": 0.7}, (yml, md), TrackingConfig())
    csv = project / "submissions/20260101-blend.csv"
    csv.parent.mkdir()
    csv.write_text("id,class,rle\n")
    row = {"file": "submissions/20260101-blend.csv", "competition": "tiny-hands", "ensemble": "blend",
           "cv_native_in_sample": 0.81}
    log_submission(row, recipe, yml)
    runs = by_job(project)
    assert set(runs) == {"train", "ensemble", "submit"}
    ens, sub = ours(runs["ensemble"]), ours(runs["submit"])
    assert runs["ensemble"]["config"]["input_artifacts"] == trained
    [made] = ens
    assert runs["submit"]["config"]["input_artifacts"] == {"recipe-blend": made["digest"]}
    assert [(a["type"], a["name"], a["used"]) for a in sub] == [("submission", "submission-blend", False)]
    assert sub[0]["files"] == ["20260101-blend.csv"]
    assert runs["submit"]["run"] == {**runs["submit"]["run"], "job_type": "submit", "group": "blend",
                                     "name": "20260101-blend", "tags": ["tiny-hands"]}
    assert runs["submit"]["summary"]["cv_native_in_sample"] == 0.81


def test_submission_of_one_experiment_uses_its_fold_models(project):
    full = blend(project)
    recipe = full.model_copy(update={"name": "e1", "members": full.members[:1]})
    log_submission({"file": "submissions/x.csv", "competition": "tiny-hands", "ensemble": "e1"}, recipe, None)
    rec = recorded(project)
    assert rec["run"]["group"] == "e1" and rec["run"]["job_type"] == "submit"
    # No CSV on disk here: the inputs are still declared, no submission artifact is made.
    assert ours(rec) == [] and list(rec["config"]["input_artifacts"]) == ["model-e1-fold0", "model-e1-fold1"]


def test_online_runs_declare_inputs_with_wandb_use_artifact(project):
    """Online, an input is W&B's own: ``wandb.Run.use_artifact`` with the artifact built from the files."""
    used = []
    t = Tracker(False)
    t.run = SimpleNamespace(offline=False, use_artifact=used.append)
    t.use_artifact("e1-fold0", "model", {"config.yaml": project / "configs/competitions/tiny-hands.yaml",
                                         "gone.pt": project / "missing.pt"})
    [art] = used
    assert (art.name, art.type, art.is_draft(), sorted(art.manifest.entries)) == (
        "model-e1-fold0", "model", True, ["config.yaml"])


def test_members_that_do_not_track_make_submissions_untracked(project):
    log_submission({"file": "x.csv", "competition": "tiny-hands"}, blend(project, wandb=False), None)
    assert not (project / "wandb").exists()


def test_disabled_tracking_writes_nothing(project):
    t = Tracker(False, project="p", name="n")
    t.log({"a": 1.0})
    t.table("t", ["a"], [[1]])
    t.log_artifact("a", "model", {"f": project / "configs/competitions/tiny-hands.yaml"})
    t.finish()
    assert t.run is None and not (project / "wandb").exists()


def test_without_wandb_installed_one_warning_and_no_failure(project, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = Tracker(True, project="p", name="n")
        t.log({"a": 1.0})
        t.finish()
    assert ([str(w.message) for w in caught] == [str(caught[0].message)]
            and "wandb is not installed" in str(caught[0].message))
    log_ensemble({"name": "x"}, {})
    log_submission({"file": "x.csv"})
    assert not (project / "wandb").exists()


def test_helpers_never_raise_and_respect_enabled(project, monkeypatch):
    log_ensemble({"name": "x"}, {}, enabled=False)
    assert not (project / "wandb").exists()
    log_ensemble({"name": "odd", "members": [{"weights": []}]}, {"a": 1.0})  # malformed: still no exception
    t = Tracker(True, project="p", name="n")
    monkeypatch.setattr(t.run, "log_artifact", lambda *a, **k: 1 / 0)
    with pytest.warns(UserWarning, match="W&B call failed and was skipped: ZeroDivisionError"):
        t.log_artifact("a", "model", {"f": project / "configs/competitions/tiny-hands.yaml"})
    t.finish()


def test_artifact_names_are_valid_wandb_names():
    assert artifact_name("model", "a+b@c-fold0") == "model-a_b_c-fold0"
    long = [artifact_name("recipe", "x" * 200 + s) for s in "ab"]
    assert all(len(n) <= 128 for n in long) and long[0] != long[1]


def test_read_offline_run_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .wandb file"):
        read_offline_run(tmp_path)
