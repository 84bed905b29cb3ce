"""Training on several machines: the Makefile's NODES/NODE_RANK/MASTER_ADDR/MASTER_PORT -> torchrun's
static rendezvous, and a real 2-node x 1-process job on this machine's loopback (gloo): two torchrun
launches, node_rank 0 and 1, each in its own copy of the project, as on two machines that share no disk."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
EXP = {"competition": "tiny-hands", "model": {"arch": "Unet", "encoder": "tu-test_resnet",
                                              "decoder_channels": [16, 16, 16, 16, 16]},
       "optimizer": {"name": "adamw", "lr": 0.003}, "scheduler": {"name": "cosine", "warmup_epochs": 0},
       "data": {"input_size": 64, "batch_size": 2, "workers": 0},
       "train": {"epochs": 1, "progress": False, "seed": 0}, "tracking": {"wandb": False}}

# torchrun runs this instead of `-m competition`: the same CLI, except that each rank also saves the
# flattened weights that training's end-of-run check compares, so the test can compare the two nodes.
SPY = '''
import sys
import torch
from competition import cli
from competition.train import distributed as dd

out, check = sys.argv.pop(1), dd.same_on_all_ranks

def spy(t, d):
    torch.save(t.detach().cpu().clone(), f"{out}/rank{d.rank}.pt")
    return check(t, d)

dd.same_on_all_ranks = spy
raise SystemExit(cli.main(sys.argv[1:]))
'''


def make_line(*assignments: str, target: str = "train") -> subprocess.CompletedProcess:
    """`make -n` (print, run nothing) of a training target; stdout's last line is the launch command."""
    return subprocess.run(["make", "-n", "-s", "-C", str(REPO), target, *assignments],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_maps_nodes_to_torchrun_rendezvous():
    r = make_line("NODES=2", "NODE_RANK=1", "MASTER_ADDR=10.1.2.3", "MASTER_PORT=29400", "GPUS=4", "EXP=e", "FOLD=2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].split() == [
        ".venv/bin/torchrun", "--nnodes=2", "--node_rank=1", "--master_port=29400", "--master_addr=10.1.2.3",
        "--nproc_per_node=4", "-m", "competition", "train", "--exp", "e", "--fold", "2"]
    last = make_line("NODES=3", "MASTER_ADDR=head", target="train-all").stdout.strip().splitlines()[-1]
    assert "--nnodes=3 --node_rank=0 --master_port=29500 --master_addr=head --nproc_per_node=1 " in last
    assert "--fold all" in last and "--standalone" not in last
    # One machine: --standalone for several GPUs, no torchrun for one.
    last = make_line("GPUS=2").stdout.strip().splitlines()[-1]
    assert "torchrun --standalone --nproc_per_node=2 -m competition train" in last and "--nnodes" not in last
    assert make_line().stdout.strip().splitlines()[-1].startswith(".venv/bin/python -m competition train")
    r = make_line("NODES=2")
    assert r.returncode != 0 and "NODES=2 needs MASTER_ADDR=<node 0's address>" in r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def launch_two_nodes(node0: Path, node1: Path, spy: Path, out: Path, *args: str) -> list[subprocess.CompletedProcess]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([str(TORCHRUN), "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
                               "--master_addr=127.0.0.1", f"--master_port={port}", str(spy), str(out),
                               "train", "--exp", "ddp", "--fold", "0", *args],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, cwd in ((0, node0), (1, node1))]
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


@pytest.mark.slow
def test_two_nodes_on_loopback_train_identical_weights_and_only_node0_writes(tiny_project, tmp_path_factory):
    from competition.cli import main
    node0 = tiny_project
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    (node0 / "configs/experiments/ddp.yaml").write_text(yaml.safe_dump(EXP))
    node1 = tmp_path_factory.mktemp("node1") / "project"  # the second machine's copy: configs, folds, data
    shutil.copytree(node0, node1)
    before = files(node1)
    spy, out = node1.parent / "spy.py", node1.parent / "weights"
    spy.write_text(SPY)
    out.mkdir()

    r0, r1 = launch_two_nodes(node0, node1, spy, out)
    assert r0.returncode == 0 and r1.returncode == 0, (r0.stderr[-3000:], r1.stderr[-3000:])
    assert "weights identical on all 2 ranks" in r0.stdout
    assert r0.stdout.count("epoch   1/1") == 1 and "epoch" not in r1.stdout  # rank 0 logs
    w0, w1 = torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)
    assert w0.numel() > 10_000 and torch.equal(w0, w1)  # the same weights on both nodes, bit for bit
    run = node0 / "runs/ddp/fold0"
    assert {"best.pt", "last.pt", "metrics.json", "history.csv", "config.yaml"} <= {p.name for p in run.iterdir()}
    assert files(node1) == before  # rank 1 wrote nothing: no runs/, no lock, no checkpoint

    # Resuming needs every node to see node 0's last.pt; here node 1 cannot: one clear error, no hang.
    r0, r1 = launch_two_nodes(node0, node1, spy, out, "--set", "train.epochs=2")
    assert r0.returncode != 0 and r1.returncode != 0
    msg = "DDP ranks disagree on the epoch to start from (last.pt): [1, 0] (by rank)"
    assert msg in r0.stderr and msg in r1.stderr
    assert files(node1) == before
