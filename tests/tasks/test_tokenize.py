"""Tokenize stage: token bins that decode back to the corpus, a stable split, clear errors."""

import json
import random

import numpy as np
import pytest
import sentencepiece as spm

from tasks.shards import write_records
from tasks.stage import StageInputError
from tasks.tokenize import TokenizeConfig, is_validation, read_val_ids, tokenize_corpus

WORDS = ["module", "function", "returns", "the", "value", "of", "a", "list", "string",
         "json", "parse", "object", "file", "path", "error", "raised", "when", "called"]


def make_corpus(folder, docs=40, seed=0):
    rng = random.Random(seed)
    records = []
    for i in range(docs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "."
                 for _ in range(rng.randint(3, 8))]
        text = f"Title {i}\n" + "\n    ".join(lines) + " Ünïcode ✓"
        records.append({"id": f"doc-{i}", "text": text, "url": f"http://x/{i}"})
    write_records(records, folder, shard_size=15)
    return records


def read_docs(out_dir, split):
    meta = json.loads((out_dir / "meta.json").read_text())
    tokens = np.fromfile(out_dir / f"{split}.bin", dtype=meta["dtype"]).tolist()
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))
    docs, current = [], []
    for token in tokens:
        if token == meta["eos_id"]:
            docs.append(sp.decode(current))
            current = []
        else:
            current.append(token)
    assert not current, "every document ends with EOS"
    return docs


def test_bins_decode_back_to_the_documents(tmp_path):
    records = make_corpus(tmp_path / "in")
    result = tokenize_corpus(TokenizeConfig(vocab_size=300), tmp_path / "in", tmp_path / "out")
    out = tmp_path / "out"
    meta = json.loads((out / "meta.json").read_text())
    texts = [r["text"] for r in records]
    train, val = read_docs(out, "train"), read_docs(out, "val")
    assert sorted(train + val) == sorted(texts)  # exact round trip, whitespace and all
    assert train == [t for t in texts if t not in val]  # corpus order is kept
    assert meta["train_documents"] + meta["val_documents"] == 40 and meta["val_documents"] >= 1
    assert meta["val_bytes"] == sum(len(t.encode()) for t in read_docs(out, "val"))
    assert result["count"] == meta["train_tokens"] + meta["val_tokens"]
    assert result["unit"] == "tokens" and result["stats"]["vocab_size"] == 300
    assert result["stats"]["bytes_per_token"] > 1
    assert all((out / name).is_file() for name in result["artifacts"].values())


def test_split_is_stable_and_follows_the_id_hash(tmp_path):
    records = make_corpus(tmp_path / "in", docs=60)
    config = TokenizeConfig(vocab_size=300, val_fraction=0.3)
    tokenize_corpus(config, tmp_path / "in", tmp_path / "a")
    tokenize_corpus(config, tmp_path / "in", tmp_path / "b")
    assert (tmp_path / "a" / "val.bin").read_bytes() == (tmp_path / "b" / "val.bin").read_bytes()
    expected = [r["text"] for r in records if is_validation(r["id"], 0.3)]
    assert 5 < len(expected) < 35
    assert read_docs(tmp_path / "a", "val") == expected
    assert read_val_ids(tmp_path / "a") == {r["id"] for r in records if is_validation(r["id"], 0.3)}


