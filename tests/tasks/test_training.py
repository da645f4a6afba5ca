"""The training runner: checkpoints, and exact resume after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tasks.pretrain import PretrainConfig
from tasks.tokenize import TokenizeConfig, tokenize_corpus
from tasks.training import checkpoint_files
from tests.tasks.test_pretrain import repetitive_corpus

SETTINGS = {"d_model": 32, "n_layers": 2, "n_heads": 4, "context_length": 32, "batch_size": 8,
            "max_steps": 240, "warmup_steps": 5, "val_every_steps": 50, "val_batches": 2,
            "log_every_steps": 1, "checkpoint_every_steps": 20, "num_threads": 1,
            "dropout": 0.1}
# Runs pretraining in its own process, appending every step's train loss to losses.jsonl.
SCRIPT = textwrap.dedent("""
    import json, logging, sys
    from pathlib import Path
    logging.basicConfig(level=logging.INFO)
    from tasks.pretrain import PretrainConfig, pretrain
    tokens, out, settings = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    with open(out.parent / (out.name + "-losses.jsonl"), "a") as fh:
        def record(metrics, step):
            if "train_loss" in metrics:
                fh.write(json.dumps([step, metrics["train_loss"]]) + "\\n")
                fh.flush()
        result = pretrain(PretrainConfig(**settings), tokens, out, on_metrics=record)
    print(json.dumps(result["stats"]))
""")


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    repetitive_corpus(root / "corpus")
    tokenize_corpus(TokenizeConfig(vocab_size=300, val_fraction=0.2), root / "corpus",
                    root / "tokens")
    return root / "tokens"


def start(tokens: Path, out: Path) -> subprocess.Popen:
    root = Path(__file__).resolve().parents[2]
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(tokens), str(out),
                             json.dumps(SETTINGS)], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FORGELINE_PROGRESS": "0"})


def losses(out: Path) -> list[tuple[int, float]]:
    path = out.parent / (out.name + "-losses.jsonl")
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()]


def test_sigkilled_pretraining_resumes_at_the_next_step_with_the_same_losses(tokenized, tmp_path):
    reference = start(tokenized, tmp_path / "reference")
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    expected = dict(losses(tmp_path / "reference"))
    assert sorted(expected) == list(range(1, 241))

    killed = start(tokenized, tmp_path / "killed")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and killed.poll() is None:
        if any(step >= 60 for step, _ in checkpoint_files(tmp_path / "killed")):
            break
        time.sleep(0.01)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "pretraining ended before it was killed"
    saved = max(step for step, _ in checkpoint_files(tmp_path / "killed"))
    before = losses(tmp_path / "killed")
    assert max(step for step, _ in before) >= saved  # it got past the checkpoint

    resumed = start(tokenized, tmp_path / "killed")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming from step {saved}" in err, err[-3000:]
    after = losses(tmp_path / "killed")[len(before):]
    assert after[0][0] == saved + 1  # the next step, none repeated or skipped
    assert [step for step, _ in after] == list(range(saved + 1, 241))
    for step, loss in after:
        assert loss == pytest.approx(expected[step], rel=1e-5, abs=1e-6), (saved, step, [(s, round(x, 4), round(expected[s], 4)) for s, x in after[:3]])
    config = json.loads((tmp_path / "killed" / "config.json").read_text())
    assert config["resumed_from_step"] == saved
    assert not checkpoint_files(tmp_path / "killed")  # a finished run keeps only best.ckpt
    assert (tmp_path / "killed" / "checkpoints" / "best.ckpt").exists()


def test_checkpoint_settings_are_validated():
    with pytest.raises(ValueError):
        PretrainConfig(checkpoint_every_steps=0)
    assert PretrainConfig().checkpoint_every_steps == 100


def test_early_stopping_and_the_wall_clock_budget_end_training_sooner(tokenized, tmp_path, caplog):
    import logging

    from tasks.pretrain import pretrain

    caplog.set_level(logging.INFO, logger="tasks.training")
    tiny = {**SETTINGS, "max_steps": 100, "val_every_steps": 5, "log_every_steps": 5,
            "dropout": 0.0}
    # a learning rate too small to change anything: the second validation is no better
    stalled = pretrain(PretrainConfig(**tiny, learning_rate=1e-12, early_stopping_patience=1),
                       tokenized, tmp_path / "stalled")
    assert stalled["count"] == 10
    assert "validation loss stopped improving" in caplog.text

    budget = pretrain(PretrainConfig(**{**tiny, "max_steps": 100_000}, max_minutes=0.02),
                      tokenized, tmp_path / "budget")
    assert 0 < budget["count"] < 100_000
    assert "wall-clock budget of 0.02 minutes ran out" in caplog.text


def test_sigterm_writes_a_checkpoint_at_the_current_step_and_a_rerun_resumes_there(tokenized,
                                                                                    tmp_path):
    proc = start(tokenized, tmp_path / "stopped")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint_files(tmp_path / "stopped"):
            break
        time.sleep(0.01)
    time.sleep(0.3)  # a few steps past the periodic checkpoint
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "interrupted at step" in err, err[-2000:]
    stopped_at = max(step for step, _ in checkpoint_files(tmp_path / "stopped"))
    assert f"interrupted at step {stopped_at}" in err
    # the tokenizer is there from the start: a checkpoint of a stopped run is usable alone
    assert (tmp_path / "stopped" / "tokenizer.model").is_file()
    resumed = start(tokenized, tmp_path / "stopped")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and f"resuming from step {stopped_at}" in err, err[-2000:]


def test_a_sigterm_after_the_checkpoint_hook_still_saves_that_step(tokenized, tmp_path):
    """Lightning looks for SIGTERM once more after the callbacks' batch-end hooks: a signal
    that lands there (sent here by the module's own batch-end hook, which runs after the
    callbacks') stops the fit, and the step is still saved."""
    from torch.utils.data import DataLoader

    from models.data import RandomWindows, StridedWindows, read_meta
    from models.lightning import CausalLM
    from models.llama import Llama, ModelConfig
    from tasks.training import ResumeSampler, TrainingInterrupted, TrainSettings, run_training

    class SignalsItself(CausalLM):
        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            if self.trainer.global_step == 7:
                os.kill(os.getpid(), signal.SIGTERM)

    meta = read_meta(tokenized)
    shape = {"context_length": 16, "d_model": 16, "n_layers": 1, "n_heads": 2}
    config = PretrainConfig(**shape, max_steps=50, batch_size=4, val_every_steps=50,
                            checkpoint_every_steps=100)
    module = SignalsItself(Llama(ModelConfig(vocab_size=meta["vocab_size"], **shape)),
                           1e-3, 0.0, 1, 50, 0.1)
    train = RandomWindows(tokenized / "train.bin", meta["dtype"], 16, 50 * 4)
    val = StridedWindows(tokenized / "val.bin", meta["dtype"], 16, max_windows=4)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 7"):
        run_training(TrainSettings.of(config, "pretrain", "32-true"), module,
                     lambda seen: DataLoader(train, batch_size=4,
                                             sampler=ResumeSampler(seen, len(train))),
                     DataLoader(val, batch_size=4), tmp_path / "out", {})
    assert [step for step, _ in checkpoint_files(tmp_path / "out")] == [7]
