"""PII: replace personal data in every document with typed placeholders such as ``<EMAIL_ADDRESS>``.

Detection is Microsoft Presidio: pattern recognizers (regular expressions plus checksums:
Luhn for credit cards, IBAN check digits, ``phonenumbers`` for phone numbers) and, when a
spaCy NER model is installed, named entities such as PERSON. This machine has no
internet, and two parts of Presidio would otherwise reach for it:

* Presidio's default spaCy engine *downloads* ``en_core_web_lg`` when it is missing. Here
  the model is used only when it is installed and an entity needs it; otherwise Presidio's
  no-op NLP engine, given plain words so that context words still count, feeds the
  pattern recognizers, and NER-only entities (PERSON, ...) are skipped with a warning.
* The e-mail recognizer validates domains with ``tldextract``, which fetches the public
  suffix list on first use. It is replaced by a subclass that reads the list snapshot
  bundled with tldextract and never opens a connection.

Long documents are cut into chunks at whitespace (Presidio's cost grows with text length
and spaCy refuses texts over a million characters); each chunk is scrubbed on its own and
the scrubbed chunks are joined, so no offsets need mapping back.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from pathlib import Path

import phonenumbers
import spacy
import tldextract
from presidio_analyzer import AnalyzerEngine, BatchAnalyzerEngine, RecognizerRegistry
from presidio_analyzer.nlp_engine import (
    NerModelConfiguration,
    NlpArtifacts,
    NlpEngine,
    NoOpNlpEngine,
    SpacyNlpEngine,
)
from presidio_analyzer.predefined_recognizers import EmailRecognizer, PhoneRecognizer
from presidio_anonymizer import AnonymizerEngine
from presidio_anonymizer.entities import OperatorConfig
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.progress import progress
from tasks.shards import ShardWriter, count_records, iter_records, shard_paths
from tasks.stage import StageInputError

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
                    "credit cards and IBANs score 1.0; a phone number scores 0.4 alone and "
                    "0.75 with a context word ('phone', 'mobile', 'tel', ...) shortly before "
                    "it, so at 0.5 only phone numbers in context are replaced.")
    spacy_model: str = Field(
        "en_core_web_lg", min_length=1,
        description="spaCy NER model (package name or model directory) used for PERSON and "
                    "other NLP entities when installed; when it is not installed, only "
                    "Presidio's pattern recognizers run and names are not detected. Nothing is "
                    "downloaded: `python -m spacy download en_core_web_lg` installs it.")
    phone_regions: list[str] = Field(
        default_factory=lambda: list(PhoneRecognizer.DEFAULT_SUPPORTED_REGIONS),
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
    shard_size: int = Field(1000, ge=1, description="Documents per output parquet shard.")

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


# ---- offline Presidio engines ------------------------------------------------------------

# cache_dir=None: no cache file; suffix_list_urls=(): no download; so the list snapshot that
# ships inside the tldextract package is used.
OFFLINE_TLD_EXTRACT = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=())


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's e-mail recognizer, validating domains without fetching the suffix list."""

    def validate_result(self, pattern_text: str) -> bool:
        return OFFLINE_TLD_EXTRACT(pattern_text).fqdn != ""


class WordTokenNlpEngine(NoOpNlpEngine):
    """Presidio's no-model engine (no NER, nothing to download) plus words for context.

    Presidio raises a match's score when a context word ("phone", "email", "card", ...)
    appears among the words before it; it reads those words from the NLP engine's lemmas,
    which the plain no-op engine leaves empty, so a phone number (0.4 alone, 0.75 in
    context) would never pass the default threshold. Lower-cased ``\\w+`` words stand in
    for lemmas, and spaCy's stop word list (language data, not a model) keeps "the", "my",
    ... out of the context. A regular expression rather than a blank spaCy pipeline:
    context matching needs only the words, and spaCy's tokenizer took a third of the time.
    """

    def __init__(self, language: str):
        super().__init__(models=[{"lang_code": language, "model_name": "word-tokens"}])
        try:
            self.stop_words = frozenset(spacy.util.get_lang_class(language).Defaults.stop_words)
        except ImportError:
            raise StageInputError("pii", f"spaCy has no language {language!r}; set "
                                         "pii.language to a spaCy language code such as "
                                         "'en'") from None

    def process_text(self, text: str, language: str) -> NlpArtifacts:
        self._validate_loaded_language(language)
        return self._word_artifacts(text, language)

    def process_batch(self, texts: Iterable, language: str, batch_size: int = 1,
                      n_process: int = 1, as_tuples: bool = False, **kwargs) -> Iterator:
        for item in texts:
            text = str(item[0] if as_tuples else item)
            artifacts = self.process_text(text, language)
            yield (text, artifacts, item[1]) if as_tuples else (text, artifacts)

    def is_stopword(self, word: str, language: str) -> bool:
        return word.lower() in self.stop_words

    def is_punct(self, word: str, language: str) -> bool:
        return not any(char.isalnum() for char in word)

    def _word_artifacts(self, text: str, language: str) -> NlpArtifacts:
        matches = list(_WORD.finditer(text))
        words = [match.group() for match in matches]
        return NlpArtifacts(entities=[], tokens=words,
                            tokens_indices=[match.start() for match in matches],
                            lemmas=[word.lower() for word in words], nlp_engine=self,
                            language=language, scores=[])


