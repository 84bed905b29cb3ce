"""Many workers on one study, as on many machines: `competition tune` processes started at the same
moment on a fresh database all succeed, number their trials uniquely, draw different parameters (each
process seeds itself) and prune against each other's trials. On SQLite always, and on a real
PostgreSQL server that the module starts for itself (initdb into a temporary folder, 127.0.0.1 on a
free port). Without a server the PostgreSQL cases skip, unless COMPETITION_REQUIRE_POSTGRES=1 (CI)
makes that a failure."""
import multiprocessing as mp
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_tune import TINY_SPACE, tune_project, write  # noqa: F401, F811 (tune_project is a fixture)

from competition.config import ConfigError, load_search
from competition.tune.study import driver_url

REQUIRE_POSTGRES = os.environ.get("COMPETITION_REQUIRE_POSTGRES") == "1"


# -- a throwaway PostgreSQL server -----------------------------------------------------------------
def _bindir() -> Path | None:
    """Where initdb and pg_ctl live: on PATH, or Debian's versioned folder (not on PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    return max(versions, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0) if versions else None


class Postgres:
    """A cluster in a temporary folder with trust authentication over TCP on 127.0.0.1 only."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.base = Path(tempfile.mkdtemp(prefix="competition-pg-"))  # not under pytest's root-only tmp
        self.data, self.port = self.base / "data", _free_port()
        self.as_user: list[str] = []

    def _run(self, *cmd: str) -> None:
        r = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            log = (self.base / "server.log").read_text()[-2000:] if (self.base / "server.log").is_file() else ""
            raise RuntimeError(f"{Path(cmd[0]).name} failed ({r.returncode}): {r.stderr.strip()[-2000:]} {log}")

    def start(self) -> float:
        """Seconds from nothing to a server accepting connections."""
        t0 = time.perf_counter()
        if os.geteuid() == 0:  # initdb refuses to run as root
            user = "postgres" if _user_exists("postgres") else "nobody"
            runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
            if not runuser:
                raise RuntimeError("running as root and no `runuser` to start the server as another user")
            shutil.chown(self.base, user)
            self.as_user = [runuser, "-u", user, "--"]
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        # Durability off: a test cluster that dies with the test does not need fsync.
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.base / "server.log"), "-w",
                  "-t", "60", "-o", f"-h 127.0.0.1 -p {self.port} -k {self.base} -c fsync=off "
                  f"-c synchronous_commit=off -c full_page_writes=off", "start")
        return time.perf_counter() - t0

    def version(self) -> str:
        import psycopg
        with psycopg.connect(self.dsn("postgres")) as c:
            return c.execute("SHOW server_version").fetchone()[0]

    def dsn(self, db: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={db}"

    def fresh_url(self) -> str:
        """A new, empty database, as the URL a user writes (no driver named)."""
        import psycopg
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        # Trust authentication ignores the password: it is there to show that no output prints it.
        return f"postgresql://postgres:secret@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").is_file():
            subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                            "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable(why: str):
    if REQUIRE_POSTGRES:
        pytest.fail(f"COMPETITION_REQUIRE_POSTGRES=1 but {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def postgres(request):
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("no PostgreSQL driver: pip install -e '.[postgres]'")
    bindir = _bindir()
    if bindir is None:
        _unavailable("no PostgreSQL server binaries (initdb): apt-get install postgresql")
    server = Postgres(bindir)
    try:
        seconds = server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        server.stop()
        _unavailable(f"the PostgreSQL server did not start: {e}")
    line = f"PostgreSQL {server.version()} server on 127.0.0.1:{server.port}: up in {seconds:.2f} s (initdb + start)"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter and capture:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request, tmp_path):
    """A factory of empty databases on one backend."""
    if request.param == "sqlite":
        return lambda: f"sqlite:///{tmp_path / f'{uuid.uuid4().hex[:12]}.db'}"
    return request.getfixturevalue("postgres").fresh_url


