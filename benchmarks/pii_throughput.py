"""PII scrubbing per core: forgeline's Scrubber against a plain Presidio loop.

Both scrub the same seeded documents (about 1,500 characters of English-like prose each,
some with numbers, times and colons that are not personal data; personal data planted in
about 30% of them) with the same Presidio recognizers (the pattern-only engine that
``tasks.pii.choose_engine`` builds: Presidio's predefined recognizers, the offline e-mail
recognizer, the phone and card patterns forgeline adds), in this one process:

* baseline: the usual Presidio loop, per document: ``AnalyzerEngine.analyze`` on the whole
  text, then ``AnonymizerEngine.anonymize``.
* forgeline, per core: ``tasks.pii.Scrubber.scrub`` on batches of ``batch_size``
  documents, as the pii stage calls it: only the candidate windows (text around digits,
  '@', IPv6 colons) are analysed and anonymized.
* forgeline, the stage: ``tasks.pii.scrub_pii`` over parquet shards of the same documents,
  its shards mapped over ``--workers`` processes (default: 2, this machine's cores), as
  the pipeline's default engine does. Each worker builds its Presidio engines once, before
  the clock starts (as in a long run, where that start-up is a few seconds in hours); the
  start-up is printed beside.

``ratio`` is the stage's documents per second over the baseline's, ``ratio_per_core`` the
single-process Scrubber's.

Recall is the share of planted values that are gone from the output. The outputs of the
two are compared too: windowing must not change them.

    .venv/bin/python benchmarks/pii_throughput.py
    .venv/bin/python benchmarks/pii_throughput.py --docs 500

The last line of standard output is one JSON object (``ratio`` = forgeline / baseline
documents per second).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from presidio_anonymizer import AnonymizerEngine

from tasks import pii
from tasks.pii import PiiConfig, Scrubber, scrub_pii
from tasks.shard_runner import ProcessPoolMapper
from tasks.shards import iter_records, write_records

NO_MODEL = "forgeline_benchmark_no_such_model"  # the pattern-only engine, as without a model
DOC_CHARS = 1_500
PII_SHARE = 0.3
NUMBERS_SHARE = 0.06  # of sentences: with about 20 a document, 70% of documents have one

CONTEXT = {
    "EMAIL_ADDRESS": ["email ", "write to ", "e-mail: "],
    "PHONE_NUMBER": ["phone ", "mobile: ", "tel. ", "fax "],
    "CREDIT_CARD": ["card ", "credit card ", "visa "],
    "IP_ADDRESS": ["IP ", "server ", "host "],
    "IBAN_CODE": ["IBAN ", "account "],
    "US_SSN": ["SSN ", "social security number "],
}
# Not personal data, but windows have to look at them.
BENIGN = ["in 2019", "version 3.11.7", "at 10:30", "on page 42", "section 4.2", "by 15%",
          "since 2024-01-15", "for 3,500 users", "issue #1234", "as follows:"]


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def _value(rng: random.Random, entity: str, us, gb) -> str:
    """A planted value of ``entity``: Faker's, in the usual written forms."""
    if entity == "EMAIL_ADDRESS":
        return rng.choice([us.email, us.free_email, us.company_email])()
    if entity == "PHONE_NUMBER":
        area, d = str(rng.randint(201, 989)), lambda n: _digits(rng, n)
        return rng.choice([
            lambda: f"({area}) {d(3)}-{d(4)}", lambda: f"{area}.{d(3)}.{d(4)}",
            lambda: f"{area}-{d(3)}-{d(4)} x{d(3)}", lambda: f"{area} {d(3)} {d(4)}",
            lambda: f"+44 20 {d(4)} {d(4)}", lambda: f"+1-{area}-{d(3)}-{d(4)}",
            lambda: f"+49 30 {d(7)}", us.phone_number, gb.phone_number,
            gb.cellphone_number])()
    if entity == "CREDIT_CARD":
        number = us.credit_card_number(rng.choice(["visa", "mastercard", "amex", "discover",
                                                   "diners"]))
        sep = rng.choice(["", " ", "-"])
        if len(number) in (14, 15):
            return sep.join([number[:4], number[4:10], number[10:]])
        return sep.join(number[i:i + 4] for i in range(0, len(number), 4))
    if entity == "IP_ADDRESS":
        return us.ipv4() if rng.random() < 0.6 else us.ipv6()
    if entity == "IBAN_CODE":
        iban = us.iban()
        return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4)) if rng.random() < 0.5 \
            else iban
    return us.ssn()


def _needs_context(entity: str, value: str) -> bool:
    """Only digits (a phone number without separators): a context word makes it a phone
    number, for Presidio as for anyone."""
    return entity == "PHONE_NUMBER" and value.lstrip("+").replace("(0)", "").isdigit()


