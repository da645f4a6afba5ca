"""Evaluate stage: report numbers checked by hand, the baseline, and readable samples."""

import json
import math
import random

import numpy as np
import pytest

from tasks.evaluate import EvaluateConfig, evaluate
from tasks.pretrain import PretrainConfig, pretrain
from tasks.shards import write_records
from tasks.tokenize import TokenizeConfig, tokenize_corpus

CONTEXT = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    rng = random.Random(2)
    records = [{"id": f"d{i}", "url": f"http://x/{i}",
                "text": "\n".join(f"def {rng.choice(['load', 'dump', 'read'])}(path): return "
                                  f"{rng.randint(0, 9)}" for _ in range(8))}
               for i in range(60)]
    write_records(records, root / "corpus")
    tokenize_corpus(TokenizeConfig(vocab_size=300, val_fraction=0.2), root / "corpus",
                    root / "tokens")
    pretrain(PretrainConfig(d_model=32, n_layers=2, n_heads=4, context_length=CONTEXT,
                            batch_size=8, max_steps=60, warmup_steps=5, val_every_steps=60,
                            val_batches=1), root / "tokens", root / "pretrained")
    return root


def test_report_numbers_match_a_hand_computation(setup, tmp_path):
    config = EvaluateConfig(num_samples=2, max_new_tokens=10, sample_prompts=["def ", "x"])
    result = evaluate(config, setup / "tokens", setup / "pretrained", None, tmp_path)
    report = json.loads((tmp_path / "eval_report.json").read_text())
    meta = json.loads((setup / "tokens" / "meta.json").read_text())

    evaluated = (meta["val_tokens"] - 1) // CONTEXT * CONTEXT
    assert result["count"] == report["evaluated_tokens"] == evaluated
    model = report["pretrained"]
    expected_bpb = model["val_loss"] * evaluated / (
        meta["val_bytes"] * evaluated / meta["val_tokens"] * math.log(2))
    assert model["bits_per_byte"] == pytest.approx(expected_bpb, rel=1e-9)
    assert model["val_perplexity"] == pytest.approx(math.exp(model["val_loss"]))

    # the baseline by hand: add-one unigram from train.bin, scored on the same targets
    train = np.fromfile(setup / "tokens" / "train.bin", dtype=meta["dtype"])
    val = np.fromfile(setup / "tokens" / "val.bin", dtype=meta["dtype"])
    counts = np.bincount(train, minlength=meta["vocab_size"])
    probs = (counts + 1) / (len(train) + meta["vocab_size"])
    by_hand = -np.log(probs[val[1:evaluated + 1]]).mean()
    assert report["unigram"]["val_loss"] == pytest.approx(by_hand, rel=1e-9)
    assert model["ppl_ratio_vs_unigram"] < 0.6
    assert result["stats"]["ppl_ratio_vs_unigram"] == pytest.approx(
        model["ppl_ratio_vs_unigram"], rel=1e-4)

    samples = (tmp_path / "samples.md").read_text()
    assert "## def" in samples and samples.count("```text") == 4
    assert report["samples_model"] == "pretrained" and len(report["samples"]) == 4


def test_subset_and_finetuned_model(setup, tmp_path):
    config = EvaluateConfig(val_batches=1, batch_size=2, num_samples=1, max_new_tokens=5,
                            temperature=0)
    result = evaluate(config, setup / "tokens", setup / "pretrained", setup / "pretrained",
                      tmp_path)
    report = json.loads((tmp_path / "eval_report.json").read_text())
    assert report["evaluated_tokens"] == 2 * CONTEXT
    assert report["finetuned"]["val_loss"] == pytest.approx(report["pretrained"]["val_loss"])
    assert report["samples_model"] == "finetuned"
    assert "finetuned_bits_per_byte" in result["stats"]


