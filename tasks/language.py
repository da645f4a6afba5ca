"""Language identification for the filter stage, with py3langid (langid.py's model, shipped
in the wheel: nothing is downloaded).

``identify_language(text, sample_chars)`` gives the most likely language of a document
and its probability. py3langid is a naive Bayes classifier over byte n-grams; with
normalized probabilities it divides the scores by the square root of the input's length
before the softmax, so a probability means about the same thing for a tweet and for a
page, and short or mixed texts get lower scores. It walks the bytes in Python, so only
the first ``sample_chars`` characters are classified: the cost per document is bounded,
and a few thousand characters decide a language as well as the whole page does.

py3langid (and numpy under it) is imported on first use, in the worker that filters a
shard, so validating a config loads neither.
"""

from __future__ import annotations

from functools import lru_cache

# The labels of py3langid's shipped model (0.4): ISO 639-1 codes where the language has
# one, ISO 639-3 otherwise, and zxx ("no linguistic content"). Kept here so that
# ``filter.languages`` is checked without loading the model; a test compares it with the
# installed model's labels.
_MODEL_LABELS = """
    ace af am an ar ary arz as az ba bcl be bg bn br bs ca crh cs cy da de dz el en eo es
    et eu ext fa fi fo fr fuv fy ga gcf gcr gd gl gom grc gu gug guw ha hbo he hi hr ht hu
    hy id ig is it ja jv ka kab kik kk km kn ko ku ky la lb lg lij ln lo lt ltg lv mg mk ml
    mn mr ms mt my ne nl nn no nso oc om or pa pcm pl ps pt qu ro ru rw sa sdh se si sk sl
    sn so sq sr st sv sw ta te tg th tk tl tr tt ug uk ur uz uzs vec vi vo wa wuu xh yo yue
    zh zu zxx
"""
MODEL_LANGUAGES = frozenset(_MODEL_LABELS.split())

NO_LANGUAGE = "zxx"  # the label of a document with nothing to classify


def check_language_codes(codes: list[str]) -> list[str]:
    """Lower-cased codes, or ValueError naming the unknown ones (for config validation)."""
    normalized = [code.strip().lower() for code in codes]
    unknown = [code for code in normalized if code not in MODEL_LANGUAGES]
    if unknown:
        raise ValueError(
            f"unknown language code(s) {unknown}: use ISO 639-1 codes such as en, de, fr, "
            f"es, zh; the identifier knows {', '.join(sorted(MODEL_LANGUAGES))}")
    return list(dict.fromkeys(normalized))


@lru_cache(maxsize=1)
def language_identifier():
    """py3langid's identifier with normalized probabilities, loaded once per process (~1s)."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError as exc:
        raise ImportError("the filter stage identifies languages with py3langid, which is "
                          "not installed: pip install 'py3langid>=0.3'") from exc
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify_language(text: str, sample_chars: int = 2000) -> tuple[str, float]:
    """(language code, probability) of the first ``sample_chars`` characters of ``text``."""
    sample = text[:sample_chars] if sample_chars else text
    if not sample.strip():
        return NO_LANGUAGE, 0.0
    language, score = language_identifier().classify(sample)
    return language, round(float(score), 4)
