"""``recloop train | evaluate | recommend | export | algos``: offline training and its outputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from recloop.cli.app import app, echo, echo_json, output_dir, warn
from recloop.errors import ConfigError, DataError, TrainingError

if TYPE_CHECKING:
    from recloop.evaluation.ab import AbReport, Interval
    from recloop.evaluation.ope import OPEComparison
    from recloop.training.compare import RunEvaluation

_TRAIN_HELP = (
    "Train an algorithm on a prepared dataset into RUN_DIR (--out).\n\n"
    "Writes RUN_DIR/run.json (the full config), metrics.jsonl (one line per epoch: train "
    "means, validation metrics, transitions/s), checkpoint/ (last.pt each epoch, best.pt), "
    "artifact/ (the serving bundle) and results.json (final valid and test metrics, full "
    "ranking). Early stopping watches validation NDCG@10 (fit.metric) and the best epoch's "
    "weights are kept.\n\n"
    "The config file (--config) and --set share one layout: the algorithm's fields at the top "
    "level, the fit loop's under `fit:`, and `algo:` naming the algorithm (or holding its "
    "fields as a mapping). Example file:\n\n"
    "\b\n"  # click: keep the example's lines as they are
    "    algo: reinforce\n"
    "    lr: 0.001\n"
    "    encoder: {kind: gru, history: 20}\n"
    "    fit: {epochs: 10, patience: 3}\n\n"
    "and the same with overrides: --set lr=0.001 --set encoder.kind=gru --set fit.epochs=10. "
    "Flags (--epochs, --device, --pretrained) beat the file and --set beats both. "
    "`recloop algos NAME` lists every field with its default and meaning; every field is "
    "checked before the data is read."
)


@app.command("train", help=_TRAIN_HELP)
def train(
    algo: str = typer.Option(None, "--algo", "-a", help="Algorithm (recloop algos lists them)."),
    data: Path = typer.Option(..., "--data", "-d", help="Prepared dataset directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
    epochs: int = typer.Option(None, "--epochs", "-e", help="Epochs (fit.epochs)."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML config file."),
    sets: list[str] = typer.Option([], "--set", "-s", help="Override KEY=VALUE (repeatable)."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (fit.device)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out."),
    pretrained: str = typer.Option(
        None, "--pretrained", help="DSSM embeddings directory (recloop pretrain)."
    ),
    track: list[str] = typer.Option(
        [],
        "--track",
        help="Also log the run to tensorboard (RUN_DIR/tensorboard) or mlflow (one MLflow run: "
        "params, metrics per epoch, the artifact and the evaluation table); repeatable. Needs "
        "recloop[tensorboard] or recloop[mlflow].",
    ),
    mlflow_uri: str = typer.Option(
        None,
        "--mlflow-uri",
        help="MLflow tracking URI or folder (default: $MLFLOW_TRACKING_URI, else ./mlruns).",
    ),
    mlflow_experiment: str = typer.Option(
        None, "--mlflow-experiment", help="MLflow experiment name (default: recloop)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print final metrics as JSON."),
    nproc: int = typer.Option(
        1,
        "--nproc",
        min=1,
        help="Train data-parallel on this many processes (PyTorch distributed: gloo on the "
        "CPU, NCCL on CUDA; rank 0 evaluates and writes). Runs `torchrun --nproc-per-node N "
        "-m recloop.train` with the other options.",
    ),
) -> None:
    from recloop.training import distributed
    from recloop.training.compare import format_table
    from recloop.training.recommender import train_run
    from recloop.training.tracking import open_trackers

    output_dir(out, "--out")
    if nproc > 1 and not distributed.launched():
        args = ["--data", str(data), "--out", str(out)]
        for flag, value in (
            ("--algo", algo),
            ("--epochs", epochs),
            ("--config", config),
            ("--device", device),
            ("--pretrained", pretrained),
        ):
            if value is not None:
                args += [flag, str(value)]
        for s in sets:
            args += ["--set", s]
        args += [f for f, on in (("--resume", resume), ("--overwrite", overwrite)) if on]
        args += ["--json"] if as_json else []
        for name in track:
            args += ["--track", name]
        for flag, value in (
            ("--mlflow-uri", mlflow_uri),
            ("--mlflow-experiment", mlflow_experiment),
        ):
            if value is not None:
                args += [flag, str(value)]
        _run_ranks(nproc, args)
        return
    # a missing library or an unknown name fails here, before the data is read
    trackers = open_trackers(
        track, run_dir=out, tracking_uri=mlflow_uri, experiment=mlflow_experiment
    )
    result = train_run(
        algo,
        data,
        out,
        config_path=config,
        overrides=sets,
        epochs=epochs,
        device=device,
        pretrained=pretrained,
        resume=resume,
        overwrite=overwrite,
        trackers=trackers,
    )
    if not distributed.is_main():
        return  # rank 0 reports
    if as_json:
        doc: dict[str, Any] = {"valid": result.valid, "test": result.test}
        if trackers:
            doc["tracked"] = [t.describe() for t in trackers]
        echo_json(doc)
        return
    echo(
        f"{result.algo}: {result.epochs} epochs, {result.steps} steps, "
        f"{result.transitions_per_s:,.0f} transitions/s"
        + (f", best epoch {result.best_epoch}" if result.best_epoch is not None else "")
    )
    rows = [(split, metrics) for split, metrics in (("valid", result.valid), ("test", result.test))]
    rows = [(s, m) for s, m in rows if m]
    if rows:
        keys = ["hr@10", "ndcg@10", "mrr@10"]
        table = [[s, *(_fmt(m.get(k)) for k in keys)] for s, m in rows]
        echo(format_table(["split", *keys], table))
        echo(f"(full ranking, consumed items {'masked' if result.mask_consumed else 'kept'})")
    echo(f"artifact: {result.artifact}")
    for tracker in trackers:
        echo(f"tracked: {tracker.describe()}")


def _run_ranks(nproc: int, args: list[str]) -> None:
    """``torchrun --standalone --nproc-per-node nproc -m recloop.train ARGS``; a rank that
    fails (an error, a kill) fails the whole job, whose exit status is passed on."""
    import json
    import os
    import subprocess
    import sys

    from recloop.cli.app import ROOT_OPTIONS
    from recloop.train import ROOT_OPTIONS_ENV

    env = {**os.environ, ROOT_OPTIONS_ENV: json.dumps(ROOT_OPTIONS)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "recloop.train",
        *args,
    ]
    code = subprocess.run(cmd, check=False, env=env).returncode
    if code != 0:
        raise TrainingError(
            f"distributed training failed: torchrun exited with status {code} (its summary "
            f"above names the failed rank of {nproc} and its error); a run that got past its "
            "first epoch keeps that epoch's checkpoint for --resume"
        )


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))


@app.command("evaluate")
def evaluate_cmd(
    runs: list[Path] = typer.Argument(None, help="Run or artifact directories (none with --ab)."),
    data: Path = typer.Option(
        None, "--data", "-d", help="Prepared dataset (default: the one each run recorded)."
    ),
    split: str = typer.Option("test", "--split", help="valid or test."),
    protocol: str = typer.Option(
        "both",
        "--protocol",
        help="masked (consumed items removed, targets stay: RecBole's rule for general "
        "models), unmasked (nothing removed: RecBole's rule for sequential models) or both.",
    ),
    no_mask: bool = typer.Option(
        False, "--no-mask", help="Same as --protocol unmasked (kept for old scripts)."
    ),
    ks: str = typer.Option("5,10,20", "--ks", help="Cut-offs K, comma separated."),
    ope: bool = typer.Option(
        False,
        "--ope",
        help="Add off-policy estimates (IPS, SNIPS, doubly robust, bootstrap intervals) of "
        "each policy's value on the split's logged events, all against one behaviour model "
        "(the data's logged propensities, else one fitted on TRAIN) and one reward model per "
        "dataset; with several runs, each one minus the first with paired intervals.",
    ),
    ope_overrides: list[str] = typer.Option(
        [], "--ope-set", help="Override an OPE config field, e.g. --ope-set weight_cap=20."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ab: bool = typer.Option(
        False,
        "--ab",
        help="Instead of runs: compare the A/B arms of `recloop serve --ab` from the served "
        "log and its attributed feedback (--database-url): reward per served list and click "
        "rate per arm with 95% bootstrap intervals over users, and each arm minus the "
        "baseline (independent bootstrap).",
    ),
    database_url: str | None = typer.Option(
        None, help="With --ab: the SQL log `recloop stream` writes (default: RECLOOP_DATABASE_URL)."
    ),
    table_prefix: str = typer.Option("", help="With --ab: prefix of the log's tables."),
    since: str | None = typer.Option(
        None, help="With --ab: lists served since unix seconds, an ISO time or e.g. 24h, 7d."
    ),
    baseline: str | None = typer.Option(
        None,
        help="With --ab: the arm the others are compared with (default: control, else current, "
        "else baseline, else the first by name).",
    ),
    include_open: bool = typer.Option(
        False,
        "--include-open",
        help="With --ab: count lists whose attribution window is still open (their late "
        "feedback counts as none).",
    ),
    n_boot: int = typer.Option(2000, help="With --ab: bootstrap resamples."),
    seed: int = typer.Option(0, help="With --ab: seed of the bootstrap."),
) -> None:
    """Full-ranking metrics of one or several runs on a split, as a comparison table; or,
    with --ab, the A/B arms of the service from its served log."""
    if ab:
        if runs:
            raise ConfigError("--ab reads the served log: give no run directories with it")
        _evaluate_ab(
            database_url=database_url,
            table_prefix=table_prefix,
            since=since,
            baseline=baseline,
            settled_only=not include_open,
            n_boot=n_boot,
            seed=seed,
            as_json=as_json,
        )
        return
    if not runs:
        raise ConfigError("name at least one run or artifact directory (or use --ab)")
    from recloop.config import load_config
    from recloop.evaluation.ope import OPEConfig
    from recloop.training.compare import comparison_table, evaluate_runs

    ope_cfg = load_config(OPEConfig, overrides=ope_overrides) if ope else None
    if ope_cfg is not None and ope_cfg.behaviour == "beta_head" and len(runs) > 1:
        raise ConfigError(
            "--ope-set behaviour=beta_head scores each run against its own behaviour head: "
            "the estimates of several runs would not be comparable; drop it to use one "
            "behaviour model for all runs, or evaluate one run"
        )

    try:
        cutoffs = tuple(int(k) for k in ks.split(",") if k.strip())
    except ValueError:
        raise ConfigError(f"--ks must be comma-separated integers, got {ks!r}") from None
    if not cutoffs:
        raise ConfigError("--ks must name at least one cut-off")
    if no_mask:
        protocol = "unmasked"
    if protocol not in ("both", "masked", "unmasked"):
        raise ConfigError(f"--protocol must be masked, unmasked or both, got {protocol!r}")
    masks = {"both": (True, False), "masked": (True,), "unmasked": (False,)}[protocol]
    by_mask = {
        m: evaluate_runs(runs, data=data, split=split, mask_consumed=m, ks=cutoffs) for m in masks
    }
    results = by_mask[masks[0]]
    ope_reports: list[dict[str, Any]] = []
    paired: list[dict[str, Any]] = []
    if ope_cfg is not None:
        from recloop.data.dataset import PreparedDataset
        from recloop.evaluation.ope import ope_for_runs

        datasets: dict[str, PreparedDataset] = {}
        for res in results:
            if res.data not in datasets:
                datasets[res.data] = PreparedDataset.load(Path(res.data))
        comparison = ope_for_runs(
            runs, [datasets[res.data] for res in results], split=split, cfg=ope_cfg
        )
        ope_reports = [rep.to_dict() for rep in comparison.reports]
        paired = [p.to_dict() for p in comparison.paired]
        _warn_ope(comparison)
    if as_json:
        # "metrics" holds the first protocol's numbers ("mask_consumed" says which); with
        # both, each run also carries "metrics_unmasked".
        doc: dict[str, Any] = {
            "split": split,
            "protocol": protocol,
            "mask_consumed": masks[0],
            "runs": [r.to_dict() for r in results],
        }
        if len(masks) == 2:
            for run_doc, res in zip(doc["runs"], by_mask[False], strict=True):
                run_doc["metrics_unmasked"] = res.metrics
        if ope_cfg is not None:
            for run_doc, rep in zip(doc["runs"], ope_reports, strict=True):
                run_doc["ope"] = rep
            doc["paired"] = paired
        echo_json(doc)
        return
    k = 10 if 10 in cutoffs else cutoffs[0]
    echo(
        "\n\n".join(comparison_table(by_mask[m], split=split, mask_consumed=m, k=k) for m in masks)
    )
    if ope_reports and ope_cfg is not None:
        echo("")
        echo(_ope_tables(results, ope_reports, paired, split=split))


def _evaluate_ab(
    *,
    database_url: str | None,
    table_prefix: str,
    since: str | None,
    baseline: str | None,
    settled_only: bool,
    n_boot: int,
    seed: int,
    as_json: bool,
) -> None:
    import os

    from recloop.evaluation.ab import ab_report, parse_since
    from recloop.streaming.log import BehaviorLog

    url = database_url or os.environ.get("RECLOOP_DATABASE_URL")
    if not url:
        raise ConfigError("--ab needs --database-url (or RECLOOP_DATABASE_URL): the served log")
    start = None if since is None else parse_since(since)
    log = BehaviorLog(url, prefix=table_prefix)
    try:
        served = log.read_served(since=start)
    finally:
        log.dispose()
    report = ab_report(
        served,
        baseline=baseline,
        since=start,
        settled_only=settled_only,
        n_boot=n_boot,
        seed=seed,
    )
    if as_json:
        echo_json(report.to_dict())
    else:
        echo(format_ab(report))


def format_ab(report: AbReport) -> str:
    """The report as two plain tables."""
    from recloop.training.compare import format_table

    def cell(iv: Interval, *, diff: bool = False, small: bool = False) -> str:
        mark = " *" if diff and not small and (iv.low > 0 or iv.high < 0) else ""
        return f"{iv.value:.4f} [{iv.low:.4f}, {iv.high:.4f}]{mark}"

    conf = f"{report.confidence:.0%}"
    rows = [
        [
            a.arm,
            str(a.users),
            str(a.lists),
            cell(a.reward_per_list),
            cell(a.click_rate),
            ",".join(a.policies),
            ",".join(a.model_versions),
        ]
        for a in report.arms
    ]
    lines = [
        format_table(
            ["arm", "users", "lists", "reward/list", "click rate", "policy", "model"], rows
        ),
        f"per served list ({'settled lists' if report.settled_only else 'all lists'}"
        f"{'' if report.since is None else f' since {report.since}'}); {conf} bootstrap "
        f"intervals over users ({report.n_boot} resamples, seed {report.seed})",
        "",
        format_table(
            ["arm", f"reward/list - {report.baseline}", f"click rate - {report.baseline}"],
            [
                [
                    d.arm,
                    cell(d.reward_per_list, diff=True, small=d.small_sample),
                    cell(d.click_rate, diff=True, small=d.small_sample),
                ]
                for d in report.differences
            ],
        ),
        f"independent bootstrap of each arm and the baseline ({conf}; * = excludes 0, "
        f"both arms with at least {report.min_users} users)",
    ]
    if report.open_lists:
        lines.append(f"{report.open_lists} lists still open (attribution not settled) left out")
    if report.lists_without_arm:
        lines.append(f"{report.lists_without_arm} lists served without an A/B arm left out")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def _warn_ope(comparison: OPEComparison) -> None:
    """One line on stderr per OPE flag and per run that could not be paired."""
    for run, rep in zip(comparison.runs, comparison.reports, strict=True):
        lo, hi = rep.reward_range
        for name, iv in rep.estimates.items():
            if f"{name}_out_of_range" in iv.flags:
                warn(
                    f"warning: {run}: {name.upper()} {iv.value:.3f} [{iv.low:.3f}, "
                    f"{iv.high:.3f}] leaves the logged reward range [{lo:g}, {hi:g}]; the "
                    "propensities are likely wrong or the weights too heavy (read SNIPS/DR)"
                )
        if "mean_weight_far_from_1" in rep.flags:
            warn(
                f"warning: {run}: mean importance weight {rep.mean_weight:.2f} is far from 1 "
                f"(it is about 1 when beta is right and covers the policy; beta: "
                f"{rep.behaviour})"
            )
    for run, why in comparison.unpaired.items():
        warn(f"warning: {run}: no paired difference with the first run ({why})")


def _ope_tables(
    results: Sequence[RunEvaluation],
    reports: list[dict[str, Any]],
    paired: list[dict[str, Any]],
    *,
    split: str,
) -> str:
    """The OPE table of every run and, with several runs, the paired differences."""
    from recloop.training.compare import format_table

    def cell(iv: dict[str, Any], mark: str = "") -> str:
        flag = " !" if iv.get("flags") else ""
        return f"{iv['value']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]{mark}{flag}"

    rows = []
    for res, rep in zip(results, reports, strict=True):
        est = rep["estimates"]
        weight_flag = " !" if "mean_weight_far_from_1" in rep["flags"] else ""
        rows.append(
            [
                res.run,
                res.algo,
                *(cell(est[m]) for m in ("ips", "snips", "dr")),
                f"{rep['logged_value']:.3f}",
                f"{rep['mean_weight']:.2f}{weight_flag}",
                f"{rep['clipped_share']:.1%}",
                f"{rep['ess']:.0f}/{rep['n_events']}",
                rep["behaviour"],
            ]
        )
    header = ["run", "algo", "IPS", "SNIPS", "DR", "logged", "mean w", "clipped", "ESS", "beta"]
    conf = round(100 * reports[0]["config"]["confidence"])
    lines = [
        format_table(header, rows),
        f"off-policy value of each policy on the {split} split's logged events "
        f"({conf}% bootstrap intervals; ! = flagged, see the warnings)",
    ]
    for res, rep in zip(results, reports, strict=True):
        by_slot = rep.get("ess_by_position") or {}
        if by_slot:
            cells = ", ".join(f"{k}: {v:.2f}" for k, v in by_slot.items())
            lines.append(f"{res.run}: ESS / impressions by list position: {cells}")
    left_out = reports[0].get("left_out", 0)
    if left_out:
        lines.append(
            f"{left_out} impressions of the split left out: fallback lists, which no policy "
            "drew, and any below ope.positions"
        )
    if paired:
        algo = {res.run: res.algo for res in results}
        diff_rows = [
            [
                p["run"],
                algo.get(p["run"], ""),
                *(
                    cell(d, " *" if d["excludes_zero"] else "")
                    for d in (p["differences"][m] for m in ("ips", "snips", "dr"))
                ),
            ]
            for p in paired
        ]
        lines += [
            "",
            format_table(["run", "algo", "IPS - first", "SNIPS - first", "DR - first"], diff_rows),
            f"each run minus {paired[0]['baseline']} on the same events, beta and q "
            f"({conf}% paired bootstrap intervals; * = the interval excludes 0)",
        ]
    return "\n".join(lines)


@app.command("recommend")
def recommend_cmd(
    artifact: Path = typer.Argument(..., help="Artifact or run directory."),
    user: str = typer.Option(..., "--user", "-u", help="Raw user id."),
    history: str = typer.Option(
        None, "--history", help="Recent raw item ids, oldest first, comma separated."
    ),
    n: int = typer.Option(10, "-n", help="How many items."),
    data: Path = typer.Option(
        None,
        "--data",
        "-d",
        help="Prepared dataset to read the user's history from when --history is not given "
        "(default: the artifact's, if still there).",
    ),
    keep_consumed: bool = typer.Option(
        False, "--keep-consumed", help="Do not drop items already in the history."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Ranked raw item ids for one user, as `recloop serve` answers them.

    A user not in the artifact's id map is scored from --history; without one, the answer
    is the artifact's train-set popular items (source "popular", with a warning), as the
    service does: a policy state with neither a user nor a history means nothing.
    """
    import numpy as np
    import torch

    from recloop.artifacts import load_artifact
    from recloop.data.dataset import PreparedDataset
    from recloop.ranking import topk
    from recloop.training.compare import check_same_ids
    from recloop.training.recommender import consumed_mask, pad_histories, user_histories

    if n < 1:
        raise ConfigError(f"-n must be >= 1, got {n}")
    art = load_artifact(artifact)
    u = art.user_index.get(user, 0)
    if u == 0 and history is None:
        warn(f"user {user!r} is not in the artifact's id map and has no --history: popular items")
        # the service's order (recloop.serving.service.LoadedModel.train_popular)
        counts = torch.as_tensor(np.asarray(art.popularity, np.float32)[None, 1:])
        ranked = topk(counts, art.n_items, row_keys=torch.zeros(1))
        top = (ranked.indices[0, :n] + 1).tolist()
        _print_recommendation(
            as_json,
            user=user,
            known=False,
            source="popular",
            history_from="none",
            version=art.model_version,
            items=[art.item_ids[i - 1] for i in top],
            scores=ranked.values[0, :n].tolist(),
        )
        return
    if u == 0:
        warn(f"user {user!r} is not in the artifact's id map: scoring as an unknown user")
    h = art.history_len
    exclude = torch.zeros((1, art.n_items + 1), dtype=torch.bool)
    source = "none"
    if history is not None:
        raw = [x.strip() for x in history.split(",") if x.strip()]
        unknown = [x for x in raw if x not in art.item_index]
        if unknown:
            raise DataError(f"--history: item {unknown[0]!r} is not in the artifact's id map")
        hist = pad_histories([[art.item_index[x] for x in raw]], history=h)
        rew = (hist != 0).to(torch.float32)
        exclude.scatter_(1, hist, True)
        source = "--history"
    else:
        path = data
        if path is None:
            recorded = art.manifest.get("dataset", {}).get("path")
            path = Path(recorded) if recorded and Path(recorded).is_dir() else None
        if path is not None and u > 0:
            ds = PreparedDataset.load(path)
            check_same_ids(art.manifest, ds, artifact)
            users = np.array([u], np.int64)
            hist, rew = user_histories(ds, users, history=h)
            exclude = consumed_mask(ds, users)
            source = str(path)
        else:
            hist = torch.zeros((1, h), dtype=torch.int64)
            rew = torch.zeros((1, h), dtype=torch.float32)
    exclude[:, 0] = True
    idx, scores = art.recommend(
        torch.tensor([u]), hist, rew, n=n, exclude=None if keep_consumed else exclude
    )
    items = [art.item_ids[i - 1] for i in idx[0].tolist() if i > 0]
    vals = scores[0].tolist()[: len(items)]
    _print_recommendation(
        as_json,
        user=user,
        known=u > 0,
        source="policy",
        history_from=source,
        version=art.model_version,
        items=items,
        scores=vals,
    )


