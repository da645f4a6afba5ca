"""PII: replace personal data in every document with typed placeholders such as ``<EMAIL_ADDRESS>``.

Detection is Microsoft Presidio, offline: pattern recognizers (e-mail, phone and card
numbers, IP addresses, IBANs, US SSNs) and, when a spaCy NER model is installed, named
entities such as PERSON; without the model, NER-only entities are skipped with a warning.

The stage is split in two modules so that validating a config stays fast:

* this one holds the stage: ``PiiConfig``, the choice of engine (``choose_engine``), the
  chunks and candidate windows, the ``Scrubber``, and the shard step and stage
  (``PiiStep``, ``scrub_pii``). It imports neither Presidio, spaCy nor tldextract, which
  take seconds to import: ``flows.config`` imports ``PiiConfig``, and the CLI validates
  configs.
* ``tasks.pii_engine`` holds everything that needs them: the offline recognizers and NLP
  engines and ``get_engine``, which builds them once per worker process. It is imported
  here only inside ``choose_engine`` (and ``Scrubber`` imports Presidio's
  ``OperatorConfig`` when it is built), on the first use of an engine.

Long documents are cut into chunks at whitespace (Presidio's cost grows with text length
and spaCy refuses texts over a million characters); each chunk is scrubbed on its own and
the scrubbed chunks are joined, so no offsets need mapping back. Without the NER model,
only windows of a chunk are analysed: the pattern entities need a digit, an '@' or (IPv6)
a ':', so a window is the text around such words, with enough words before them for
context, and the output is the same as from analysing the whole chunk.

No log line here holds a document's text or a detected value.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import phonenumbers
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.shard_runner import Mapper, ShardStep, run_sharded
from tasks.stage import StageInputError

if TYPE_CHECKING:
    from tasks.pii_engine import PiiEngine  # imports Presidio: only in choose_engine

log = logging.getLogger(__name__)

DEFAULT_ENTITIES = ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IP_ADDRESS", "IBAN_CODE",
                    "US_SSN", "PERSON"]

# The same NER settings as Presidio's conf/spacy.yaml: spaCy labels mapped to Presidio
# entities, ORG ignored (it flags too many product and project names).
NER_LABEL_MAPPING = {"PER": "PERSON", "PERSON": "PERSON", "NORP": "NRP", "FAC": "LOCATION",
                     "LOC": "LOCATION", "LOCATION": "LOCATION", "GPE": "LOCATION",
                     "DATE": "DATE_TIME", "TIME": "DATE_TIME"}
NER_IGNORED_LABELS = ["ORG", "ORGANIZATION", "CARDINAL", "EVENT", "LANGUAGE", "LAW", "MONEY",
                      "ORDINAL", "PERCENT", "PRODUCT", "QUANTITY", "WORK_OF_ART"]
NER_ENTITIES = frozenset(NER_LABEL_MAPPING.values())

_ENTITY_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_WORD = re.compile(r"\w+")

# Presidio's PhoneRecognizer.DEFAULT_SUPPORTED_REGIONS (presidio-analyzer 2.2), spelled out
# so that validating a config does not import Presidio. The phone and card patterns that
# forgeline adds to Presidio's are in tasks.pii_engine.
DEFAULT_PHONE_REGIONS = ("US", "GB", "DE", "FR", "IL", "IN", "CA", "BR")

# ---- candidate windows -------------------------------------------------------------------
# Each of these entities holds a digit, an '@', or (an IPv6 address: 'fe80::1', '::',
# 'dead:beef::', or all eight groups) a '::' or a ':' between hex digits, so without NER
# only the text around such words needs analysing. Not any ':': prose is full of "Note:".
WINDOWED_ENTITIES = frozenset({"EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IP_ADDRESS",
                               "IBAN_CODE", "US_SSN"})
# from the first such character to the end of the word (run of non-spaces)
_CANDIDATE = re.compile(r"(?:[\d@]|::|[0-9a-f]:[0-9a-f])\S*", re.IGNORECASE)
_SPACE = re.compile(r"\s")
WINDOW_MARGIN = 100  # characters kept on each side of a candidate word
# Presidio's context enhancer reads the 5 keywords (words that are not stop words) before a
# match, and the match's own; a window starts that many keywords, and one more, before.
WINDOW_KEYWORDS = 7


class PiiConfig(BaseModel):
    """Which kinds of personal data to find and what to replace them with."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run this stage; when off, documents keep their "
                                            "personal data.")
    entities: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ENTITIES),
        description="Presidio entity types to replace: EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD, "
                    "IP_ADDRESS, IBAN_CODE, US_SSN, PERSON, URL, CRYPTO, MAC_ADDRESS, UK_NHS, "
                    "US_PASSPORT, DATE_TIME, LOCATION, NRP, ... PERSON, LOCATION and NRP need "
                    "the NER model (spacy_model) and are skipped with a warning without it. URL "
                    "is left out on purpose: web pages link to project sites and docs, and "
                    "masking those removes useful text while rarely hiding anything personal.")
    language: str = Field("en", min_length=2,
                          description="spaCy/Presidio language code of the corpus; Presidio's "
                                      "built-in recognizers are mostly English.")
    score_threshold: float = Field(
        0.5, ge=0, le=1,
        description="Minimum Presidio confidence (0-1) to replace a detection. Checksum-valid "
                    "credit cards and IBANs score 1.0. A phone number written as one, "
                    "(555) 010-4477, 555-010-4477, +44 20 7946 0958, 555-010-4477 x321, "
                    "0113 496 0123, scores 0.5-0.6 and is replaced at 0.5; a bare run of "
                    "digits scores 0.3-0.4 and is replaced only with a context word ('phone', "
                    "'mobile', 'tel', ...) shortly before it (+0.35).")
    spacy_model: str = Field(
        "en_core_web_lg", min_length=1,
        description="spaCy NER model (package name or model directory) used for PERSON and "
                    "other NLP entities when installed; when it is not installed, only "
                    "Presidio's pattern recognizers run and names are not detected. Nothing is "
                    "downloaded: `python -m spacy download en_core_web_lg` installs it.")
    phone_regions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PHONE_REGIONS),
        description="Countries (ISO codes) whose national phone formats are recognized "
                    "(212-555-0123 is US); numbers with a + country prefix are found anyway. "
                    "Each region is one more pass of the phone matcher, the costliest "
                    "recognizer: Presidio's 8 default regions take two thirds of the stage's "
                    "time on Python documentation, US alone a quarter.")
    placeholder: str = Field("<{entity_type}>", min_length=1,
                             description="Replacement for each detection; {entity_type} "
                                         "becomes the entity name, e.g. <EMAIL_ADDRESS>.")
    batch_size: int = Field(32, ge=1, le=4096,
                            description="Documents analysed together; with the NER model, "
                                        "the batch size of spaCy's nlp.pipe.")
    max_chars_per_chunk: int = Field(
        20_000, ge=1_000, le=1_000_000,
        description="Longer documents are analysed in pieces of at most this many characters, "
                    "cut at a line break or space: Presidio slows down on very long texts and "
                    "spaCy refuses texts over 1,000,000 characters.")
    columns: list[str] = Field(
        default_factory=lambda: ["text", "title", "author", "description"], min_length=1,
        description="Text columns to scrub; those a corpus does not have are skipped. The "
                    "title goes into fine-tuning prompts, so it is scrubbed too.")

    @field_validator("entities")
    @classmethod
    def _entity_names(cls, entities: list[str]) -> list[str]:
        if not entities:
            raise ValueError("pii.entities is empty; list at least one entity type or set "
                             "pii.enabled to false")
        bad = [e for e in entities if not _ENTITY_NAME.fullmatch(e)]
        if bad:
            raise ValueError(f"pii.entities {bad} are not Presidio entity names (upper case, "
                             "e.g. EMAIL_ADDRESS)")
        return list(dict.fromkeys(entities))

    @field_validator("phone_regions")
    @classmethod
    def _known_regions(cls, regions: list[str]) -> list[str]:
        unknown = [r for r in regions if r not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"pii.phone_regions {unknown} are not phone regions (upper-case "
                             "ISO country codes such as US, GB, DE)")
        if not regions:
            raise ValueError("pii.phone_regions is empty; remove PHONE_NUMBER from "
                             "pii.entities instead")
        return list(dict.fromkeys(regions))

    @field_validator("placeholder")
    @classmethod
    def _placeholder_format(cls, placeholder: str) -> str:
        try:
            placeholder.format(entity_type="EMAIL_ADDRESS")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"pii.placeholder {placeholder!r} is not a valid format string: "
                             f"only {{entity_type}} may appear in braces ({exc})") from None
        return placeholder


