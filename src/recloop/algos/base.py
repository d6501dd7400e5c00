"""The algorithm contract shared by every policy learner.

An algorithm is a config dataclass (hyper-parameters, registered by name in :data:`ALGOS`)
and an :class:`Algo` that owns a serving :class:`~recloop.artifacts.PolicyNet` plus whatever
else it trains (critics, behaviour heads, generators, targets) and its optimisers.
``update(batch)`` performs one gradient step on a :class:`~recloop.data.batch.TransitionBatch`
and returns typed stats; the fit loop in :mod:`recloop.training` does everything else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from recloop.artifacts.heads import HeadConfig
from recloop.artifacts.policy import PolicyNet, PolicySpec
from recloop.config import check, config_from_dict
from recloop.data.batch import TransitionBatch
from recloop.data.dataset import TRAIN, PreparedDataset
from recloop.encoders.base import EncoderConfig
from recloop.errors import ConfigError
from recloop.registry import Registry

if TYPE_CHECKING:
    from recloop.training.recommender import Recommender


@dataclass(frozen=True, kw_only=True)
class AlgoConfig:
    """Hyper-parameters every algorithm has; subclasses add their own."""

    algo: ClassVar[str] = ""
    fit_defaults: ClassVar[Mapping[str, Any]] = {}
    """The fit loop's settings this algorithm was tuned with (e.g. more epochs for the
    sequence models); a run's ``fit:`` section and ``--set fit.*`` still override them."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """State encoder (kind, H, D, sizes)."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """Score head of the serving policy."""
    batch_size: int = 128
    """Transitions per update."""
    lr: float = 1e-3
    """Adam learning rate of the policy."""
    weight_decay: float = 0.0
    """L2 penalty (Adam weight decay)."""
    grad_clip: float | None = None
    """Max global gradient norm per optimiser step; None = no clipping."""
    seed: int = 0
    """Seed for initialisation, sampling and shuffling."""
    pretrained: str | None = None
    """Directory of DSSM embeddings (``recloop pretrain``) to initialise the tables from."""

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(
            self.grad_clip is None or self.grad_clip > 0,
            f"grad_clip must be > 0 or null, got {self.grad_clip}",
        )

    def label(self) -> str:
        """What results tables call a run: the name, plus the variant where a field changes
        what is trained (``td3 (+BC, α=2.5)``)."""
        return self.algo

    def create(self) -> Recommender:
        """An untrained recommender for this config; call ``.fit(dataset)`` on it."""
        from recloop.training.recommender import Recommender

        return Recommender(self)


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """What an algorithm needs to know about the data before it builds its networks."""

    n_users: int
    """Real users (tables have n_users + 1 rows)."""
    n_items: int
    """Real items (tables have n_items + 1 rows)."""
    popularity: np.ndarray  # (N + 1,) float32, train-split interaction counts, 0 at padding
    item_embeddings: Tensor | None = None  # (N + 1, D) pretrained, row 0 zeros
    user_embeddings: Tensor | None = None  # (U + 1, D) pretrained, row 0 zeros

    @staticmethod
    def from_dataset(
        dataset: PreparedDataset,
        *,
        item_embeddings: Tensor | None = None,
        user_embeddings: Tensor | None = None,
    ) -> DatasetSpec:
        train = dataset.item[dataset.split == TRAIN]
        pop = np.bincount(train, minlength=dataset.n_items + 1).astype(np.float32)
        pop[0] = 0.0
        return DatasetSpec(
            n_users=dataset.n_users,
            n_items=dataset.n_items,
            popularity=pop,
            item_embeddings=item_embeddings,
            user_embeddings=user_embeddings,
        )


Scalar = float | Tensor
"""A stat of one update: a float, or a detached 0-d tensor so that a GPU step need not sync."""


@dataclass(frozen=True)
class UpdateStats:
    """Scalars of one update; subclasses add fields (floats or detached 0-d tensors).

    The fit loop averages every field over an epoch; returning tensors instead of calling
    ``.item()`` keeps a CUDA step free of host syncs.
    """

    loss: Scalar
    """The main objective minimised by this step."""

    def to_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}