def _print_recommendation(
    as_json: bool,
    *,
    user: str,
    known: bool,
    source: str,
    history_from: str,
    version: str,
    items: list[str],
    scores: list[float],
) -> None:
    if as_json:
        echo_json(
            {
                "user": user,
                "known_user": known,
                "source": source,
                "history_from": history_from,
                "model_version": version,
                "items": items,
                "scores": scores,
            }
        )
        return
    for rank, (item, score) in enumerate(zip(items, scores, strict=True), start=1):
        echo(f"{rank:>3}  {item}  {score:.4f}")


@app.command("export")
def export_cmd(
    artifact: Path = typer.Argument(..., help="Artifact or run directory."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx or torchscript."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version."),
    check: bool = typer.Option(
        True, "--check/--no-check", help="Compare onnxruntime's scores with PyTorch's."
    ),
) -> None:
    """Export an artifact's scorer: inputs user (B,), history (B,H), history_reward (B,H)."""
    from recloop.artifacts import load_artifact
    from recloop.artifacts.export import FORMATS, check_onnx, export_onnx, export_torchscript

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    art = load_artifact(artifact)
    if fmt == "onnx":
        path = export_onnx(art, out, opset=opset)
        msg = f"wrote {path} (ONNX opset {opset}, batch dimension dynamic)"
        if check:
            diff = check_onnx(path, art)
            msg += f"; onnxruntime matches PyTorch (max abs diff {diff:.2e})"
    else:
        path = export_torchscript(art, out)
        msg = f"wrote {path} (TorchScript)"
    echo(msg)


