"""`forgeline run` again after pretraining was SIGKILLed resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_a_killed_pretraining_resumes_when_the_run_is_repeated(corpus, tmp_path):
    env = {**os.environ, "FORGELINE_PROGRESS": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    work = tmp_path / "work"
    command = [str(BIN / "forgeline"), "run", "--config", str(ROOT / "configs" / "tiny.yaml"),
               "--workdir", str(work), "--until", "pretrain", "--json",
               "--set", f"source.paths=[{corpus}]", "--set", "pretrain.max_steps=400",
               "--set", "pretrain.checkpoint_every_steps=20", "--set", "pretrain.num_threads=1"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    checkpoints: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        checkpoints = list((work / "stages").glob(".partial-pretrain-*/checkpoints/step-*.ckpt"))
        if checkpoints:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoints, "pretraining wrote no checkpoint before the run ended"

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600,
                           check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from step" in rerun.stdout + rerun.stderr
    stage = json.loads(rerun.stdout.strip().splitlines()[-1])["stages"]["pretrain"]
    assert stage["count"] == 400
    config = json.loads((Path(stage["output"]) / "config.json").read_text())
    assert config["resumed_from_step"] >= 20
    assert not list((work / "stages").glob(".partial-pretrain-*"))
