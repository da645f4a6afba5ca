"""Training on several processes: the rank-aware sampler, the launcher's plan, DDP over
gloo on two CPU processes, errors and stops crossing from the processes to the caller."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from tasks.finetune import FinetuneConfig, finetune
from tasks.launch import across_devices, device_count, processes_to_start, world_size
from tasks.pretrain import PretrainConfig, pretrain
from tasks.stage import StageInputError
from tasks.tokenize import TokenizeConfig, tokenize_corpus
from tasks.training import ResumeSampler, checkpoint_files
from tests.tasks.test_pretrain import repetitive_corpus
from tests.tasks.test_training import SCRIPT  # pretraining in a process of its own

ROOT = Path(__file__).resolve().parents[2]
TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "context_length": 32, "batch_size": 8,
        "max_steps": 40, "warmup_steps": 5, "val_every_steps": 20, "val_batches": 2,
        "log_every_steps": 5, "num_threads": 1, "accelerator": "cpu"}
DDP = {"strategy": "ddp", "devices": 2}


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    repetitive_corpus(root / "corpus")
    tokenize_corpus(TokenizeConfig(vocab_size=300, val_fraction=0.2), root / "corpus",
                    root / "tokens")
    return root / "tokens"


def test_ranks_read_disjoint_shares_that_together_are_the_single_process_order():
    single = list(ResumeSampler(0, 48))
    ranks = [list(ResumeSampler(0, 48, rank, 3)) for rank in range(3)]
    assert all(len(r) == 16 for r in ranks)
    assert sorted(i for r in ranks for i in r) == single
    # step by step (batch 4 per rank), the ranks together read the next 12 samples
    for step in range(4):
        batch = {i for r in ranks for i in r[step * 4:(step + 1) * 4]}
        assert batch == set(single[step * 12:(step + 1) * 12])


def test_a_resumed_sampler_continues_every_rank_where_it_stopped():
    world, batch, steps_done = 2, 4, 3
    seen = steps_done * batch * world  # what run_training resumes from: all ranks' samples
    for rank in range(world):
        full = list(ResumeSampler(0, 40, rank, world))
        resumed = ResumeSampler(seen, 40)
        resumed.shard(rank, world)
        assert list(resumed) == full[steps_done * batch:]
        assert len(resumed) == len(full) == 20  # the whole run's length, as Lightning counts
    with pytest.raises(ValueError):
        ResumeSampler(0, 40, rank=2, world_size=2)


def test_the_launch_plan_follows_strategy_devices_and_nodes():
    cpu = {"accelerator": "cpu"}
    assert world_size(PretrainConfig(**cpu, **DDP)) == 2
    assert processes_to_start(PretrainConfig(**cpu, **DDP)) == 2
    assert world_size(PretrainConfig(**cpu, devices=2)) == 2  # 'auto' picks DDP for two
    assert world_size(PretrainConfig(**cpu, strategy="ddp", devices=1)) == 1
    assert world_size(PretrainConfig(**cpu, strategy="ddp")) == 1  # 'auto': one CPU process
    assert world_size(FinetuneConfig(**cpu, strategy="ddp", devices="0,1")) == 2
    assert device_count("0,2,") == 2 and device_count(-1, "cpu") == 1
    assert processes_to_start(PretrainConfig(**cpu)) == 0

    two_nodes = PretrainConfig(**cpu, **DDP, num_nodes=2)
    assert world_size(two_nodes) == 4
    with pytest.raises(ValueError, match="num_nodes=2.*torchrun --nnodes 2 --nproc-per-node 2"):
        processes_to_start(two_nodes, "pretrain")


def test_a_process_started_with_a_rank_starts_no_more_processes():
    """Under torchrun (or the launcher) LOCAL_RANK is set when the process starts; Lightning
    setting it later, in a process that trained on one device, does not count."""
    script = textwrap.dedent("""
        import os, sys
        from tasks.launch import processes_to_start
        from tasks.pretrain import PretrainConfig
        config = PretrainConfig(accelerator="cpu", strategy="ddp", devices=2, num_nodes=2)
        before = processes_to_start(config)
        os.environ["LOCAL_RANK"] = "0"
        print(before, processes_to_start(config.model_copy(update={"num_nodes": 1})))
    """)
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    started = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                             text=True, env={**env, "LOCAL_RANK": "1"}, check=True)
    assert started.stdout.split() == ["0", "0"]
    plain = subprocess.run([sys.executable, "-c", script.replace("num_nodes=2", "num_nodes=1")],
                           cwd=ROOT, capture_output=True, text=True, env=env, check=True)
    assert plain.stdout.split() == ["2", "2"]


def test_settings_that_cannot_work_are_refused_when_the_config_is_loaded():
    with pytest.raises(ValidationError, match="use 'ddp'"):
        PretrainConfig(strategy="ddp_spawn")
    with pytest.raises(ValidationError, match="use 'ddp'"):
        FinetuneConfig(strategy="ddp_fork")
    for devices in (0, "0", "two", -2):
        with pytest.raises(ValidationError, match="devices"):
            FinetuneConfig(devices=devices)
    with pytest.raises(ValidationError):
        PretrainConfig(num_nodes=0)
    assert FinetuneConfig(strategy="fsdp", devices="0,1", num_nodes=2).num_nodes == 2


def test_ddp_pretraining_on_two_cpu_processes_writes_one_model_and_reports_once(tokenized,
                                                                                 tmp_path):
    calls: list[tuple[int, dict]] = []
    result = pretrain(PretrainConfig(**TINY, **DDP), tokenized, tmp_path / "ddp",
                      on_metrics=lambda metrics, step: calls.append((step, metrics)))
    steps = [step for step, metrics in calls if "train_loss" in metrics]
    assert steps == [1, 5, 10, 15, 20, 25, 30, 35, 40]  # once each: rank zero reports
    assert [step for step, metrics in calls if "val_loss" in metrics] == [20, 40]
    assert result["count"] == 40
    assert result["stats"]["tokens_seen"] == 2 * 40 * 8 * 32  # both ranks' batches
    first = next(m["train_loss"] for _, m in calls if "train_loss" in m)
    assert result["stats"]["val_loss"] < first - 1.5
    out = tmp_path / "ddp"
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints", "config.json", "loss_curve.png", "model.pt", "tokenizer.model"]
    assert not list(out.rglob(".*.tmp"))
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["training"]["strategy"] == "ddp"
    assert torch.load(out / "model.pt", weights_only=True)["state_dict"]


def test_ddp_finetuning_on_two_cpu_processes(tokenized, tmp_path):
    pretrain(PretrainConfig(**{**TINY, "max_steps": 20, "context_length": 64}), tokenized,
             tmp_path / "pretrained")
    calls: list[tuple[int, dict]] = []
    config = FinetuneConfig(max_steps=20, batch_size=8, warmup_steps=2, val_every_steps=10,
                            log_every_steps=5, response_chars=60, val_fraction=0.25,
                            accelerator="cpu", num_threads=1, **DDP)
    result = finetune(config, tokenized, tmp_path / "pretrained", tokenized.parent / "corpus",
                      tmp_path / "ddp", on_metrics=lambda m, step: calls.append((step, m)))
    assert [step for step, m in calls if "train_loss" in m] == [1, 5, 10, 15, 20]
    assert [step for step, m in calls if "val_loss" in m] == [10, 20]
    assert result["count"] == 20
    assert result["stats"]["val_loss_after"] < result["stats"]["val_loss_before"] - 0.1
    assert (tmp_path / "ddp" / "model.pt").is_file()
    assert not list((tmp_path / "ddp" / "checkpoints").glob("step-*.ckpt"))


def test_an_error_in_every_process_reaches_the_caller_with_its_type(tokenized, tmp_path):
    with pytest.raises(StageInputError, match="fewer than one context window") as info:
        pretrain(PretrainConfig(**{**TINY, **DDP, "context_length": 100_000}), tokenized,
                 tmp_path)
    assert "in training process rank" in str(info.value.__cause__)


@across_devices
def one_rank_fails(config, on_metrics=None):
    """Rank 1 fails while rank 0 waits for it in a collective (it would wait 30 minutes)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise ValueError("rank one cannot go on")
    dist.barrier()
    return {"rank": dist.get_rank()}


