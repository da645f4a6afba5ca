"""Finetune stage: the held-out response loss falls (training every weight, LoRA adapters
or a soft prompt), prompts are not trained on, bad files are reported by line."""

import json
import random

import pytest
import torch

from models.adapters import load_adapter
from models.checkpoint import load_model
from models.data import Pair
from models.generation import load_generator
from tasks.finetune import FinetuneConfig, document_title, finetune, split_pairs
from tasks.pretrain import PretrainConfig, pretrain
from tasks.shards import write_records
from tasks.stage import StageInputError
from tasks.tokenize import TokenizeConfig, is_validation, tokenize_corpus

NAMES = ["json", "socket", "pathlib", "csv", "zipfile", "random", "string", "struct"]
FAST = {"max_steps": 40, "batch_size": 8, "warmup_steps": 3, "val_every_steps": 20,
        "log_every_steps": 5, "response_chars": 60, "val_fraction": 0.25}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus whose pages open by restating their title, a tokenizer and a small model."""
    root = tmp_path_factory.mktemp("finetune")
    rng = random.Random(1)
    records = []
    for i in range(80):
        name = rng.choice(NAMES)
        title = f"{name} {i}"
        body = " ".join(rng.choice(NAMES) + " module" for _ in range(12))
        records.append({"id": f"d{i}", "url": f"http://x/{name}/{i}", "title": title,
                        "text": f"{title} reference\nThe {name} module. {body}"})
    write_records(records, root / "corpus")
    tokenize_corpus(TokenizeConfig(vocab_size=300), root / "corpus", root / "tokens")
    # trained well enough that its attention means something: a soft prompt can steer it
    pretrain(PretrainConfig(d_model=32, n_layers=2, n_heads=4, context_length=48, batch_size=8,
                            max_steps=150, learning_rate=1e-2, warmup_steps=10,
                            val_every_steps=150, val_batches=1, num_threads=1),
             root / "tokens", root / "pretrained")
    return root


def run(setup, out, **overrides):
    metrics = []
    result = finetune(FinetuneConfig(**{**FAST, **overrides}), setup / "tokens",
                      setup / "pretrained", setup / "corpus", out,
                      on_metrics=lambda m, step: metrics.append((step, m)))
    return result, metrics


def test_finetuning_lowers_the_held_out_response_loss(setup, tmp_path):
    result, metrics = run(setup, tmp_path)
    stats = result["stats"]
    assert stats["val_loss_after"] < stats["val_loss_before"] - 0.3
    assert stats["train_loss_final"] < stats["train_loss_first"]
    assert stats["pairs_train"] + stats["pairs_val"] == 80 and stats["pairs_val"] >= 5
    assert result["count"] == 40 and result["unit"] == "steps"
    assert any("val_loss" in m for _, m in metrics) and any("train_loss" in m for _, m in metrics)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["finetune"]["max_steps"] == 40
    assert all((tmp_path / p).is_file() for p in result["artifacts"].values())


def test_pairs_from_a_jsonl_file(setup, tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"prompt": f"Q: {n}?\nA:", "response": f" the {n} module"})
             for n in NAMES * 3]
    path.write_text("\n".join(lines) + "\n")
    result, _ = run(setup, tmp_path / "out", data_path=str(path), max_steps=10)
    assert result["stats"]["pairs_train"] + result["stats"]["pairs_val"] == 24


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n', r"pairs.jsonl:2: not valid JSON"),
    ('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": ""}\n',
     r"pairs.jsonl:3: expected an object"),
])
def test_bad_records_are_reported_with_file_and_line(setup, tmp_path, content, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    with pytest.raises(StageInputError, match=message):
        run(setup, tmp_path / "out", data_path=str(path))


def test_missing_data_file_is_an_input_error(setup, tmp_path):
    with pytest.raises(StageInputError, match="does not exist"):
        run(setup, tmp_path / "out", data_path=str(tmp_path / "nope.jsonl"))


def test_title_falls_back_to_first_line_then_url():
    assert document_title({"title": " json ", "text": "x"}) == "json"
    assert document_title({"title": "", "text": "\n  First line\nmore"}) == "First line"
    assert document_title({"text": "", "url": "http://h/library/json.html"}) == \
        "library/json.html"


def test_documents_held_out_of_pretraining_are_never_fine_tuned_on():
    pairs = [(f"doc-{i}", Pair(f"Title {i}:", f" text {i}")) for i in range(40)]
    trained_by_hash = [k for k, _ in pairs if not is_validation(k, 0.1)]
    held_out = set(trained_by_hash[:3])  # held out by the tokenizer's forced pick, say
    train, val = split_pairs(pairs, 0.1, held_out)
    by_key = dict(pairs)
    assert all(by_key[k] in val and by_key[k] not in train for k in held_out)
    assert len(train) + len(val) == 40 and train
    with pytest.raises(StageInputError, match="held out of pretraining"):
        split_pairs(pairs[:2], 0.1, {"doc-0", "doc-1"})


LORA = {"adapter": {"method": "lora", "lora_rank": 2, "lora_alpha": 4},
        "learning_rate": 1e-2, "checkpoint_every_steps": 10}


@pytest.fixture(scope="module")
def lora_run(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return run(setup, out, **LORA)[0], out


def test_lora_trains_a_few_percent_of_the_weights_and_saves_a_merged_plain_model(setup,
                                                                                  lora_run):
    result, out = lora_run
    stats = result["stats"]
    assert result["method"] == "lora"
    assert stats["val_loss_after"] < stats["val_loss_before"] - 0.3
    # rank 2 on the 5 linear layers of 2 blocks
    assert 0 < stats["trainable_share"] < 0.10 and stats["trainable_params"] == 2304
    assert (out / result["artifacts"]["adapter"] / "adapter_model.safetensors").is_file()
    pretrained = load_model(setup / "pretrained" / "model.pt")
    merged = load_model(out / "model.pt")  # a plain Llama state dict: no peft names
    assert set(merged.state_dict()) == set(pretrained.state_dict())
    idx = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rebuilt = load_adapter(pretrained, out / "adapter").eval()
        assert torch.allclose(rebuilt(idx)[0], merged(idx)[0], atol=1e-5)
        assert not torch.allclose(pretrained(idx)[0], merged(idx)[0], atol=1e-3)


# the runner's ResumeSampler starts the data where the checkpoint stopped, which Lightning
# cannot know: its warning about a loader that is not resumable does not apply
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint")
def test_an_interrupted_lora_run_resumes_to_the_same_model(setup, lora_run, tmp_path):
    class Stop(Exception):
        pass

    def stop_at_25(metrics, step):
        if step >= 25:
            raise Stop

    config = FinetuneConfig(**{**FAST, **LORA})
    with pytest.raises(Stop):
        finetune(config, setup / "tokens", setup / "pretrained", setup / "corpus", tmp_path,
                 on_metrics=stop_at_25)
    resumed = finetune(config, setup / "tokens", setup / "pretrained", setup / "corpus",
                       tmp_path)
    assert resumed["resumed_from_step"] == 20 and resumed["count"] == 40
    assert resumed["stats"]["val_loss_after"] == pytest.approx(
        lora_run[0]["stats"]["val_loss_after"], abs=1e-4)


def test_prompt_tuning_learns_a_soft_prompt_and_leaves_every_weight_as_it_was(setup, tmp_path):
    result, _ = run(setup, tmp_path, max_steps=100, learning_rate=0.03,
                    adapter={"method": "prompt_tuning", "prompt_tokens": 8})
    stats = result["stats"]
    assert result["method"] == "prompt_tuning" and stats["trainable_params"] == 8 * 32
    assert stats["val_loss_after"] < stats["val_loss_before"] - 0.3  # measured: 2.74 -> 2.21
    pretrained = load_model(setup / "pretrained" / "model.pt").state_dict()
    tuned = load_model(tmp_path / "model.pt")
    assert tuned.config.prompt_tokens == 8
    assert all(torch.equal(value, pretrained[name])
               for name, value in tuned.state_dict().items() if name != "prompt")
    rebuilt = load_adapter(load_model(setup / "pretrained" / "model.pt"), tmp_path / "adapter")
    assert torch.equal(rebuilt.prompt, tuned.prompt)
    text = load_generator(tmp_path).generate("### Title: json 7\n### Text:\n",
                                             max_new_tokens=12, temperature=0)
    assert text.strip()


def test_fine_tuning_dropout_is_used_while_training_but_not_saved(setup, tmp_path):
    run(setup, tmp_path, max_steps=3, dropout=0.2)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["dropout"] == 0.2
    assert load_model(tmp_path / "model.pt").config.dropout == 0.0


def test_a_soft_prompt_too_long_for_the_context_is_an_input_error(setup, tmp_path):
    with pytest.raises(StageInputError, match="prompt_tokens=30"):
        run(setup, tmp_path, adapter={"method": "prompt_tuning", "prompt_tokens": 30})
