"""`instructrl sft|rm|dpo --config FILE` as real subprocesses, end to end, a few steps each."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from instructrl.offline import dpo, rm, sft

# an in-process train() in this pytest process wrote a single-process rendezvous
# into os.environ; a child must make its own
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _run(args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "instructrl.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.mark.parametrize("stage, data", [
    ("sft", {"train_file": "demos", "eval_file": "demos_eval"}),
    ("rm", {"train_file": "rankings", "eval_file": "rankings_eval_gold"}),
    ("dpo", {"train_file": "pairs", "eval_file": "pairs_eval"}),
])
def test_stage_cli_end_to_end(stage, data, tiny_model, task_files, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / f"{stage}.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model), "output_dir": str(out),
        "data": {k: str(task_files[v]) for k, v in data.items()},
        "train": {"max_steps": 3, "micro_batch_size": 4, "log_every": 1},
    }))
    proc = _run([stage, "--config", str(config), "optim.lr=1e-4"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    assert final["stage"] == stage and final["steps"] == 3
    assert f"{stage}: 100%" in proc.stderr  # the progress bar
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m.get("split") == "train"] == [1, 2, 3]
    assert lines[-1]["event"] == "done"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "instructrl.json", "metrics.jsonl"} <= names
    saved = json.loads((out / "instructrl.json").read_text())
    assert saved["config"]["optim"]["lr"] == 1e-4  # the override was applied


@pytest.mark.parametrize("module, field", [(sft, "data.train_file"), (rm, "data.demonstrations_file"),
                                           (dpo, "dpo.beta")])
def test_help_lists_typed_fields(module, field, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert field in text and "deepspeed.zero_stage (int, default 0)" in text


def test_config_errors_name_the_field(tmp_path, capsys):
    assert sft.main(["model=m", f"output_dir={tmp_path}/o"]) == 2
    assert "data.train_file: required" in capsys.readouterr().err
    assert sft.main(["model=m", "output_dir=o", "data.train_file=x", "optim.lrr=1"]) == 2
    assert "optim.lrr: unknown field" in capsys.readouterr().err


def test_demo_shows_a_stage_progress(tiny_model, task_files, tmp_path, monkeypatch):
    """issue 16: `instructrl demo` said nothing during SFT and RM. Without the progress bar a stage
    prints a line per train/eval line of its log, and the demo echoes them as the stage runs."""
    from instructrl.demo.main import _run

    for k in DIST_ENV:
        monkeypatch.delenv(k, raising=False)
    shown: list[str] = []
    _run("sft", ["sft", f"model={tiny_model}", f"output_dir={tmp_path / 'out'}",
                 f"data.train_file={task_files['demos']}", f"data.eval_file={task_files['demos_eval']}",
                 "train.max_steps=3", "train.micro_batch_size=4", "train.log_every=1", "train.progress=false"],
         tmp_path, echo=shown.append, echo_every_s=0.0)
    assert [x.split(":")[0] for x in shown] == ["sft step 1/3 train", "sft step 2/3 train", "sft step 3/3 train",
                                                "sft step 3/3 eval"]
    assert all("loss " in x for x in shown)
