"""Installs that fit their use: the core (folds, train, submit, a bundle's run.py) runs without the
optional extras (optuna, wandb, matplotlib), a command that needs a missing extra says which in one
line, the dependency closure used for wheels/ and constraints.txt, and the constraints files agree
with pyproject.toml's bounds."""
from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from competition.errors import UserError
from competition.installs import closure, missing_extra, project_requirements, write_constraints

REPO = Path(__file__).resolve().parent.parent
EXTRAS = ("optuna", "wandb", "matplotlib")
EXP = {"competition": "tiny-hands", "model": {"arch": "Unet", "encoder": "tu-test_resnet",
                                              "decoder_channels": [16, 16, 16, 16, 16]},
       "optimizer": {"name": "adamw", "lr": 0.003}, "scheduler": {"name": "cosine", "warmup_epochs": 0},
       "data": {"input_size": 64, "batch_size": 4, "workers": 0},
       "train": {"epochs": 1, "progress": False, "seed": 0}}  # tracking.wandb stays on: it must not need wandb
# Test-only stand-in for "not installed": None in sys.modules makes `import optuna` raise
# ModuleNotFoundError, as it would without the package (and timm's optional `import wandb` skips it).
BLOCK = "import sys; [sys.modules.__setitem__(m, None) for m in sys.argv.pop(1).split(',') if m]; "
CLI = BLOCK + "from competition.cli import main; sys.exit(main(sys.argv[1:]))"
RUN_PATH = BLOCK + "import runpy; sys.argv.pop(0); runpy.run_path(sys.argv[0], run_name='__main__')"