# ---- choosing an engine -----------------------------------------------------------------

def model_installed(name: str) -> bool:
    """True for an installed spaCy model package or a model directory; never downloads.
    (spaCy's ``util.is_package`` without importing spaCy.)"""
    if Path(name).is_dir():
        return True
    try:
        importlib.metadata.distribution(name)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class EnginePlan:
    engine: PiiEngine
    entities: list[str]  # what will be replaced
    skipped: list[str]  # requested, but needing an NER model that is not installed
    description: str  # for people: which NLP engine ran and what it cannot see


def choose_engine(config: PiiConfig) -> EnginePlan:
    """Pick the engine for the requested entities and say what it can and cannot detect.

    The NER model is loaded only when an entity that only NER finds is requested: it is
    slow to load and to run, and pattern entities do not need it. The first call in a
    process imports Presidio and spaCy (``tasks.pii_engine``); engines are cached there.
    """
    from tasks.pii_engine import get_engine

    regions = tuple(config.phone_regions)
    patterns = get_engine(config.language, None, regions)
    unknown = [e for e in config.entities
               if e not in patterns.supported_entities and e not in NER_ENTITIES]
    if unknown:
        known = sorted(patterns.supported_entities | NER_ENTITIES)
        raise StageInputError("pii", f"unknown entity type(s) {unknown} for language "
                                     f"{config.language!r}; fix pii.entities (known: {known})")
    ner_only = [e for e in config.entities if e not in patterns.supported_entities]
    if not ner_only:
        return EnginePlan(patterns, list(config.entities), [],
                          f"{patterns.description} (no NER entity requested)")
    if model_installed(config.spacy_model):
        engine = get_engine(config.language, config.spacy_model, regions)
        return EnginePlan(engine, list(config.entities), [],
                          f"{engine.description} (NER for {', '.join(ner_only)})")
    wanted = [e for e in config.entities if e not in ner_only]
    return EnginePlan(patterns, wanted, ner_only,
                      f"{patterns.description}: no spaCy NER model, {', '.join(ner_only)} not "
                      f"detected (install {config.spacy_model})")