C = TypeVar("C", bound=AlgoConfig)


class Algo(Generic[C]):
    """Base of every algorithm: builds the serving policy and checkpoints what it trains.

    Subclasses build extra networks and optimisers in ``__init__`` (after ``super().__init__``),
    list them in ``networks()`` / ``optimizers()``, and implement ``update``.
    """

    config_class: ClassVar[type[AlgoConfig]]
    trainable: ClassVar[bool] = True
    """False for algorithms fitted in closed form (popularity): the fit loop skips updates."""

    def __init__(self, cfg: C, spec: DatasetSpec, *, device: torch.device) -> None:
        self.cfg = cfg
        self.spec = spec
        self.device = device
        self.policy = PolicyNet(
            PolicySpec(
                n_users=spec.n_users,
                n_items=spec.n_items,
                encoder=cfg.encoder,
                head=self.head_config(),
            )
        )
        self._load_pretrained()
        self.policy.to(device)
        self.steps = 0
        """Updates done so far; subclasses count them in ``update`` when a schedule (delayed
        actor, target-network interval) depends on it, and checkpoints carry it."""

    def head_config(self) -> HeadConfig:
        """The serving head; algorithms whose actor must be a given head override this."""
        return self.cfg.head

    def _load_pretrained(self) -> None:
        for table, pre, name in (
            (self.policy.item_embedding, self.spec.item_embeddings, "item"),
            (self.policy.user_embedding, self.spec.user_embeddings, "user"),
        ):
            if pre is None or table is None:
                continue
            if tuple(pre.shape) != tuple(table.weight.shape):
                raise ConfigError(
                    f"pretrained {name} embeddings have shape {tuple(pre.shape)}, the policy "
                    f"needs {tuple(table.weight.shape)} (check encoder.embedding_dim and the data)"
                )
            with torch.no_grad():
                table.weight.copy_(pre)

    def update(self, batch: TransitionBatch) -> UpdateStats:
        """One gradient step on ``batch`` (already on ``self.device``)."""
        raise NotImplementedError

    def begin_epoch(self, epoch: int) -> None:
        """Called by the fit loop before each training epoch; ``epoch`` is 0-based from the
        start of the run (a resumed run goes on counting).  Algorithms whose loss follows a
        schedule over epochs override it; the default does nothing."""

    def networks(self) -> dict[str, nn.Module]:
        """Every module whose weights a checkpoint must hold (the policy included)."""
        return {"policy": self.policy}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimiser whose state a checkpoint must hold."""
        return {}

    def fit_closed_form(self, dataset: PreparedDataset) -> None:
        """Closed-form fit for algorithms with ``trainable = False``."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> None:
        for net in self.networks().values():
            net.train(mode)

    def state_dict(self) -> dict[str, Any]:
        return {
            "networks": {k: v.state_dict() for k, v in self.networks().items()},
            "optimizers": {k: v.state_dict() for k, v in self.optimizers().items()},
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, net in self.networks().items():
            net.load_state_dict(state["networks"][k])
        for k, opt in self.optimizers().items():
            opt.load_state_dict(state["optimizers"][k])
        self.steps = int(state.get("steps", 0))


ALGOS: Registry[type[Algo[Any]]] = Registry("algorithm")
"""Algorithm name → class; each class's ``config_class`` gives its config dataclass."""


def run_label(algo: str, config: Mapping[str, Any] | None) -> str:
    """The :meth:`AlgoConfig.label` of a saved run (an artifact manifest's ``algo`` and
    ``config``); the bare name when that config no longer parses (an older recloop's fields)."""
    try:
        cls = ALGOS.get(algo).config_class
        return config_from_dict(cls, config or {}, source=algo).label()
    except ConfigError:
        return algo


def optimizer_step(
    opt: torch.optim.Optimizer | Iterable[torch.optim.Optimizer],
    loss: Tensor,
    *,
    params: Iterable[Tensor] | None = None,
    grad_clip: float | None = None,
) -> None:
    """zero_grad → backward → clip gradient norms to ``grad_clip`` → step.

    ``opt`` may be several optimisers stepped on one loss (e.g. Adam for dense weights and
    RowAdam for embedding tables with sparse gradients).  With ``params`` the global norm
    of those parameters is clipped; without, each param group of each optimiser is clipped
    on its own, so networks trained in one step on a summed loss (a policy and its
    behaviour head) do not scale each other's gradients.  Clipping scales by
    ``min(1, max_norm / norm)`` and so never flips a sign: RecNN's
    ``clip_grad_norm_(p, -1, 1)`` passes max_norm=-1, which multiplies gradients by a
    negative factor.  Sparse gradients are supported.
    """
    opts = [opt] if isinstance(opt, torch.optim.Optimizer) else list(opt)
    for o in opts:
        o.zero_grad(set_to_none=True)
    loss.backward()
    if dist.is_available() and dist.is_initialized():
        # Data-parallel training (recloop.training.distributed): every rank steps on the
        # gradient of the global batch, before clipping, as DistributedDataParallel does.
        average_gradients(p for o in opts for group in o.param_groups for p in group["params"])
    if grad_clip is not None:
        if params is not None:
            clip_grad_norm(list(params), max_norm=grad_clip)
        else:
            for o in opts:
                for group in o.param_groups:
                    clip_grad_norm(group["params"], max_norm=grad_clip)
    for o in opts:
        o.step()


@torch.no_grad()
def average_gradients(params: Iterable[Tensor]) -> None:
    """Average the gradients of ``params`` over the ranks, in place (no-op in one process).

    Dense gradients go in one flattened all-reduce per (device, dtype); sparse ones are
    all-reduced as sparse tensors (gloo).  A parameter that has a gradient on some ranks and
    none on others (a branch one shard took) gets zeros where it had none, so the ranks step
    the same parameters; one with no gradient anywhere stays without one.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    world = dist.get_world_size()
    unique = {id(p): p for p in params if p.requires_grad}
    plist = list(unique.values())
    if not plist:
        return
    # Layout of each gradient on this rank: 0 none, 1 dense, 2 sparse; MAX over the ranks
    # tells every rank which parameters to reduce and how (all ranks must issue the same
    # collectives in the same order, or they pair up wrongly and hang).
    layout = torch.tensor(
        [0 if p.grad is None else 2 if p.grad.is_sparse else 1 for p in plist], dtype=torch.int32
    )
    dist.all_reduce(layout, op=dist.ReduceOp.MAX)
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p, kind in zip(plist, layout.tolist(), strict=True):
        if kind == 0:
            continue
        if p.grad is None:  # another rank's shard reached this parameter, this one's did not
            p.grad = (
                torch.sparse_coo_tensor(
                    torch.zeros((1, 0), dtype=torch.int64, device=p.device),
                    torch.zeros((0, *p.shape[1:]), dtype=p.dtype, device=p.device),
                    p.shape,
                )
                if kind == 2
                else torch.zeros_like(p)
            )
        g = p.grad
        if kind == 2:
            if g.is_cuda:
                raise ConfigError(
                    "sparse embedding gradients cannot be all-reduced on CUDA (NCCL has no "
                    "sparse all-reduce); set the algorithm's sparse option off, or train on "
                    "the CPU with gloo"
                )
            if not g.is_sparse:
                g = p.grad = g.to_sparse()
            dist.all_reduce(g)
            g.mul_(1.0 / world)
        else:
            if g.is_sparse:
                g = p.grad = g.to_dense()
            buckets.setdefault((g.device, g.dtype), []).append(g)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.mul_(1.0 / world)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on any rank of a distributed run (``flag`` itself in one
    process): lets every rank take the same branch before a collective."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@torch.no_grad()
def clip_grad_norm(params: Sequence[Tensor], *, max_norm: float) -> Tensor:
    """Scale the gradients of ``params`` so that their joint L2 norm is at most ``max_norm``.

    Like ``torch.nn.utils.clip_grad_norm_`` but accepts sparse gradients (their norm is the
    norm of the coalesced values).  Returns the norm before clipping (0-d tensor).
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = [(g.coalesce().values() if g.is_sparse else g).detach().pow(2).sum() for g in grads]
    total = torch.stack([n.to(norms[0].device) for n in norms]).sum().sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.device))
    return total


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, *, tau: float) -> None:
    """Polyak averaging θ' ← τθ + (1 − τ)θ' (Lillicrap et al. 2016)."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.lerp_(s, tau)


@dataclass(frozen=True, kw_only=True)
class ParamGroup:
    """Parameters sharing a learning rate and weight decay."""

    params: list[nn.Parameter]
    """The parameters (those with ``requires_grad`` off are dropped)."""
    lr: float
    """Adam learning rate."""
    weight_decay: float = 0.0
    """L2 penalty; not applied to parameters with sparse gradients (RowAdam has none)."""


class RowAdam(torch.optim.Optimizer):
    """Lazy Adam for tables with sparse (row) gradients: only the rows in a gradient move.

    The same update as ``torch.optim.SparseAdam`` (moments and parameters of untouched rows
    stay as they are; bias correction counts every step of the table), written as a handful
    of row gathers and scatters on the coalesced gradient instead of SparseAdam's sparse
    tensor arithmetic, which costs tens of milliseconds a step on a 100k-row table.  A dense
    gradient gets the plain Adam update.
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr = group["lr"]
            b1, b2 = group["betas"]
            eps = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                bc1 = 1.0 - b1**step
                bc2 = 1.0 - b2**step
                g = p.grad
                if not g.is_sparse:
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    p.addcdiv_(m, (v / bc2).sqrt_().add_(eps), value=-lr / bc1)
                    continue
                g = g.coalesce()
                rows = g.indices()[0]
                values = g.values()
                m_rows = m.index_select(0, rows).mul_(b1).add_(values, alpha=1 - b1)
                v_rows = v.index_select(0, rows).mul_(b2).addcmul_(values, values, value=1 - b2)
                m.index_copy_(0, rows, m_rows)
                v.index_copy_(0, rows, v_rows)
                # Rows are unique after coalescing, so gather-update-scatter is exact, and
                # much cheaper than index_add_ on the CPU.
                p_rows = p.index_select(0, rows)
                p_rows.addcdiv_(m_rows, v_rows.div_(bc2).sqrt_().add_(eps), value=-lr / bc1)
                p.index_copy_(0, rows, p_rows)


