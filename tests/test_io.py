"""competition.io: atomic writes (modes, failures, concurrency), stale temp cleanup, hashes, text reading."""
import hashlib
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from competition.io import (
    ReadError,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    clean_stale_temps,
    default_mode,
    file_hash,
    is_temp_name,
    read_text,
)

REPO = Path(__file__).resolve().parent.parent


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_text_is_written_byte_for_byte(tmp_path):
    target = tmp_path / "sub" / "a.csv"  # missing folders are created
    atomic_write_text(target, "id,x\r\nä,1\n")
    assert target.read_bytes() == "id,x\r\nä,1\n".encode()
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01" and leftovers(target.parent) == []


@pytest.mark.parametrize("mask, want", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_file_mode_follows_the_umask(tmp_path, umask, mask, want):
    umask(mask)
    atomic_write_text(tmp_path / "a.txt", "x")
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"y")
    assert mode(tmp_path / "a.txt") == want and mode(tmp_path / "b.bin") == want  # not mkstemp's 0600


def test_rewritten_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "run.sh"
    target.write_text("old")
    target.chmod(0o750)
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and mode(target) == 0o750


def test_temp_is_beside_the_target_and_named_by_our_pattern(tmp_path):
    target = tmp_path / "folds.csv"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.exists() and not target.exists()
        assert re.fullmatch(r"\.folds\.csv\.[a-z0-9_]{8}\.tmp", tmp.name) and is_temp_name(tmp.name)
        tmp.write_text("a")
    assert target.read_text() == "a" and not tmp.exists()


def test_failure_leaves_no_temp_and_no_target(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_failure_leaves_an_existing_target_untouched(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("before")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "before" and leftovers(tmp_path) == []


def test_concurrent_threads_never_collide(tmp_path):
    target = tmp_path / "shared.txt"
    payloads = [f"{k}:" + str(k) * 20_000 for k in range(8)]
    start, errors = threading.Barrier(len(payloads)), []

    def writer(text: str) -> None:
        start.wait()
        try:
            for _ in range(25):
                atomic_write_text(target, text)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_text() in payloads  # always one whole write, never a mix
    assert leftovers(tmp_path) == []


def test_concurrent_processes_never_collide(tmp_path):
    target = tmp_path / "shared.txt"
    code = ("import sys; from competition.io import atomic_write_text\n"
            "for _ in range(150): atomic_write_text(sys.argv[1], sys.argv[2] * 5000)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target), c], cwd=REPO, stderr=subprocess.PIPE)
             for c in "ab"]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert target.read_text() in ("a" * 5000, "b" * 5000)
    assert leftovers(tmp_path) == []


def test_clean_stale_temps_removes_only_our_old_temps(tmp_path):
    old = time.time() - 3600

    def make(name: str, age: float | None = old, folder: bool = False) -> Path:
        p = tmp_path / name
        p.mkdir() if folder else p.write_text("x")
        if age is not None:
            os.utime(p, (age, age))
        return p

    stale = make(".folds.csv.ab12cd_9.tmp")
    fresh = make(".folds.csv.zz99yy00.tmp", age=None)  # a writer may still be busy with it
    keep = [make("folds.csv.ab12cd_9.tmp"),  # no leading dot: not ours
            make(".folds.csv.tmp"),  # no random part
            make(".folds.csv.ABCDEFGH.tmp"),  # tempfile never uses capitals
            make("notes.tmp"), make(".hidden"), make("data.csv"),
            make(".dir.ab12cd34.tmp", folder=True)]  # folders are never touched
    link = tmp_path / ".link.ab12cd34.tmp"
    link.symlink_to(tmp_path / "data.csv")
    os.utime(link, (old, old), follow_symlinks=False)
    removed = clean_stale_temps(tmp_path, max_age_s=600)
    assert removed == [stale] and not stale.exists()
    assert fresh.exists() and all(p.exists() for p in keep) and link.is_symlink()
    assert clean_stale_temps(tmp_path / "missing", 0) == []


def test_a_killed_writer_leaves_a_temp_that_cleanup_recognises(tmp_path):
    target = tmp_path / "a.csv"
    with pytest.raises(SystemExit):
        with atomic_path(target) as tmp:
            tmp.write_text("x")
            name = tmp.name
            os.link(tmp, tmp_path / "copy")  # survives the cleanup below, like a temp a SIGKILL leaves
            raise SystemExit
    os.replace(tmp_path / "copy", tmp_path / name)
    assert clean_stale_temps(tmp_path, max_age_s=-1) == [tmp_path / name]


def test_file_hash_is_a_streamed_sha256_prefix(tmp_path):
    path = tmp_path / "big.bin"
    data = os.urandom(3 * (1 << 20) + 123)  # several read chunks
    path.write_bytes(data)
    full = hashlib.sha256(data).hexdigest()
    assert file_hash(path) == full[:16] and file_hash(path, 64) == full and file_hash(path, 8) == full[:8]
    with pytest.raises(ValueError, match="between 1 and 64"):
        file_hash(path, 0)


def test_read_text_names_the_file_and_the_problem(tmp_path):
    good = tmp_path / "good.json"
    good.write_bytes(b"\xef\xbb\xbf{\"a\": 1}")  # a BOM, as Excel and Notepad write
    assert read_text(good) == '{"a": 1}'
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("id,name\n1,Müller\n".encode("latin-1"))
    with pytest.raises(ReadError, match=r"latin1\.csv: train CSV is not UTF-8 text \(undecodable byte 0xfc on "
                                        r"line 2\); save it as UTF-8"):
        read_text(bad, "train CSV")
    with pytest.raises(ReadError, match=r"nope\.csv: folds file not found"):
        read_text(tmp_path / "nope.csv", "folds file")
    with pytest.raises(ReadError, match="is a folder"):
        read_text(tmp_path)
    assert issubclass(ReadError, ValueError)


def test_the_working_directory_is_read_in_paths_only():
    """``paths.project()`` is the one place that says the project is the current directory."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "competition"
    cwd = re.compile(r"Path\.cwd\(\)|os\.getcwd\(\)")
    found = [f"{p.relative_to(root)}:{n}" for p in root.rglob("*.py") if p.name != "paths.py"
             for n, line in enumerate(p.read_text().splitlines(), 1) if cwd.search(line)]
    assert not found, f"use competition.paths.project(): {found}"


def test_atomic_dir_publishes_whole_or_leaves_the_old_folder(tmp_path):
    out = tmp_path / "store"
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".store.") and not out.exists()
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1" and mode(out) == default_mode(directory=True)
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("killed half-way")
    assert (out / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    with atomic_dir(out) as tmp:  # a rewrite replaces the folder whole: no file of the old one stays
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_atomic_dir_without_replace_keeps_the_first_writers_folder(tmp_path):
    out = tmp_path / "cache"
    with atomic_dir(out, replace=False) as tmp:
        (tmp / "x").write_text("first")
    with pytest.raises(FileExistsError):
        with atomic_dir(out, replace=False) as tmp:
            (tmp / "x").write_text("second")
    assert (out / "x").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
