"""Shared pieces of the algorithm contract: the optimisers built for every algorithm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recloop.algos.base import ParamGroup, RowAdam, build_adam


def sparse_steps(opt_cls: type, steps: int = 5) -> torch.Tensor:
    torch.manual_seed(0)
    table = nn.Embedding(50, 4, sparse=True)
    opt = opt_cls(table.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 50, (12,), generator=g)  # duplicates included
        opt.zero_grad(set_to_none=True)
        (table(idx) ** 2).sum().backward()
        opt.step()
    return table.weight.detach()


def test_row_adam_matches_sparse_adam() -> None:
    """The fast lazy Adam against torch's SparseAdam (the slow reference)."""
    torch.testing.assert_close(sparse_steps(RowAdam), sparse_steps(torch.optim.SparseAdam))


def test_row_adam_leaves_untouched_rows() -> None:
    table = nn.Embedding(10, 3, sparse=True)
    before = table.weight.detach().clone()
    opt = RowAdam(table.parameters(), lr=0.1)
    table(torch.tensor([2, 2, 7])).sum().backward()
    opt.step()
    moved = (table.weight != before).any(dim=1)
    assert moved.tolist() == [i in (2, 7) for i in range(10)]
    state = opt.state_dict()["state"][0]
    assert state["step"] == 1 and float(state["exp_avg"][0].abs().sum()) == 0.0


def test_row_adam_dense_gradient_is_adam() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 3)
    opt_a, opt_b = RowAdam(a.parameters(), lr=0.05), torch.optim.Adam(b.parameters(), lr=0.05)
    for _ in range(4):
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight)


def test_build_adam_splits_dense_and_sparse() -> None:
    table = nn.Embedding(10, 3, sparse=True)
    lin = nn.Linear(3, 3)
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    opts = build_adam(
        [
            ParamGroup(params=[table.weight, *lin.parameters(), frozen], lr=0.1),
            ParamGroup(params=[table.weight], lr=0.5),  # already placed: ignored
        ],
        sparse=[table.weight],
    )
    assert set(opts) == {"adam", "row_adam"}
    assert [len(g["params"]) for g in opts["adam"].param_groups] == [2]
    assert [len(g["params"]) for g in opts["row_adam"].param_groups] == [1]
    assert opts["row_adam"].param_groups[0]["lr"] == pytest.approx(0.1)
