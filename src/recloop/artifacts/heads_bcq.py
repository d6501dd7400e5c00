"""Serving heads of batch-constrained Q-learning (Fujimoto et al.), continuous and discrete.

Both keep, inside the serving policy, exactly the parts of BCQ that pick the action, so an
artifact rebuilds them from the registry without training code:

- ``bcq``: the VAE decoder G(s, z) and the perturbation model ξ(s, a) bounded by Φ.  Serving
  takes the deterministic action a = G(s, 0) + Φ·tanh(ξ(s, G(s, 0))) and ranks items by
  similarity with it, like the ``dot`` head.
- ``bcq_discrete``: the Q-head and the behaviour model G(a | s) over items; items whose
  G(a | s) / max G is below the threshold τ rank below every allowed item.

Φ and τ are buffers, saved with the weights, set by the algorithm from its config.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recloop.artifacts.heads import (
    _ACTIVATIONS,
    HEADS,
    HeadConfig,
    ScoreHead,
    mlp,
    score_items,
)
from recloop.data.batch import PAD_ID


class StateActionMLP(nn.Module):
    """An MLP of (state, action): the first layer is split into a state and an action part.

    ``f(s, a) = MLP(W_s s + W_a a + b)`` is the same function as an MLP of ``[s, a]``, but the
    state projection is computed once per state when several actions are scored for it
    (BCQ's n sampled actions): ``action`` may be (B, A) or (B, n, A) against ``state`` (B, S),
    and the output is (B, out) or (B, n, out).
    """

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        hidden: tuple[int, ...],
        out_dim: int,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        first = hidden[0] if hidden else out_dim
        self.state_in = nn.Linear(state_dim, first)
        self.action_in = nn.Linear(action_dim, first, bias=False)
        self.act: nn.Module = _ACTIVATIONS[activation]() if hidden else nn.Identity()
        self.rest: nn.Module = (
            mlp(first, hidden[1:], out_dim, activation) if hidden else nn.Identity()
        )

    def forward(self, state: Tensor, action: Tensor) -> Tensor:
        hs = self.state_in(state)
        if action.dim() == 3:
            hs = hs.unsqueeze(1)
        return self.rest(self.act(hs + self.action_in(action)))


@HEADS.register("bcq")
class BCQHead(ScoreHead):
    """VAE decoder + perturbation model; scores = sim(G(s, 0) + ξ, e_i) (Fujimoto et al. 2019).

    The latent size is 2·D, as in the paper's reference implementation.  With
    ``cfg.bound_action`` the decoder output is squashed by tanh and the perturbed action
    clamped to [-1, 1] (the paper's ``max_action``); otherwise the action space is the
    unbounded item-embedding space (DBRL's layout).
    """

    def __init__(
        self, cfg: HeadConfig, *, state_dim: int, n_items: int, embedding_dim: int
    ) -> None:
        super().__init__()
        hidden = cfg.hidden_dims
        self.latent_dim = 2 * embedding_dim
        self.bound_action = cfg.bound_action
        self.cosine = cfg.similarity == "cosine"
        self.normalize_items = self.cosine
        self.decoder = StateActionMLP(
            state_dim, self.latent_dim, hidden, embedding_dim, cfg.activation
        )
        self.perturbation = StateActionMLP(
            state_dim, embedding_dim, hidden, embedding_dim, cfg.activation
        )
        # Φ, the largest perturbation per action coordinate (set from the algorithm's config).
        self.phi: Tensor
        self.register_buffer("phi", torch.tensor(0.05))

    def decode(self, state: Tensor, z: Tensor) -> Tensor:  # (B, S), (B, [n,] L) -> (B, [n,] D)
        a = self.decoder(state, z)
        return torch.tanh(a) if self.bound_action else a

    def perturb(self, state: Tensor, action: Tensor) -> Tensor:  # (B, S), (B, [n,] D) -> same
        """a + Φ·tanh(ξ(s, a)), clamped to the action range when it is bounded."""
        out = action + self.phi * torch.tanh(self.perturbation(state, action))
        return out.clamp(-1.0, 1.0) if self.bound_action else out

    def action(self, state: Tensor) -> Tensor:  # (B, S) -> (B, D)
        """The deterministic serving action: decoder at z = 0, then the perturbation."""
        z = state.new_zeros(state.shape[0], self.latent_dim)
        return self.perturb(state, self.decode(state, z))

    def forward(self, state: Tensor, item_weight: Tensor) -> Tensor:
        return score_items(self.action(state), item_weight, cosine=self.cosine)

    def query(self, state: Tensor) -> Tensor:
        a = self.action(state)
        return nn.functional.normalize(a, dim=-1) if self.cosine else a


@HEADS.register("bcq_discrete")
class BCQDiscreteHead(ScoreHead):
    """Q-head and behaviour head over items; only actions with G(a|s)/max G > τ are eligible.

    Fujimoto et al. 2019, "Benchmarking Batch Deep RL Algorithms", Algorithm 1: the policy is
    argmax of Q over the eligible actions.  For a full ranking the ineligible items follow
    the eligible ones, ordered by their behaviour log-probability, so every item keeps a
    finite, meaningful rank: ``score = Q`` if eligible, else ``min_eligible Q - 1 + log G``.
    """

    def __init__(
        self, cfg: HeadConfig, *, state_dim: int, n_items: int, embedding_dim: int
    ) -> None:
        super().__init__()
        self.q = mlp(state_dim, cfg.hidden_dims, n_items + 1, cfg.activation)
        self.behaviour = mlp(state_dim, cfg.hidden_dims, n_items + 1, cfg.activation)
        # τ, the smallest G(a|s) / max_a G(a|s) an eligible action has (set from the config).
        self.threshold: Tensor
        self.register_buffer("threshold", torch.tensor(0.3))
        pad = torch.zeros(n_items + 1)
        pad[PAD_ID] = float("-inf")
        self._pad_logit: Tensor
        self.register_buffer("_pad_logit", pad, persistent=False)

    def behaviour_log_prob(self, state: Tensor) -> Tensor:  # (B, S) -> (B, N + 1)
        """log G(a|s) over the catalogue, -inf at the padding slot."""
        return torch.log_softmax(self.behaviour(state) + self._pad_logit, dim=-1)

    def eligible(self, logp: Tensor) -> Tensor:  # (B, N + 1) log G -> (B, N + 1) bool
        """G(a|s) / max_a G(a|s) > τ (strict, as the authors' code), computed in log space."""
        return logp - logp.max(dim=-1, keepdim=True).values > torch.log(self.threshold)

    def forward(self, state: Tensor, item_weight: Tensor) -> Tensor:
        q = self.q(state)
        logp = self.behaviour_log_prob(state)
        eligible = self.eligible(logp)
        lowest = torch.where(eligible, q, torch.full_like(q, float("inf"))).amin(-1, keepdim=True)
        return torch.where(eligible, q, lowest - 1.0 + logp)
