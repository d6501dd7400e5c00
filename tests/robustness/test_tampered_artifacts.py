"""A hostile user's damaged artifacts: each is refused with one ArtifactError line.

One tiny artifact is trained once; each case copies it, damages it in one way and checks
that :func:`load_artifact` raises :class:`ArtifactError` naming the problem, and that
``recloop evaluate / recommend / export`` exit with status 2 and print one line, no
traceback.  Cases marked "re-signed" also rewrite the hashes and the model version, as
someone who knows the format would, so that the check under test is the one that fires,
not the sha256 of the file they edited.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from recloop.artifacts import load_artifact
from recloop.artifacts.manifest import model_version_of
from recloop.cli import main
from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset
from recloop.errors import ArtifactError
from recloop.training.recommender import train_run

FAST = ["encoder.kind=mean", "encoder.history=3", "encoder.embedding_dim=8", "batch_size=16"]
N_USERS, N_ITEMS, LENGTH = 12, 15, 8


def _walk() -> PreparedDataset:
    """User u watches items u, u + 1, ... (mod N); last event test, one before valid."""
    t = np.arange(LENGTH)
    split = np.where(t == LENGTH - 1, TEST, np.where(t == LENGTH - 2, VALID, TRAIN))
    return PreparedDataset.from_arrays(
        user=np.repeat(np.arange(1, N_USERS + 1), LENGTH),
        item=((np.arange(N_USERS)[:, None] + t[None, :]) % N_ITEMS + 1).ravel(),
        timestamp=np.tile(t, N_USERS),
        split=np.tile(split, N_USERS),
        n_items=N_ITEMS,
        user_ids=[f"u{i}" for i in range(1, N_USERS + 1)],
        item_ids=[f"i{i}" for i in range(1, N_ITEMS + 1)],
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(artifact directory, prepared dataset) of one supervised model, trained once."""
    base = tmp_path_factory.mktemp("tamper")
    data = _walk().save(base / "data")
    result = train_run(
        "supervised",
        data,
        base / "run",
        epochs=1,
        overrides=[*FAST, "fit.progress=false", "fit.tensorboard=false", "fit.checkpoint=false"],
    )
    assert result.artifact is not None
    load_artifact(result.artifact)  # the undamaged artifact loads
    return result.artifact, data


# --- tampering helpers -------------------------------------------------------------------


def _manifest(d: Path) -> dict[str, Any]:
    out: dict[str, Any] = json.loads((d / "manifest.json").read_text())
    return out


def _write_manifest(d: Path, m: Any) -> None:
    (d / "manifest.json").write_text(json.dumps(m))


