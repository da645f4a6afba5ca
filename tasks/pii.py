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

Two recognizers are added to Presidio's: written phone numbers (``(555) 010-4477``,
``+44 20 7946 0958``, ...), which ``phonenumbers`` drops when the number is not assigned,
and card numbers in the groupings Presidio's pattern misses (2-series Mastercard, 19
digits). The NLP engine without a model gives every character that is not a space a
token, so every match has a token to look up context words from.

Long documents are cut into chunks at whitespace (Presidio's cost grows with text length
and spaCy refuses texts over a million characters); each chunk is scrubbed on its own and
the scrubbed chunks are joined, so no offsets need mapping back. Without the NER model,
only windows of a chunk are analysed: the pattern entities need a digit, an '@' or (IPv6)
a ':', so a window is the text around such words, with enough words before them for
context, and the output is the same as from analysing the whole chunk.

Presidio and spaCy take seconds to import: they are imported on first use of an engine
(``presidio()``), so that ``PiiConfig`` can be validated without them. No log line here
holds a document's text or a detected value.
"""

from __future__ import annotations

import importlib.metadata
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
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import phonenumbers
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.shard_runner import Mapper, ShardStep, run_sharded
from tasks.stage import StageInputError

if TYPE_CHECKING:
    from presidio_analyzer import BatchAnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngine, SpacyNlpEngine
    from presidio_anonymizer import AnonymizerEngine

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
# The tokens of the engine without a model: words, and runs of other characters that are
# not spaces, so that a match starting at any non-space character has a token.
_TOKEN = re.compile(r"\w+|[^\w\s]+")

# Presidio's PhoneRecognizer.DEFAULT_SUPPORTED_REGIONS (presidio-analyzer 2.2), spelled out
# so that validating a config does not import Presidio.
DEFAULT_PHONE_REGIONS = ("US", "GB", "DE", "FR", "IL", "IN", "CA", "BR")

# ---- phone and card patterns added to Presidio's -----------------------------------------
# Presidio's PhoneRecognizer keeps only the numbers ``phonenumbers`` calls valid, so a
# number written as one but not assigned (555-010-4477, most made-up and many new ones) is
# kept. These patterns find the usual written forms; a form that is a phone number by its
# shape alone (area code in parentheses, 3-3-4 groups, + country code and groups, an
# extension) scores above the default threshold, a bare run of digits needs a context
# word. They run with Presidio's flags (IGNORECASE, MULTILINE, DOTALL).
_NOT_AFTER = r"(?<![\w+/]|\d[.-])"  # not the tail of a longer number, version or path
_NOT_AFTER_PAREN = r"(?<![\w)])"
_NOT_BEFORE = r"(?![\w+/]|[.-]\d)"  # nor the head of one (3.11.7, 2024-01-15, 192.168...)
_EXTENSION = r"(?: ?(?:x|ext\.?|extension) ?\d{1,5})?"
PHONE_STRONG_SCORE = 0.6
PHONE_GROUPED_SCORE = 0.5
PHONE_WEAK_SCORE = 0.3  # 0.65 with a context word
# (name, regex, score, regions that use the national form: None = international)
PHONE_PATTERNS = [
    ("phone NANP (555) 010-4477",
     _NOT_AFTER_PAREN + r"(?:(?:\+|00)?1[ .-]?)?\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"
     + _EXTENSION + _NOT_BEFORE, PHONE_STRONG_SCORE, ("US", "CA")),
    ("phone NANP 555-010-4477",
     _NOT_AFTER + r"(?:(?:\+|00)?1([ .-]))?\d{3}([ .-])\d{3}\2\d{4}" + _EXTENSION + _NOT_BEFORE,
     PHONE_STRONG_SCORE, ("US", "CA")),
    ("phone NANP digits only (weak)", _NOT_AFTER + r"(?:\+?1)?[2-9]\d{9}" + _NOT_BEFORE,
     PHONE_WEAK_SCORE, ("US", "CA")),
    ("phone international +44 20 7946 0958",
     _NOT_AFTER + r"\+[1-9]\d{0,3}(?: ?\(0\) ?|[ .-]?)(?:\(\d{1,5}\)|\d{1,8})(?:[ .-]\d{2,8}){1,5}"
     + _EXTENSION + _NOT_BEFORE, PHONE_STRONG_SCORE, None),
    ("phone international digits only (weak)",
     _NOT_AFTER + r"\+[1-9]\d{0,3}(?: ?\(0\) ?)?\d{6,13}" + _NOT_BEFORE, PHONE_WEAK_SCORE, None),
    ("phone GB (0113) 496 0123",
     _NOT_AFTER_PAREN + r"\(0\d{2,4}\) ?\d{3,4}[ -]?\d{3,4}" + _EXTENSION + _NOT_BEFORE,
     PHONE_STRONG_SCORE, ("GB",)),
    ("phone GB 0113 496 0123",
     _NOT_AFTER + r"0[1-9]\d{1,3}[ -]\d{3,4}(?:[ -]?\d{3,4})?" + _EXTENSION + _NOT_BEFORE,
     PHONE_GROUPED_SCORE, ("GB",)),
    ("phone GB digits only (weak)", _NOT_AFTER + r"0[1-9]\d{8,9}" + _NOT_BEFORE,
     PHONE_WEAK_SCORE, ("GB",)),
]
# Matched as substrings of the words before a number ("call" is a stop word, but "calls",
# "calling" count); also given to Presidio's phone recognizer, whose list lacks tel and fax.
PHONE_CONTEXT = ["phone", "telephone", "tel", "call", "mobile", "cell", "fax", "contact",
                 "dial", "whatsapp", "sms"]

# Card numbers that Presidio's pattern (first digit 1, 3-6, 13 to 17 digits) misses: the
# 2-series Mastercard and Maestro 56-58 ranges, and 19 digits. Luhn-checked as Presidio's.
CARD_PATTERNS = [
    ("card 16 digits 2221-2720 or 56-58 (weak)",
     r"\b(?:2[2-7]\d{2}|5[6-8]\d{2})([ -]?)\d{4}\1\d{4}\1\d{4}\b", 0.3),
    ("card 19 digits (weak)",
     r"\b(?:[2-6]\d{3}([ -])\d{4}\1\d{4}\1\d{4}\1\d{3}|[4-6]\d{18})\b", 0.3),
]

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


# ---- offline Presidio engines ------------------------------------------------------------

_EXTENSION_AT_END = re.compile(r" ?(?:x|ext\.?|extension) ?\d{1,5}$", re.IGNORECASE)
_CLOSING_BRACKETS = {"(": ")", "[": "]", "\uff08": "\uff09", "\uff3b": "\uff3d"}
_OPENING_BRACKETS = frozenset(_CLOSING_BRACKETS)
_DOTTED_QUAD = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


def plausible_phone(text: str, national_regions: Iterable[str]) -> bool:
    """Whether a phone pattern's match has the length of a number (``phonenumbers``'
    "possible", not "valid": an unassigned number is still personal data) and is not all
    one digit (000-000-0000)."""
    number = _EXTENSION_AT_END.sub("", text)
    digits = [char for char in number if char.isdigit()]
    if len(set(digits)) < 2:
        return False
    if number.startswith("00"):
        number = "+" + number[2:]
    try:
        if number.startswith("+"):
            return phonenumbers.is_possible_number(phonenumbers.parse(number, None))
        return len(digits) >= 10 and any(
            phonenumbers.is_possible_number(phonenumbers.parse(number, region))
            for region in national_regions)
    except phonenumbers.NumberParseException:
        return False


@lru_cache(maxsize=1)
def presidio() -> SimpleNamespace:
    """Presidio, spaCy and tldextract, imported on first use, and the classes built on them.

    They take seconds to import, and validating a config (the CLI does) needs none of them.
    The classes are defined here, not in a module of their own, so that this file's hash,
    part of the pii stage's key, covers them.
    """
    import spacy
    import tldextract
    from presidio_analyzer import (
        AnalyzerEngine,
        BatchAnalyzerEngine,
        Pattern,
        PatternRecognizer,
        RecognizerRegistry,
    )
    from presidio_analyzer.nlp_engine import (
        NerModelConfiguration,
        NlpArtifacts,
        NoOpNlpEngine,
        SpacyNlpEngine,
    )
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        PhoneRecognizer,
    )
    from presidio_anonymizer import AnonymizerEngine
    from presidio_anonymizer.entities import OperatorConfig

    # cache_dir=None: no cache file; suffix_list_urls=(): no download; so the list snapshot
    # that ships inside the tldextract package is used.
    offline_tld_extract = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=())

    class OfflineEmailRecognizer(EmailRecognizer):
        """Presidio's e-mail recognizer, validating domains without fetching the suffix list."""

        def validate_result(self, pattern_text: str) -> bool:
            return offline_tld_extract(pattern_text).fqdn != ""

    class FormattedPhoneRecognizer(PatternRecognizer):
        """Phone numbers by their written form (``PHONE_PATTERNS``), assigned or not: the
        international forms, and the national forms of the configured regions among US,
        CA and GB."""

        def __init__(self, regions: Iterable[str], supported_language: str = "en"):
            regions = set(regions)
            used = [(name, regex, score, national)
                    for name, regex, score, national in PHONE_PATTERNS
                    if national is None or regions & set(national)]
            self.national_regions = sorted({region for *_, national in used if national
                                            for region in national if region in regions})
            super().__init__(supported_entity="PHONE_NUMBER",
                             patterns=[Pattern(name, regex, score)
                                       for name, regex, score, _ in used],
                             context=PHONE_CONTEXT, supported_language=supported_language,
                             name="FormattedPhoneRecognizer")

        def invalidate_result(self, pattern_text: str) -> bool:
            return not plausible_phone(pattern_text, self.national_regions)

    class ValidPhoneRecognizer(PhoneRecognizer):
        """Presidio's phone recognizer (``phonenumbers``, valid numbers only) with two fixes:
        an opening bracket that ``phonenumbers`` takes into a match without its closing one
        is left out ("(+44 20 7946 0958)" would lose its "(" to the placeholder), and a
        dotted quad (an IPv4 address, sometimes a valid number too) is not a phone number."""

        def analyze(self, text: str, entities: list[str], nlp_artifacts=None) -> list:
            results = []
            for result in super().analyze(text, entities, nlp_artifacts):
                while (result.start < result.end and text[result.start] in _OPENING_BRACKETS
                       and _CLOSING_BRACKETS[text[result.start]]
                       not in text[result.start:result.end]):
                    result.start += 1
                if not _DOTTED_QUAD.fullmatch(text, result.start, result.end):
                    results.append(result)
            return results

    class CardNumberRecognizer(CreditCardRecognizer):
        """Presidio's credit card recognizer (Luhn check, context) for ``CARD_PATTERNS``."""

        def __init__(self, supported_language: str = "en"):
            super().__init__(patterns=[Pattern(*pattern) for pattern in CARD_PATTERNS],
                             supported_language=supported_language,
                             name="CardNumberRecognizer")

    class WordTokenNlpEngine(NoOpNlpEngine):
        """Presidio's no-model engine (no NER, nothing to download) plus words for context.

        Presidio raises a match's score when a context word ("phone", "email", "card", ...)
        appears among the words before it; it reads those words from the NLP engine's
        lemmas, which the plain no-op engine leaves empty, so a phone number (0.4 alone,
        0.75 in context) would never pass the default threshold. Lower-cased ``\\w+`` words
        stand in for lemmas, and spaCy's stop word list (language data, not a model) keeps
        "the", "my", ... out of the context. Runs of other characters that are not spaces
        are tokens too (flagged as punctuation, so never context words): Presidio looks up
        the token at each match's start and fails when there is none, as for the '::' of
        an IPv6 address after a full stop. A regular expression rather than a blank spaCy
        pipeline: context matching needs only the words, and spaCy's tokenizer took a third
        of the time.
        """

        def __init__(self, language: str):
            super().__init__(models=[{"lang_code": language, "model_name": "word-tokens"}])
            try:
                self.stop_words = frozenset(
                    spacy.util.get_lang_class(language).Defaults.stop_words)
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
            matches = list(_TOKEN.finditer(text))
            tokens = [match.group() for match in matches]
            return NlpArtifacts(entities=[], tokens=tokens,
                                tokens_indices=[match.start() for match in matches],
                                lemmas=[token.lower() for token in tokens], nlp_engine=self,
                                language=language, scores=[])

    return SimpleNamespace(
        spacy=spacy, AnalyzerEngine=AnalyzerEngine, BatchAnalyzerEngine=BatchAnalyzerEngine,
        RecognizerRegistry=RecognizerRegistry, NerModelConfiguration=NerModelConfiguration,
        SpacyNlpEngine=SpacyNlpEngine, EmailRecognizer=EmailRecognizer,
        PhoneRecognizer=PhoneRecognizer, CreditCardRecognizer=CreditCardRecognizer,
        AnonymizerEngine=AnonymizerEngine, OperatorConfig=OperatorConfig,
        OFFLINE_TLD_EXTRACT=offline_tld_extract, OfflineEmailRecognizer=OfflineEmailRecognizer,
        FormattedPhoneRecognizer=FormattedPhoneRecognizer,
        ValidPhoneRecognizer=ValidPhoneRecognizer,
        CardNumberRecognizer=CardNumberRecognizer, WordTokenNlpEngine=WordTokenNlpEngine)


