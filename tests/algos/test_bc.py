"""TD3+BC's behaviour-cloning term and weighting, against values computed by hand, and wired
into the actor-critics (TD3 here; the others call the same functions)."""

from __future__ import annotations

import math

import pytest
import torch
from actor_critic_helpers import make, tiny_batch

from recloop.algos.base import run_label
from recloop.algos.bc import BCConfig, bc_label, behaviour_cloning, with_bc
from recloop.algos.td3 import TD3, TD3Config
from recloop.config import load_config
from recloop.errors import ConfigError

# Item table (N + 1 = 4, D = 2): row 0 is padding.
ITEMS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]])
ACTION = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # (B = 2, D)
LOGGED = torch.tensor([1, 3])


def close(a: torch.Tensor, b: float) -> None:
    torch.testing.assert_close(a, torch.tensor(b), rtol=1e-5, atol=1e-6)


def test_mse_term_is_the_mean_squared_distance_to_the_logged_item() -> None:
    # row 0: (1 − 1)² + (0 − 0)² = 0; row 1: (0.5 + 1)² + (0.5 − 0.5)² = 2.25; mean over 4
    bc = behaviour_cloning(BCConfig(loss="mse"), ACTION, LOGGED, item_weight=ITEMS, cosine=False)
    close(bc, 2.25 / 4)


def test_ce_term_is_the_cross_entropy_of_the_logged_item_over_the_item_scores() -> None:
    # scores of items 1..3: row 0 [1, 0, −1]; row 1 [0.5, 0.5, −0.25]
    row0 = -1.0 + math.log(math.e + 1.0 + math.exp(-1.0))  # logged item 1
    row1 = 0.25 + math.log(2 * math.exp(0.5) + math.exp(-0.25))  # logged item 3
    bc = behaviour_cloning(BCConfig(loss="ce"), ACTION, LOGGED, item_weight=ITEMS, cosine=False)
    close(bc, (row0 + row1) / 2)


def test_no_bc_is_a_zero_and_leaves_the_objective_alone() -> None:
    bc = behaviour_cloning(None, ACTION, LOGGED, item_weight=ITEMS, cosine=False)
    close(bc, 0.0)
    objective, q = torch.tensor(-1.5), torch.tensor([2.0, -4.0])
    close(with_bc(objective, q=q, bc=torch.tensor(0.5), cfg=None), -1.5)
    close(with_bc(objective, q=q, bc=torch.tensor(0.5), cfg=BCConfig()), 2.5 / 3 * -1.5 + 0.5)


def test_labels_name_the_variant() -> None:
    assert bc_label("td3", BCConfig(loss="mse")) == "td3 (+BC-mse, α=2.5)"
    assert bc_label("ddpg", BCConfig(alpha=10.0, loss="ce")) == "ddpg (+BC-ce, α=10)"
    assert bc_label("td3", None) == "td3"
    assert TD3Config().label() == "td3 (+BC-ce, α=2.5)"


def test_bc_is_one_setting_away_on_the_command_line() -> None:
    off = load_config(TD3Config, overrides=["bc=null", "critic.tau=0.01"])
    assert off.bc is None and off.label() == "td3" and off.critic.tau == 0.01
    alpha = load_config(TD3Config, overrides=["bc.alpha=1"])
    assert alpha.label() == "td3 (+BC-ce, α=1)" and alpha.bc == BCConfig(alpha=1.0)
    with pytest.raises(ConfigError, match=r"bc\.loss"):
        load_config(TD3Config, overrides=["bc.loss=l1"])
    with pytest.raises(ConfigError, match=r"bc\.alpha"):
        BCConfig(alpha=-1.0)


def test_run_label_reads_a_manifest_config_and_falls_back_to_the_name() -> None:
    assert run_label("td3", {"bc": {"alpha": 10.0, "loss": "ce"}}) == "td3 (+BC-ce, α=10)"
    assert run_label("td3", {"bc": None}) == "td3"
    assert run_label("td3", {"bc_weight": 10.0}) == "td3"  # an older recloop's field
    assert run_label("reinforce", {}) == "reinforce"


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_td3_actor_loss_is_minus_lambda_q_plus_the_bc_term(loss: str) -> None:
    # critic.lr ~ 0: the critic step before the actor's leaves Q as it is, so the reported
    # actor loss can be recomputed from the networks before the update
    algo = make("td3", policy_delay=1, critic={"lr": 1e-30}, bc=BCConfig(alpha=2.5, loss=loss))
    assert isinstance(algo, TD3)
    batch = tiny_batch()
    with torch.no_grad():
        state = algo.policy.state(batch.user, batch.history, batch.history_reward)
        action = algo.actor.action(state)
        q_pi = algo.critic.q1(state, action)
        items = algo.policy.item_embedding.weight
        if loss == "mse":
            bc = ((action - items[batch.action]) ** 2).mean()
        else:
            bc = torch.nn.functional.cross_entropy(action @ items[1:].T, batch.action - 1)
        lam = 2.5 / q_pi.abs().mean()
    stats = algo.update(batch)
    torch.testing.assert_close(torch.as_tensor(stats.bc_loss), bc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.as_tensor(stats.actor_loss), -lam * q_pi.mean() + bc, rtol=1e-5, atol=1e-6
    )