def test_empty_corpus_is_an_input_error(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(StageInputError, match="corpus is empty"):
        tokenize_corpus(TokenizeConfig(), tmp_path / "in", tmp_path / "out")


def test_vocabulary_too_large_for_the_corpus_names_the_setting(tmp_path):
    make_corpus(tmp_path / "in", docs=5)
    with pytest.raises(StageInputError, match=r"too small for tokenize.vocab_size=50000"):
        tokenize_corpus(TokenizeConfig(vocab_size=50000), tmp_path / "in", tmp_path / "out")


def test_vocabulary_too_small_for_the_characters_says_to_raise_it(tmp_path):
    make_corpus(tmp_path / "in", docs=5)
    with pytest.raises(StageInputError, match=r"vocab_size=100 is too small .* raise "
                                              r"tokenize.vocab_size above \d+"):
        tokenize_corpus(TokenizeConfig(vocab_size=100), tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out" / "tokenizer.model").exists()


def test_shards_encode_in_parallel_to_the_same_bins(tmp_path):
    """The per-shard half: encoded one task per shard (here in 2 processes) and joined in
    shard order, the token files are those of one process, whatever the sharding."""
    from tasks.shard_runner import ProcessPoolMapper

    records = [{"id": f"d{i}", "text": f"Document {i} talks about rivers and bridges. " * 5,
                "url": f"http://h/{i}"} for i in range(60)]
    write_records(records, tmp_path / "small", shard_size=7)
    write_records(records, tmp_path / "one", shard_size=1000)
    config = TokenizeConfig(vocab_size=320, val_fraction=0.2)
    tokenize_corpus(config, tmp_path / "one", tmp_path / "serial")
    with ProcessPoolMapper(2) as mapper:
        tokenize_corpus(config, tmp_path / "small", tmp_path / "parallel", mapper=mapper)
    for name in ("train.bin", "val.bin", "tokenizer.vocab", "val_ids.json"):
        assert (tmp_path / "serial" / name).read_bytes() == \
            (tmp_path / "parallel" / name).read_bytes(), name
    assert not (tmp_path / "parallel" / "parts").exists()


def test_tokens_and_documents_are_counted_per_source(tmp_path):
    records = make_corpus(tmp_path / "plain")
    for number, record in enumerate(records):
        record["source"] = "books" if number % 3 else "web"
    write_records(records, tmp_path / "named", shard_size=15)
    result = tokenize_corpus(TokenizeConfig(vocab_size=400), tmp_path / "named", tmp_path / "a")
    stats = result["stats"]
    assert stats["source.web.documents"] == 14 and stats["source.books.documents"] == 26
    assert stats["source.web.tokens"] + stats["source.books.tokens"] == result["count"]
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert not any(key.startswith("source.") for key in meta)  # training's meta stays lean
    # a corpus without a source column (the crawl's pages) is counted as the crawl
    crawled = tokenize_corpus(TokenizeConfig(vocab_size=400), tmp_path / "plain", tmp_path / "b")
    assert crawled["stats"]["source.crawl.tokens"] == crawled["count"]


def test_the_mask_token_has_an_id_that_text_never_encodes_to(tmp_path):
    records = make_corpus(tmp_path / "in")
    for record in records[:20]:  # a literal "<mask>" in the text stays plain text
        record["text"] += " fill the <mask> here"
    write_records(records, tmp_path / "in2", shard_size=15)
    tokenize_corpus(TokenizeConfig(vocab_size=300), tmp_path / "in2", tmp_path / "out")
    out = tmp_path / "out"
    meta = json.loads((out / "meta.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert meta["mask_id"] == sp.piece_to_id("<mask>") == 4 and sp.is_control(4)
    assert {meta[k] for k in ("unk_id", "bos_id", "eos_id", "pad_id")} == {0, 1, 2, 3}
    assert meta["mask_id"] not in sp.encode("fill the <mask> here")
    tokens = np.concatenate([np.fromfile(out / f"{side}.bin", dtype=meta["dtype"])
                             for side in ("train", "val")])
    assert not (tokens == meta["mask_id"]).any()
    assert sorted(read_docs(out, "train") + read_docs(out, "val")) == \
        sorted(r["text"] for r in records)


def test_a_tokenizer_without_a_mask_token_falls_back_to_an_unused_special_id(tmp_path, caplog):
    import logging

    from tasks.tokenize import resolve_mask_id

    make_corpus(tmp_path / "in")
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))))
    # an older tokenizer: the same special ids, no <mask>
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "old"),
                                   vocab_size=300, byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=3, minloglevel=2)
    caplog.set_level(logging.INFO, logger="tasks.tokenize")
    tokenize_corpus(TokenizeConfig(), tmp_path / "in", tmp_path / "out",
                    tokenizer=tmp_path / "old.model")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["mask_id"] == meta["bos_id"] == 1
    assert "has no <mask> token" in caplog.text and "unused BOS (id 1)" in caplog.text
    tokens = np.fromfile(tmp_path / "out" / "train.bin", dtype=meta["dtype"])
    assert not (tokens == 1).any()  # documents are encoded without BOS: it is free

    # a meta.json written before there was a mask_id (an older run)
    caplog.clear()
    old = {k: v for k, v in meta.items() if k != "mask_id"}
    assert resolve_mask_id(old, "the tokenizer in old/") == 1
    assert "the tokenizer in old/ has no <mask> token" in caplog.text
    assert resolve_mask_id({**old, "bos_id": -1}) == 3  # no BOS: the PAD id
    with pytest.raises(StageInputError, match="neither a BOS nor a PAD"):
        resolve_mask_id({**old, "bos_id": -1, "pad_id": -1})
