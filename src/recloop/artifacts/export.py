"""Export a policy's scorer to ONNX (or TorchScript) for serving outside Python/PyTorch.

The exported graph is ``scores = policy(user, history, history_reward)``:

========================  ==========  =====================================================
input / output            dtype       shape
========================  ==========  =====================================================
``user``                  int64       (B,) user index, 0 = unknown
``history``               int64       (B, H) item indices, left-padded with 0
``history_reward``        float32     (B, H) rewards of those items, 0 at padding
``scores``                float32     (B, N + 1) item scores; column 0 (padding) is -inf
========================  ==========  =====================================================

B is dynamic.  Every export declares all three inputs, in this order, even when the policy
ignores one (the tracer drops unused inputs; they are put back as unused graph inputs),
so a server can always feed the same three arrays.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from recloop.artifacts.bundle import Artifact, load_artifact
from recloop.artifacts.policy import PolicyNet
from recloop.errors import ArtifactError

logger = logging.getLogger(__name__)

INPUTS = ("user", "history", "history_reward")
OUTPUT = "scores"
FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 17


def _policy_of(source: Artifact | PolicyNet | Path | str) -> PolicyNet:
    if isinstance(source, PolicyNet):
        return source
    if isinstance(source, Artifact):
        return source.policy
    return load_artifact(Path(source)).policy


def example_inputs(
    policy: PolicyNet, *, batch: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random valid inputs (some padding, one unknown user) for tracing and checks."""
    g = torch.Generator().manual_seed(seed)
    spec = policy.spec
    h = spec.encoder.history
    user = torch.randint(0, spec.n_users + 1, (batch,), generator=g)
    history = torch.randint(1, spec.n_items + 1, (batch, h), generator=g)
    pad = torch.randint(0, h + 1, (batch,), generator=g)  # left padding per row
    history = history.masked_fill(torch.arange(h).unsqueeze(0) < pad.unsqueeze(1), 0)
    reward = torch.rand((batch, h), generator=g) * (history != 0)
    return user, history, reward


def _cpu_eval_copy(policy: PolicyNet) -> PolicyNet:
    p = copy.deepcopy(policy).to("cpu")
    p.eval()
    return p


def export_onnx(
    source: Artifact | PolicyNet | Path | str,
    path: Path | str,
    *,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write the scorer of ``source`` (policy, artifact or artifact/run directory) to ONNX.

    Uses the TorchScript-based exporter (fast and dependable for these small graphs); the
    batch dimension is dynamic.  Needs the ``onnx`` package (``pip install recloop[export]``).
    """
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        raise ArtifactError(
            "ONNX export needs the onnx package: pip install 'recloop[export]'"
        ) from None
    policy = _cpu_eval_copy(_policy_of(source))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = example_inputs(policy)
    dynamic = {name: {0: "batch"} for name in (*INPUTS, OUTPUT)}
    with warnings.catch_warnings():
        # Tracing a fixed-shape graph is what we want here, so the tracer's warnings about
        # Python values becoming constants are noise; torch's own deprecation notices about
        # this exporter stay visible (the dynamo exporter took 2-16 s per model here).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            policy,
            args,
            str(path),
            input_names=list(INPUTS),
            output_names=[OUTPUT],
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
    model = onnx.load(str(path))
    present = {i.name: i for i in model.graph.input}
    h = policy.spec.encoder.history
    declared = {
        "user": helper.make_tensor_value_info("user", TensorProto.INT64, ["batch"]),
        "history": helper.make_tensor_value_info("history", TensorProto.INT64, ["batch", h]),
        "history_reward": helper.make_tensor_value_info(
            "history_reward", TensorProto.FLOAT, ["batch", h]
        ),
    }
    ordered = [present.get(name, declared[name]) for name in INPUTS]
    others = [i for i in model.graph.input if i.name not in INPUTS]
    del model.graph.input[:]
    model.graph.input.extend(ordered + others)
    model.doc_string = (
        f"recloop policy scorer: n_users={policy.spec.n_users}, n_items={policy.spec.n_items}, "
        f"H={h}, encoder={policy.spec.encoder.kind}, head={policy.spec.head.kind}"
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def export_torchscript(source: Artifact | PolicyNet | Path | str, path: Path | str) -> Path:
    """Write a traced TorchScript module of the scorer (same inputs and output as ONNX)."""
    policy = _cpu_eval_copy(_policy_of(source))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(policy, example_inputs(policy), check_trace=False)
    traced.save(str(path))
    return path


def check_onnx(
    path: Path | str,
    source: Artifact | PolicyNet | Path | str,
    *,
    batch: int = 7,
    seed: int = 1,
    relative: bool = False,
) -> float:
    """Max absolute difference between onnxruntime and PyTorch scores on random inputs
    (with ``relative``: divided by max(1, the largest finite |score|), so that policies with
    large scores, e.g. Q-values, are judged by the same tolerance).

    Uses a batch size other than the traced one, so a graph that froze the batch fails.
    -inf entries (the padding column) must match exactly and count as 0.  Needs
    ``onnxruntime``.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ArtifactError(
            "checking an ONNX export needs onnxruntime: pip install 'recloop[export]'"
        ) from None
    policy = _cpu_eval_copy(_policy_of(source))
    user, history, reward = example_inputs(policy, batch=batch, seed=seed)
    with torch.inference_mode():
        expected = policy(user, history, reward).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"user": user.numpy(), "history": history.numpy(), "history_reward": reward.numpy()}
    (got,) = session.run([OUTPUT], {i.name: feed[i.name] for i in session.get_inputs()})
    if got.shape != expected.shape:
        raise ArtifactError(
            f"{path}: ONNX scores have shape {got.shape}, expected {expected.shape}"
        )
    inf_e, inf_g = np.isinf(expected), np.isinf(got)
    if not (np.array_equal(inf_e, inf_g) and np.array_equal(expected[inf_e], got[inf_g])):
        raise ArtifactError(f"{path}: ONNX scores differ from PyTorch in their -inf entries")
    finite = ~inf_e
    if not finite.any():
        return 0.0
    diff = float(np.abs(got[finite] - expected[finite]).max())
    return diff / max(1.0, float(np.abs(expected[finite]).max())) if relative else diff