def test_a_prompt_tuned_model_is_scored_on_windows_it_can_read(setup, tmp_path):
    """A soft prompt takes positions of the context: both models are scored on windows of
    what the prompt-tuned one can read, so their numbers stay comparable."""
    import shutil

    from models.adapters import AdapterSettings, finish_model, prepare_model
    from models.checkpoint import load_model, save_model

    settings = AdapterSettings(method="prompt_tuning", prompt_tokens=4)
    tuned = finish_model(prepare_model(load_model(setup / "pretrained" / "model.pt"), settings),
                         settings, tmp_path / "tuned")
    save_model(tmp_path / "tuned" / "model.pt", tuned)
    shutil.copy(setup / "pretrained" / "tokenizer.model", tmp_path / "tuned")
    config = EvaluateConfig(val_batches=1, batch_size=2, num_samples=1, max_new_tokens=5)
    result = evaluate(config, setup / "tokens", setup / "pretrained", tmp_path / "tuned",
                      tmp_path / "out")
    assert result["count"] == 2 * (CONTEXT - 4)
    assert math.isfinite(result["stats"]["finetuned_val_loss"])


ENCODER = {"d_model": 32, "n_layers": 2, "n_heads": 4, "context_length": CONTEXT,
           "batch_size": 8, "max_steps": 300, "warmup_steps": 5, "val_every_steps": 300,
           "val_batches": 4, "objective": "masked", "num_threads": 1}


@pytest.fixture(scope="module")
def encoder(setup):
    result = pretrain(PretrainConfig(**ENCODER), setup / "tokens", setup / "encoder")
    return setup / "encoder", result


def test_an_encoder_gets_masked_token_metrics_instead_of_perplexity(setup, encoder, tmp_path):
    from models.data import StridedWindows
    from models.masked_lm import VAL_STREAM, MaskedWindows
    from tasks.pretrain import masking_for

    encoder_dir, pretrained = encoder
    # the windows pretraining validated on, so the numbers must be the same
    config = EvaluateConfig(val_batches=4, batch_size=8)
    result = evaluate(config, setup / "tokens", encoder_dir, None, tmp_path)
    stats = result["stats"]
    assert stats["mlm_accuracy"] == pytest.approx(pretrained["stats"]["mlm_accuracy"], abs=1e-5)
    assert stats["mlm_loss"] == pytest.approx(pretrained["stats"]["mlm_loss"], abs=1e-4)
    assert stats["mlm_baseline_accuracy"] == pretrained["stats"]["mlm_baseline_accuracy"]
    assert stats["mlm_accuracy"] > stats["mlm_baseline_accuracy"] + 0.15
    assert stats["mlm_loss"] < stats["mlm_baseline_loss"]
    assert not [key for key in stats if "perplexity" in key or "bits_per_byte" in key]
    report = json.loads((tmp_path / "eval_report.json").read_text())
    assert "no perplexity" in report["masked_lm"]["note"] and "unigram" not in report
    assert report["samples"] == [] and report["samples_model"] is None
    assert "does not generate" in (tmp_path / "samples.md").read_text()

    # the baseline by hand: the most frequent ordinary train token, on the masked tokens
    meta = json.loads((setup / "tokens" / "meta.json").read_text())
    train = np.fromfile(setup / "tokens" / "train.bin", dtype=meta["dtype"])
    counts = np.bincount(train, minlength=meta["vocab_size"])
    counts[[0, 1, 2, 3, meta["mask_id"]]] = 0
    windows = MaskedWindows(StridedWindows(setup / "tokens" / "val.bin", meta["dtype"], CONTEXT,
                                           32), masking_for({}, meta), 0, VAL_STREAM)
    labels = np.concatenate([windows[i][1].numpy() for i in range(len(windows))])
    labels = labels[labels >= 0]
    assert report["pretrained"]["masked_tokens"] == len(labels) > 50
    assert stats["mlm_baseline_accuracy"] == pytest.approx(
        (labels == counts.argmax()).mean(), abs=1e-5)
