"""TD3+BC's behaviour-cloning regulariser for the offline actor-critics (Fujimoto & Gu 2021).

"A Minimalist Approach to Offline Reinforcement Learning", eq. 3-4: the actor minimises

    −λ · mean Q(s, π(s)) + BC,   λ = α / mean|Q(s, π(s))|  (over the batch, detached)

so that α weighs the critic against the logged actions whatever the scale of the rewards.
DDPG, TD3, BCQ and both SACs carry a ``bc: BCConfig | None`` field: the default is the paper's
α = 2.5 with a cross-entropy BC term over the catalogue (TD3+BC's squared distance,
``bc.loss=mse``, does not rank: see :attr:`BCConfig.loss`), and ``--set bc=null`` gives the
published algorithm.  A run is labelled by what it trains (``td3 (+BC-ce, α=2.5)``), not by
the name of the algorithm it starts from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from recloop.algos.targets import bc_regularised
from recloop.artifacts.heads import score_items
from recloop.config import check

BC_LOSSES = ("mse", "ce")


@dataclass(frozen=True, kw_only=True)
class BCConfig:
    """Behaviour cloning in the actor loss, TD3+BC's form (Fujimoto & Gu 2021)."""

    alpha: float = 2.5
    """α of λ = α / mean|Q(s, π(s))|, the weight of the normalised Q term against the BC term
    (the paper's 2.5; larger trusts the critic more; 0 is pure behaviour cloning).
    ``--set bc=null`` drops the BC term: the published algorithm."""
    loss: str = "ce"
    """The BC term.  ``ce``: cross-entropy of the logged item under the actor's item scores
    sim(π(s), e_i) over the catalogue (a ranking loss, about ln N at the start; discrete
    SAC, whose action is an item, has only this one).  ``mse``, TD3+BC's own for continuous
    actions: mean over batch and dimensions of (π(s) − e_a)², e_a the logged item's
    embedding, in the actor's action space; it does not teach the actor to *rank* e_a first
    (a point near e_a need not score it highest, and nothing trains the table to make it so):
    TD3 with it ranks near random on ml-100k (test HR@10 0.012–0.018 for α = 1, 2.5, 10 after
    5 epochs; 0.083 with ``ce``, popularity 0.084)."""

    def __post_init__(self) -> None:
        check(self.alpha >= 0.0, f"bc.alpha must be >= 0, got {self.alpha}")
        check(self.loss in BC_LOSSES, f"bc.loss must be mse or ce, got {self.loss!r}")


def bc_label(algo: str, bc: BCConfig | None) -> str:
    """``td3 (+BC-ce, α=2.5)`` (the BC term and its α); ``td3`` without BC."""
    if bc is None:
        return algo
    return f"{algo} (+BC-{bc.loss}, α={bc.alpha:g})"


def behaviour_cloning(
    bc: BCConfig | None,
    action: Tensor,
    logged: Tensor,
    *,
    item_weight: Tensor,
    cosine: bool,
) -> Tensor:
    """The BC term of actor points ``action`` (B, D) against logged item indices ``logged`` (B,).

    ``item_weight`` (N + 1, D) is the item table; the logged item's row is the logged action
    (detached: cloning moves the actor, not the data).  ``mse``: F.mse_loss(π(s), e_a);
    ``ce``: cross-entropy over the real items (padding column dropped) of sim(π(s), e_i).
    No ``bc``: a zero, without scoring the catalogue.
    """
    if bc is None:
        return action.new_zeros(())
    if bc.loss == "mse":
        return F.mse_loss(action, item_weight[logged].detach())
    scores = score_items(action, item_weight[1:], cosine=cosine)  # (B, N)
    return F.cross_entropy(scores, logged - 1)


def with_bc(objective: Tensor, *, q: Tensor, bc: Tensor, cfg: BCConfig | None) -> Tensor:
    """λ · objective + BC with λ = α / mean|q| (``q`` (B,) the Q-values of the actor's
    actions); ``objective`` unchanged when ``cfg`` is None (the published algorithm)."""
    if cfg is None:
        return objective
    return bc_regularised(objective, q=q, bc=bc, alpha=cfg.alpha)