# ---- scrubbing ---------------------------------------------------------------------------

def split_chunks(text: str, max_chars: int) -> list[str]:
    """Consecutive pieces of ``text`` of at most ``max_chars``, joined they give ``text`` back.

    Each cut goes after the last line break in the second half of the window, else after the
    last space or tab, so entities (which do not span lines, and mostly not spaces) stay whole.
    """
    chunks = []
    start = 0
    while len(text) - start > max_chars:
        low, end = start + max_chars // 2, start + max_chars
        cut = text.rfind("\n", low, end)
        if cut == -1:
            cut = max(text.rfind(" ", low, end), text.rfind("\t", low, end))
        if cut == -1:
            cut = end - 1
        chunks.append(text[start:cut + 1])
        start = cut + 1
    chunks.append(text[start:])
    return chunks


def _word_start(text: str, pos: int) -> int:
    """``pos``, moved back to the start of the word (run of non-spaces) it falls in."""
    while pos > 0 and not text[pos - 1].isspace():
        pos -= 1
    return pos


def _end_at_space(text: str, pos: int) -> int:
    """``pos``, moved on to the next whitespace character (or the end of ``text``)."""
    if pos >= len(text):
        return len(text)
    space = _SPACE.search(text, pos)
    return space.start() if space else len(text)