def _edit_manifest(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        m = _manifest(d)
        edit(m)
        _write_manifest(d, m)

    return tamper


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _resign(d: Path, *, shapes: bool = False) -> None:
    """Make the hashes and model version agree with the (edited) files again."""
    m = _manifest(d)
    m["weights_sha256"] = _sha(d / "weights.safetensors")
    for name in ("user_ids.txt", "item_ids.txt"):
        m["id_maps"][name] = _sha(d / name)
    if shapes:
        tensors = load_file(str(d / "weights.safetensors"))
        m["shapes"] = {k: list(v.shape) for k, v in tensors.items()}
    m["model_version"] = model_version_of(m)
    _write_manifest(d, m)


def _edit_tensors(
    edit: Callable[[dict[str, torch.Tensor]], None], *, shapes: bool = False
) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        tensors = load_file(str(d / "weights.safetensors"))
        edit(tensors)
        save_file(tensors, str(d / "weights.safetensors"))
        _resign(d, shapes=shapes)

    return tamper


def _edit_ids(name: str, edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        (d / name).write_bytes(edit((d / name).read_bytes()))
        _resign(d)

    return tamper


def _set_entry(t: dict[str, torch.Tensor], key: str, value: float) -> None:
    t[key] = t[key].clone()
    t[key].view(-1)[3] = value


def _json_list(d: Path) -> None:
    _write_manifest(d, [_manifest(d)])


def _nan_literal(d: Path) -> None:
    text = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(text.replace('"lr": 0.001', '"lr": NaN', 1))


def _drop_key(section: str, key: str) -> Callable[[dict[str, Any]], None]:
    return lambda m: m[section].pop(key)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = m
        for p in parents:
            node = node[p]
        node[last] = value

    return edit


def _set_and_resign(path: str, value: Any) -> Callable[[Path], None]:
    def tamper(d: Path) -> None:
        _edit_manifest(_set(path, value))(d)
        _resign(d)

    return tamper


def _dup_user(ids: bytes) -> bytes:
    lines = ids.split(b"\n")
    lines[2] = lines[1]  # user index 3 gets user 2's raw id
    return b"\n".join(lines)


EMB = "policy.item_embedding.weight"

CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    # (11) damaged manifests that used to crash with a traceback
    "no weights_sha256": (
        _edit_manifest(lambda m: m.pop("weights_sha256")),
        r"manifest\.json: field 'weights_sha256' is missing",
    ),
    "no id_maps": (
        _edit_manifest(lambda m: m.pop("id_maps")),
        r"manifest\.json: field 'id_maps' is missing",
    ),
    "id_maps without user_ids.txt": (
        _edit_manifest(_drop_key("id_maps", "user_ids.txt")),
        r"manifest\.json: field 'id_maps\.user_ids\.txt' is missing",
    ),
    "manifest is a JSON list": (
        _json_list,
        r"manifest\.json: expected a JSON object at the top level, got list",
    ),
    "manifest is not JSON": (
        lambda d: (d / "manifest.json").write_text('{"format_version": 2,'),
        r"manifest\.json: invalid JSON",
    ),
    "NaN literal in the config": (_nan_literal, r"manifest\.json: invalid JSON .*NaN"),
    "format_version true": (
        _edit_manifest(_set("format_version", True)),
        r"artifact format_version True, this recloop reads 2",
    ),
    "n_users is a string": (
        _edit_manifest(_set("policy/n_users", "abc")),
        r"manifest\.json: field 'policy\.n_users': input should be a valid integer, got 'abc'",
    ),
    "n_items is a float": (
        _edit_manifest(_set("policy/n_items", 15.0)),
        r"manifest\.json: field 'policy\.n_items': .*integer, got 15\.0",
    ),
    "unknown top-level field": (
        _edit_manifest(_set("weights", "x")),
        r"manifest\.json: unknown field 'weights'",
    ),
    "deleted id map": (
        lambda d: (d / "item_ids.txt").unlink(),
        r"item_ids\.txt: id map is missing",
    ),
    "deleted weights": (
        lambda d: (d / "weights.safetensors").unlink(),
        r"not an artifact",
    ),
    "missing popularity tensor (re-signed)": (
        _edit_tensors(lambda t: t.pop("popularity"), shapes=True),
        r"weights\.safetensors: tensor 'popularity' is missing",
    ),
    "unknown encoder kind (re-signed)": (
        _set_and_resign("policy/encoder/kind", "nope"),
        r"manifest\.json: field 'policy': cannot rebuild the policy: unknown encoder 'nope'",
    ),
    "unknown encoder field (re-signed)": (
        _set_and_resign("policy/encoder/depth", 3),
        r"manifest\.json policy\.encoder: unknown field 'depth' for EncoderConfig",
    ),
    "edited weights": (
        lambda d: (d / "weights.safetensors").write_bytes(
            (d / "weights.safetensors").read_bytes()[:-4]
        ),
        r"weights\.safetensors: sha256 .* does not match the manifest's",
    ),
    # (12) wrong artifacts that used to load
    "NaN weight (re-signed)": (
        _edit_tensors(lambda t: _set_entry(t, EMB, float("nan"))),
        rf"tensor '{EMB}' holds 1 NaN and 0 inf of \d+ values",
    ),
    "inf weight (re-signed)": (
        _edit_tensors(lambda t: _set_entry(t, EMB, float("inf"))),
        rf"tensor '{EMB}' holds 0 NaN and 1 inf",
    ),
    "NaN popularity (re-signed)": (
        _edit_tensors(lambda t: _set_entry(t, "popularity", float("nan"))),
        r"tensor 'popularity' holds 1 NaN",
    ),
    "negative popularity (re-signed)": (
        _edit_tensors(lambda t: _set_entry(t, "popularity", -4.0)),
        r"tensor 'popularity' holds negative counts",
    ),
    "popularity of the wrong length (re-signed)": (
        _edit_tensors(lambda t: t.update(popularity=t["popularity"][:-2].clone()), shapes=True),
        rf"tensor 'popularity' is torch\.float32 of shape \({N_ITEMS - 1},\), "
        rf"expected float32 of shape \({N_ITEMS + 1},\)",
    ),
    "popularity of the wrong length, shapes not updated (re-signed)": (
        _edit_tensors(lambda t: t.update(popularity=t["popularity"][:-2].clone())),
        rf"field 'shapes\.popularity' is \[{N_ITEMS + 1}\], the tensor in weights\.safetensors "
        rf"has \[{N_ITEMS - 1}\]",
    ),
    "extra tensor (re-signed)": (
        _edit_tensors(lambda t: t.update(backdoor=torch.zeros(2)), shapes=True),
        r"tensors do not match the policy spec: unexpected \['backdoor'\]",
    ),
    "declared shapes disagree with the tensors": (
        _edit_manifest(_set(f"shapes/{EMB}", [N_ITEMS + 1, 9])),
        rf"field 'shapes\.{EMB}' is \[{N_ITEMS + 1}, 9\], the tensor in weights\.safetensors "
        rf"has \[{N_ITEMS + 1}, 8\]",
    ),
    "encoder config disagrees with the tensors (re-signed)": (
        _set_and_resign("policy/encoder/embedding_dim", 4),
        r"weights\.safetensors: tensors do not match the policy spec: "
        r"'policy\.head\.net\.0\.weight' has shape \(16, 16\), expected \(16, 8\)",
    ),
    "duplicate user id (re-signed)": (
        _edit_ids("user_ids.txt", _dup_user),
        r"user_ids\.txt: duplicate id 'u2' on lines 2 and 3",
    ),
    "id map one line short (re-signed)": (
        _edit_ids("item_ids.txt", lambda b: b"\n".join(b.split(b"\n")[:-2]) + b"\n"),
        rf"item_ids\.txt: holds {N_ITEMS - 1} ids, the manifest's policy\.n_items is {N_ITEMS}",
    ),
    "id map not UTF-8 (re-signed)": (
        _edit_ids("item_ids.txt", lambda b: b"\xff" + b),
        r"item_ids\.txt: not UTF-8 text",
    ),
    "edited encoder config, same model_version": (
        _edit_manifest(_set("policy/encoder/dropout", 0.5)),
        r"field 'model_version' is 'supervised-[0-9a-f]{12}' but the weights, id maps, config "
        r"and policy spec give 'supervised-[0-9a-f]{12}': the manifest was edited",
    ),
    "edited algorithm config, same model_version": (
        _edit_manifest(_set("config/seed", 7)),
        r"field 'model_version' .* the manifest was edited",
    ),
    "id map swapped with its sha256, same model_version": (
        lambda d: (
            (d / "item_ids.txt").write_text("i2\ni1\n" + "".join(f"i{i}\n" for i in range(3, 16))),
            _edit_manifest(_set("id_maps/item_ids.txt", _sha(d / "item_ids.txt")))(d),
        ),
        r"field 'model_version' .* the manifest was edited",
    ),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def tampered(
    request: pytest.FixtureRequest, pristine: tuple[Path, Path], tmp_path: Path
) -> tuple[Path, str]:
    """(damaged copy of the artifact, regex its error must match)."""
    tamper, pattern = CASES[request.param]
    d = tmp_path / "artifact"
    shutil.copytree(pristine[0], d)
    tamper(d)
    return d, pattern


def test_load_refuses_with_one_line(tampered: tuple[Path, str]) -> None:
    d, pattern = tampered
    with pytest.raises(ArtifactError, match=pattern) as info:
        load_artifact(d)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("command", ["evaluate", "recommend", "export"])
def test_cli_exits_2_with_one_line(
    command: str,
    tampered: tuple[Path, str],
    pristine: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    d, pattern = tampered
    args = {
        "evaluate": ["evaluate", d, "--data", pristine[1]],
        "recommend": ["recommend", d, "--user", "u1"],
        "export": ["export", d, "--out", tmp_path / "p.onnx", "--no-check"],
    }[command]
    code = main(["--no-progress", "-q", *map(str, args)])
    out = capsys.readouterr()
    assert code == 2
    assert out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in out.err
    assert re.search(pattern, lines[0])
    assert not (tmp_path / "p.onnx").exists()
