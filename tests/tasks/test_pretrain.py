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


MASKED = {**TINY, "objective": "masked", "max_steps": 400, "val_every_steps": 100,
          "val_batches": 8, "num_threads": 1}


@pytest.fixture(scope="module")
def masked(tokenized, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoder")
    calls = []
    result = pretrain(PretrainConfig(**MASKED), tokenized, out,
                      on_metrics=lambda metrics, step: calls.append((step, metrics)))
    return out, result, calls


def test_masked_pretraining_beats_the_most_frequent_token(tokenized, masked):
    out, result, calls = masked
    stats = result["stats"]
    assert stats["mlm_accuracy"] > stats["mlm_baseline_accuracy"] + 0.15
    assert stats["mlm_accuracy"] > stats["mlm_accuracy_initial"] + 0.2
    assert stats["mlm_loss"] == stats["val_loss"] < stats["mlm_baseline_loss"] - 0.5
    assert "val_perplexity" not in stats  # no left-to-right probability: no perplexity
    assert stats["mlm_masked_tokens"] > 150
    # validation masks are fixed: the last validation and the final evaluation agree
    accuracy = [(step, m["val_mlm_accuracy"]) for step, m in calls if "val_mlm_accuracy" in m]
    val = [(step, m["val_loss"]) for step, m in calls if "val_loss" in m]
    assert [step for step, _ in accuracy] == [step for step, _ in val] == [100, 200, 300, 400]
    assert accuracy[-1][1] == pytest.approx(stats["mlm_accuracy"], abs=1e-4)
    assert val[-1][1] == pytest.approx(stats["mlm_loss"], abs=1e-4)

    model = load_model(out / "model.pt")
    assert model.config.causal is False
    config = json.loads((out / "config.json").read_text())
    meta = json.loads((tokenized / "meta.json").read_text())
    assert config["objective"] == config["training"]["objective"] == "masked"
    assert config["masking"]["mask_id"] == meta["mask_id"] == 4
    assert config["masking"]["mask_rate"] == 0.15 and config["model"]["causal"] is False


def test_a_crashed_masked_run_resumes_to_the_same_losses_and_weights(tokenized, tmp_path):
    from tasks.training import checkpoint_files

    settings = PretrainConfig(**{**MASKED, "max_steps": 30, "val_every_steps": 15,
                                 "log_every_steps": 1, "checkpoint_every_steps": 10,
                                 "dropout": 0.1})

    def recorder(into):
        return lambda metrics, step: into.update(
            {(step, name): value for name, value in metrics.items()
             if name in ("train_loss", "val_loss", "val_mlm_accuracy")})

    expected: dict = {}
    reference = pretrain(settings, tokenized, tmp_path / "reference",
                         on_metrics=recorder(expected))

    class Crash(Exception):
        pass

    before: dict = {}

    def crash_at_25(metrics, step):
        recorder(before)(metrics, step)
        if step == 25:
            raise Crash

    with pytest.raises(Crash):
        pretrain(settings, tokenized, tmp_path / "crashed", on_metrics=crash_at_25)
    assert [step for step, _ in checkpoint_files(tmp_path / "crashed")] == [10, 20]
    after: dict = {}
    resumed = pretrain(settings, tokenized, tmp_path / "crashed", on_metrics=recorder(after))
    assert resumed["resumed_from_step"] == 20
    assert sorted({step for step, _ in after}) == list(range(21, 31))
    for key, value in after.items():  # the masks, dropout and order continue exactly
        assert value == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert resumed["stats"]["mlm_accuracy"] == reference["stats"]["mlm_accuracy"]
    weights = [torch.load(path / "model.pt", weights_only=True)["state_dict"]
               for path in (tmp_path / "reference", tmp_path / "crashed")]
    for name, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][name], atol=1e-6), name


def test_masking_shares_must_fit_in_the_chosen_tokens():
    with pytest.raises(ValidationError, match="at most 1"):
        PretrainConfig(objective="masked", mask_token_ratio=0.8, random_token_ratio=0.3)
    with pytest.raises(ValidationError):
        PretrainConfig(mask_rate=0.0)
    assert PretrainConfig(mask_token_ratio=0.5, random_token_ratio=0.5).objective == "causal"
