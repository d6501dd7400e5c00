"""Next-item cross-entropy over every position of a window, as GRU4Rec and SASRec train.

:mod:`~recloop.algos.supervised` scores one transition per window: the encoder reads the
last H items and predicts the next one.  Sequential recommenders instead read a window of
H items once and predict, at every position t, item t + 1 from items <= t (Hidasi et al.
2016; Kang & McAuley 2018): H predictions for the price of one encoder pass.

The fit loop hands every algorithm shuffled :class:`~recloop.data.batch.TransitionBatch`
es.  A transition at event row p already carries the window this needs: ``history`` holds
rows p - H .. p - 1 (the inputs) and ``next_history`` rows p - H + 1 .. p (the targets, one
step ahead), left-padded at the user's start.  Training every transition's window would see
each event H times an epoch, so :func:`select_windows` keeps a window with probability
1 / ``window_stride``: about one pass over the events per epoch, each epoch on different
windows.  ``keep_done`` also keeps every window that ends a session or the user's train
events (SASRec's one window per user and epoch); on MovieLens-100K that trained 2.4x the
positions per epoch and overfitted sooner (docs/tuning_seqrec.md), so it is off by default.

Only train events enter training: the sampler draws transitions from the train split, and
every split protocol (ratio, loo, time) gives each user a chronological train prefix, so
the rows of a window ending at a train event are train events too.

Serving is unchanged: the state is the encoder over the last H items and the score the
head's logits, so evaluation, artifacts and ONNX export treat these like any algorithm.
:func:`position_states` gives the state at every position: from one pass of the recurrent
layer (gru, lstm) or of the transformer blocks (attention); any other encoder is run on
each prefix of the window, which is exact but H times the work.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from recloop.algos.base import (
    Algo,
    AlgoConfig,
    DatasetSpec,
    ParamGroup,
    Scalar,
    UpdateStats,
    any_rank,
    build_adam,
    optimizer_step,
)
from recloop.artifacts.heads import HeadConfig
from recloop.config import check
from recloop.data.batch import PAD_ID, TransitionBatch
from recloop.encoders.attention import AttentionEncoder
from recloop.encoders.base import StateEncoder
from recloop.encoders.common import compact_left
from recloop.encoders.gru import GRUEncoder

SEQUENCE_HEADS = ("linear", "dot")
"""Heads whose logits are trained by the softmax (the others have nothing to train)."""


def _tied_head() -> HeadConfig:
    return HeadConfig(kind="dot", bound_action=False)


@dataclass(frozen=True, kw_only=True)
class SequenceConfig(AlgoConfig):
    """Cross-entropy of the next item at every position of sampled windows of H items."""

    # The validation search (docs/tuning_seqrec.md) ran up to 40 epochs with patience 5;
    # the best epochs were 10-23, past the fit loop's default of 8.
    fit_defaults: ClassVar[Mapping[str, Any]] = {"epochs": 40, "patience": 5}

    head: HeadConfig = field(default_factory=_tied_head)
    """Score head; by default a linear map to D scored by dot product with the item table
    (tied input and output embeddings, as RecBole's GRU4Rec and SASRec)."""
    batch_size: int = 2048
    """Transitions the sampler draws per update; the windows ending at about batch_size /
    window_stride of them are trained, so up to batch_size positions (RecBole: 2048)."""
    window_stride: int | None = None
    """A window is trained with probability 1 / window_stride; None = encoder.history,
    about one pass over the events per epoch."""
    embedding_dropout: float = 0.0
    """Dropout on the item vectors the encoder reads, in training (GRU4Rec's dropout_prob)."""
    init_std: float | None = 0.02
    """Std of the normal initialisation of the item table (RecBole's initializer_range);
    None keeps torch's N(0, 1).  A pretrained table is kept as it is."""
    keep_done: bool = False
    """Also train every window that ends a session or the user's train events."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.head.kind in SEQUENCE_HEADS,
            f"head.kind must be one of {list(SEQUENCE_HEADS)}, got {self.head.kind!r}",
        )
        check(
            self.window_stride is None or self.window_stride >= 1,
            f"window_stride must be >= 1 or null, got {self.window_stride}",
        )
        check(
            self.init_std is None or self.init_std > 0,
            f"init_std must be > 0 or null, got {self.init_std}",
        )
        check(
            0.0 <= self.embedding_dropout < 1.0,
            f"embedding_dropout must be in [0, 1), got {self.embedding_dropout}",
        )

    @property
    def stride(self) -> int:
        """The window stride in effect."""
        return self.window_stride if self.window_stride is not None else self.encoder.history


@dataclass(frozen=True)
class SequenceStats(UpdateStats):
    """Mean next-item cross-entropy over the trained positions."""

    windows: Scalar
    """Windows trained in this update."""
    positions: Scalar
    """Positions (predictions) trained in this update."""


def select_windows(done: Tensor, nonempty: Tensor, *, rate: float, uniform: Tensor) -> Tensor:
    """(B,) bool: the windows to train: ``done`` ones, and the others where ``uniform < rate``.

    Only ``nonempty`` windows (at least one real input item) qualify; ``uniform`` (B,) holds
    U(0, 1) draws.  When none is selected the first non-empty window is (batches are
    shuffled, so that is a uniform pick); all False only when every window is empty.
    """
    keep = (done | (uniform < rate)) & nonempty
    if not bool(keep.any()):
        keep = nonempty & (nonempty.long().cumsum(dim=0) == 1)
    return keep


def prefix_histories(history: Tensor, history_reward: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every non-padding position's prefix, as its own left-padded history.

    (B, H) int64 items and (B, H) rewards → (M, H) prefix items, (M, H) prefix rewards and
    the (M,) row of each, M = non-padding positions in row-major order.  The prefix ending
    at position j is row b's positions 0 .. j shifted right by H - 1 - j, PAD_ID (reward 0)
    on the left.
    """
    h = history.shape[1]
    rows, cols = (history != PAD_ID).nonzero(as_tuple=True)  # (M,), (M,)
    src = cols.unsqueeze(1) - (h - 1) + torch.arange(h, device=history.device)  # (M, H)
    before = src < 0
    at = (rows.unsqueeze(1), src.clamp(min=0))
    return (
        history[at].masked_fill(before, PAD_ID),
        history_reward[at].masked_fill(before, 0.0),
        rows,
    )


def _recurrent_outputs(enc: GRUEncoder, x: Tensor) -> Tensor:
    """Top-layer outputs at every position of compacted inputs (B, H, F) → (B, H, hidden)."""
    h0 = x.new_zeros(enc.cfg.num_layers, x.shape[0], enc.cfg.hidden_dim)
    state = (h0, h0) if isinstance(enc.rnn, nn.LSTM) else h0
    out, _ = enc.rnn(x, state)
    return out


def _attention_outputs(enc: AttentionEncoder, x: Tensor, length: Tensor) -> Tensor:
    """:meth:`AttentionEncoder.forward` before it keeps the last position: (B, H, hidden).

    Positions count back from each row's last item, as in the encoder (and as SASRec's
    left-padded windows), so position t's output sees its items with the offsets of the
    whole window; at the last position this is exactly the serving state.
    """
    h = x.shape[1]
    t = torch.arange(h, device=x.device)
    real = t.unsqueeze(0) < length.unsqueeze(1)  # (B, H)
    back = (length.unsqueeze(1) - 1 - t.unsqueeze(0)).clamp(min=0)
    z = (enc.proj(x) + enc.position(back)) * real.unsqueeze(-1).to(x.dtype)
    z = enc.dropout(z)
    causal = t.unsqueeze(1) >= t.unsqueeze(0)
    allowed = (causal.unsqueeze(0) & real.unsqueeze(1)).unsqueeze(1)  # (B, 1, H, H)
    for block in enc.blocks:
        z = block(z, allowed)
    return enc.norm(z)


def position_states(
    encoder: StateEncoder, user: Tensor, history: Tensor, history_reward: Tensor
) -> Tensor:
    """The state after each non-padding position of each row: (M, S), row-major.

    (B,), (B, H), (B, H) → the state the encoder gives for the prefix ending at each real
    position, M = number of real positions.  The recurrent encoders' states equal the
    encoder on each prefix; the attention encoder's equal it at the last position of a row
    (see :func:`_attention_outputs`); other encoders are run on every prefix.
    """
    valid = history != PAD_ID
    rows = valid.nonzero(as_tuple=True)[0]
    if isinstance(encoder, GRUEncoder | AttentionEncoder):
        seq = compact_left(history, encoder.inputs(history, history_reward))
        if isinstance(encoder, GRUEncoder):
            out = _recurrent_outputs(encoder, seq.x)
        else:
            out = _attention_outputs(encoder, seq.x, seq.length)
        # Real item j of a row sits at compacted position (number of real items <= j) - 1.
        dest = valid.long().cumsum(dim=1) - 1  # (B, H)
        states = out[rows, dest[valid]]  # (M, hidden)
        return encoder.finish(states, user[rows])
    prefix, prefix_reward, rows = prefix_histories(history, history_reward)
    return encoder(user[rows], prefix, prefix_reward)


@contextmanager
def embedding_dropout(table: nn.Embedding, p: float) -> Iterator[None]:
    """Within the block, every lookup in ``table`` comes back with dropout ``p`` applied.

    A forward hook reaches the item vectors inside any encoder without changing it; the
    heads read ``table.weight`` directly, so output scores are not dropped out.
    """
    if p <= 0.0:
        yield
        return

    def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        return F.dropout(out, p=p, training=True)

    handle = table.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class SequenceAlgo(Algo[Any]):
    """Minimise −Σ_t log π(item_{t+1} | items ≤ t) over the positions of sampled windows."""

    def __init__(self, cfg: SequenceConfig, spec: DatasetSpec, *, device: torch.device) -> None:
        super().__init__(cfg, spec, device=device)
        self.seq_cfg = cfg
        table = self.policy.item_embedding
        if cfg.init_std is not None and spec.item_embeddings is None:
            # With logits a dot product against this same table, N(0, 1) rows start the
            # softmax far from uniform (logits of size ~D); small rows start it near uniform.
            with torch.no_grad():
                table.weight.normal_(0.0, cfg.init_std)
                table.weight[PAD_ID].zero_()
        self.opt = build_adam(
            [
                ParamGroup(
                    params=list(self.policy.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay
                )
            ]
        )

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self.opt

    def update(self, batch: TransitionBatch) -> SequenceStats:
        cfg = self.seq_cfg
        uniform = torch.rand(batch.done.shape, device=batch.done.device)
        nonempty = batch.history[:, -1] != PAD_ID  # left-padded: empty iff the last is pad
        done = batch.done if cfg.keep_done else torch.zeros_like(batch.done)
        keep = select_windows(done, nonempty, rate=1.0 / cfg.stride, uniform=uniform)
        kept = bool(keep.any())
        if not any_rank(kept):  # no window anywhere: no step (in one process as in several)
            zero = torch.zeros((), device=batch.done.device)
            return SequenceStats(loss=zero, windows=0.0, positions=0.0)
        if not kept:
            # Distributed only: other ranks step, so this one joins with a zero gradient to
            # keep the collectives paired and the weights identical.
            nothing = torch.stack([p.sum() for p in self.policy.parameters()]).sum() * 0.0
            optimizer_step(self.opt.values(), nothing, grad_clip=cfg.grad_clip)
            self.steps += 1
            return SequenceStats(loss=nothing.detach(), windows=0.0, positions=0.0)
        history = batch.history[keep]  # (W, H)
        targets = batch.next_history[keep][history != PAD_ID]  # (M,)
        with embedding_dropout(self.policy.item_embedding, cfg.embedding_dropout):
            states = position_states(
                self.policy.encoder, batch.user[keep], history, batch.history_reward[keep]
            )  # (M, S)
        logits = self.policy.head(states, self.policy.item_embedding.weight)  # (M, N + 1)
        loss = F.cross_entropy(logits, targets)
        optimizer_step(self.opt.values(), loss, grad_clip=cfg.grad_clip)
        self.steps += 1
        return SequenceStats(
            loss=loss.detach(),
            windows=float(history.shape[0]),
            positions=float(targets.shape[0]),
        )
