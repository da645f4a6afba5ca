"""The `forgeline` command as a user runs it: exit codes, messages, --json, help."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"


def forgeline(*args, cwd, timeout=600):
    env = {**os.environ, "PREFECT_HOME": str(Path(cwd) / ".prefect"), "FORGELINE_PROGRESS": "0"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_help_explains_commands_and_settings(tmp_path):
    top = forgeline("--help", cwd=tmp_path)
    assert top.returncode == 0 and "run" in top.stdout and "config" in top.stdout
    run = forgeline("run", "--help", cwd=tmp_path)
    for flag in ("--config", "--set", "--until", "--workdir", "--json", "MLFLOW_TRACKING_URI"):
        assert flag in run.stdout


def test_invalid_setting_exits_2_naming_the_field_before_any_work(tmp_path):
    result = forgeline("run", "--set", "pretrain.learning_rate=-1", cwd=tmp_path)
    assert result.returncode == 2
    assert "pretrain.learning_rate" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "work").exists()


def test_bad_config_file_exits_2_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("crawl:\n  max_pages: -5\nfilter:\n  min_wordz: 3\n")
    result = forgeline("run", "--config", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "crawl.max_pages" in result.stderr and "filter.min_wordz" in result.stderr


def test_config_command_prints_loadable_explained_yaml(tmp_path):
    result = forgeline("config", "--set", "pretrain.max_steps=5", cwd=tmp_path)
    assert result.returncode == 0
    assert yaml.safe_load(result.stdout)["pretrain"]["max_steps"] == 5
    assert result.stdout.count("\n# ") + result.stdout.count("  # ") > 20


@pytest.mark.slow
def test_empty_corpus_fails_in_the_stage_that_found_it(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"{i}.txt").write_text("too short")
    result = forgeline("run", "--config", str(TINY_CONFIG), "--set", f"source.paths=[{docs}]",
                       cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    message = result.stderr.strip().splitlines()[-1]
    # extract drops the three 9-character documents (min_chars) and says so: nothing is
    # left for the later stages, so the run stops there instead of failing in training
    assert message.startswith("forgeline: error: extract: no document kept out of 3"), message
    assert "extract.min_chars" in message
    assert "Traceback" not in result.stdout
    assert not list((tmp_path / "work" / "stages").glob("tokenize-*"))


@pytest.mark.slow
def test_json_summary_is_the_last_line(tmp_path, corpus):
    result = forgeline("run", "--config", str(TINY_CONFIG), "--set", f"source.paths=[{corpus}]",
                       "--until", "dedup", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["mlflow_run_id"]
    assert list(summary["stages"]) == ["crawl", "extract", "filter", "dedup"]
    for stage in summary["stages"].values():
        assert Path(stage["output"]).is_dir() and stage["count"] > 0


@pytest.mark.slow
def test_default_source_end_to_end_on_tiny_settings(tmp_path):
    """The embedded default (this Python's docs over loopback HTTP), every stage, tiny model."""
    result = forgeline("run", "--config", str(TINY_CONFIG), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(summary["stages"]) == ["crawl", "extract", "filter", "dedup", "pii",
                                       "tokenize", "pretrain", "finetune", "evaluate"]
    assert summary["stages"]["crawl"]["count"] >= 10
    assert "forgeline run summary" in result.stderr