def make_documents(n: int, seed: int = 0, numbers: float = NUMBERS_SHARE,
                   ) -> tuple[list[dict], list[list[tuple[str, str]]]]:
    """``n`` records ``{"id", "url", "title", "text"}`` of about ``DOC_CHARS`` characters of
    English-like prose (Faker's English word list, sentences and paragraphs; a share
    ``numbers`` of the sentences mention a number, a time or end in a colon: ``BENIGN``),
    and for each record the ``(entity, value)`` pairs planted in its text: one to three in
    about ``PII_SHARE`` of them, none in the rest. Seeded: the same arguments give the same
    documents.
    """
    from faker import Faker

    rng = random.Random(seed)
    us, gb = Faker("en_US"), Faker("en_GB")
    us.seed_instance(seed)
    gb.seed_instance(seed + 1)
    entities = list(CONTEXT)
    records, planted = [], []
    for number in range(n):
        sentences = []
        length = 0
        while length < DOC_CHARS:
            sentence = us.sentence(nb_words=rng.randint(6, 16))
            if rng.random() < numbers:
                sentence = sentence[:-1] + f" {rng.choice(BENIGN)}."
            sentences.append(sentence)
            length += len(sentence) + 1
        values = []
        if rng.random() < PII_SHARE:
            for _ in range(rng.randint(1, 3)):
                entity = rng.choice(entities)
                value = _value(rng, entity, us, gb)
                context = rng.choice(CONTEXT[entity]) \
                    if _needs_context(entity, value) or rng.random() < 0.5 else ""
                at = rng.randrange(len(sentences))
                sentences[at] = sentences[at][:-1] + f", {context}{value}."
                values.append((entity, value))
        text = ""
        for i, sentence in enumerate(sentences):
            text += sentence + ("\n\n" if i % 5 == 4 else " ")
        records.append({"id": f"doc{number:06d}", "url": f"https://example.org/{number}",
                        "title": us.sentence(nb_words=5), "text": text.rstrip()})
        planted.append(values)
    return records, planted


def recall(outputs: list[str], planted: list[list[tuple[str, str]]]) -> float:
    values = [(output, value) for output, found in zip(outputs, planted) for _, value in found]
    return sum(value not in output for output, value in values) / max(1, len(values))


def run_stage(records: list[dict], config: PiiConfig, workers: int
              ) -> tuple[list[str], float, float]:
    """The pii stage over shards in ``workers`` processes: (texts, docs/s, start-up s)."""
    with tempfile.TemporaryDirectory(prefix="pii-bench-") as tmp:
        shard_size = max(1, len(records) // (workers * 8))  # 8 shards per worker
        write_records(records, Path(tmp) / "in", shard_size=shard_size)
        started = time.perf_counter()
        with ProcessPoolMapper(workers, warm_up=partial(pii.choose_engine, config)) as mapper:
            startup = time.perf_counter() - started
            started = time.perf_counter()
            result = scrub_pii(config, Path(tmp) / "in", Path(tmp) / "out", mapper=mapper)
            seconds = time.perf_counter() - started
        texts = {r["id"]: r["text"] for r in iter_records(Path(tmp) / "out" / "data")}
    assert result["count"] == len(records)
    return [texts[r["id"]] for r in records], len(records) / seconds, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--numbers", type=float, default=NUMBERS_SHARE,
                        help="share of sentences with a number that is not personal data")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes for the stage run (default 2)")
    args = parser.parse_args()

    started = time.perf_counter()
    records, planted = make_documents(args.docs, args.seed, args.numbers)
    texts = [record["text"] for record in records]
    chars = sum(map(len, texts))
    print(f"{len(texts)} documents, {chars / len(texts):.0f} characters on average, "
          f"{sum(map(bool, planted))} with {sum(map(len, planted))} planted values "
          f"(made in {time.perf_counter() - started:.1f}s)")

    config = PiiConfig(spacy_model=NO_MODEL)
    plan = pii.choose_engine(config)
    scrubber = Scrubber(plan.engine, plan.entities, config.score_threshold, config.placeholder,
                        config.max_chars_per_chunk, config.batch_size)
    analyzer = plan.engine.analyzer.analyzer_engine  # the same recognizers and NLP engine
    anonymizer = AnonymizerEngine()

    def baseline(batch: list[str]) -> list[str]:
        outputs = []
        for text in batch:
            results = analyzer.analyze(text=text, language=config.language,
                                       entities=plan.entities,
                                       score_threshold=config.score_threshold)
            outputs.append(anonymizer.anonymize(text, results, scrubber.operators).text)
        return outputs

    def forgeline(batch: list[str]) -> list[str]:
        outputs = []
        for start in range(0, len(batch), config.batch_size):
            outputs += [text for text, _ in
                        scrubber.scrub(batch[start:start + config.batch_size])]
        return outputs

    baseline(texts[:20]), forgeline(texts[:20])  # compile the patterns, warm the caches
    timed = {}
    for name, run in (("baseline", baseline), ("forgeline", forgeline)):
        started = time.perf_counter()
        outputs = run(texts)
        seconds = time.perf_counter() - started
        timed[name] = (outputs, len(texts) / seconds)
        print(f"{name:>9}: {seconds:6.1f}s  {len(texts) / seconds:8.1f} docs/s  "
              f"{chars / seconds / 1e6:.3f} M chars/s  recall {recall(outputs, planted):.4f}")
    same = sum(a == b for a, b in zip(timed["baseline"][0], timed["forgeline"][0]))
    print(f"identical outputs: {same}/{len(texts)}")
    stage_outputs, stage_rate, startup = run_stage(records, config, args.workers)
    print(f"{'stage':>9}: {len(texts) / stage_rate:6.1f}s  {stage_rate:8.1f} docs/s  with "
          f"{args.workers} workers (their start-up, not timed: {startup:.1f}s)  recall "
          f"{recall(stage_outputs, planted):.4f}")
    result = {
        "baseline_docs_per_second": round(timed["baseline"][1], 2),
        "forgeline_docs_per_second": round(stage_rate, 2),
        "ratio": round(stage_rate / timed["baseline"][1], 3),
        "forgeline_per_core_docs_per_second": round(timed["forgeline"][1], 2),
        "ratio_per_core": round(timed["forgeline"][1] / timed["baseline"][1], 3),
        "baseline_recall": round(recall(timed["baseline"][0], planted), 4),
        "forgeline_recall": round(recall(stage_outputs, planted), 4),
        "workers": args.workers,
        "worker_startup_seconds": round(startup, 2),
        "docs": len(texts),
        "identical_outputs": same,
        "stage_identical_outputs": sum(a == b for a, b in zip(timed["baseline"][0],
                                                                stage_outputs)),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
