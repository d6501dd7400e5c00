"""REINFORCE with top-K off-policy correction (Chen et al., "Top-K Off-Policy Correction for a
REINFORCE Recommender System", WSDM 2019).

A softmax policy π(a|s) over the catalogue is trained on logged transitions with the
gradient

    E_β[ min(π/β, c) · λ_K(s, a) · G · ∇ log π(a|s) ],   λ_K = K (1 − π(a|s))^(K − 1),

where β is the logging (behaviour) policy, estimated by a second softmax head trained by
cross-entropy on the same state with its gradient blocked (section 4.3 of the paper), or,
with ``behaviour="logged"``, read from the dataset's logged ``propensity`` column (the
probability with which the logging system showed the item), G is
the discounted return of the logged session from this step on, c caps the importance
weight and K is the slate size the top-K correction accounts for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from recloop.algos.base import (
    ALGOS,
    Algo,
    AlgoConfig,
    DatasetSpec,
    ParamGroup,
    Scalar,
    UpdateStats,
    build_adam,
    optimizer_step,
)
from recloop.algos.losses import rewarded_cross_entropy, scale_returns, topk_off_policy_loss
from recloop.algos.softmax import PROPOSALS, ItemSoftmax, use_sparse_tables
from recloop.artifacts.heads import HeadConfig, LinearHead
from recloop.config import check
from recloop.data.batch import TransitionBatch
from recloop.data.schema import PROPENSITY
from recloop.encoders.base import EncoderConfig
from recloop.errors import DataError

RETURN_SCALES = ("none", "mean", "std")
BEHAVIOURS = ("estimated", "logged")


def _default_encoder() -> EncoderConfig:
    return EncoderConfig(kind="gru", history=20, embedding_dim=64, hidden_dim=64, dropout=0.2)


@dataclass(frozen=True, kw_only=True)
class ReinforceConfig(AlgoConfig):
    """REINFORCE with top-K off-policy correction (Chen et al., WSDM 2019)."""

    algo: ClassVar[str] = "reinforce"
    encoder: EncoderConfig = field(default_factory=_default_encoder)
    """State encoder (kind, H, D, sizes); a GRU over the last 20 items by default."""
    top_k: int = 10
    """K in lambda_K = K * (1 - pi)^(K - 1); 1 switches the top-K correction off."""
    weight_cap: float | None = 2.0
    """Cap c on the importance weight min(pi / beta, c); None switches the correction off."""
    beta_hidden_dims: tuple[int, ...] = ()
    """Hidden layers of the behaviour head beta before its softmax layer; () = one linear
    layer on the (detached) state."""
    beta_lr: float | None = None
    """Adam learning rate of the behaviour head; None = ``lr``."""
    returns_scale: str = "mean"
    """Rescale the discounted returns within each batch: ``none`` (as in the paper),
    ``mean`` (divide by the batch mean, so the step size does not depend on the discount
    and session lengths) or ``std`` (standardise: a baseline that pushes below-average
    actions down)."""
    sampled_softmax: int | None = None
    """Negatives per batch for a sampled softmax over the catalogue (100k+ items), used by
    pi and beta alike; None = full softmax."""
    proposal: str = "popularity"
    """Distribution of sampled negatives: ``uniform`` or ``popularity`` (train count + 1)."""
    ce_weight: float = 0.0
    """λ of REINFORCE+CE: λ · (−mean log π(a|s) over the rewarded logged actions) is added to
    the corrected loss, so π also imitates the clicks.  Where the log is mostly greedy, π
    then moves towards the logging policy and the importance weights π/β towards 1, which
    otherwise start near 1/N on the greedy events (docs/experiment.md).  0: the paper's
    loss."""
    ce_epochs: int = 0
    """Supervised warm start: the first ``ce_epochs`` epochs of a training run minimise only
    the cross-entropy of π on the rewarded logged actions (the +CE term alone), so the
    corrected gradient starts from a π that already ranks the clicked items, and the weights
    π/β of the greedy events start above the 1/N of a fresh π (in docs/experiment.md's
    loop, a mean capped weight of 0.3 after one such epoch, 0.2 without); the corrected
    loss (+ ce_weight · CE) from then on.  β is trained in every epoch.  0: no warm start;
    ≥ ``fit.epochs``: π never leaves the cross-entropy (a click-imitation model, the warm
    start's control).  An epoch cut short by ``fit.max_steps`` counts as one, and each
    training run (each round of ``recloop loop``, warm-started or not) starts with its own
    warm start.  With validation and ``fit.restore_best``, the epoch put back may be one of
    the warm start's: those are the epochs whose ``train.loss`` equals ``train.ce`` in
    metrics.jsonl."""
    behaviour: Literal["estimated", "logged"] = "estimated"
    """Where β(a|s) of the importance weight comes from: ``estimated`` by the behaviour head
    (the paper's section 4.3), or ``logged``: the dataset's ``propensity`` event column, the
    logging system's own probability of the item (training refuses to start without it).
    The behaviour head is trained either way (OPE reads it)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.head.kind == "linear", f"head.kind must be linear, got {self.head.kind!r}")
        check(
            self.behaviour in BEHAVIOURS,
            f"behaviour must be one of {list(BEHAVIOURS)}, got {self.behaviour!r}",
        )
        check(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        check(
            self.weight_cap is None or self.weight_cap > 0,
            f"weight_cap must be > 0 or null, got {self.weight_cap}",
        )
        check(all(h > 0 for h in self.beta_hidden_dims), "beta_hidden_dims must be positive")
        check(self.beta_lr is None or self.beta_lr > 0, f"beta_lr must be > 0, got {self.beta_lr}")
        check(
            self.returns_scale in RETURN_SCALES,
            f"returns_scale must be one of {list(RETURN_SCALES)}, got {self.returns_scale!r}",
        )
        check(
            self.sampled_softmax is None or self.sampled_softmax >= 1,
            f"sampled_softmax must be >= 1 or null, got {self.sampled_softmax}",
        )
        check(self.proposal in PROPOSALS, f"proposal must be one of {list(PROPOSALS)}")
        check(self.ce_weight >= 0, f"ce_weight must be >= 0, got {self.ce_weight}")
        check(self.ce_epochs >= 0, f"ce_epochs must be >= 0, got {self.ce_epochs}")

    def label(self) -> str:
        parts = [f"+CE, λ={self.ce_weight:g}"] if self.ce_weight else []
        if self.ce_epochs:
            parts.append(f"CE warm start {self.ce_epochs} ep")
        return f"{self.algo} ({', '.join(parts)})" if parts else self.algo


@dataclass(frozen=True)
class ReinforceStats(UpdateStats):
    """Scalars of one REINFORCE step (``loss`` is the loss π minimised: the corrected loss,
    without the +CE term; the cross-entropy alone during a ``ce_epochs`` warm start)."""

    beta_nll: Scalar
    """Cross-entropy of the behaviour head on the logged items."""
    weight: Scalar
    """Mean capped importance weight min(pi / beta, c)."""
    lambda_k: Scalar
    """Mean top-K multiplier K (1 - pi)^(K - 1)."""
    logp: Scalar
    """Mean log pi(a|s) of the logged actions."""
    ce: Scalar
    """The +CE term (0 without ``ce_weight`` or a warm start: not computed)."""


@ALGOS.register("reinforce")
class Reinforce(Algo[ReinforceConfig]):
    """Softmax policy π and behaviour head β on one state; π follows the corrected gradient."""

    config_class = ReinforceConfig

    def __init__(self, cfg: ReinforceConfig, spec: DatasetSpec, *, device: torch.device) -> None:
        super().__init__(cfg, spec, device=device)
        head = self.policy.head
        assert isinstance(head, LinearHead)
        self.pi = head
        self.beta = LinearHead(
            HeadConfig(hidden_dims=cfg.beta_hidden_dims, activation=cfg.head.activation),
            state_dim=self.policy.encoder.state_dim,
            n_items=spec.n_items,
            embedding_dim=cfg.encoder.embedding_dim,
        ).to(device)
        self.softmax = ItemSoftmax(
            n_items=spec.n_items,
            num_sampled=cfg.sampled_softmax,
            proposal=cfg.proposal,
            popularity=spec.popularity,
            device=device,
        )
        sparse: list[torch.Tensor] = []
        if self.softmax.sampled:
            sparse = [*use_sparse_tables(self.policy), head.output.weight, self.beta.output.weight]
        self.opt = build_adam(
            [
                ParamGroup(
                    params=list(self.policy.parameters()),
                    lr=cfg.lr,
                    weight_decay=cfg.weight_decay,
                ),
                ParamGroup(
                    params=list(self.beta.parameters()),
                    lr=cfg.beta_lr if cfg.beta_lr is not None else cfg.lr,
                    weight_decay=cfg.weight_decay,
                ),
            ],
            sparse=sparse,
        )

        self.ce_phase = cfg.ce_epochs > 0
        """True while π trains on the cross-entropy alone (the first ``ce_epochs``)."""

    def begin_epoch(self, epoch: int) -> None:
        self.ce_phase = epoch < self.cfg.ce_epochs

    def networks(self) -> dict[str, nn.Module]:
        return {"policy": self.policy, "beta": self.beta}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self.opt

    def behaviour_logp(self, batch: TransitionBatch, estimated: torch.Tensor) -> torch.Tensor:
        """(B,) log β(a|s) for the importance weight: the behaviour head's (detached) or the
        logged propensities'."""
        if self.cfg.behaviour == "estimated":
            return estimated.detach()
        if batch.propensity is None:
            # Raised by the first update, before any weight has moved.
            raise DataError(
                f'reinforce behaviour="logged" needs the logged "{PROPENSITY}" event column, '
                f"and this dataset has none: prepare data whose events carry a "
                f'"{PROPENSITY}" column, or set behaviour=estimated'
            )
        return batch.propensity.log()

    def update(self, batch: TransitionBatch) -> ReinforceStats:
        state = self.policy.state(batch.user, batch.history, batch.history_reward)  # (B, S)
        cand = self.softmax.draw(batch.action)  # None with the full softmax
        # log π(a|s) of the logged actions, one per row.
        logp = self.softmax.log_prob(self.pi.features(state), self.pi.output, batch.action, cand)
        # log β(a|s): the behaviour head reads the state but does not train it (section 4.3).
        beta_logp = self.softmax.log_prob(
            self.beta.features(state.detach()), self.beta.output, batch.action, cand
        )
        returns = scale_returns(batch.returns, mode=self.cfg.returns_scale)  # G, (B,)
        terms = topk_off_policy_loss(
            logp=logp,
            beta_logp=self.behaviour_logp(batch, beta_logp),
            returns=returns,
            top_k=self.cfg.top_k,
            weight_cap=self.cfg.weight_cap,
        )
        ce = torch.zeros(())
        if self.cfg.ce_weight or self.ce_phase:
            ce = rewarded_cross_entropy(logp, batch.reward)
        if self.ce_phase:  # supervised warm start: π imitates the clicks only (the
            # corrected terms are still computed: their weights say how far π is from β)
            loss = ce
        elif self.cfg.ce_weight:  # REINFORCE+CE: imitate the rewarded logged actions too
            loss = terms.loss + self.cfg.ce_weight * ce
        else:
            loss = terms.loss
        beta_nll = -beta_logp.mean()
        # One backward for both: β's loss reaches only β's weights (the state is detached),
        # and each param group is clipped on its own.
        optimizer_step(self.opt.values(), loss + beta_nll, grad_clip=self.cfg.grad_clip)
        return ReinforceStats(
            loss=(ce if self.ce_phase else terms.loss).detach(),
            beta_nll=beta_nll.detach(),
            weight=terms.weight.mean(),
            lambda_k=terms.lambda_k.mean(),
            logp=logp.detach().mean(),
            ce=ce.detach(),
        )