def test_a_failure_in_one_process_ends_the_others_and_is_raised_here():
    started = time.monotonic()
    with pytest.raises(ValueError, match="rank one cannot go on") as info:
        one_rank_fails(SimpleNamespace(strategy="ddp", devices=2, accelerator="cpu",
                                       num_nodes=1))
    assert time.monotonic() - started < 120
    cause = str(info.value.__cause__)
    assert "in training process rank 1 of 2" in cause and "one_rank_fails" in cause


RESUMABLE = {**TINY, **DDP, "max_steps": 200, "log_every_steps": 1, "val_every_steps": 100,
             "checkpoint_every_steps": 10, "dropout": 0.1}


def start(tokens: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(tokens), str(out),
                             json.dumps(RESUMABLE)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FORGELINE_PROGRESS": "0"})


def losses(out: Path) -> list[tuple[int, float]]:
    path = out.parent / (out.name + "-losses.jsonl")
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_sigterm_stops_every_rank_at_a_checkpoint_and_a_rerun_resumes_exactly(tokenized,
                                                                              tmp_path):
    reference = start(tokenized, tmp_path / "reference")
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    expected = dict(losses(tmp_path / "reference"))
    assert sorted(expected) == list(range(1, 201))

    stopped = start(tokenized, tmp_path / "stopped")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and stopped.poll() is None:
        if any(step >= 20 for step, _ in checkpoint_files(tmp_path / "stopped")):
            break
        time.sleep(0.01)
    stopped.send_signal(signal.SIGTERM)  # to the launching process only
    _, err = stopped.communicate(timeout=300)
    assert stopped.returncode != 0 and "interrupted at step" in err, err[-3000:]
    at = max(step for step, _ in checkpoint_files(tmp_path / "stopped"))
    assert f"pretrain: interrupted at step {at}" in err, err[-3000:]
    assert at < 200

    resumed = start(tokenized, tmp_path / "stopped")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and f"resuming from step {at}" in err, err[-3000:]
    after = [(step, loss) for step, loss in losses(tmp_path / "stopped") if step > at]
    after = after[-(200 - at):]  # the resumed run's steps
    assert [step for step, _ in after] == list(range(at + 1, 201))
    for step, loss in after:
        assert loss == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