def _count_keywords(text: str, start: int, end: int, stop_words: frozenset[str]) -> int:
    """Words in ``text[start:end]`` that Presidio's context enhancer counts (see
    ``NlpArtifacts.set_keywords``): not a stop word, not punctuation, not "be"."""
    count = 0
    for word in _WORD.findall(text, start, end):
        lower = word.lower()
        if lower not in stop_words and lower != "be" and any(c.isalnum() for c in word):
            count += 1
    return count


def candidate_windows(text: str, stop_words: frozenset[str], margin: int = WINDOW_MARGIN,
                      keywords: int = WINDOW_KEYWORDS) -> list[tuple[int, int]]:
    """The parts of ``text`` that can hold a ``WINDOWED_ENTITIES`` match, as sorted, disjoint
    ``(start, end)`` spans; none when ``text`` has no digit, '@', '::' or hex digit colon
    hex digit.

    Each word (run of non-spaces) holding one of these gets a window from at
    least ``margin`` characters and ``keywords`` context words before it (the words
    Presidio's context enhancer reads, stop words skipped; ``stop_words`` are the NLP
    engine's) to ``margin`` characters after it, both ends at whitespace; overlapping
    windows are merged. Tokens, regular expression boundaries and context words are then
    the same in a window as in the whole text, so analysing the windows finds what
    analysing the whole text finds, in a fraction of the time on prose.
    """
    windows: list[list[int]] = []
    for hit in _CANDIDATE.finditer(text):
        end = _end_at_space(text, hit.end() + margin)
        if windows and hit.start() <= windows[-1][1]:
            windows[-1][1] = max(windows[-1][1], end)
            continue
        floor = windows[-1][1] if windows else 0
        start = _word_start(text, hit.start())
        found = 0
        while start > floor and found < keywords:
            earlier = _word_start(text, max(floor, start - margin))
            found += _count_keywords(text, earlier, start, stop_words)
            start = earlier
        if windows and start <= windows[-1][1]:
            windows[-1][1] = end
        else:
            windows.append([start, end])
    return [(start, end) for start, end in windows]


@dataclass
class Scrubber:
    """Replaces the configured entities in batches of texts with one engine.

    With ``windowed`` (the default where possible: no NER model, and only entities from
    ``WINDOWED_ENTITIES``) only the ``candidate_windows`` of each chunk are analysed and
    anonymized, and the text between them is kept as it is: the same output as analysing
    whole chunks, without spending Presidio's time on prose that cannot hold a match.
    """

    engine: PiiEngine
    entities: list[str]
    score_threshold: float
    placeholder: str
    max_chars: int
    batch_size: int
    windowed: bool | None = None

    def __post_init__(self) -> None:
        from presidio_anonymizer.entities import OperatorConfig  # loaded with the engine

        self.operators = {
            entity: OperatorConfig("replace", {"new_value": self.placeholder.format(
                entity_type=entity)})
            for entity in self.entities}
        possible = not self.engine.ner and set(self.entities) <= WINDOWED_ENTITIES
        if self.windowed is None:
            self.windowed = possible
        elif self.windowed and not possible:
            raise ValueError("candidate windows need an engine without NER and entities "
                             f"from {sorted(WINDOWED_ENTITIES)}")

    def spans(self, chunk: str) -> list[tuple[int, int]]:
        """The parts of ``chunk`` to analyse."""
        if self.windowed:
            return candidate_windows(chunk, self.engine.stop_words)
        return [(0, len(chunk))]

    def scrub(self, texts: list[str]) -> list[tuple[str, Counter]]:
        """Each text with its detections replaced, and how many of each entity type."""
        chunks = [(i, chunk) for i, text in enumerate(texts)
                  for chunk in split_chunks(text, self.max_chars) if chunk]
        spans = [self.spans(chunk) for _, chunk in chunks]
        found = iter(self.engine.analyzer.analyze_iterator(
            [chunk[start:end] for (_, chunk), chunk_spans in zip(chunks, spans)
             for start, end in chunk_spans],
            language=self.engine.language, batch_size=self.batch_size, entities=self.entities,
            score_threshold=self.score_threshold))
        scrubbed: list[list[str]] = [[] for _ in texts]
        counts = [Counter() for _ in texts]
        for (i, chunk), chunk_spans in zip(chunks, spans):
            done = 0  # chunk[:done] is in scrubbed[i]
            for start, end in chunk_spans:
                results = next(found)
                if results:
                    anonymized = self.engine.anonymizer.anonymize(chunk[start:end], results,
                                                                  self.operators)
                    scrubbed[i] += (chunk[done:start], anonymized.text)
                    counts[i].update(item.entity_type for item in anonymized.items)
                    done = end
            scrubbed[i].append(chunk[done:])
        return [("".join(parts), count) for parts, count in zip(scrubbed, counts)]


