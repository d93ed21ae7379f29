"""Iteration (one batch, one policy_version) vs optimizer step: the old "step" names fail with the new one."""
from __future__ import annotations

import pytest

from instructrl.config import ConfigError, load
from instructrl.learner import checkpoint
from instructrl.learner.config import LearnerConfig


def test_old_max_steps_key_names_max_iterations():
    assert load(LearnerConfig, None, ["model.actor_path=/m", "ppo.max_iterations=7"]).ppo.max_iterations == 7
    with pytest.raises(ConfigError, match=r"^ppo\.max_steps: this key was renamed; use ppo\.max_iterations$"):
        load(LearnerConfig, None, ["model.actor_path=/m", "ppo.max_steps=7"])


def test_demo_and_launcher_keys_moved_too(capsys):
    from instructrl.demo.main import main as demo_main
    from instructrl.launcher.config import LaunchConfig
    from instructrl.launcher.run import plan

    assert demo_main(["sizes.ppo_steps=3"]) == 2
    assert "sizes.ppo_steps: this key was renamed; use sizes.ppo_iterations" in capsys.readouterr().err
    cfg = load(LaunchConfig, None, ["reference.model=/m", "rollout.engine.model=/m", "learner.model.actor_path=/m",
                                    "reward.rule=instructrl.reward.rules:exact_match", "learner.ppo.max_steps=3"])
    with pytest.raises(ConfigError, match=r"learner\.ppo\.max_steps: this key was renamed; use ppo\.max_iterations"):
        plan(cfg, "redis://x")


def test_latest_is_the_newest_complete_iteration_dir(tmp_path):
    assert checkpoint.latest(str(tmp_path / "none")) is None
    for v in (2, 10):
        d = tmp_path / f"iteration-{v:08d}"
        d.mkdir()
        (d / "state.json").write_text("{}")
    (tmp_path / "iteration-00000011").mkdir()  # no state.json: a save that did not finish
    (tmp_path / ".tmp-iteration-00000012").mkdir()
    assert checkpoint.latest(str(tmp_path)) == str(tmp_path / "iteration-00000010")
    assert checkpoint.iteration_dir(str(tmp_path), 10) == str(tmp_path / "iteration-00000010")


def test_checkpoints_of_the_old_layout_are_not_silently_ignored(tmp_path):
    old = tmp_path / "step-00000004"
    old.mkdir()
    (old / "state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"step-NNNNNNNN/.*iteration-NNNNNNNN/"):
        checkpoint.latest(str(tmp_path))
