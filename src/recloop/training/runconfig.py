"""One training run's configuration: the algorithm's config plus the fit loop's settings.

A run is configured by a YAML file and ``--set key=value`` overrides with the same layout:

.. code-block:: yaml

    algo: reinforce          # the algorithm's name (or pass --algo)
    lr: 0.001                # algorithm fields at the top level ...
    encoder: {kind: gru, history: 20}
    fit:                     # ... and the fit loop's under ``fit:``
      epochs: 10
      patience: 3

``algo:`` may instead be a mapping holding the algorithm's fields (``algo: {lr: 0.001}``);
top-level fields and that section are merged.  ``--set lr=0.01``, ``--set encoder.kind=mean``
and ``--set fit.epochs=3`` address the same places.  Every name and type is checked
before any data is read, and an error names the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recloop.algos.base import ALGOS, AlgoConfig
from recloop.config import config_from_dict, merge, parse_overrides, read_yaml
from recloop.errors import ConfigError
from recloop.training.fit import FitConfig


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A validated run configuration."""

    algo: str
    """Registered algorithm name."""
    config: AlgoConfig
    """The algorithm's config (its class is ``ALGOS.get(algo).config_class``)."""
    fit: FitConfig
    """The fit loop's settings."""


def split_sections(
    data: Mapping[str, Any], *, source: str
) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """``(algorithm name or None, algorithm fields, fit fields)`` of a run mapping."""
    rest = dict(data)
    name: str | None = None
    algo_section: dict[str, Any] = {}
    raw_algo = rest.pop("algo", None)
    if isinstance(raw_algo, str):
        name = raw_algo
    elif isinstance(raw_algo, Mapping):
        algo_section = dict(raw_algo)
        inner = algo_section.pop("name", None)
        if inner is not None:
            name = str(inner)
    elif raw_algo is not None:
        raise ConfigError(f"{source}: field 'algo' must be a name or a mapping, got {raw_algo!r}")
    fit_section = rest.pop("fit", {})
    if not isinstance(fit_section, Mapping):
        raise ConfigError(f"{source}: field 'fit' must be a mapping, got {fit_section!r}")
    return name, merge(rest, algo_section), dict(fit_section)


def load_run_config(
    algo: str | None = None,
    *,
    path: Path | None = None,
    values: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Validated run config from (rising priority) ``base``, a YAML file, ``values``, ``--set``.

    ``values`` uses the file's layout (e.g. ``{"fit": {"epochs": 3}, "pretrained": DIR}``);
    None entries are ignored.  ``algo`` (the ``--algo`` flag) must agree with an ``algo:``
    name in the file or the base when both are given.
    """
    import recloop.algos  # noqa: F401  (fills the registry)

    data: dict[str, Any] = dict(base or {})
    sources: list[str] = []
    if path is not None:
        file_name, *_ = split_sections(read_yaml(path), source=str(path))
        base_name, *_ = split_sections(data, source="base")
        if base_name is not None and file_name is not None and base_name != file_name:
            raise ConfigError(f"{path}: algo {file_name!r} differs from the run's {base_name!r}")
        data = merge(data, read_yaml(path))
        sources.append(str(path))
    if values:
        data = merge(data, _drop_none(values))
    if overrides:
        data = merge(data, parse_overrides(overrides))
        sources.append("--set")
    source = " with ".join(sources) or "config"
    name, algo_data, fit_data = split_sections(data, source=source)
    if algo is not None:
        if name is not None and name != algo:
            raise ConfigError(f"{source}: field 'algo' is {name!r} but --algo is {algo!r}")
        name = algo
    if name is None:
        raise ConfigError(
            f"no algorithm given: pass --algo or set 'algo: NAME' in the config "
            f"(known: {', '.join(ALGOS.names())})"
        )
    cls = ALGOS.get(name).config_class
    config = config_from_dict(cls, algo_data, source=source)
    fit_data = merge(dict(cls.fit_defaults), fit_data)  # the algorithm's tuned fit settings
    fit = config_from_dict(FitConfig, fit_data, source=f"{source} (fit section)")
    return RunConfig(algo=name, config=config, fit=fit)


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            inner = _drop_none(v)
            if inner:
                out[k] = inner
        elif v is not None:
            out[k] = v
    return out