def load(url: str, name: str = "tiny-tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=driver_url(url))


# -- URLs, drivers, seeds --------------------------------------------------------------------------
def test_postgres_urls_as_users_write_them_name_the_installed_driver(monkeypatch):
    import importlib.util

    from competition.tune import study
    rest = "user:secret@db.example:5432/optuna"
    have = {"psycopg": False, "psycopg2": True}
    monkeypatch.setattr(importlib.util, "find_spec", lambda m: object() if have.get(m) else None)
    assert study.driver_url(f"postgresql://{rest}") == f"postgresql+psycopg2://{rest}"
    assert study.driver_url(f"postgres://{rest}") == f"postgresql+psycopg2://{rest}"  # Heroku's spelling
    have["psycopg"] = True  # psycopg 3 preferred when both are there
    assert study.driver_url(f"postgresql://{rest}") == f"postgresql+psycopg://{rest}"
    for url in (f"postgresql+psycopg2://{rest}", "sqlite:////tmp/x.db", f"mysql+pymysql://{rest}"):
        assert study.driver_url(url) == url  # a named driver and other databases pass unchanged
    have.clear()
    with pytest.raises(ConfigError) as e:
        study.driver_url(f"postgresql://{rest}")
    msg = str(e.value)
    assert "pip install -e '.[postgres]'" in msg and "secret" not in msg and "\n" not in msg


def test_a_missing_driver_is_one_line_naming_the_extra():
    import importlib.util

    from competition.tune.study import open_storage
    if importlib.util.find_spec("psycopg2") is not None:
        pytest.skip("psycopg2 is installed here")
    with pytest.raises(ConfigError) as e:
        open_storage("postgresql+psycopg2://me:secret@127.0.0.1:1/db")
    msg = str(e.value)
    assert "driver is not installed" in msg and "psycopg2" in msg and "pip install -e '.[postgres]'" in msg
    assert "secret" not in msg and "\n" not in msg


def test_unreachable_database_is_one_line_without_the_password():
    from competition.tune.study import open_storage
    pytest.importorskip("psycopg")
    with pytest.raises(ConfigError) as e:
        open_storage(f"postgresql+psycopg://me:secret@127.0.0.1:{_free_port()}/db")
    msg = str(e.value)
    assert msg.startswith("cannot open Optuna storage 'postgresql+psycopg://me:***@127.0.0.1:")
    assert "OperationalError" in msg and "secret" not in msg and "\n" not in msg


def test_unpinned_seeds_differ_per_worker_and_a_pinned_seed_reproduces(project):
    from competition.tune.study import sampler_seed
    write(project, "search", "free", {**TINY_SPACE, "sampler": {"startup_trials": 2}})
    write(project, "search", "pinned", TINY_SPACE)  # sampler.seed: 0
    free, pinned = load_search("free"), load_search("pinned")
    assert free.sampler.seed is None
    # Same index and trials before it, as on two machines started together: still different.
    assert len({sampler_seed(free, 0, 0) for _ in range(5)}) == 5
    assert all(0 <= sampler_seed(free, 0, 0) < 2**32 for _ in range(5))
    assert [sampler_seed(pinned, i, n) for i, n in [(0, 0), (0, 0), (1, 0), (0, 3)]] == [0, 0, 1000, 3]

    def draws(space):  # the sampler a single worker gets, on an empty study
        from competition.tune import space as sp
        from competition.tune.study import make_sampler
        study = optuna.create_study(direction="maximize", sampler=make_sampler(space, sampler_seed(space, 0, 0)))
        study.optimize(lambda t: float(len(sp.suggest(t, space.params))), n_trials=3)
        return [t.params for t in study.trials]
    assert draws(pinned) == draws(pinned)  # a pinned seed reproduces a single worker's study
    assert draws(free) != draws(free)


# -- many workers, one fresh database --------------------------------------------------------------
def _prepare_in_lockstep(urls: list[str], barrier, results) -> None:
    """A worker's start-up (`prepare`: storage, schema, study, identity) on each fresh database, at the
    same moment as the other processes."""
    from competition.tune.study import Options, prepare
    for url in urls:
        barrier.wait(timeout=300)
        try:
            prepare("tiny", "tiny", Options(storage=url))
            results.put((url, "ok"))
        except Exception as e:
            results.put((url, f"{type(e).__name__}: {e}"))


def test_workers_creating_one_study_at_once_all_succeed(tune_project, fresh_url):
    urls = [fresh_url() for _ in range(3)]  # rounds: the race is lost by chance, so give it chances
    ctx = mp.get_context("spawn")
    barrier, results, n = ctx.Barrier(4), ctx.Queue(), 4
    procs = [ctx.Process(target=_prepare_in_lockstep, args=(urls, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=600) for _ in range(n * len(urls))]
    for p in procs:
        p.join(timeout=60)
    assert [r for _, r in got if r != "ok"] == []
    for url in urls:
        summaries = optuna.get_all_study_summaries(storage=driver_url(url))
        assert [s.study_name for s in summaries] == ["tiny-tiny"]  # one study, not one per worker
        assert load(url).user_attrs["experiment"] == "tiny"


@pytest.mark.slow
def test_two_tune_processes_on_one_fresh_study(tune_project, fresh_url):
    url, trials = fresh_url(), 4
    # One epoch, fold 0; the median pruner may prune from the first completed trial on.
    write(tune_project, "search", "tiny", {**TINY_SPACE, "trials": trials, "budget": {"epochs": 1, "folds": [0]},
                                           "sampler": {"startup_trials": 2},
                                           "pruner": {"name": "median", "startup_trials": 1, "warmup_epochs": 0}})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "competition", "tune", "--exp", "tiny", "--space", "tiny", "--storage", url]
    logs = [tune_project / f"worker{i}.log" for i in range(2)]
    procs = [subprocess.Popen(cmd, cwd=tune_project, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
             for log in logs]  # started together: both create the schema and the study on an empty database
    codes = [p.wait(timeout=900) for p in procs]
    assert codes == [0, 0], "\n\n".join(log.read_text()[-3000:] for log in logs)

    study = load(url)
    ts = study.get_trials(deepcopy=False)
    # The study stops at `trials` finished; a worker already running one when the other finished it adds one.
    assert trials <= len(ts) <= trials + 1
    assert sorted(t.number for t in ts) == list(range(len(ts)))  # unique numbers, none lost
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in ts)
    worker = {t.number: t.user_attrs["worker"] for t in ts}
    assert len(set(worker.values())) == 2, worker  # both processes trained trials of the one study
    seeds = {t.user_attrs["worker"]: t.user_attrs["sampler_seed"] for t in ts}
    assert len(set(seeds.values())) == 2  # each process seeded itself
    drawn = [tuple(sorted(t.params.items())) for t in ts]
    assert len(set(drawn)) == len(drawn)  # no two trials asked for the same parameters
    # The pruner judged trials against completed trials of the other process too: one shared search.
    crossed = [t.number for t in ts if any(worker[c] != worker[t.number] for c in t.user_attrs["compared_with"])]
    assert crossed, {t.number: (worker[t.number], t.user_attrs["compared_with"]) for t in ts}
    assert study.user_attrs["experiment"] == "tiny"
    for log in logs:
        assert "finished trial(s)" in log.read_text() and "secret" not in log.read_text()
    assert "secret" not in (tune_project / "configs/experiments/tiny-tuned.yaml").read_text()
