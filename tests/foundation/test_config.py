"""Typed config: nested loading, overrides, and errors that name the field."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest

from instructrl.config import ConfigError, field, help_lines, load


@dataclasses.dataclass
class PPO:
    kl_coef: float = field(0.1, help="beta")
    epochs: int = field(4, help="PPO epochs")
    estimator: str = field("k1", help="k1|k2|k3")
    RENAMED: ClassVar[dict[str, str]] = {"max_steps": "ppo.max_iterations"}


@dataclasses.dataclass
class Top:
    ppo: PPO = field(default_factory=PPO, help="ppo")
    name: str | None = field(None, help="run name")
    tags: list[str] = field(default_factory=list, help="tags")


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  kl_coef: 0.2\nname: run1\ntags: [a, b]\n")
    cfg = load(Top, f, ["ppo.epochs=2", "ppo.kl_coef=0.05"])
    assert cfg == Top(PPO(0.05, 2, "k1"), "run1", ["a", "b"])


@pytest.mark.parametrize("overrides,msg", [
    (["ppo.kl=1"], "ppo.kl: unknown field"),
    (["ppo.epochs=two"], "ppo.epochs: expected an integer"),
    (["ppo=3"], "ppo: expected a mapping"),
    (["tags=x"], "tags: expected a list"),
    (["novalue"], "expected key=value"),
    (["ppo.max_steps=3"], "ppo.max_steps: this key was renamed; use ppo.max_iterations"),
])
def test_errors_name_the_field(overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        load(Top, None, overrides)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(Top, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(Top, bad)


def test_help_lines_are_dotted():
    lines = help_lines(Top)
    assert "ppo.kl_coef (float, default 0.1): beta" in lines


@dataclasses.dataclass
class Worker:
    ppo: PPO = field(default_factory=lambda: PPO(epochs=8), help="a section whose default differs from PPO()")
    inner: Top = field(default_factory=lambda: Top(ppo=PPO(kl_coef=0.5), name="w"), help="two levels")


def test_a_section_given_in_part_keeps_its_fields_default_instance():
    """`ppo.kl_coef=...` alone must not reset `ppo.epochs` to PPO's class default."""
    cfg = load(Worker, None, ["ppo.kl_coef=0.3", "inner.ppo.estimator=k3"])
    assert cfg.ppo == PPO(kl_coef=0.3, epochs=8)
    assert cfg.inner == Top(ppo=PPO(kl_coef=0.5, estimator="k3"), name="w")
    assert load(Worker, None, []) == Worker()
