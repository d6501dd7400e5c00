"""Data-parallel training over several processes with ``torch.distributed`` (DDP semantics).

``recloop train --nproc N`` (or ``torchrun --nproc-per-node N -m recloop.train ...``) starts
N ranks.  Each rank holds a full copy of the networks, trains on its own shard of every
global batch, and before each optimiser step the gradients are averaged across ranks (one
all-reduce of a flattened bucket per dtype, as ``DistributedDataParallel`` does), so every
rank applies the same update and the weights stay identical.  The result equals a
single-process run whose batches are the concatenation of the ranks' batches (batch size
``N x batch_size``), to float tolerance, for every algorithm whose loss is a mean over the
batch (``tests/training/test_distributed.py`` checks it).

Why not the ``DistributedDataParallel`` module wrapper: recloop's algorithms step several
networks with several losses per update (actor and critic, policy and behaviour head) and
some look embedding rows up with sparse gradients; the wrapper expects one forward and one
backward per module per step.  The averaging (:func:`recloop.algos.base.average_gradients`)
runs in :func:`recloop.algos.base.optimizer_step`, the single place every algorithm steps
through, whenever a process group of several ranks is active.

Backends: gloo on the CPU (sparse gradients are all-reduced as sparse tensors), NCCL on CUDA
for the gradients with gloo beside it for the loop's few CPU flags (NCCL has no sparse
all-reduce: sparse embedding gradients are refused there with a clear error — turn
``sparse`` off, or use the CPU).  Rank 0 alone evaluates, writes metrics, checkpoints and the
artifact while the others wait; the early-stopping decision is broadcast to them.  A rank
that dies is seen by ``torchrun``, which stops the others and ends the job; a collective
left waiting gives up after ``RECLOOP_DIST_TIMEOUT`` seconds (default 1800, long enough for
rank 0's evaluations on a large catalogue).

For losses that are a mean over a per-rank count that varies (the sequence models average
over the positions of the windows they keep), the update is the mean of the ranks' means,
as with ``DistributedDataParallel``, not exactly the one-process mean.

The last global batch of an epoch is dropped when it cannot be split evenly over the ranks
(fewer than ``N x batch_size`` transitions, a different set each epoch after shuffling):
averaging unequal shards would weight their transitions unequally.  The number dropped is
logged.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recloop.data.batch import TransitionBatch
from recloop.data.sampler import TransitionSampler
from recloop.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0

_CONTEXT: DistContext | None = None


@dataclass(frozen=True, kw_only=True)
class DistContext:
    """Where this process stands in a distributed run."""

    rank: int
    """Global rank, 0 … world_size − 1; rank 0 writes every output."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank on this machine (the CUDA device index with NCCL)."""
    backend: str
    """``gloo``, or ``cpu:gloo,cuda:nccl`` on CUDA."""
    device: str
    """The device this rank trains on (``cpu`` or ``cuda:LOCAL_RANK``)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0, and in any single-process run."""
    return not active() or dist.get_rank() == 0


def launched() -> bool:
    """True when a launcher (torchrun) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> DistContext | None:
    """Join the process group that ``torchrun`` describes in the environment (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); None when not launched that way.

    ``device`` is the configured ``fit.device``: ``cpu`` → gloo; ``cuda``/``cuda:N`` → NCCL
    on ``cuda:LOCAL_RANK``; ``auto`` → NCCL when CUDA is present, else gloo.
    """
    if not launched():
        return None
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    kind = device.split(":")[0]
    use_cuda = kind == "cuda" or (kind == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"fit.device is {device!r} but CUDA is not available on rank {rank}")
    # With CUDA, gloo still carries the few CPU tensors (flags, counts) the loop exchanges.
    backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
    dev = f"cuda:{local}" if use_cuda else "cpu"
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"rank {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA "
                "device(s) here; start at most one process per GPU"
            )
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        timeout = float(os.environ.get("RECLOOP_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        dist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout))
    logger.info("rank %d of %d (%s on %s)", rank, world, backend, dev)
    global _CONTEXT
    _CONTEXT = DistContext(
        rank=rank, world_size=world, local_rank=local, backend=backend, device=dev
    )
    return _CONTEXT


def context() -> DistContext | None:
    """The context :func:`setup` made in this process (None in a single-process run)."""
    return _CONTEXT if active() else None


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (no-op outside one)."""
    global _CONTEXT
    _CONTEXT = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def broadcast_networks(networks: Iterable[nn.Module]) -> None:
    """Give every rank rank 0's parameters and buffers (ranks start from one set of weights
    even where initialisation is not bit-identical across processes)."""
    if not active():
        return
    for net in networks:
        for t in net.state_dict().values():
            dist.broadcast(t, src=0)


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (the early-stopping decision)."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.broadcast(t, src=0)
    return bool(t.item())


def all_sum(value: int) -> int:
    """The sum of an integer over the ranks."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


class ShardedSampler:
    """Rank ``rank``'s share of each global batch of a :class:`TransitionSampler`.

    Global batch g of an epoch is ``N x B`` consecutive rows of the sampler's epoch
    permutation (B = the sampler's batch size, N = world size); rank r takes rows
    ``[g N B + r B, g N B + (r + 1) B)``.  Concatenated over ranks, the batches are those of
    one sampler with batch size N B — which is what makes a distributed run comparable with
    a single-process one.  An incomplete last global batch is dropped (module docstring).
    """

    def __init__(self, sampler: TransitionSampler, *, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.sampler = sampler
        self.rank = rank
        self.world_size = world_size
        self._epoch = 0

    @property
    def n_transitions(self) -> int:
        return self.sampler.n_transitions

    @property
    def global_batch(self) -> int:
        return self.sampler.batch_size * self.world_size

    def __len__(self) -> int:
        """Batches per epoch on each rank (complete global batches only)."""
        return self.sampler.n_transitions // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __iter__(self) -> Iterator[TransitionBatch]:
        epoch = self._epoch
        self._epoch += 1
        packed = self.sampler.epoch_rows(epoch)
        n, gb, b = len(self), self.global_batch, self.sampler.batch_size
        dropped = self.n_transitions - n * gb
        if dropped and self.rank == 0:
            logger.info(
                "epoch %d: %d transitions left out (the last global batch of %d would not "
                "split evenly over %d ranks)",
                epoch + 1,
                dropped,
                gb,
                self.world_size,
            )
        for g in range(n):
            lo = g * gb + self.rank * b
            part = self.sampler.unpack(packed[lo : lo + b])
            yield self.sampler.batch(part.rows)


def describe(ctx: DistContext | None) -> dict[str, Any]:
    """What a run records about its distribution (run.json, results)."""
    if ctx is None:
        return {"world_size": 1}
    return {"world_size": ctx.world_size, "backend": ctx.backend}
