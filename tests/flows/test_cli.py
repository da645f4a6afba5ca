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


def forgeline(*args, cwd, timeout=600, extra_env=None):
    env = {**os.environ, "PREFECT_HOME": str(Path(cwd) / ".prefect"), "FORGELINE_PROGRESS": "0"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra_env or {})
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


def test_config_command_masks_credentials_in_urls(tmp_path):
    result = forgeline("config", "--set", "crawl.seeds=[https://user:pw-SECRET@example.org/]",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pw-SECRET" not in result.stdout + result.stderr
    assert yaml.safe_load(result.stdout)["crawl"]["seeds"] == ["https://***@example.org/"]
    bad = forgeline("config", "--set", "crawl.seeds=[ftp://user:pw-SECRET@example.org/]",
                    cwd=tmp_path)
    assert bad.returncode == 2 and "crawl.seeds" in bad.stderr
    assert "pw-SECRET" not in bad.stdout + bad.stderr


@pytest.mark.slow
def test_non_utf8_jsonl_exits_2_naming_the_line(tmp_path):
    source = tmp_path / "latin1.jsonl"
    source.write_bytes(b'{"id": "a", "text": "one"}\n{"id": "b", "text": "two"}\n'
                       b'{"id": "c", "text": "caf\xe9"}\n')
    result = forgeline("run", "--set", f"source.paths=[{source}]", "--until", "crawl",
                       cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"forgeline: error: crawl: {source}:3 is not UTF-8"), message
    assert "UnicodeDecodeError" not in result.stderr


@pytest.mark.slow
def test_tracking_uri_password_is_never_printed(tmp_path):
    """MLflow quotes the tracking URI when its server cannot be reached: masked here."""
    result = forgeline("run", "--until", "crawl", cwd=tmp_path, timeout=300, extra_env={
        "MLFLOW_TRACKING_URI": "http://forgeline:pw-SECRET@127.0.0.1:9",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "http://***@127.0.0.1:9" in result.stderr
    assert "pw-SECRET" not in result.stdout + result.stderr


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
                                       "tokenize", "pretrain", "finetune", "dpo", "classify",
                                       "ner", "evaluate", "fewshot"]
    assert summary["stages"]["crawl"]["count"] >= 10
    # the classification and NER tasks are derived from the docs themselves
    assert summary["stages"]["classify"]["count"] > 0 and summary["stages"]["ner"]["count"] > 0
    assert {"classify_accuracy", "ner_f1", "fewshot_accuracy_k0"} <= set(summary["metrics"])
    assert summary["champion"]["decision"] == "first"
    assert "forgeline run summary" in result.stderr