def build_adam(
    groups: Sequence[ParamGroup], *, sparse: Iterable[Tensor] = ()
) -> dict[str, torch.optim.Optimizer]:
    """Adam over the dense parameters, :class:`RowAdam` (lazy Adam) over those in ``sparse``.

    Embedding tables looked up with ``sparse=True`` get sparse gradients; a lazy Adam then
    touches only the rows a batch used, which is what makes a 100k-item catalogue cheap per
    step (dense Adam would read and write every row).  Dense Adam uses the fused kernel (one
    pass over each tensor; on the CPU about twice as fast as ``foreach`` at these sizes).
    Returns ``{"adam": ..., "row_adam": ...}`` without the entries that would be empty,
    ready for :meth:`Algo.optimizers`.  Weight decay does not apply to the sparse tables.
    """
    sparse_ids = {id(p) for p in sparse}
    dense_groups: list[dict[str, Any]] = []
    sparse_groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for g in groups:
        params = [p for p in g.params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        dense = [p for p in params if id(p) not in sparse_ids]
        sp = [p for p in params if id(p) in sparse_ids]
        if dense:
            dense_groups.append({"params": dense, "lr": g.lr, "weight_decay": g.weight_decay})
        if sp:
            sparse_groups.append({"params": sp, "lr": g.lr})
    out: dict[str, torch.optim.Optimizer] = {}
    if dense_groups:
        out["adam"] = torch.optim.Adam(dense_groups, fused=True)
    if sparse_groups:
        out["row_adam"] = RowAdam(sparse_groups)
    return out
