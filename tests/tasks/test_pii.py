"""PII stage: real Presidio on a tiny handmade corpus, offline, with and without an NER model."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import spacy
from pydantic import ValidationError

from tasks import pii, pii_engine
from tasks.pii import PiiConfig, scrub_pii, split_chunks
from tasks.shards import iter_records, shard_paths, write_records
from tasks.stage import StageInputError

ROOT = Path(__file__).resolve().parents[2]
NO_MODEL = "forgeline_test_no_such_model"  # never installed: the pattern-only path, always

DOCS = [
    {"id": "mail", "url": "https://a.example/1", "title": "t1",
     "text": "Questions go to guido.van.rossum@python.org, not to the list."},
    {"id": "phone", "url": "https://a.example/2", "title": "t2",
     "text": "Support desk phone: 212-555-0123, open on weekdays."},
    {"id": "card", "url": "https://a.example/3", "title": "t3",
     "text": "Paid with card 4111 1111 1111 1111 yesterday."},
    {"id": "ip", "url": "https://a.example/4", "title": "t4",
     "text": "The server at 192.168.10.42 answered slowly."},
    {"id": "iban", "url": "https://a.example/5", "title": "t5",
     "text": "Wire it to IBAN DE89 3704 0044 0532 0130 00 please."},
    {"id": "ssn", "url": "https://a.example/6", "title": "t6",
     "text": "Her social security number is 536-22-1234 on the form."},
    {"id": "clean", "url": "https://a.example/7", "title": "t7",
     "text": "Lists are mutable sequences; tuples are not. See section 3.2 for details."},
]
EXPECTED = {
    "mail": "Questions go to <EMAIL_ADDRESS>, not to the list.",
    "phone": "Support desk phone: <PHONE_NUMBER>, open on weekdays.",
    "card": "Paid with card <CREDIT_CARD> yesterday.",
    "ip": "The server at <IP_ADDRESS> answered slowly.",
    "iban": "Wire it to IBAN <IBAN_CODE> please.",
    "ssn": "Her social security number is <US_SSN> on the form.",
    "clean": DOCS[-1]["text"],
}


def run(tmp_path: Path, docs: list[dict], **config) -> tuple[dict, list[dict]]:
    write_records(docs, tmp_path / "in", shard_size=3)
    result = scrub_pii(PiiConfig(spacy_model=NO_MODEL, **config), tmp_path / "in",
                       tmp_path / "out")
    return result, list(iter_records(tmp_path / "out" / "data"))


def test_each_entity_type_becomes_its_placeholder_and_clean_text_is_unchanged(tmp_path):
    _, out = run(tmp_path, DOCS)
    assert [d["id"] for d in out] == [d["id"] for d in DOCS]
    assert {d["id"]: d["text"] for d in out} == EXPECTED
    assert [d["title"] for d in out] == [d["title"] for d in DOCS]  # other columns survive
    assert [d["url"] for d in out] == [d["url"] for d in DOCS]
    counts = {d["id"]: json.loads(d["pii_counts"]) for d in out}
    assert counts["card"] == {"CREDIT_CARD": 1} and counts["clean"] == {}
    assert [d["pii_count"] for d in out] == [1, 1, 1, 1, 1, 1, 0]


def test_titles_are_scrubbed_too_and_counted(tmp_path):
    docs = [{"id": "t", "url": "u", "title": "Mail jane.roe@example.com",
             "text": "Nothing personal here at all."}]
    _, out = run(tmp_path, docs)
    assert out[0]["title"] == "Mail <EMAIL_ADDRESS>"
    assert out[0]["text"] == docs[0]["text"]
    assert json.loads(out[0]["pii_counts"]) == {"EMAIL_ADDRESS": 1}
    _, kept = run(tmp_path / "text-only", docs, columns=["text"])
    assert kept[0]["title"] == docs[0]["title"]


def test_stats_count_what_was_replaced(tmp_path):
    docs = DOCS + [{"id": "two", "url": "u", "title": "t",
                    "text": "Write to a@example.com or b@example.org."}]
    result, _ = run(tmp_path, docs)
    assert result["count"] == len(docs)
    stats = result["stats"]
    assert stats["input_documents"] == 8
    assert stats["documents_with_pii"] == 7
    assert stats["pii_EMAIL_ADDRESS"] == 3
    assert stats["pii_total"] == 8
    for entity in ("PHONE_NUMBER", "CREDIT_CARD", "IP_ADDRESS", "IBAN_CODE", "US_SSN"):
        assert stats[f"pii_{entity}"] == 1
    assert stats["ner_model"] == 0 and stats["entities_skipped"] == 1
    assert all(isinstance(v, int | float) for v in stats.values())


def test_without_a_model_names_are_skipped_and_the_engine_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tasks.pii"):
        result, out = run(tmp_path, [{"id": "n", "url": "u", "title": "t",
                                      "text": "Barry Warsaw wrote this module."}])
    assert "pattern recognizers only" in result["nlp_engine"]
    assert "PERSON not detected" in result["nlp_engine"]
    assert result["entities_skipped"] == ["PERSON"] and "PERSON" not in result["entities"]
    assert out[0]["text"] == "Barry Warsaw wrote this module."
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(NO_MODEL in message and "PERSON" in message for message in warnings)


def test_only_requested_entities_with_a_custom_placeholder(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tasks.pii"):
        result, out = run(tmp_path, DOCS, entities=["EMAIL_ADDRESS"],
                          placeholder="[{entity_type}]")
    texts = {d["id"]: d["text"] for d in out}
    assert texts["mail"] == "Questions go to [EMAIL_ADDRESS], not to the list."
    assert texts["ip"] == DOCS[3]["text"]
    assert result["nlp_engine"] == "pattern recognizers only (no NER entity requested)"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_weak_matches_stay(tmp_path):
    """Invalid checksums, and runs of digits without a context word, are not personal data
    (a number written as a phone number, 212-555-0123, is: see the phone tests)."""
    docs = [{"id": "bad-card", "url": "u", "title": "t",
             "text": "The test vector 4111 1111 1111 1112 fails the Luhn check."},
            {"id": "bare-number", "url": "u", "title": "t",
             "text": "Run the job with seed 2125550123 again."}]
    _, out = run(tmp_path, docs)
    assert [d["text"] for d in out] == [d["text"] for d in docs]


def make_scrubber(**kwargs) -> pii.Scrubber:
    config = PiiConfig(spacy_model=NO_MODEL)
    plan = pii.choose_engine(config)
    return pii.Scrubber(plan.engine, plan.entities, config.score_threshold, config.placeholder,
                        config.max_chars_per_chunk, config.batch_size, **kwargs)


def scrub_one(text: str, **kwargs) -> str:
    return make_scrubber(**kwargs).scrub([text])[0][0]


@pytest.mark.parametrize("windowed", [True, False])
@pytest.mark.parametrize("text", ["x sys.::.", "ends with ::", "::", "a::", "x.::", "(::)",
                                  "see fe80::1.", "fe80::1"])
def test_ipv6_colons_after_punctuation_or_at_the_end_do_not_crash(text, windowed):
    """Presidio looks up the token at each match's start; '::' after a full stop had none
    ("Did not find word '::' in the list of tokens")."""
    scrubbed = scrub_one(text, windowed=windowed)
    assert "fe80" not in scrubbed


@pytest.mark.parametrize("text", [
    "(555) 010-4477", "555.010.4477", "555-010-4477 x321", "555-010-4477", "555 010 4477",
    "+44 20 7946 0958", "+1-202-555-0143", "+49 30 1234567", "(202)555-0143x123",
    "001-202-555-0143x1234", "+44(0)7700 900123", "(0113) 496 0123", "0113 496 0123",
    "07700 900123", "212-555-0123",
])
def test_phone_numbers_written_as_such_are_found_without_context(text):
    """Assigned or not (555 and 010 are not): the written form makes them phone numbers."""
    assert scrub_one(f"Reach her at {text} today.") == "Reach her at <PHONE_NUMBER> today."
    assert scrub_one(f"Reach her ({text}), today.") == "Reach her (<PHONE_NUMBER>), today."


@pytest.mark.parametrize("text", ["5550104477", "+441134960123", "01134960123",
                                  "+44(0)7700900653", "07700900123"])
def test_phone_numbers_that_are_only_digits_need_a_context_word(text):
    assert scrub_one(f"The value {text} is here.") == f"The value {text} is here."
    assert scrub_one(f"My phone is {text} now.") == "My phone is <PHONE_NUMBER> now."
    assert scrub_one(f"Tel. {text}") == "Tel. <PHONE_NUMBER>"


@pytest.mark.parametrize("text", [
    "Python 3.11.7 came out on 2024-01-15.", "ISBN 978-3-16-148410-0 and 0-306-40615-2.",
    "The build id 12345678901234 and 1234567890123 and 20240115.", "Wait 10:30 to 12:45.",
    "Ratio 16:9, section 4.2.1, pi 3.14159265358979, 1,234,567.89 dollars.",
    "Times 2024-01-15T10:30:00Z and 10/12/2023 and x = 555-0100.",
])
def test_numbers_that_are_not_phone_numbers_stay(text):
    assert scrub_one(text) == text


def test_an_ip_address_is_not_a_phone_number():
    text = "Call the server on 152.211.22.29 by phone."
    assert scrub_one(text) == "Call the server on <IP_ADDRESS> by phone."


@pytest.mark.parametrize("number", [
    "4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111",  # Visa 4-4-4-4
    "5555 5555 5555 4444", "2221 0000 0000 0009", "2720-9999-9999-9996",  # Mastercard
    "3782 822463 10005", "378282246310005", "3714-496353-98431",  # Amex 4-6-5
    "3056 930902 5904", "30569309025904",  # Diners 4-6-4
    "6011 1111 1111 1117", "6011 0009 9013 9424 124", "4000-0000-0000-0000-006",  # 19
    "6221260000000000001",
])
def test_luhn_valid_card_numbers_in_the_usual_groupings_are_found(number):
    assert scrub_one(f"Paid with {number} yesterday.") == "Paid with <CREDIT_CARD> yesterday."


def test_candidate_windows_surround_digits_at_and_ipv6_colons_with_context():
    stop_words = pii.choose_engine(PiiConfig(spacy_model=NO_MODEL)).engine.stop_words
    assert pii.candidate_windows("Plain prose. Note: nothing here.", stop_words) == []
    text = "word " * 100 + "call 555-010-4477 " + "word " * 30 + "a@b.org " + "x " * 300
    windows = pii.candidate_windows(text, stop_words)
    assert len(windows) == 1  # 150 characters apart: one window
    start, end = windows[0]
    assert start <= text.index("555") - 100 and end >= text.index("a@b.org") + 107
    assert text[start - 1].isspace() and text[end].isspace()
    text = text.replace("word " * 30, "word " * 60)  # 300 apart: two
    (_, first_end), (second_start, _) = pii.candidate_windows(text, stop_words)
    assert first_end < second_start
    # stop words do not count as context: the window reaches back to a real word
    far = "phone " + "the of and to a in is " * 20 + "5550104477"
    assert pii.candidate_windows(far, stop_words) == [(0, len(far))]
    assert pii.candidate_windows("std::vector a:b fe80::1", stop_words)[0][0] == 0


def test_windows_give_the_same_output_as_whole_texts():
    rng = __import__("random").Random(3)
    words = ["the", "of", "and", "phone", "card", "ssn", "iban", "server", "email", "note:",
             "number", "word", "prose", "table", "2024", "3.11.7", "16:9"]
    values = ["555-010-4477", "(555) 010-4477", "+44 20 7946 0958", "5550104477",
              "4111 1111 1111 1111", "192.168.1.10", "fe80::1", "a@b.org", "536-22-1234",
              "DE89 3704 0044 0532 0130 00", "::"]
    texts = [" ".join(rng.choice(words) if rng.random() < 0.9 else rng.choice(values)
                      for _ in range(rng.randint(5, 400))) for _ in range(60)]
    texts += ["phone " + "the of and to a in is " * 30 + "5550104477 " + "prose " * 50,
              "prose " * 300 + "\n\nmail me at jane@example.com\n" + "prose " * 300]
    for max_chars in (20_000, 1_000):
        windowed = make_scrubber(windowed=True)
        whole = make_scrubber(windowed=False)
        windowed.max_chars = whole.max_chars = max_chars
        assert windowed.scrub(texts) == whole.scrub(texts)


def test_windows_are_not_used_with_entities_that_may_hold_no_digit():
    config = PiiConfig(spacy_model=NO_MODEL, entities=["EMAIL_ADDRESS", "URL"])
    plan = pii.choose_engine(config)
    scrubber = pii.Scrubber(plan.engine, plan.entities, 0.5, "<{entity_type}>", 20_000, 8)
    assert not scrubber.windowed
    with pytest.raises(ValueError, match="candidate windows"):
        pii.Scrubber(plan.engine, plan.entities, 0.5, "<{entity_type}>", 20_000, 8,
                     windowed=True)


def test_importing_the_config_does_not_import_presidio_or_spacy():
    """The CLI validates configs: it must not wait seconds for Presidio and spaCy."""
    code = ("import sys, time; started = time.perf_counter(); import tasks.pii; "
            "from tasks.pii import PiiConfig; PiiConfig(); "
            "print(time.perf_counter() - started); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'presidio_analyzer', 'presidio_anonymizer', 'spacy', 'tldextract'}));"
            "print('tasks.pii_engine' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    seconds, heavy, engine = done.stdout.strip().splitlines()
    assert heavy == "[]" and engine == "False"
    assert float(seconds) < 2


def test_detected_values_and_texts_stay_out_of_the_logs(caplog):
    values = ["jane.roe@example.com", "555-010-4477", "4111 1111 1111 1111", "536-22-1234",
              "DE89 3704 0044 0532 0130 00", "192.168.10.42", "5550104477"]
    text = "Secret prose here: " + ", ".join(f"phone {value}" for value in values)
    with caplog.at_level(logging.DEBUG):
        scrubber = make_scrubber()
        logging.getLogger("presidio-analyzer").error("Failed to validate text %s", values[0])
        scrubber.scrub([text])
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "Failed to validate text" in logged  # Presidio's records are there, masked
    assert not [v for v in [*values, "Secret prose"] if v in logged]


def test_long_documents_are_chunked_without_losing_or_moving_text(tmp_path):
    line = "Filler line about iterators and generators in the standard library.\n"
    parts = [line * 40 + f"Ask user{i}@example.com about it.\n" for i in range(30)]
    text = "".join(parts)
    assert len(text) > 5 * 1_000
    _, out = run(tmp_path, [{"id": "long", "url": "u", "title": "t", "text": text}],
                 max_chars_per_chunk=1_000)
    expected = "".join(line * 40 + "Ask <EMAIL_ADDRESS> about it.\n" for _ in range(30))
    assert out[0]["text"] == expected
    assert json.loads(out[0]["pii_counts"]) == {"EMAIL_ADDRESS": 30}


def test_split_chunks_cuts_at_line_breaks_then_spaces():
    text = "alpha beta\ngamma delta epsilon\nzeta"
    chunks = split_chunks(text, 16)
    assert "".join(chunks) == text
    assert all(len(c) <= 16 for c in chunks)
    assert chunks[0] == "alpha beta\n"
    words = "word " * 100
    assert all(c.endswith(" ") for c in split_chunks(words, 32)[:-1])
    assert "".join(split_chunks("x" * 100, 32)) == "x" * 100  # no whitespace: hard cuts


def test_output_shards_mirror_input_shards_and_nothing_is_removed(tmp_path):
    result, out = run(tmp_path, DOCS)
    assert [p.name for p in shard_paths(tmp_path / "out" / "data")] == \
        [p.name for p in shard_paths(tmp_path / "in")]
    assert not (tmp_path / "out" / "removed").exists()
    assert result["count"] == len(out) == len(DOCS)


def test_engines_are_built_once_per_process():
    config = PiiConfig(spacy_model=NO_MODEL)
    assert pii.choose_engine(config).engine is pii.choose_engine(config).engine


def test_empty_input_is_a_stage_input_error(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(StageInputError, match="no documents"):
        scrub_pii(PiiConfig(), tmp_path / "in", tmp_path / "out")


@pytest.mark.parametrize("config, message", [
    ({"entities": ["EMAIL_ADDRESS", "SHOE_SIZE"]}, "SHOE_SIZE"),
    ({"language": "zz"}, "pii.language"),
])
def test_unusable_settings_are_stage_input_errors(tmp_path, config, message):
    write_records(DOCS[:1], tmp_path / "in")
    with pytest.raises(StageInputError, match=message):
        scrub_pii(PiiConfig(spacy_model=NO_MODEL, **config), tmp_path / "in", tmp_path / "out")


def test_a_broken_model_directory_is_a_stage_input_error(tmp_path):
    write_records(DOCS[:1], tmp_path / "in")
    broken = tmp_path / "model"
    broken.mkdir()
    with pytest.raises(StageInputError, match="cannot load the spaCy model"):
        scrub_pii(PiiConfig(spacy_model=str(broken)), tmp_path / "in", tmp_path / "out")


@pytest.mark.parametrize("field, value", [
    ("entities", []), ("entities", ["email_address"]), ("placeholder", "<{kind}>"),
    ("phone_regions", ["XX"]), ("score_threshold", 1.5), ("max_chars_per_chunk", 10),
    ("unknown_field", 1),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValidationError):
        PiiConfig(**{field: value})


def test_config_defaults():
    config = PiiConfig()
    assert config.enabled and config.entities[0] == "EMAIL_ADDRESS"
    assert "PERSON" in config.entities and "URL" not in config.entities
    assert config.placeholder == "<{entity_type}>" and config.spacy_model == "en_core_web_lg"
    assert all(field.description for field in PiiConfig.model_fields.values())


def test_email_domains_are_checked_without_network():
    assert pii_engine.OFFLINE_TLD_EXTRACT.suffix_list_urls == ()
    recognizers = pii.choose_engine(PiiConfig(spacy_model=NO_MODEL)).engine.analyzer \
        .analyzer_engine.registry.recognizers
    emails = [r for r in recognizers if "EMAIL_ADDRESS" in r.supported_entities]
    assert emails and all(isinstance(r, pii_engine.OfflineEmailRecognizer) for r in emails)


def test_a_fresh_process_with_sockets_disabled_scrubs_quickly(tmp_path):
    """First use in a new process, empty caches, any connection attempt fails loudly."""
    script = f"""