@app.command("algos")
def algos_cmd(
    name: str = typer.Argument(None, help="One algorithm (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the algorithms and every config field with its default and meaning."""
    import recloop.algos  # noqa: F401  (fills the registry)
    from recloop.algos.base import ALGOS
    from recloop.config import config_to_dict, describe
    from recloop.training.fit import FitConfig

    names = [name] if name else ALGOS.names()
    out: dict[str, Any] = {}
    for n in names:
        cls = ALGOS.get(n)
        ccls = cls.config_class
        # The defaults of an instance: a nested config's default_factory may differ from
        # the nested class's own defaults (e.g. REINFORCE's GRU encoder).
        actual = _flat(config_to_dict(ccls()))
        out[n] = {
            "doc": (ccls.__doc__ or "").strip(),
            "fields": [
                {"name": f, "type": t, "default": repr(actual[f]) if f in actual else d, "doc": doc}
                for f, t, d, doc in describe(ccls)
            ],
        }
    fit_rows = [
        {"name": f"fit.{f}", "type": t, "default": d, "doc": doc}
        for f, t, d, doc in describe(FitConfig)
    ]
    if as_json:
        echo_json({"algos": out, "fit": fit_rows})
        return
    for n, info in out.items():
        echo(f"{n}: {info['doc']}")
        for row in info["fields"]:
            echo(f"  {row['name']} ({row['type']}, default {row['default']})")
            if row["doc"]:
                echo(f"      {' '.join(row['doc'].split())}")
        echo()
    echo("fit loop (section `fit:`, shared by every algorithm):")
    for row in fit_rows:
        echo(f"  {row['name']} ({row['type']}, default {row['default']})")
        if row["doc"]:
            echo(f"      {' '.join(row['doc'].split())}")
