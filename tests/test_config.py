from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from recloop.config import (
    check,
    config_from_dict,
    config_to_dict,
    describe,
    field_docs,
    load_config,
    parse_overrides,
)
from recloop.errors import ConfigError
from recloop.registry import Registry


@dataclass(frozen=True, kw_only=True)
class Inner:
    """Nested."""

    width: int = 4
    """How wide."""


@dataclass(frozen=True, kw_only=True)
class Outer:
    """Top."""

    lr: float = 1e-3
    """Learning rate."""
    name: str = "x"
    """A name."""
    cap: float | None = 2.0
    """Optional cap."""
    sizes: tuple[int, ...] = (1, 2)
    """Layer sizes."""
    inner: Inner = field(default_factory=Inner)
    """Nested block."""

    def __post_init__(self) -> None:
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")


def test_from_dict_types_and_nesting() -> None:
    cfg = config_from_dict(Outer, {"lr": 0.5, "cap": None, "sizes": [3], "inner": {"width": 9}})
    assert cfg == Outer(lr=0.5, cap=None, sizes=(3,), inner=Inner(width=9))


def test_unknown_field_names_it_and_suggests() -> None:
    with pytest.raises(ConfigError, match=r"unknown field 'inner.widht'.*did you mean width"):
        config_from_dict(Outer, {"inner": {"widht": 3}}, source="f.yaml")


def test_wrong_type_names_field_and_value() -> None:
    with pytest.raises(ConfigError, match=r"f.yaml: field 'lr' expects float, got 'fast'"):
        config_from_dict(Outer, {"lr": "fast"}, source="f.yaml")


def test_post_init_range_check_is_reported_with_source() -> None:
    with pytest.raises(ConfigError, match=r"f.yaml: lr must be > 0, got -1.0"):
        config_from_dict(Outer, {"lr": -1}, source="f.yaml")


def test_overrides_parse_yaml_values_and_dotted_keys() -> None:
    assert parse_overrides(["inner.width=7", "cap=null", "sizes=[4, 5]", "name=abc"]) == {
        "inner": {"width": 7},
        "cap": None,
        "sizes": [4, 5],
        "name": "abc",
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["lr"])
    with pytest.raises(ConfigError, match="'inner' is set both as a value and a group"):
        parse_overrides(["inner=1", "inner.width=7"])
    with pytest.raises(ConfigError, match="'inner' is set both as a group and a value"):
        parse_overrides(["inner.width=7", "inner=1"])


def test_load_config_priority(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("lr: 0.1\nname: file\ninner:\n  width: 2\n")
    cfg = load_config(Outer, path=p, values={"name": "flag", "cap": None}, overrides=["lr=0.2"])
    assert (cfg.lr, cfg.name, cfg.cap, cfg.inner.width) == (0.2, "flag", 2.0, 2)


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("lr: 0.1\nname: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        load_config(Outer, path=p)


def test_docs_and_describe_and_roundtrip() -> None:
    assert field_docs(Outer)["lr"] == "Learning rate."
    rows = {r[0]: r for r in describe(Outer)}
    assert rows["inner.width"][3] == "How wide."
    assert rows["cap"][2] == "2.0"
    d = config_to_dict(Outer())
    assert d["sizes"] == [1, 2] and d["inner"] == {"width": 4}
    assert config_from_dict(Outer, d) == Outer()


def test_registry() -> None:
    reg: Registry[type] = Registry("thing")

    @reg.register("a")
    class A:
        pass

    assert reg.get("a") is A and reg.names() == ["a"] and "a" in reg
    with pytest.raises(ConfigError, match=r"unknown thing 'b' \(known: a\)"):
        reg.get("b")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(A)


@dataclass(frozen=True, kw_only=True)
class WithOwnDefault:
    """A nested section whose default differs from the nested class's defaults."""

    inner: Inner = field(default_factory=lambda: Inner(width=64))
    """Nested block with its own default."""


def test_partial_section_lands_on_the_fields_own_default() -> None:
    assert config_from_dict(WithOwnDefault, {"inner": {}}).inner.width == 64
    rows = {r[0]: r for r in describe(WithOwnDefault)}
    assert rows["inner.width"][2] == "64"
