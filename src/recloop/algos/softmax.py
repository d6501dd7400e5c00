"""Softmax over the catalogue for policies with a linear output layer: full or sampled.

A linear head (and REINFORCE's behaviour head) ends in an output layer whose row i is item
i's output vector.  :class:`ItemSoftmax` turns the layer's input features into log π(a|s)
of the logged items, either over all N + 1 slots or, for catalogues of 100k+ items, over
the logged item plus M negatives drawn once per batch from a proposal distribution, with
the logQ correction (:func:`~recloop.algos.losses.sampled_log_prob`).

In sampled mode the output rows and the embedding tables are read with ``sparse=True``, so
their gradients are sparse and :func:`~recloop.algos.base.build_adam` steps them with
a lazy row-wise Adam (:class:`~recloop.algos.base.RowAdam`): a step then costs O(B + M) rows,
not O(N).

Padding (slot 0) is part of the full softmax during training: it is never a target, so its
logit is simply pushed down, and serving masks it (:class:`~recloop.artifacts.PolicyNet`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from recloop.algos.losses import log_prob_of, sampled_log_prob
from recloop.artifacts.policy import PolicyNet

PROPOSALS = ("uniform", "popularity")
"""Proposal distributions of sampled negatives."""


@dataclass(frozen=True)
class Candidates:
    """Negatives shared by every row of a batch."""

    items: Tensor  # (M,) int64 item indices in 1..N
    log_q: Tensor  # (M,) float32, log of each one's expected count M·Q(i)
    accidental: Tensor  # (B, M) bool, negative j equals row b's logged item


class ItemSoftmax:
    """log π(a|s) of logged items under the softmax of an output layer.

    ``num_sampled`` None gives the full softmax; otherwise M = ``num_sampled`` negatives are
    drawn per batch from ``proposal``: ``uniform`` over items 1..N, or ``popularity``,
    Q(i) ∝ train count + 1.  Draws use torch's global generator, which checkpoints save.
    """

    def __init__(
        self,
        *,
        n_items: int,
        num_sampled: int | None,
        proposal: str,
        popularity: np.ndarray,
        device: torch.device,
    ) -> None:
        if proposal not in PROPOSALS:
            raise ValueError(f"unknown proposal {proposal!r} (expected one of {PROPOSALS})")
        self.n_items = n_items
        self.num_sampled = num_sampled
        self.proposal = proposal
        self.device = device
        if num_sampled is None:
            return
        if proposal == "uniform":
            q = np.ones(n_items + 1, np.float64)
        else:
            q = np.asarray(popularity, np.float64) + 1.0
        q[0] = 0.0
        q /= q.sum()
        with np.errstate(divide="ignore"):
            log_q = np.log(num_sampled * q)
        self._log_q = torch.as_tensor(log_q, dtype=torch.float32, device=device)  # (N + 1,)
        self._cdf = torch.as_tensor(np.cumsum(q[1:]), dtype=torch.float64, device=device)  # (N,)

    @property
    def sampled(self) -> bool:
        return self.num_sampled is not None

    def draw(self, action: Tensor) -> Candidates | None:
        """This batch's negatives for the logged items ``action`` (B,); None for the full
        softmax."""
        if self.num_sampled is None:
            return None
        m = self.num_sampled
        if self.proposal == "uniform":
            items = torch.randint(1, self.n_items + 1, (m,), device=self.device)
        else:
            u = torch.rand(m, dtype=torch.float64, device=self.device)
            items = torch.searchsorted(self._cdf, u).clamp_(max=self.n_items - 1) + 1
        return Candidates(
            items=items,
            log_q=self._log_q[items],
            accidental=action.unsqueeze(1) == items.unsqueeze(0),
        )

    def log_prob(
        self, features: Tensor, output: nn.Linear, action: Tensor, cand: Candidates | None
    ) -> Tensor:
        """(B, F) features, the (N + 1) × F output layer, (B,) logged items → (B,) log π."""
        if cand is None:
            return log_prob_of(output(features), action)
        b = action.shape[0]
        idx = torch.cat([action, cand.items])  # (B + M,)
        w = F.embedding(idx, output.weight, sparse=True)  # (B + M, F), sparse gradient
        bias = output.bias[idx]
        pos_logit = (features * w[:b]).sum(dim=1) + bias[:b]  # (B,)
        # The logQ correction folded into the negatives' bias: one (B, M) product, no more.
        neg_logits = torch.addmm(bias[b:] - cand.log_q, features, w[b:].T)  # (B, M)
        return sampled_log_prob(
            pos_logit=pos_logit,
            neg_logits=neg_logits,
            accidental=cand.accidental,
        )


def use_sparse_tables(policy: PolicyNet) -> list[Tensor]:
    """Switch the policy's embedding tables to sparse gradients; returns their weights."""
    out: list[Tensor] = []
    for table in (policy.item_embedding, policy.user_embedding):
        if table is not None:
            table.sparse = True
            out.append(table.weight)
    return out
