"""DPO stage: preference tuning raises held-out preference accuracy above the untuned
model's, derived pairs hold hard negatives from the right places, bad files are reported
by line, and the LoRA option trains adapters only."""

import json
import math
import random
from collections import Counter

import pytest
import torch

from models.checkpoint import load_model
from models.preference import (
    DirectPreference,
    PreferenceDataset,
    PreferencePair,
    dpo_loss,
    pair_logprobs,
    sequence_logprobs,
)
from tasks.dpo import DpoConfig, corpus_pairs, corrupt, dpo, file_pairs, passages
from tasks.pretrain import PretrainConfig, pretrain
from tasks.shards import write_records
from tasks.stage import StageInputError
from tasks.tokenize import TokenizeConfig, tokenize_corpus

NAMES = ["json", "socket", "pathlib", "csv", "zipfile", "random", "string", "struct"]
STABLE = set(NAMES[:4])  # the rule the preference pairs teach: these answer "yes"
FAST = {"max_steps": 40, "batch_size": 16, "warmup_steps": 3, "val_every_steps": 20,
        "log_every_steps": 5, "learning_rate": 5e-3, "beta": 0.5, "val_fraction": 0.3,
        "general_val_windows": 2, "accelerator": "cpu"}
DERIVED = {"prompt_chars": 60, "continuation_chars": 40, "passages_per_document": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small corpus of module pages (with yes/no answers in it), a tokenizer and a
    small pretrained model."""
    root = tmp_path_factory.mktemp("dpo")
    rng = random.Random(1)
    records = []
    for i in range(60):
        name = rng.choice(NAMES)
        body = ". ".join(f"is {rng.choice(NAMES)} stable? {rng.choice(['yes', 'no'])}"
                         for _ in range(6))
        records.append({"id": f"d{i}", "url": f"http://x/{name}/{i}", "title": f"{name} {i}",
                        "text": f"{name} {i} reference\nThe {name} module reads "
                                f"{rng.choice(NAMES)} data.\n{body}."})
    write_records(records, root / "corpus")
    tokenize_corpus(TokenizeConfig(vocab_size=300), root / "corpus", root / "tokens")
    pretrain(PretrainConfig(d_model=32, n_layers=2, n_heads=4, context_length=48, batch_size=8,
                            max_steps=30, warmup_steps=3, val_every_steps=30, val_batches=1),
             root / "tokens", root / "pretrained")
    return root


def rule_pairs(path):
    """Pairs whose preferred answer depends on the module named in the prompt: a model
    that does not know the rule is right about half the time, whichever answer it likes."""
    lines = []
    for i in range(12):
        for name in NAMES:
            good, bad = (" 1 1", " 2 2") if name in STABLE else (" 2 2", " 1 1")
            lines.append(json.dumps({"prompt": f"{i} is {name}", "chosen": good,
                                     "rejected": bad}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run(setup, out, **overrides):
    metrics = []
    result = dpo(DpoConfig(**{**FAST, **overrides}), setup / "tokens", setup / "pretrained",
                 setup / "corpus", out, on_metrics=lambda m, step: metrics.append((step, m)))
    return result, metrics


def test_dpo_raises_held_out_preference_accuracy(setup, tmp_path):
    result, metrics = run(setup, tmp_path / "out", data_path=str(rule_pairs(tmp_path / "p.jsonl")))
    stats = result["stats"]
    assert stats["dpo_pairs_train"] + stats["dpo_pairs_val"] == 96 and stats["dpo_pairs_val"] >= 15
    assert stats["dpo_preference_accuracy_before"] <= 0.7  # the untuned model guesses
    assert stats["dpo_preference_accuracy"] >= 0.8
    assert stats["dpo_preference_accuracy"] >= stats["dpo_preference_accuracy_before"] + 0.2
    assert stats["dpo_reward_accuracy"] >= 0.8 and stats["dpo_reward_margin"] > 0
    assert stats["dpo_val_loss_before"] == pytest.approx(math.log(2), abs=1e-4)
    assert stats["dpo_val_loss_after"] < stats["dpo_val_loss_before"] - 0.2
    assert stats["dpo_train_loss_final"] < stats["dpo_train_loss_first"]
    assert result["count"] == 40 and result["unit"] == "steps" and result["method"] == "full"
    assert any("val_loss" in m for _, m in metrics)
    assert any("dpo_preference_accuracy" in m for _, m in metrics)
    out = tmp_path / "out"
    assert all((out / p).exists() for p in result["artifacts"].values())
    assert (out / "tokenizer.model").is_file()
    saved = json.loads((out / "config.json").read_text())
    assert saved["dpo"]["max_steps"] == 40
    # model.pt is the tuned policy: it gives the held-out answers the accuracy reported
    tuned = load_model(out / "model.pt")
    assert tuned.config.d_model == 32
    sample = [json.loads(line) for line in (out / "pairs_sample.jsonl").read_text().splitlines()]
    assert 0 < len(sample) <= 20 and all(s["chosen"] != s["rejected"] for s in sample)


def test_lora_adapter_trains_a_small_share_and_still_learns(setup, tmp_path):
    result, _ = run(setup, tmp_path / "out", data_path=str(rule_pairs(tmp_path / "p.jsonl")),
                    adapter={"method": "lora"}, learning_rate=1e-2, max_steps=80)
    stats = result["stats"]
    assert stats["trainable_share"] < 0.25 and result["method"] == "lora"
    assert stats["dpo_preference_accuracy"] >= 0.8
    assert stats["dpo_preference_accuracy"] >= stats["dpo_preference_accuracy_before"] + 0.2
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    tuned = load_model(tmp_path / "out" / "model.pt")  # merged: a plain Llama
    base = load_model(setup / "pretrained" / "model.pt")
    assert not torch.equal(tuned.blocks[0].attn.q_proj.weight, base.blocks[0].attn.q_proj.weight)


def test_derived_pairs_hold_hard_negatives(setup):
    config = DpoConfig(**DERIVED, max_pairs=400)
    held_out = {"d3", "d7"}
    train, val, counts = corpus_pairs(config, setup / "corpus", held_out)
    assert counts["passages"] >= 60 and train and val
    assert {p.source for p in train}.isdisjoint({p.source for p in val})
    assert held_out <= {p.source for p in val}
    kinds = Counter(p.negative for p in train + val)
    assert kinds["near_duplicate"] > 0 and kinds["corrupted"] > 0
    assert all(p.rejected != p.chosen for p in train + val)
    from tasks.shards import iter_records

    texts = {r["id"]: r["text"] for r in iter_records(setup / "corpus")}
    for pair in train + val:
        assert pair.prompt + pair.chosen in texts[pair.source]  # the true continuation
        if pair.negative == "near_duplicate":  # another document's continuation
            owners = {doc for doc, text in texts.items() if pair.rejected in text}
            assert owners - {pair.source}
            # and from the same side of the split: nothing held out leaks into training
            side = {p.source for p in (val if pair in val else train)}
            assert owners & side - {pair.source}


def test_derived_pairs_train_end_to_end(setup, tmp_path):
    result, _ = run(setup, tmp_path / "out", **DERIVED, max_steps=10, val_every_steps=10)
    stats = result["stats"]
    assert stats["dpo_pairs_train"] > 50 and stats["dpo_pairs_val"] > 5
    assert {"dpo_preference_accuracy_near_duplicate",
            "dpo_preference_accuracy_before_corrupted"} <= set(stats)
    assert stats["dpo_reward_accuracy"] > 0.5  # the tuned model moved the right way
    sample = [json.loads(line) for line in
              (tmp_path / "out" / "pairs_sample.jsonl").read_text().splitlines()]
    assert len(sample) == 20 and {s["negative"] for s in sample} == {"near_duplicate",
                                                                      "corrupted"}


def test_corruptions_change_the_text_but_look_like_it():
    rng = random.Random(0)
    text = " the json module reads data. It writes files.\nThen it closes them"
    shuffled = corrupt(text, "shuffle", rng, 0.5)
    assert shuffled != text and sorted(shuffled.split()) == sorted(text.split())
    swapped = corrupt(text, "swap_sentences", rng, 0.5)
    assert swapped != text and sorted(swapped.split()) == sorted(text.split())
    donor = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    replaced = corrupt(text, "replace_span", rng, 0.5, donor=donor)
    assert replaced != text and set(replaced.split()) - set(text.split()) <= set(donor.split())
    assert len(replaced.split()) == len(text.split())


def test_passages_are_cut_at_words_and_spread_over_the_text():
    text = " ".join(f"w{i}" for i in range(200))
    cut = passages(text, 30, 20, 3)
    assert len(cut) == 3
    for prompt, continuation in cut:
        assert prompt + continuation in text and continuation.startswith(" ")
        assert len(prompt) <= 30 and len(continuation) <= 20
    assert cut[0][0] != cut[1][0] and text.index(cut[1][0]) < text.index(cut[2][0])
    assert passages("too short", 30, 20, 3) == []


def test_dpo_loss_and_sequence_logprobs(setup):
    import sentencepiece as spm

    model = load_model(setup / "pretrained" / "model.pt")
    sp = spm.SentencePieceProcessor(model_file=str(setup / "tokens" / "tokenizer.model"))
    pairs = [PreferencePair("is json 1 stable?", " yes", " no"),
             PreferencePair("the csv module", " reads data", " data reads")]
    data = PreferenceDataset(pairs, sp, 49, eos_id=2, pad_id=3)
    ids, mask, _ = data.collate([data[0], data[1]])
    flat_ids, flat_mask = ids.view(4, -1), mask.view(4, -1)
    with torch.no_grad():
        got = sequence_logprobs(model, flat_ids, flat_mask)
        # the same from the model's own masked loss: mean over response tokens x their count
        for row in range(4):
            x, m = flat_ids[row:row + 1], flat_mask[row:row + 1]
            _, loss = model(x[:, :-1], x[:, 1:], m[:, 1:])
            assert got[row].item() == pytest.approx(-loss.item() * m[:, 1:].sum().item(),
                                                    rel=1e-4)
    # batched by length, put back in order: the same numbers, pair by pair
    assert torch.allclose(pair_logprobs(model, data, batch_size=1), got.view(2, 2), atol=1e-4)
    assert torch.allclose(pair_logprobs(model, data, batch_size=2), got.view(2, 2), atol=1e-4)
    same = torch.tensor([[-3.0, -5.0]])
    loss, margin = dpo_loss(same, same, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and margin.item() == 0
    loss, margin = dpo_loss(torch.tensor([[-2.0, -6.0]]), same, beta=0.5)  # 0.5 * (1 - -1)
    assert margin.item() == pytest.approx(1.0) and loss.item() < math.log(2)
    smoothed, _ = dpo_loss(torch.tensor([[-2.0, -6.0]]), same, beta=0.5, label_smoothing=0.2)
    assert smoothed.item() > loss.item()  # cDPO doubts a share of the labels
    module = DirectPreference(model, 1e-3, 0.0, 0, 10, 0.1, beta=0.1)
    assert not any(name.startswith("reference") for name, _ in module.named_parameters())


def test_pairs_file_is_read(tmp_path):
    path = rule_pairs(tmp_path / "pairs.jsonl")
    pairs = file_pairs(path, max_pairs=10)
    assert len(pairs) == 10 and pairs[0].source == "pairs.jsonl:1"


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"\n',
     r"pairs.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": "b"}\n',
     r"pairs.jsonl:3: expected an object"),
    ('{"prompt": "a", "chosen": "b", "rejected": "b"}\n', r"pairs.jsonl:1: .*same text"),
])
def test_bad_records_are_reported_with_file_and_line(tmp_path, content, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    with pytest.raises(StageInputError, match=message):
        file_pairs(path, max_pairs=100)


def test_missing_or_too_small_input_is_an_input_error(setup, tmp_path):
    with pytest.raises(StageInputError, match="does not exist"):
        run(setup, tmp_path / "out", data_path=str(tmp_path / "nope.jsonl"))
    one = tmp_path / "one.jsonl"
    one.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(StageInputError, match="at least 2"):
        run(setup, tmp_path / "out", data_path=str(one))
    with pytest.raises(StageInputError, match="long enough"):
        run(setup, tmp_path / "out", prompt_chars=5000)
