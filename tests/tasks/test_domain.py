"""Domain stage: training on the selected slice of the corpus lowers its held-out loss more
than the general one; selectors combine; a selection of nothing is an input error."""

import random

import pytest
from pydantic import ValidationError

from models.checkpoint import load_model
from models.generation import load_generator
from tasks.domain import DomainConfig, domain_finetune, selected_documents
from tasks.pretrain import PretrainConfig, pretrain
from tasks.shards import write_records
from tasks.stage import StageInputError
from tasks.tokenize import TokenizeConfig, tokenize_corpus

NAMES = ["json", "socket", "pathlib", "csv", "zipfile", "random", "string", "struct"]
WORDS = ["wie", "kann", "ich", "das", "laden", "fehler", "hilfe", "danke"]
FAST = {"enabled": True, "max_steps": 40, "batch_size": 8, "warmup_steps": 3,
        "learning_rate": 3e-3, "val_every_steps": 20, "log_every_steps": 5,
        "eval_windows": 16, "val_fraction": 0.2, "num_threads": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two kinds of documents (module references in English from a docs site, questions in
    German from a forum), a tokenizer and a model pretrained briefly on both."""
    root = tmp_path_factory.mktemp("domain")
    rng = random.Random(3)
    records = []
    for i in range(60):
        name = rng.choice(NAMES)
        body = " ".join(rng.choice(NAMES) + " module" for _ in range(12))
        records.append({"id": f"doc{i}", "url": f"https://docs.example.org/lib/{name}/{i}",
                        "source": "docs", "language": "en", "title": name,
                        "text": f"{name} {i} reference\nThe {name} module. {body}"})
        question = " ".join(f"{rng.choice(WORDS)} {rng.choice(NAMES)}?" for _ in range(8))
        records.append({"id": f"post{i}", "url": f"https://forum.example.net/t/{i}",
                        "source": "forum", "language": "de", "title": f"Frage {i}",
                        "text": f"Frage {i}: {question} danke"})
    write_records(records, root / "corpus")
    tokenize_corpus(TokenizeConfig(vocab_size=400, val_fraction=0.1), root / "corpus",
                    root / "tokens")
    pretrain(PretrainConfig(d_model=32, n_layers=2, n_heads=4, context_length=48, batch_size=8,
                            max_steps=40, learning_rate=1e-2, warmup_steps=5,
                            val_every_steps=40, val_batches=1, num_threads=1),
             root / "tokens", root / "pretrained")
    return root


def run(setup, out, **overrides):
    return domain_finetune(DomainConfig(**{**FAST, **overrides}), setup / "tokens",
                           setup / "pretrained", setup / "corpus", out)


def test_domain_training_lowers_the_in_domain_loss_more_than_the_general_one(setup, tmp_path):
    result = run(setup, tmp_path, sources=["forum"])
    stats = result["stats"]
    assert stats["domain_documents"] == 60 and stats["domain_val_documents"] >= 1
    assert stats["domain_tokens"] > 0 and result["count"] == 40
    assert stats["domain_val_loss_after"] < stats["domain_val_loss_before"] - 0.1
    domain_gain = stats["domain_val_loss_before"] - stats["domain_val_loss_after"]
    general_gain = stats["general_val_loss_before"] - stats["general_val_loss_after"]
    assert domain_gain > general_gain + 0.05
    assert result["method"] == "full" and stats["trainable_share"] == 1.0
    assert all((tmp_path / path).is_file() for path in result["artifacts"].values())
    assert not (tmp_path / "data").exists()  # the encoded slice is dropped afterwards
    # a model directory the later stages can use
    assert load_model(tmp_path / "model.pt").config.context_length == 48
    assert isinstance(load_generator(tmp_path).generate("Frage 3:", max_new_tokens=5,
                                                        temperature=0), str)


def test_selectors_match_every_condition_given(setup):
    def count(**selectors):
        config = DomainConfig(enabled=True, **selectors)
        return sum(1 for _ in selected_documents(config, setup / "corpus"))

    assert count(sources=["forum"]) == 60
    assert count(url_pattern=r"^https://forum\.example\.net/t/1\d$") == 10
    assert count(languages=["EN"]) == 60
    assert count(sources=["docs", "forum"], languages=["de"]) == 60
    assert count(sources=["docs"], languages=["de"]) == 0


def test_lora_on_a_url_selection_saves_the_adapter(setup, tmp_path):
    result = run(setup, tmp_path, url_pattern=r"//docs\.example\.org/", max_steps=10,
                 adapter={"method": "lora", "lora_rank": 2})
    stats = result["stats"]
    assert stats["domain_documents"] == 60 and stats["trainable_share"] < 0.10
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert set(load_model(tmp_path / "model.pt").state_dict()) == \
        set(load_model(setup / "pretrained" / "model.pt").state_dict())


def test_a_selection_matching_nothing_names_the_selectors(setup, tmp_path):
    with pytest.raises(StageInputError, match=r"no document .*sources=\['wiki'\], "
                                              r"languages=\['fr'\]"):
        run(setup, tmp_path, sources=["wiki"], languages=["fr"])


def test_language_selection_needs_a_language_column(setup, tmp_path):
    write_records([{"id": f"x{i}", "url": f"http://x/{i}", "text": "some text"}
                   for i in range(3)], tmp_path / "corpus")
    with pytest.raises(StageInputError, match="no 'language' column"):
        domain_finetune(DomainConfig(**FAST, languages=["en"]), setup / "tokens",
                        setup / "pretrained", tmp_path / "corpus", tmp_path / "out")


def test_config_needs_a_selector_when_enabled_and_a_valid_pattern():
    assert not DomainConfig().enabled  # off by default, and then needs no selector
    with pytest.raises(ValidationError, match="selects no documents"):
        DomainConfig(enabled=True)
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        DomainConfig(enabled=True, url_pattern="docs[")
    with pytest.raises(ValidationError):
        DomainConfig(enabled=True, sources=["a"], unknown=1)