class PiiStep(ShardStep):
    """Personal data replaced in the text columns of a shard's documents. The Presidio
    engines are built once per worker process (``get_engine`` is cached), not per shard."""

    name = "pii"
    batch_size = 32

    def __init__(self, config: PiiConfig):
        super().__init__(config)
        self.batch_size = config.batch_size
        plan = choose_engine(config)
        self.entities = plan.entities
        self.scrubber = Scrubber(plan.engine, plan.entities, config.score_threshold,
                                 config.placeholder, config.max_chars_per_chunk,
                                 config.batch_size)

    def apply(self, records: list[dict], stats: Counter) -> list[dict]:
        found = [Counter() for _ in records]
        for column in self.config.columns:
            if column not in records[0]:
                continue
            texts = [record[column] or "" for record in records]
            stats["input_chars"] += sum(len(text) for text in texts)
            for record, counter, (text, counts) in zip(records, found,
                                                       self.scrubber.scrub(texts)):
                if record[column] is not None:
                    record[column] = text
                counter.update(counts)
        for record, counts in zip(records, found):
            record["pii_count"] = sum(counts.values())
            record["pii_counts"] = json.dumps(dict(sorted(counts.items())))
            stats["documents_with_pii"] += bool(counts)
            stats["pii_total"] += sum(counts.values())
            for entity, number in counts.items():
                stats[f"pii_{entity}"] += number
        return records


def scrub_pii(config: PiiConfig, input_dir: Path, out_dir: Path,
              mapper: Mapper | None = None) -> dict:
    """Write every input document to ``out_dir/data`` with the personal data in its
    ``config.columns`` replaced.

    Columns are kept and two are added: ``pii_count`` (replacements in the document) and
    ``pii_counts`` (a JSON object, entity type -> replacements, e.g. '{"EMAIL_ADDRESS": 2}').
    No document is removed, except one that makes Presidio fail (reason ``pii_error``),
    which is held back rather than passed on unscrubbed.
    """
    started = time.perf_counter()
    plan = choose_engine(config)  # here too: a bad entity name fails before any shard runs
    if plan.skipped:
        log.warning("NLP engine: %s; no spaCy model is installed and none is downloaded: run "
                    "`python -m spacy download %s` to detect %s", plan.description,
                    config.spacy_model, ", ".join(plan.skipped))
    else:
        log.info("NLP engine: %s", plan.description)
    result = run_sharded(PiiStep, config, input_dir, out_dir, mapper)
    seconds = time.perf_counter() - started
    stats = result["stats"]
    for key in ("documents_with_pii", "pii_total", "input_chars",
                *(f"pii_{entity}" for entity in plan.entities)):
        stats.setdefault(key, 0)
    log.info("pii: %d documents, %d with personal data, %d replacements in %.1fs (%.1f "
             "docs/s, %.2f M chars/s)", result["count"], stats["documents_with_pii"],
             stats["pii_total"], seconds, stats["input_documents"] / seconds,
             stats["input_chars"] / 1e6 / seconds)
    stats.update({"entities_skipped": len(plan.skipped), "ner_model": int(plan.engine.ner),
                  "seconds": round(seconds, 3),
                  "docs_per_second": round(stats["input_documents"] / seconds, 2)})
    return {**result, "nlp_engine": plan.description, "entities": plan.entities,
            "entities_skipped": plan.skipped}