def python(code: str, *args: str, blocked=EXTRAS, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, ",".join(blocked), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_recipe(project: Path, exp: str = "core", name: str = "core") -> None:
    """A one-member, one-fold recipe over runs/<exp>/fold0/best.pt."""
    from competition.config import Recipe, RecipeCheckpoint, RecipeMember, dump_yaml, load_competition
    from competition.io import file_hash
    comp = load_competition("tiny-hands")
    ck = RecipeCheckpoint(path=f"runs/{exp}/fold0/best.pt", sha256=file_hash(project / f"runs/{exp}/fold0/best.pt"))
    recipe = Recipe(name=name, competition="tiny-hands", task="multilabel", classes=comp.classes,
                    folds_sha256=file_hash(project / "folds/tiny-hands.csv"),
                    members=[RecipeMember(experiment=exp, folds=[0], checkpoints=[ck], weights=[1.0],
                                          tta=["identity", "hflip"])],
                    thresholds=[0.4] * len(comp.classes))
    dump_yaml(recipe, project / f"ensembles/{name}.yaml")


def test_core_import_path_imports_no_optional_extra():
    r = python("import sys; import competition.cli, competition.folds, competition.train.loop, "
               "competition.predict.run, competition.predict.bundle, competition.ensemble; "
               "print(sorted(m for m in ('optuna', 'matplotlib') if m in sys.modules))", blocked=())
    assert r.returncode == 0, r.stderr[-2000:]
    # wandb is left out of this check: when it is installed, timm imports it by itself (an optional
    # `import wandb` in timm.utils); with it blocked, the test below shows nothing of ours needs it.
    assert r.stdout.strip() == "[]"


def test_missing_extra_message_names_the_extra():
    e = missing_extra(ModuleNotFoundError("No module named 'optuna'", name="optuna"), "tune")
    assert str(e) == ("`competition tune` needs optuna, which is not installed: install the 'tune' extra "
                      "(pip install 'competition[tune]', or pip install -e '.[tune]' in a clone; make venv "
                      "installs every extra)")
    assert "'plots' extra" in str(missing_extra(ModuleNotFoundError(name="matplotlib")))
    # A package that is installed but broken, or any other module: not an extra's problem.
    assert missing_extra(ModuleNotFoundError(name="optuna.visualization"), "tune") is None
    assert missing_extra(ModuleNotFoundError(name="cv2")) is None
    assert missing_extra(ImportError("optuna"), "tune") is None


def test_tune_without_optuna_is_one_line_naming_the_extra(project):
    r = python(CLI, "tune", "--exp", "x", blocked=("optuna",), cwd=project)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: `competition tune` needs optuna, which is not installed: install the 'tune' extra (pip install "
        "'competition[tune]', or pip install -e '.[tune]' in a clone; make venv installs every extra)"]


def test_folds_train_submit_and_bundle_run_without_optuna_wandb_matplotlib(tiny_project, tmp_path):
    (tiny_project / "configs/experiments/core.yaml").write_text(yaml.safe_dump(EXP))
    for args in (["folds", "--comp", "tiny-hands"], ["train", "--exp", "core", "--fold", "0"]):
        r = python(CLI, *args, cwd=tiny_project)
        assert r.returncode == 0, r.stderr[-3000:]
    assert (tiny_project / "runs/core/fold0/best.pt").is_file()
    write_recipe(tiny_project)
    r = python(CLI, "submit", "--ensemble", "core", "--out", "ref.csv", "--no-progress", "--force",
               cwd=tiny_project)
    assert r.returncode == 0, r.stderr[-3000:]
    r = python(CLI, "bundle", "core", "--out", str(tmp_path / "bundle"), cwd=tiny_project)
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = python(RUN_PATH, str(tmp_path / "bundle/run.py"), "--data-root", str(tiny_project / "data/tiny-hands"),
               "--out", "sub.csv", "--no-progress", "--force", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (elsewhere / "sub.csv").read_bytes() == (tiny_project / "ref.csv").read_bytes()
    # The commands that do need an extra say which.
    r = python(CLI, "runs", "--plot", blocked=("matplotlib",), cwd=tiny_project)
    assert r.returncode == 2 and "needs matplotlib" in r.stderr and "'plots' extra" in r.stderr
    assert "Traceback" not in r.stderr


def fake_dist(site: Path, name: str, version: str, *requires: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"  # as installers name it
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires))


def test_closure_follows_extras_and_markers_and_stops_at_skip(tmp_path, monkeypatch):
    site = tmp_path / "site"
    fake_dist(site, "zz-app", "1.0", "zz-lib[fast]>=2", "zz-heavy", "zz-win; sys_platform == 'nonexistent'",
              "zz-new; python_version >= '3.99'", "zz-doc; extra == 'docs'")
    fake_dist(site, "zz_lib", "2.5", "zz-speed; extra == 'fast'", "zz-base")
    fake_dist(site, "zz-speed", "0.3", "zz-base>=1")
    fake_dist(site, "zz-base", "1.1")
    fake_dist(site, "zz-heavy", "9.0", "zz-gpu")  # torch's place: skipped with what only it needs
    fake_dist(site, "zz-gpu", "12.0")
    monkeypatch.syspath_prepend(str(site))
    assert closure(["zz-app"]) == {"zz-app": "1.0", "zz-base": "1.1", "zz-gpu": "12.0", "zz-heavy": "9.0",
                                   "zz-lib": "2.5", "zz-speed": "0.3"}
    assert closure(["zz-app"], skip=frozenset({"zz_heavy"})) == {
        "zz-app": "1.0", "zz-base": "1.1", "zz-lib": "2.5", "zz-speed": "0.3"}
    with pytest.raises(UserError, match=r"zz-new .* is required but not installed here"):
        closure(["zz-app"], env={"python_version": "3.99"})


def test_project_requirements_follow_self_referencing_extras(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "my_pkg"\ndependencies = ["a>=1"]\n[project.optional-dependencies]\n'
        'x = ["b"]\ny = ["My-Pkg[x]", "c<2"]\nall = ["my-pkg[y]"]\n')
    assert project_requirements(tmp_path / "pyproject.toml") == ["a>=1"]
    assert sorted(project_requirements(tmp_path / "pyproject.toml", ("all",))) == ["a>=1", "b", "c<2"]


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.split("#")[0].strip():
            name, _, version = line.split("#")[0].strip().partition("==")
            assert version, f"{path.name}: {line!r} is not name==version"
            out[Requirement(name).name.lower().replace("_", "-")] = version
    return out


def direct(*extras: str) -> list[Requirement]:
    return [Requirement(r) for r in project_requirements(REPO / "pyproject.toml", extras)]


def test_constraints_pin_every_direct_requirement_within_its_bounds():
    lock = pins(REPO / "constraints.txt")
    assert lock["torch"] == "2.14.1" and lock["torchvision"] == "0.29.1"
    for r in direct("all", "dev", "postgres", "bench"):
        name = r.name.lower().replace("_", "-")
        assert name in lock, f"constraints.txt does not pin {r}"
        assert r.specifier.contains(lock[name], prereleases=True), f"constraints.txt: {name}=={lock[name]} vs {r}"


def test_constraints_min_pins_every_floor():
    floors = pins(REPO / "constraints-min.txt")
    for r in direct("all", "dev"):
        name = r.name.lower().replace("_", "-")
        low = [s.version for s in r.specifier if s.operator == ">="]
        assert name in floors, f"constraints-min.txt does not pin {r}"
        assert r.specifier.contains(floors[name]), f"constraints-min.txt: {name}=={floors[name]} vs {r}"
        if name not in ("torch", "torchvision"):  # the only builds on the test machine (see the file)
            assert [Version(v) for v in low] == [Version(floors[name])], (
                f"constraints-min.txt: {name}=={floors[name]}, but the floor is {low}")


@pytest.mark.skipif(Path(sys.prefix).resolve() != (REPO / ".venv").resolve(), reason="checks the project's .venv")
def test_constraints_txt_is_what_the_venv_holds(tmp_path):
    """Drift check: an upgrade in .venv without `make constraints` (or a stale .venv) fails here."""
    write_constraints(tmp_path / "c.txt", REPO / "pyproject.toml")
    assert pins(tmp_path / "c.txt") == pins(REPO / "constraints.txt")
    assert md.version("torch") == "2.14.1"


def test_pyproject_declares_every_extra_the_code_names():
    from competition.installs import EXTRAS as MAP
    optional = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, extra in MAP.items():
        assert any(Requirement(r).name == module for r in optional[extra]), (module, extra)
    core = {Requirement(r).name for r in project_requirements(REPO / "pyproject.toml")}
    assert not core & set(MAP), "the core must not pull an optional extra"
