"""Read back what an offline W&B run recorded, for the tests (no server, no sync).

There is no public reader: W&B 0.2x dropped its Python one (``wandb.sdk.internal.datastore``) and
``wandb.Api`` needs a server, so this reads the ``run-<id>.wandb`` transaction log by hand. It relies on
two things W&B does not promise, both pinned below: the file layout (a 7-byte ``:W&B`` header, then
LevelDB-log records: 32 KiB blocks, 7-byte record headers, FULL/FIRST/MIDDLE/LAST fragments) and the
private protobuf module ``wandb.proto.wandb_internal_pb2`` (``Record`` and the fields read below).
Checked with wandb 0.19.9, 0.19.10 and 0.31.0 (the versions between are assumed to agree); on another
version, check those two things and widen ``CHECKED``.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

CHECKED = ((0, 19, 9), (0, 31, 99))  # inclusive range of wandb versions this reader was checked with


def _version() -> tuple[int, ...]:
    import wandb
    return tuple(int(p) for p in wandb.__version__.split(".")[:3] if p.isdigit())


def read_offline_run(run_dir: Path | str) -> dict:
    """{"run": {project, entity, group, job_type, name, id, tags}, "config", "history": [row, ...],
    "summary", "artifacts": [{type, name, digest, files, metadata, used, staged}, ...], "finished"}.

    ``used``: the record declares the artifact as an input (``use_after_commit``), else an output;
    ``staged``: artifact path -> the local file ``wandb sync`` will upload. W&B's service writes the
    file behind the run, so a run that has just finished may read ``finished: False`` for a moment.
    """
    assert CHECKED[0] <= _version() <= CHECKED[1], (
        f"wandb {_version()} is outside {CHECKED}: check this reader against its .wandb format, then widen CHECKED")
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(run_dir).glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no .wandb file (not a W&B run folder)")
    data = files[0].read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{files[0]}: not a W&B transaction log")
    out = {"run": {}, "config": {}, "history": [], "summary": {}, "artifacts": [], "finished": False}

    def put(d: dict, items) -> None:
        for i in items:  # a nested key (a table's or an image's fields) becomes nested dicts
            *parents, last = list(i.nested_key) or [i.key]
            cur = d
            for k in parents:
                cur = cur.setdefault(k, {})
            cur[last] = json.loads(i.value_json) if i.value_json else None

    pos, block, frag = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (crc, n, kind) == (0, 0, 0):  # block trailer / zero padding
            pos += left
            continue
        if pos + 7 + n > len(data):
            break  # a record still being written
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        frag = chunk if kind in (1, 2) else frag + chunk
        if kind not in (1, 4):
            continue
        rec = pb.Record()
        rec.ParseFromString(frag)
        which = rec.WhichOneof("record_type")
        if which == "run":
            r = rec.run
            out["run"] = {"project": r.project, "entity": r.entity, "group": r.run_group, "job_type": r.job_type,
                          "name": r.display_name, "id": r.run_id, "tags": list(r.tags)}
            put(out["config"], r.config.update)
        elif which == "config":
            put(out["config"], rec.config.update)
        elif which == "history":
            out["history"].append({})
            put(out["history"][-1], rec.history.item)
        elif which == "summary":
            put(out["summary"], rec.summary.update)
        elif which == "artifact":
            a = rec.artifact
            out["artifacts"].append({
                "type": a.type, "name": a.name, "digest": a.digest, "used": a.use_after_commit,
                "metadata": json.loads(a.metadata) if a.metadata else {},
                "files": sorted(e.path for e in a.manifest.contents),
                "staged": {e.path: e.local_path for e in a.manifest.contents}})
        elif which == "exit":
            out["finished"] = True
    out["config"].pop("_wandb", None)
    return out