_PRESIDIO_NAMES = frozenset({"OFFLINE_TLD_EXTRACT", "OfflineEmailRecognizer",
                             "FormattedPhoneRecognizer", "ValidPhoneRecognizer",
                             "CardNumberRecognizer", "WordTokenNlpEngine"})


def __getattr__(name: str) -> Any:
    """``pii.WordTokenNlpEngine`` and the other classes of ``presidio()``, imported then."""
    if name in _PRESIDIO_NAMES:
        return getattr(presidio(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _NoTextInLogs(logging.Filter):
    """Presidio's own log records can carry text: a match that failed validation (IBAN, at
    ERROR), the words around a match (DEBUG). Their string arguments are masked; numbers,
    such as timings, are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, dict):
            record.args = {key: self.mask(value) for key, value in record.args.items()}
        elif record.args:
            record.args = tuple(self.mask(value) for value in record.args)
        return True

    @staticmethod
    def mask(value: Any) -> Any:
        return value if isinstance(value, int | float) else "<masked>"


_NO_TEXT_IN_LOGS = _NoTextInLogs()


@dataclass(frozen=True)
class PiiEngine:
    """Presidio analyzer and anonymizer, built once per process and reused."""

    analyzer: BatchAnalyzerEngine
    anonymizer: AnonymizerEngine
    language: str
    supported_entities: frozenset[str]
    ner: bool
    description: str
    # The engine's stop words when it has no NER model (candidate windows need them).
    stop_words: frozenset[str] = frozenset()


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


def _registry(language: str, nlp_engine: NlpEngine, phone_regions: tuple[str, ...]):
    """Presidio's predefined recognizers for ``language``, e-mail offline, phones by region,
    plus phone numbers by their written form and card numbers in more groupings.

    With the no-op engine Presidio adds no NER recognizer; with a spaCy model it adds one.
    """
    p = presidio()
    registry = p.RecognizerRegistry(supported_languages=[language])
    registry.load_predefined_recognizers(languages=[language], nlp_engine=nlp_engine)
    recognizers = []
    for recognizer in registry.recognizers:
        if type(recognizer) is p.EmailRecognizer:
            recognizer = p.OfflineEmailRecognizer(
                supported_language=recognizer.supported_language)
        elif type(recognizer) is p.PhoneRecognizer:
            recognizers.append(p.FormattedPhoneRecognizer(
                phone_regions, supported_language=recognizer.supported_language))
            recognizer = p.ValidPhoneRecognizer(
                supported_language=recognizer.supported_language,
                supported_regions=phone_regions,
                context=list(dict.fromkeys(p.PhoneRecognizer.CONTEXT + PHONE_CONTEXT)))
        elif type(recognizer) is p.CreditCardRecognizer:
            recognizers.append(p.CardNumberRecognizer(
                supported_language=recognizer.supported_language))
        recognizers.append(recognizer)
    registry.recognizers = recognizers
    return registry


def load_spacy_engine(language: str, spacy_model: str) -> SpacyNlpEngine:
    """Presidio's spaCy engine over an installed model, with Presidio's default NER mapping."""
    p = presidio()
    ner_config = p.NerModelConfiguration(model_to_presidio_entity_mapping=NER_LABEL_MAPPING,
                                         labels_to_ignore=NER_IGNORED_LABELS)
    engine = p.SpacyNlpEngine(models=[{"lang_code": language, "model_name": spacy_model}],
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
               phone_regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS,
               ) -> PiiEngine:
    """Presidio engines for ``language``: with NER from ``spacy_model``, or pattern-only if None."""
    started = time.perf_counter()
    p = presidio()
    for name in ("presidio-analyzer", "presidio-anonymizer"):
        logging.getLogger(name).addFilter(_NO_TEXT_IN_LOGS)  # once: a filter is a set member
    stop_words: frozenset[str] = frozenset()
    if spacy_model is None:
        nlp_engine: NlpEngine = p.WordTokenNlpEngine(language)
        nlp_engine.load()
        stop_words = nlp_engine.stop_words
        description = "pattern recognizers only"
    else:
        nlp_engine = load_spacy_engine(language, spacy_model)
        meta = nlp_engine.get_nlp(language).meta
        description = (f"spaCy {meta.get('lang', language)}_{meta.get('name', spacy_model)} "
                       f"{meta.get('version', '?')}")
    with quiet_presidio_loading():
        registry = _registry(language, nlp_engine, phone_regions)
        analyzer = p.AnalyzerEngine(registry=registry, nlp_engine=nlp_engine,
                                    supported_languages=[language])
    supported = frozenset(registry.get_supported_entities([language]))
    log.info("built Presidio engines (%s) in %.1fs", description, time.perf_counter() - started)
    return PiiEngine(p.BatchAnalyzerEngine(analyzer), p.AnonymizerEngine(), language, supported,
                     spacy_model is not None, description, stop_words)


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
        operator = presidio().OperatorConfig
        self.operators = {
            entity: operator("replace", {"new_value": self.placeholder.format(
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