@dataclass(frozen=True)
class PiiEngine:
    """Presidio analyzer and anonymizer, built once per process and reused."""

    analyzer: BatchAnalyzerEngine
    anonymizer: AnonymizerEngine
    language: str
    supported_entities: frozenset[str]
    ner: bool
    description: str


def model_installed(name: str) -> bool:
    """True for an installed spaCy model package or a model directory; never downloads."""
    return spacy.util.is_package(name) or Path(name).is_dir()


def _registry(language: str, nlp_engine: NlpEngine,
              phone_regions: tuple[str, ...]) -> RecognizerRegistry:
    """Presidio's predefined recognizers for ``language``, e-mail offline, phones by region.

    With the no-op engine Presidio adds no NER recognizer; with a spaCy model it adds one.
    """
    registry = RecognizerRegistry(supported_languages=[language])
    registry.load_predefined_recognizers(languages=[language], nlp_engine=nlp_engine)
    recognizers = []
    for recognizer in registry.recognizers:
        if type(recognizer) is EmailRecognizer:
            recognizer = OfflineEmailRecognizer(supported_language=recognizer.supported_language)
        elif type(recognizer) is PhoneRecognizer:
            recognizer = PhoneRecognizer(supported_language=recognizer.supported_language,
                                         supported_regions=phone_regions)
        recognizers.append(recognizer)
    registry.recognizers = recognizers
    return registry


def load_spacy_engine(language: str, spacy_model: str) -> SpacyNlpEngine:
    """Presidio's spaCy engine over an installed model, with Presidio's default NER mapping."""
    ner_config = NerModelConfiguration(model_to_presidio_entity_mapping=NER_LABEL_MAPPING,
                                       labels_to_ignore=NER_IGNORED_LABELS)
    engine = SpacyNlpEngine(models=[{"lang_code": language, "model_name": spacy_model}],
                            ner_model_configuration=ner_config)
    try:
        engine.load()
    except (OSError, ValueError) as exc:
        raise StageInputError("pii", f"cannot load the spaCy model {spacy_model!r} ({exc}); "
                                     "reinstall it or set pii.spacy_model") from None
    return engine


@contextmanager
def quiet_presidio_loading() -> Iterator[None]:
    """Hide Presidio's noise while loading: a line per recognizer, a WARNING per Spanish,
    Italian, ... recognizer skipped for English, and a warning that the no-op engine gives
    no context words (WordTokenNlpEngine does). Expected or untrue, and alarming in a log."""
    presidio_log = logging.getLogger("presidio-analyzer")
    level = presidio_log.level
    presidio_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LemmaContextAwareEnhancer cannot use "
                                                      "context words", category=UserWarning)
            yield
    finally:
        presidio_log.setLevel(level)


@lru_cache(maxsize=4)
def get_engine(language: str, spacy_model: str | None = None,
               phone_regions: tuple[str, ...] = PhoneRecognizer.DEFAULT_SUPPORTED_REGIONS,
               ) -> PiiEngine:
    """Presidio engines for ``language``: with NER from ``spacy_model``, or pattern-only if None."""
    started = time.perf_counter()
    if spacy_model is None:
        nlp_engine: NlpEngine = WordTokenNlpEngine(language)
        nlp_engine.load()
        description = "pattern recognizers only"
    else:
        nlp_engine = load_spacy_engine(language, spacy_model)
        meta = nlp_engine.get_nlp(language).meta
        description = (f"spaCy {meta.get('lang', language)}_{meta.get('name', spacy_model)} "
                       f"{meta.get('version', '?')}")
    with quiet_presidio_loading():
        registry = _registry(language, nlp_engine, phone_regions)
        analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp_engine,
                                  supported_languages=[language])
    supported = frozenset(registry.get_supported_entities([language]))
    log.info("built Presidio engines (%s) in %.1fs", description, time.perf_counter() - started)
    return PiiEngine(BatchAnalyzerEngine(analyzer), AnonymizerEngine(), language, supported,
                     spacy_model is not None, description)


@dataclass(frozen=True)
class EnginePlan:
    engine: PiiEngine
    entities: list[str]  # what will be replaced
    skipped: list[str]  # requested, but needing an NER model that is not installed
    description: str  # for people: which NLP engine ran and what it cannot see


