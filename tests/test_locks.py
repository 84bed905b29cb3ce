"""Run-folder locks name their holder in every case: an exclusive holder (train, oof), shared holders
(ensemble, submit, pseudo), two ``train`` processes started together, a ``--check`` probe (which must
not erase the holder's record), and never a killed process's stale record."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import write_exp

from competition import locks, paths
from competition.cli import main

# A process holding a lock: argv = lock path, ex|sh, then the command it pretends to be (the record's
# command is `competition <args>` for `python -c`). It prints "ready" once it holds the lock and keeps
# it until its stdin is closed.
HOLDER = """
import sys
from competition import locks
path, mode = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
with locks.hold(path, mode == "ex", "run folder"):
    print("ready", flush=True)
    sys.stdin.read()
"""
# The real `competition train` (check_run's probe, then fit's lock), with the training itself replaced
# by "print training, wait for stdin to close".
TRAIN = """
import sys
import competition.train.loop as loop
def _fit(*a, **k):
    print("training", flush=True)
    sys.stdin.read()
    return {}
loop._fit = _fit
from competition.cli import main
sys.exit(main(sys.argv[1:]))
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(code: str, *args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=ENV, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(p: subprocess.Popen, word: str) -> None:
    line = p.stdout.readline()
    assert line.strip() == word, (line, p.stderr.read() if p.poll() is not None else "")


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.stdin.close()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def folded(tiny_project):
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    write_exp(tiny_project, "t", train={"epochs": 1})
    return tiny_project


def test_train_vs_train_names_the_holders_pid_and_command_and_check_keeps_its_record(folded, capsys):
    first = start(TRAIN, "train", "--exp", "t", "--fold", "0", cwd=folded)
    try:
        wait_for(first, "training")
        lock = paths.run("t", 0).lock
        assert main(["train", "--exp", "t", "--fold", "0"]) == 2
        err = capsys.readouterr().err
        assert f"PID {first.pid}" in err and "(`competition train --exp t --fold 0`)" in err, err
        assert "reading" not in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        # --check probes the lock: refused the same way, and the holder's record is still whole after it.
        for _ in range(3):
            assert main(["train", "--exp", "t", "--fold", "0", "--check"]) == 2
            assert f"PID {first.pid}" in capsys.readouterr().err
            assert json.loads(lock.read_text())["pid"] == first.pid
    finally:
        stop(first)
    assert first.returncode == 0
    assert lock.read_text() == ""  # released: no record left to be mistaken for a holder
    assert main(["train", "--exp", "t", "--fold", "0", "--check"]) == 0
    assert lock.read_text() == ""  # the probe leaves no record of its own either


# A holder slow to write its record: the moment between taking the lock and writing the record
# lasts 50 ms instead of microseconds. It prints "locked" in that moment.
SLOW_HOLDER = """
import sys, time
from competition import locks
record = locks._holder
def slow(*a):
    print("locked", flush=True)
    time.sleep(0.05)
    return record(*a)
locks._holder = slow
path = sys.argv.pop(1)
with locks.hold(path, True, "run folder"):
    sys.stdin.read()
"""


def test_a_refusal_in_the_moment_the_winner_takes_the_lock_names_the_winner(tmp_path):
    """The old lock truncated the file, then wrote the record, and a refused process read it at once:
    the loser of two trains started together read the empty file in between and called the winner
    "a reader" (the old ``_describe``'s fallback for an empty file)."""
    lock = tmp_path / "run/.lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": dead_pid(), "host": __import__("socket").gethostname(),
                                "since": "2026-01-01 00:00:00", "command": "competition train --check"}))
    winner = start(SLOW_HOLDER, lock, "train", "--exp", "t", "--fold", "0")
    try:
        wait_for(winner, "locked")
        with pytest.raises(locks.Locked) as e:
            with locks.hold(lock, True, "run folder"):
                pass
        msg = str(e.value)
        assert f"PID {winner.pid} since" in msg and "(`competition train --exp t --fold 0`)" in msg, msg
    finally:
        stop(winner)


