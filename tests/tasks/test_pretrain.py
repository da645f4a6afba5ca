"""Pretrain stage on a tiny repetitive corpus: it must beat the unigram baseline."""

import json
import random

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from models.checkpoint import load_model
from models.data import StridedWindows
from models.evaluation import unigram_cross_entropy, unigram_log_probs
from models.llama import Llama, ModelConfig
from tasks.pretrain import PretrainConfig, pretrain
from tasks.shards import write_records
from tasks.stage import StageInputError
from tasks.tokenize import TokenizeConfig, tokenize_corpus

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "context_length": 32, "batch_size": 8,
        "max_steps": 80, "warmup_steps": 5, "val_every_steps": 40, "val_batches": 2,
        "log_every_steps": 10}


def repetitive_corpus(folder, docs=60):
    """Sentences from a small grammar: predictable from context, not from frequencies alone."""
    rng = random.Random(0)
    subjects, verbs = ["the parser", "a socket", "the json module"], ["reads", "writes", "closes"]
    records = []
    for i in range(docs):
        lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} the file number {n}."
                 for n in range(rng.randint(5, 10))]
        records.append({"id": f"d{i}", "text": "\n".join(lines), "url": f"http://x/{i}"})
    write_records(records, folder)


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    repetitive_corpus(root / "corpus")
    tokenize_corpus(TokenizeConfig(vocab_size=300, val_fraction=0.2), root / "corpus",
                    root / "tokens")
    return root / "tokens"


@pytest.fixture(scope="module")
def trained(tokenized, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    calls = []
    result = pretrain(PretrainConfig(**TINY), tokenized, out,
                      on_metrics=lambda metrics, step: calls.append((step, metrics)))
    return out, result, calls


def test_validation_loss_beats_the_unigram_baseline(tokenized, trained):
    _, result, _ = trained
    meta = json.loads((tokenized / "meta.json").read_text())
    log_probs = unigram_log_probs(np.fromfile(tokenized / "train.bin", dtype=meta["dtype"]),
                                  meta["vocab_size"])
    val = np.fromfile(tokenized / "val.bin", dtype=meta["dtype"]).astype(np.int64)
    baseline = unigram_cross_entropy(log_probs, val[1:])
    assert result["stats"]["val_loss"] < baseline - 0.5  # perplexity < 60% of the unigram's
    assert result["count"] == 80 and result["unit"] == "steps"
    assert result["stats"]["tokens_seen"] == 80 * 8 * 32
    assert result["stats"]["val_perplexity"] == pytest.approx(
        np.exp(result["stats"]["val_loss"]), rel=1e-3)


def test_model_file_loads_without_lightning_and_gives_identical_outputs(tokenized, trained):
    out, _, _ = trained
    payload = torch.load(out / "model.pt", weights_only=True)
    fresh = Llama(ModelConfig.from_dict(payload["model_config"]))
    fresh.load_state_dict(payload["state_dict"])
    fresh.eval()
    x, _ = StridedWindows(tokenized / "val.bin", "uint16", 32)[0]
    assert torch.equal(fresh(x[None])[0], load_model(out / "model.pt")(x[None])[0])
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["d_model"] == 32 and config["training"]["max_steps"] == 80
    assert config["resolved"]["precision"] == "32-true"
    assert (out / "tokenizer.model").is_file() and (out / "loss_curve.png").stat().st_size > 1000


def test_metrics_reach_the_callback(trained):
    _, _, calls = trained
    train_steps = [step for step, m in calls if "train_loss" in m]
    assert train_steps[:3] == [1, 10, 20] and train_steps[-1] == 80
    assert {"lr", "tokens_per_second"} <= set(next(m for _, m in calls if "train_loss" in m))
    val = [(step, m["val_loss"]) for step, m in calls if "val_loss" in m]
    assert [step for step, _ in val] == [40, 80]
    first_train = next(m["train_loss"] for _, m in calls if "train_loss" in m)
    assert val[-1][1] < first_train


def test_too_few_tokens_for_one_window_is_an_input_error(tokenized, tmp_path):
    with pytest.raises(StageInputError, match="fewer than one context window"):
        pretrain(PretrainConfig(**{**TINY, "context_length": 100_000}), tokenized, tmp_path)


def test_bad_model_shape_is_refused_when_the_config_is_loaded():
    with pytest.raises(ValidationError, match="divisible by n_heads"):
        PretrainConfig(**{**TINY, "n_heads": 5})
    with pytest.raises(ValidationError, match="multiple of n_kv_heads"):
        PretrainConfig(**{**TINY, "n_heads": 4, "n_kv_heads": 3})


def test_presets_set_the_shape_and_fields_set_on_top_win():
    from tasks.pretrain import MODEL_PRESETS, model_config_for

    gpt2 = PretrainConfig(preset="gpt2-small")
    assert (gpt2.d_model, gpt2.n_layers, gpt2.n_heads, gpt2.context_length) == (768, 12, 12, 1024)
    shape = model_config_for(gpt2, vocab_size=50257)
    assert round(shape.parameter_count() / 1e6) == 124  # GPT-2 small's size
    assert PretrainConfig(preset="gpt2-small", n_layers=6).n_layers == 6
    # a form sends every field: those at their defaults still take the preset's value
    form = {**PretrainConfig().model_dump(), "preset": "tiny"}
    assert PretrainConfig(**form).d_model == MODEL_PRESETS["tiny"]["d_model"]
    with pytest.raises(ValidationError):
        PretrainConfig(preset="huge")


def test_parameter_and_flop_counts_come_from_the_config():
    for shape in ({"vocab_size": 300, "d_model": 64, "n_layers": 3, "n_heads": 4,
                   "n_kv_heads": 2, "tie_embeddings": False},
                  {"vocab_size": 4096, "d_model": 128, "n_layers": 4, "n_heads": 4}):
        config = ModelConfig(**shape)
        model = Llama(config)
        assert config.parameter_count() == model.num_params()
        assert config.parameter_count(non_embedding=True) == model.num_params(non_embedding=True)
    config = ModelConfig(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, context_length=256)
    # 6 FLOPs per matmul weight (blocks + tied head) + attention 12 * L * d * T
    weights = Llama(config).num_params(non_embedding=True) + 4096 * 128
    assert config.flops_per_token() == 6 * weights + 12 * 4 * 128 * 256


def test_throughput_metrics_include_flops_and_mfu_against_the_stated_peak(tokenized, tmp_path):
    seen: dict[str, list[float]] = {}

    def record(metrics, step):
        for name, value in metrics.items():
            seen.setdefault(name, []).append(value)

    config = PretrainConfig(**{**TINY, "max_steps": 20, "log_every_steps": 5}, peak_tflops=0.5)
    result = pretrain(config, tokenized, tmp_path / "out", on_metrics=record)
    flops = result["stats"]["flops_per_token"]
    for tokens, flop_rate, mfu in zip(seen["tokens_per_second"], seen["flops_per_second"],
                                      seen["mfu"]):
        assert flop_rate == pytest.approx(tokens * flops)
        assert mfu == pytest.approx(flop_rate / 0.5e12)
    assert all(t > 0 for t in seen["step_time_seconds"])
    assert all(m > 0 for m in seen["peak_memory_mb"])
