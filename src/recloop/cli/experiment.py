"""``recloop experiment``: closed loops side by side in a ground-truth world."""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.cli.app import app, echo, echo_json
from recloop.errors import ConfigError


@app.command("experiment")
def experiment_command(
    world: str = typer.Option("shop", "--world", help="Ground-truth world (recloop world)."),
    rounds: int = typer.Option(5, "--rounds", min=1, help="Rounds of serve → stream → loop."),
    workdir: Path = typer.Option(
        Path("runs/experiment"), "--workdir", help="Where every arm's registry, log and loop live."
    ),
    users: int = typer.Option(150, "--users", min=2, help="Fresh simulated users per round."),
    arms: str = typer.Option(
        "reinforce:behaviour=logged,cql,sasrec,popularity,random",
        "--arms",
        help="Comma-separated arms: an algorithm with optional :field=value training "
        "settings, or `random` (uniform serving, no loop).",
    ),
    epochs: int = typer.Option(2, "--epochs", min=1, help="Training epochs per round."),
    policy: str = typer.Option(
        "epsilon", "--policy", help="Serving policy of the learning arms: epsilon or softmax."
    ),
    epsilon: float = typer.Option(
        0.1, "--epsilon", min=0.0, max=1.0, help="ε of the epsilon serving policy."
    ),
    temperature: float = typer.Option(
        1.0, "--temperature", min=1e-4, help="T of the softmax serving policy."
    ),
    history_source: str = typer.Option(
        "request",
        "--history-source",
        help="Where the arms' services read a user's recent items: request (the users send "
        "every item shown with its reward) or store (they send none: the service reads "
        "the arm's online store, which the stream processor fills with the clicks; the "
        "truth roll-outs feed the models the clicks too).",
    ),
    bootstrap: str = typer.Option(
        "random",
        "--bootstrap",
        help="World policy whose log trains the shared first model (popularity counts): "
        "random (cold start) or popularity (strong start).",
    ),
    margin: float = typer.Option(0.0, "--margin", min=0.0, help="The loop gate's margin."),
    truth_users: int = typer.Option(
        400, "--truth-users", min=0, help="Users of each gate-truth roll-out (0: no check)."
    ),
    bootstrap_users: int = typer.Option(
        300, "--bootstrap-users", min=2, help="Users of the world log the first model learns."
    ),
    gate: str = typer.Option(
        "both",
        "--gate",
        help="What the loops' gates decide on once a model is current: both (ranking metric "
        "on rewarded holdout impressions and paired DR on the logged propensities), ope or "
        "metric (one of them alone).",
    ),
    canary: float = typer.Option(
        0.0,
        "--canary",
        min=0.0,
        max=0.99,
        help="Share of an arm's users a candidate that passed the gate serves for a round "
        "as the registry's canary, before the loop promotes or stops it on their behaviour "
        "(0: promote at the gate).",
    ),
    canary_min_users: int = typer.Option(
        30,
        "--canary-min-users",
        min=2,
        help="Users each side of a canary needs before the loop judges it.",
    ),
    gate_trusted: bool = typer.Option(
        True,
        "--gate-trusted/--gate-untrusted",
        help="Whether the gates act only on OPE estimates their reports do not warn about "
        "(estimate out of the outcomes' range, mean importance weight far from 1, effective "
        "sample size below --gate-min-ess); --gate-untrusted only logs the warnings (the "
        "gate before 2026-12-06).",
    ),
    gate_min_ess: float = typer.Option(
        30.0,
        "--gate-min-ess",
        min=0.0,
        help="Smallest effective sample size of an OPE estimate the gates act on (0: none).",
    ),
    gate_mean_weight: str = typer.Option(
        "0.5,2",
        "--gate-mean-weight",
        help="LOW,HIGH: the gates act only on OPE estimates whose mean importance weight lies "
        "in [LOW, HIGH] (below LOW, that share of a model's choices was never shown in the "
        "log).",
    ),
    gate_bound_bias: bool = typer.Option(
        True,
        "--gate-bound-bias/--gate-no-bound-bias",
        help="The gates also need the OPE difference's outer low end to clear the margin: "
        "the share of each policy the clipped weights cannot weigh valued at the worst "
        "outcome for the candidate and at the best for the current model (the default; "
        "--gate-no-bound-bias: DR's interval alone, the gate before 2026-12-07).",
    ),
    gate_outcome: str = typer.Option(
        "reward",
        "--gate-outcome",
        help="The outcome the gate's DR estimates per logged impression: reward (the "
        "impression's own) or return (the discounted return to the end of its session).",
    ),
    gate_target: str = typer.Option(
        "served",
        "--gate-target",
        help="The policy the gate's OPE scores each model as: served (as the arm's service "
        "serves it, with the logged exploration: the policy the truth rolls out) or "
        "uniform_topk (one of its top 10, uniformly; the default until 2026-12-06).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of users, requests and training."),
    baseline: str | None = typer.Option(
        None,
        "--baseline",
        help="Arm the others are compared with user by user (paired differences and ratios "
        "in the JSON and CSV); default: the first supervised arm, else random.",
    ),
    world_set: list[str] = typer.Option(
        [], "--world-set", help="Override a world config field (repeatable)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document at the end."),
) -> None:
    """Closed loops in a ground-truth world: the real service, bus, stream processor, SQL log
    and `recloop loop --once` per round, with simulated users answering as the world says.

    Prints the true reward per session of every arm and round with 95 % intervals and the
    gate's decisions checked against the truth; writes WORKDIR/experiment.csv and
    WORKDIR/experiment.json.
    """
    from recloop.loop.experiment import (
        ExperimentConfig,
        compare_last_round,
        parse_arms,
        run_experiment,
        summary_table,
    )

    cfg = ExperimentConfig(
        world=world,
        world_overrides=tuple(world_set),
        rounds=rounds,
        users=users,
        bootstrap_users=bootstrap_users,
        truth_users=truth_users,
        epochs=epochs,
        policy=policy,
        history_source=history_source,
        epsilon=epsilon,
        temperature=temperature,
        bootstrap=bootstrap,
        margin=margin,
        gate=gate,
        gate_outcome=gate_outcome,
        gate_target=gate_target,
        gate_trusted=gate_trusted,
        gate_min_ess=gate_min_ess,
        gate_mean_weight=_bounds(gate_mean_weight),
        gate_bound_bias=gate_bound_bias,
        canary=canary,
        canary_min_users=canary_min_users,
        seed=seed,
        baseline=baseline,
    )
    specs = parse_arms(arms, epsilon=epsilon, policy=policy, temperature=temperature)
    result = run_experiment(cfg, specs, workdir, say=(lambda _: None) if as_json else echo)
    doc = result.to_dict()
    doc["rl_vs_supervised"] = compare_last_round(result)
    doc["csv"] = str(workdir / "experiment.csv")
    if as_json:
        echo_json(doc)
        return
    echo("\nTrue reward per session (95 % interval over users; ↑ = the loop promoted after it)")
    echo(summary_table(result))
    cmp_ = doc["rl_vs_supervised"]
    if cmp_ is not None:
        echo(
            f"\nlast round: {cmp_['rl_arm']} / {cmp_['supervised_arm']} = {cmp_['ratio']:.3f}; "
            f"intervals {'disjoint' if cmp_['disjoint'] else 'overlap'}; target (>= 1.2, "
            f"disjoint) {'met' if cmp_['target_met'] else 'NOT met'}"
        )
        if "paired" in cmp_:
            p = cmp_["paired"]
            d, (lo, hi) = p["diff"], p["ratio_interval"]
            echo(
                f"paired over the same users: {cmp_['rl_arm']} − {cmp_['supervised_arm']} = "
                f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] per session; ratio "
                f"{p['ratio']:.3f} [{lo:.3f}, {hi:.3f}]"
            )
    g = doc["gate_summary"]
    echo(
        f"gate checked against the truth: {g['decisions']} decisions, {g['promoted']} promoted, "
        f"{g['violations']} violation(s) (promoted, truly worse beyond the margin), "
        f"{g['truly_better_rejected']} truly better rejected, {g['truly_worse_rejected']} "
        f"truly worse rejected; {workdir / 'experiment.csv'}"
    )
    if g.get("one_step_checked"):
        outcome = doc["config"].get("gate_outcome", "reward")
        misses = (
            f"{g['ope_misses_one_step']} OPE interval(s) missed it"
            if outcome == "reward"
            else "not the OPE's estimand with session returns"
        )
        echo(
            f"OPE against the exact one-step difference on the gates' holdout states "
            f"({g['one_step_checked']} gates): {misses}; in {g['one_step_contradicts_truth']} "
            "the one-step difference had the opposite sign of a resolved session truth (a "
            "perfect one-step estimate would have misled the gate there); in "
            f"{g['one_step_flips']} the candidate's one-step advantage had one sign in the "
            "current model's roll-out states and the other in its own"
        )
    if g.get("outer_would_keep_out"):
        echo(
            f"{g['outer_would_keep_out']} promotion(s) rested on the reward model where the "
            "log could not weigh the candidate: the low end of their outer difference was "
            "below the margin (the default --gate-bound-bias keeps such candidates out)"
        )
    if g["rejected_untrusted"]:
        cfg = doc["config"]
        ways = [] if cfg.get("canary") else ["a canary (--canary)"]
        if cfg.get("policy") != "softmax":
            ways.append(
                "softmax serving (--policy softmax: its logs keep the estimates trustworthy)"
            )
        ways.append("more exploration")
        echo(
            f"{g['rejected_untrusted']} of the rejections were on untrusted OPE estimates (the "
            f"loops' logs could not evaluate those candidates): {' or '.join(ways)} lets a "
            "loop learn; docs/experiment.md"
        )


def _bounds(text: str) -> tuple[float, float]:
    """``LOW,HIGH`` → (low, high)."""
    parts = text.split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--gate-mean-weight takes LOW,HIGH: two numbers, got {text!r}") from None
    return low, high
