"""Full-ranking evaluation of recommendation policies over the whole catalogue."""

from recloop.evaluation.metrics import (
    METRICS,
    Metric,
    average_precision,
    hit_rate,
    mrr,
    ndcg,
    precision,
    recall,
)
from recloop.evaluation.protocol import (
    EvalConfig,
    EvalUsers,
    RankingReport,
    Scorer,
    build_eval_users,
    evaluate,
    evaluate_users,
    split_code,
)

__all__ = [
    "METRICS",
    "EvalConfig",
    "EvalUsers",
    "Metric",
    "RankingReport",
    "Scorer",
    "average_precision",
    "build_eval_users",
    "evaluate",
    "evaluate_users",
    "hit_rate",
    "mrr",
    "ndcg",
    "precision",
    "recall",
    "split_code",
]