import socket, sys, time
def refuse(*args, **kwargs):
    raise RuntimeError("network access attempted")
socket.socket.connect = refuse
socket.getaddrinfo = refuse
sys.path.insert(0, {str(ROOT)!r})
from tasks.pii import PiiConfig, scrub_pii
from tasks.shards import iter_records, write_records
write_records([{{"id": "x", "url": "u", "text": "Mail jane@uni.ac.uk or bob@shop.co.jp."}}],
              {str(tmp_path / "in")!r})
started = time.perf_counter()
scrub_pii(PiiConfig(spacy_model={NO_MODEL!r}), {str(tmp_path / "in")!r}, {str(tmp_path / "out")!r})
print(round(time.perf_counter() - started, 2))
print(next(iter_records({str(tmp_path / "out" / "data")!r}))["text"])
"""
    cache = tmp_path / "cache"
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(cache)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    seconds, text = done.stdout.strip().splitlines()
    assert text == "Mail <EMAIL_ADDRESS> or <EMAIL_ADDRESS>."
    # generous: only a network timeout (tens of seconds) fails it, not a busy machine
    assert float(seconds) < 30, f"first scrub took {seconds}s: a network timeout?"
    assert time.perf_counter() - started < 60
    assert "network access attempted" not in done.stderr
    assert not (cache / "python-tldextract").exists()


@pytest.mark.skipif(not spacy.util.is_package("en_core_web_lg"),
                    reason="en_core_web_lg is not installed (no download here)")
def test_names_are_replaced_with_the_ner_model(tmp_path):
    write_records([{"id": "n", "url": "u", "text": "The module was written by Barry Warsaw."}],
                  tmp_path / "in")
    result = scrub_pii(PiiConfig(), tmp_path / "in", tmp_path / "out")
    assert "en_core_web_lg" in result["nlp_engine"] and result["stats"]["ner_model"] == 1
    text = next(iter_records(tmp_path / "out" / "data"))["text"]
    assert "<PERSON>" in text and "Warsaw" not in text


def test_a_model_directory_provides_ner_for_names(tmp_path):
    """The NER path, offline: a blank pipeline with an entity ruler stands in for the model."""
    nlp = spacy.blank("en")
    nlp.add_pipe("entity_ruler").add_patterns([{"label": "PERSON", "pattern": "Barry Warsaw"}])
    nlp.meta["name"] = "ruler_ner"
    nlp.to_disk(tmp_path / "model")
    write_records([{"id": "n", "url": "u", "text": "Barry Warsaw wrote it; mail barry@python.org."}],
                  tmp_path / "in")
    result = scrub_pii(PiiConfig(spacy_model=str(tmp_path / "model")), tmp_path / "in",
                       tmp_path / "out")
    assert result["nlp_engine"] == "spaCy en_ruler_ner 0.0.0 (NER for PERSON)"
    assert result["stats"]["ner_model"] == 1 and result["entities_skipped"] == []
    text = next(iter_records(tmp_path / "out" / "data"))["text"]
    assert text == "<PERSON> wrote it; mail <EMAIL_ADDRESS>."