@pytest.mark.slow
def test_two_trains_started_together_the_loser_names_the_winner(folded):
    """The real race of the test above: two `competition train` processes of one fold, started together."""
    (folded / "runs/t/fold0").mkdir(parents=True)  # so both probe the lock in check_run, as on a resume
    for _ in range(1):
        procs = [start(TRAIN, "train", "--exp", "t", "--fold", "0", cwd=folded) for _ in range(2)]
        try:
            deadline = time.time() + 240
            while time.time() < deadline and all(p.poll() is None for p in procs):
                time.sleep(0.1)
            loser = next(p for p in procs if p.poll() is not None)
            winner = next(p for p in procs if p is not loser)
            err = loser.stderr.read()
            assert loser.returncode == 2, err
            wait_for(winner, "training")
            assert f"PID {winner.pid}" in err and "(`competition train --exp t --fold 0`)" in err, err
            assert "reading" not in err and "no record" not in err
        finally:
            stop(*procs)


def test_readers_are_named_with_their_commands_and_a_killed_holders_record_is_not(folded, capsys):
    rp = paths.run("t", 0)
    rp.root.mkdir(parents=True)
    # What a killed `train` left: its record, of a PID that is gone.
    rp.lock.write_text(json.dumps({"pid": dead_pid(), "host": __import__("socket").gethostname(),
                                   "since": "2026-01-01 00:00:00", "command": "competition train --exp t"}) + "\n")
    r1 = start(HOLDER, rp.lock, "sh", "ensemble", "--name", "blend", "t", cwd=folded)
    r2 = start(HOLDER, rp.lock, "sh", "submit", "--ensemble", "blend", cwd=folded)
    try:
        wait_for(r1, "ready")
        wait_for(r2, "ready")
        assert main(["train", "--exp", "t", "--fold", "0"]) == 2
        err = capsys.readouterr().err
        assert "2 processes reading it" in err, err
        assert f"PID {r1.pid}" in err and "`competition ensemble --name blend t`" in err, err
        assert f"PID {r2.pid}" in err and "`competition submit --ensemble blend`" in err, err
        assert "competition train --exp t`" not in err  # the dead train's record is not a holder
        stop(r2)  # one reader leaves: only the other is named
        assert main(["train", "--exp", "t", "--fold", "0", "--check"]) == 2
        err = capsys.readouterr().err
        assert "1 process reading it" in err and f"PID {r1.pid}" in err and f"PID {r2.pid}" not in err, err
        # A reader killed while another reads: its record stays in the file, but it is not named.
        r3 = start(HOLDER, rp.lock, "sh", "pseudo", "blend", "--name", "p", cwd=folded)
        wait_for(r3, "ready")
        r3.send_signal(signal.SIGKILL)
        r3.wait()
        assert main(["train", "--exp", "t", "--fold", "0", "--check"]) == 2
        err = capsys.readouterr().err
        assert f"PID {r1.pid}" in err and f"PID {r3.pid}" not in err, err
    finally:
        stop(r1, r2)
    assert rp.lock.read_text() == ""  # the last reader emptied the log
    assert main(["train", "--exp", "t", "--fold", "0", "--check"]) == 0


def test_a_reader_refused_by_a_train_names_the_train(folded):
    rp = paths.run("t", 0)
    holder = start(HOLDER, rp.lock, "ex", "oof", "t", cwd=folded)
    try:
        wait_for(holder, "ready")
        with pytest.raises(locks.Locked, match=rf"PID {holder.pid} since .* \(`competition oof t`\)"):
            with locks.hold(rp.lock, False, "run folder"):
                pass
    finally:
        stop(holder)


def test_a_sigkilled_holder_frees_the_lock_and_its_record_is_overwritten(tmp_path):
    lock = tmp_path / "run/.lock"
    holder = start(HOLDER, lock, "ex", "train", "--exp", "t", "--fold", "0")
    wait_for(holder, "ready")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid  # left behind, but not live
    assert locks.holders(lock.read_text()) == []
    with locks.hold(lock, True, "run folder"):
        assert [r["pid"] for r in locks.holders(lock.read_text())] == [os.getpid()]
    assert lock.read_text() == ""


def test_a_reused_pid_is_not_the_holder():
    """A record of this very PID but another start time is another (dead) process's."""
    rec = locks._holder("exclusive")
    assert locks.holders(json.dumps(rec)) == [rec]
    if rec["start"] is not None:
        assert locks.holders(json.dumps({**rec, "start": str(int(rec["start"]) + 1)})) == []
    old = {k: rec[k] for k in ("pid", "host", "since", "command")}  # a record of the previous version
    assert locks.holders(json.dumps(old)) == [old]
