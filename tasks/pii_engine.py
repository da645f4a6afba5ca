"""The Presidio engine of the pii stage: recognizers, NLP engines and their assembly.

``tasks.pii`` holds the stage (its config, chunks and candidate windows, the scrubber);
this module holds everything that needs Presidio, spaCy or tldextract, imported at the top.
They take seconds to import, and validating a config (``flows.config`` imports
``tasks.pii.PiiConfig``) needs none of them, so ``tasks.pii`` imports this module only when
it first needs an engine (``tasks.pii.choose_engine``). ``get_engine`` is cached: each
worker process builds its engines once and reuses them for every shard. Both modules are
part of the pii stage's key (``flows/stages.py``).

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

No log line here holds a document's text or a detected value, and Presidio's own log
records are masked (``_NoTextInLogs``).
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import phonenumbers
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
    NlpEngine,
    NoOpNlpEngine,
    SpacyNlpEngine,
)
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    EmailRecognizer,
    PhoneRecognizer,
)
from presidio_anonymizer import AnonymizerEngine

from tasks.pii import DEFAULT_PHONE_REGIONS, NER_IGNORED_LABELS, NER_LABEL_MAPPING
from tasks.stage import StageInputError

log = logging.getLogger(__name__)

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


# ---- recognizers and the NLP engine without a model -------------------------------------

# cache_dir=None: no cache file; suffix_list_urls=(): no download; so the list snapshot
# that ships inside the tldextract package is used.
OFFLINE_TLD_EXTRACT = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=())


class OfflineEmailRecognizer(EmailRecognizer):
    """Presidio's e-mail recognizer, validating domains without fetching the suffix list."""

    def validate_result(self, pattern_text: str) -> bool:
        return OFFLINE_TLD_EXTRACT(pattern_text).fqdn != ""


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


# The tokens of the engine without a model: words, and runs of other characters that are
# not spaces, so that a match starting at any non-space character has a token.
_TOKEN = re.compile(r"\w+|[^\w\s]+")


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


# ---- the engine, built once per process -------------------------------------------------

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


def _registry(language: str, nlp_engine: NlpEngine, phone_regions: tuple[str, ...]):
    """Presidio's predefined recognizers for ``language``, e-mail offline, phones by region,
    plus phone numbers by their written form and card numbers in more groupings.

    With the no-op engine Presidio adds no NER recognizer; with a spaCy model it adds one.
    """
    registry = RecognizerRegistry(supported_languages=[language])
    registry.load_predefined_recognizers(languages=[language], nlp_engine=nlp_engine)
    recognizers = []
    for recognizer in registry.recognizers:
        if type(recognizer) is EmailRecognizer:
            recognizer = OfflineEmailRecognizer(
                supported_language=recognizer.supported_language)
        elif type(recognizer) is PhoneRecognizer:
            recognizers.append(FormattedPhoneRecognizer(
                phone_regions, supported_language=recognizer.supported_language))
            recognizer = ValidPhoneRecognizer(
                supported_language=recognizer.supported_language,
                supported_regions=phone_regions,
                context=list(dict.fromkeys(PhoneRecognizer.CONTEXT + PHONE_CONTEXT)))
        elif type(recognizer) is CreditCardRecognizer:
            recognizers.append(CardNumberRecognizer(
                supported_language=recognizer.supported_language))
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
               phone_regions: tuple[str, ...] = DEFAULT_PHONE_REGIONS,
               ) -> PiiEngine:
    """Presidio engines for ``language``: with NER from ``spacy_model``, or pattern-only if None."""
    started = time.perf_counter()
    for name in ("presidio-analyzer", "presidio-anonymizer"):
        logging.getLogger(name).addFilter(_NO_TEXT_IN_LOGS)  # once: a filter is a set member
    stop_words: frozenset[str] = frozenset()
    if spacy_model is None:
        nlp_engine: NlpEngine = WordTokenNlpEngine(language)
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
        analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp_engine,
                                    supported_languages=[language])
    supported = frozenset(registry.get_supported_entities([language]))
    log.info("built Presidio engines (%s) in %.1fs", description, time.perf_counter() - started)
    return PiiEngine(BatchAnalyzerEngine(analyzer), AnonymizerEngine(), language, supported,
                     spacy_model is not None, description, stop_words)
