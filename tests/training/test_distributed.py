"""Data-parallel training (recloop.training.distributed): two CPU ranks under torchrun give
the weights of one process over the same global batches; a killed rank fails the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from recloop.data.dataset import PreparedDataset
from recloop.data.sampler import TransitionSampler
from recloop.training.distributed import ShardedSampler

pytestmark = pytest.mark.slow

ENV = {**os.environ, "RECLOOP_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def _train(data: Path, out: Path, *, batch: int, nproc: int, algo: str, steps: int) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "recloop.cli",
        "--no-progress",
        "--threads",
        "1",
        "train",
        "--algo",
        algo,
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "3",
        "--device",
        "cpu",
        "--nproc",
        str(nproc),
        "--set",
        f"batch_size={batch}",
        "--set",
        f"fit.max_steps={steps}",
        "--set",
        "fit.final_eval=false",
        "--set",
        "fit.eval_every=0",
        "--set",
        "fit.restore_best=false",
        "--set",
        "encoder.kind=mean",
        "--set",
        "encoder.history=3",
        "--set",
        "encoder.dropout=0",  # dropout draws differ between ranks and one process
    ]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "artifact" / "weights.safetensors"


@pytest.mark.parametrize("algo", ["supervised", "dqn"])
def test_two_ranks_equal_one_process_over_the_same_global_batches(
    tmp_path: Path, algo: str, walk: Callable[..., PreparedDataset]
) -> None:
    data = walk(n_users=40, n_items=30, length=12).save(tmp_path / "data")
    # 40 users x 9 train transitions = 360 = 11 global batches of 32 (+ 8 left out).
    one = _train(data, tmp_path / "one", batch=32, nproc=1, algo=algo, steps=7)
    two = _train(data, tmp_path / "two", batch=16, nproc=2, algo=algo, steps=7)
    a, b = load_file(one), load_file(two)
    assert a.keys() == b.keys()
    moved = load_file(_train(data, tmp_path / "few", batch=32, nproc=1, algo=algo, steps=2))
    assert any(not torch.equal(a[k], moved[k]) for k in a)  # 7 steps differ from 2
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_root_options_are_kept_for_the_ranks() -> None:
    from recloop.cli import main
    from recloop.cli.app import ROOT_OPTIONS

    assert main(["--threads", "1", "--no-progress", "-q", "version"]) == 0
    assert ROOT_OPTIONS == ["--quiet", "--no-progress", "--threads", "1"]


def test_sharded_sampler_splits_each_global_batch(walk: Callable[..., PreparedDataset]) -> None:
    ds = walk(n_users=10, n_items=12, length=8)
    base = TransitionSampler(ds, history=3, batch_size=4, seed=3)
    whole = TransitionSampler(ds, history=3, batch_size=8, seed=3)
    shards = [ShardedSampler(base, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == base.n_transitions // 8
    for s in shards:
        s.set_epoch(1)
    whole.set_epoch(1)
    for g, (b0, b1, w) in enumerate(zip(*shards, whole, strict=False)):
        assert torch.equal(torch.cat([b0.action, b1.action]), w.action), g
        assert torch.equal(torch.cat([b0.history, b1.history]), w.history), g
    with pytest.raises(ValueError, match="rank must be in"):
        ShardedSampler(base, rank=2, world_size=2)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        out += [int(k) for k in kids]
    return out


def test_a_killed_rank_fails_the_job_with_a_message(
    tmp_path: Path, walk: Callable[..., PreparedDataset]
) -> None:
    data = walk(n_users=200, n_items=40, length=30).save(tmp_path / "data")
    cmd = [
        sys.executable,
        "-m",
        "recloop.cli",
        "--no-progress",
        "train",
        "--algo",
        "supervised",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1000",
        "--device",
        "cpu",
        "--nproc",
        "2",
        "--set",
        "batch_size=8",
    ]
    env = {**ENV, "RECLOOP_DIST_TIMEOUT": "30"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Wait for the first epoch's checkpoint: both ranks are training by then.
        deadline = time.monotonic() + 180
        while not (tmp_path / "run" / "checkpoint" / "last.pt").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 180 s"
            time.sleep(0.5)
        launcher = _children(proc.pid)
        ranks = [r for p in launcher for r in _children(p)]
        assert len(ranks) == 2, (launcher, ranks)
        os.kill(max(ranks), signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2
    assert "error: distributed training failed" in err
    assert "SIGKILL" in err or "Signal 9" in err or "exitcode" in err
    np.testing.assert_equal((tmp_path / "run" / "checkpoint" / "last.pt").exists(), True)


def _average_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from recloop.algos.base import average_gradients

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dense = torch.nn.Parameter(torch.zeros(3))
    dense.grad = torch.full((3,), float(rank + 1))  # 1 and 2 → 1.5
    table = torch.nn.Parameter(torch.zeros(4, 2))
    rows = torch.tensor([[rank, 3]])  # rank 0: rows 0, 3; rank 1: rows 1, 3
    table.grad = torch.sparse_coo_tensor(rows, torch.ones(2, 2) * (rank + 1), (4, 2))
    only_rank0 = torch.nn.Parameter(torch.zeros(2))
    if rank == 0:
        only_rank0.grad = torch.ones(2) * 4.0  # rank 1 has none → zeros there → mean 2
    nowhere = torch.nn.Parameter(torch.zeros(2))
    sparse_rank1 = torch.nn.Parameter(torch.zeros(3, 2))
    if rank == 1:  # a sparse gradient on one rank only: rank 0 joins with an empty one
        sparse_rank1.grad = torch.sparse_coo_tensor(torch.tensor([[2]]), torch.ones(1, 2), (3, 2))
    average_gradients([dense, table, only_rank0, nowhere, sparse_rank1])
    torch.save(
        {
            "dense": dense.grad,
            "table": table.grad.coalesce().to_dense(),
            "only_rank0": only_rank0.grad,
            "nowhere": nowhere.grad,
            "sparse_rank1": sparse_rank1.grad.coalesce().to_dense(),
        },
        f"{out}.{rank}",
    )
    dist.destroy_process_group()


def test_average_gradients_dense_sparse_and_missing(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads")
    mp.start_processes(_average_worker, args=(port, out), nprocs=2, start_method="spawn")
    table = torch.tensor([[0.5, 0.5], [1.0, 1.0], [0.0, 0.0], [1.5, 1.5]])
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        torch.testing.assert_close(got["dense"], torch.full((3,), 1.5))
        torch.testing.assert_close(got["table"], table)
        torch.testing.assert_close(got["only_rank0"], torch.full((2,), 2.0))
        assert got["nowhere"] is None
        torch.testing.assert_close(
            got["sparse_rank1"], torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
        )