def choose_engine(config: PiiConfig) -> EnginePlan:
    """Pick the engine for the requested entities and say what it can and cannot detect.

    The NER model is loaded only when an entity that only NER finds is requested: it is
    slow to load and to run, and pattern entities do not need it.
    """
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


@dataclass
class Scrubber:
    """Replaces the configured entities in batches of texts with one engine."""

    engine: PiiEngine
    entities: list[str]
    score_threshold: float
    placeholder: str
    max_chars: int
    batch_size: int

    def __post_init__(self) -> None:
        self.operators = {
            entity: OperatorConfig("replace", {"new_value": self.placeholder.format(
                entity_type=entity)})
            for entity in self.entities}

    def scrub(self, texts: list[str]) -> list[tuple[str, Counter]]:
        """Each text with its detections replaced, and how many of each entity type."""
        pieces = [(i, chunk) for i, text in enumerate(texts)
                  for chunk in split_chunks(text, self.max_chars) if chunk]
        found = self.engine.analyzer.analyze_iterator(
            [chunk for _, chunk in pieces], language=self.engine.language,
            batch_size=self.batch_size, entities=self.entities,
            score_threshold=self.score_threshold)
        scrubbed: list[list[str]] = [[] for _ in texts]
        counts = [Counter() for _ in texts]
        for (i, chunk), results in zip(pieces, found):
            if results:
                anonymized = self.engine.anonymizer.anonymize(chunk, results, self.operators)
                chunk = anonymized.text
                counts[i].update(item.entity_type for item in anonymized.items)
            scrubbed[i].append(chunk)
        return [("".join(parts), count) for parts, count in zip(scrubbed, counts)]


def batched(records: Iterable[dict], size: int) -> Iterator[list[dict]]:
    iterator = iter(records)
    while batch := list(islice(iterator, size)):
        yield batch


def scrub_pii(config: PiiConfig, input_dir: Path, out_dir: Path) -> dict:
    """Write every input document to ``out_dir/data`` with the personal data in its
    ``config.columns`` replaced.

    Columns are kept and two are added: ``pii_count`` (replacements in the document) and
    ``pii_counts`` (a JSON object, entity type -> replacements, e.g. '{"EMAIL_ADDRESS": 2}').
    No document is removed.
    """
    started = time.perf_counter()
    total = count_records(input_dir) if shard_paths(input_dir) else 0
    if total == 0:
        raise StageInputError("pii", f"no documents in {input_dir} (no shard-*.parquet files or "
                                     "all empty); check the output of the previous stage")
    plan = choose_engine(config)
    if plan.skipped:
        log.warning("NLP engine: %s; no spaCy model is installed and none is downloaded: run "
                    "`python -m spacy download %s` to detect %s", plan.description,
                    config.spacy_model, ", ".join(plan.skipped))
    else:
        log.info("NLP engine: %s", plan.description)
    scrubber = Scrubber(plan.engine, plan.entities, config.score_threshold, config.placeholder,
                        config.max_chars_per_chunk, config.batch_size)

    totals: Counter = Counter()
    with_pii = chars = 0
    with ShardWriter(Path(out_dir) / "data", config.shard_size) as writer, \
            progress(total=total, desc="pii", unit="doc") as bar:
        for batch in batched(iter_records(input_dir), config.batch_size):
            found = [Counter() for _ in batch]
            for column in config.columns:
                if column not in batch[0]:
                    continue
                texts = [record[column] or "" for record in batch]
                chars += sum(len(text) for text in texts)
                for record, counter, (text, counts) in zip(batch, found, scrubber.scrub(texts)):
                    if record[column] is not None:
                        record[column] = text
                    counter.update(counts)
            for record, counts in zip(batch, found):
                record["pii_count"] = sum(counts.values())
                record["pii_counts"] = json.dumps(dict(sorted(counts.items())))
                with_pii += bool(counts)
                totals.update(counts)
                writer.add(record)
            bar.update(len(batch))

    seconds = time.perf_counter() - started
    log.info("pii: %d documents, %d with personal data, replaced %s in %.1fs (%.1f docs/s, "
             "%.2f M chars/s)", writer.count, with_pii, dict(totals) or "nothing", seconds,
             writer.count / seconds, chars / 1e6 / seconds)
    stats = {"input_documents": total, "documents_with_pii": with_pii,
             "pii_total": sum(totals.values()),
             **{f"pii_{entity}": totals[entity] for entity in plan.entities},
             "entities_skipped": len(plan.skipped), "ner_model": int(plan.engine.ner),
             "input_chars": chars, "seconds": round(seconds, 3),
             "docs_per_second": round(writer.count / seconds, 2)}
    return {"count": writer.count, "stats": stats, "nlp_engine": plan.description,
            "entities": plan.entities, "entities_skipped": plan.skipped}
