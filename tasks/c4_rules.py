"""C4's cleaning rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a
Unified Text-to-Text Transformer", section 2.2), as TensorFlow Datasets' ``c4_utils`` and
datatrove's ``C4QualityFilter`` implement them.

Most of C4's rules act on *lines*: a line without terminal punctuation, with too few
words, with a word longer than 1000 characters, mentioning javascript or a cookie/terms
policy is dropped from the page, and the page keeps the rest. Only three rules remove the
whole page: "lorem ipsum", a curly bracket (a sign of code), and fewer than 5 sentences
left after the line rules. ``clean_c4`` returns the cleaned text, the page's removal
reason if any, and how many lines each line rule dropped.

As in C4, each line is stripped and the kept lines are joined with single newlines, so
a page that lost a line also loses its blank lines; a page that lost no line keeps its
text exactly. Sentences are counted with a punctuation rule (a run of ``.``, ``!`` or
``?`` followed by a space or the end of the line, and at least one sentence per kept
line) where C4 used NLTK's punkt tokenizer; the two agree on ordinary prose.

The defaults (see ``C4Config``) keep code-heavy documentation, the default corpus: C4's
own settings, given in each description, drop most lines of a Python docs page (code
lines have no terminal punctuation) and remove every page with a ``{``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

END_PUNCTUATION = (".", "?", "!", '"', "'")
ELLIPSIS = "..."
CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies",
                  "use of cookies", "use cookies")
_SENTENCE_END = re.compile(r"[.!?]+['\")\]]*(?:\s|$)")

# Why a line was dropped: the suffix of the ``c4_lines_dropped_<why>`` statistics.
LINE_RULES = ("too_long_word", "no_terminal_punctuation", "too_few_words", "javascript",
              "policy")
# Why a whole page was removed: the filter's removal reasons.
REASONS = ("c4_lorem_ipsum", "c4_curly_bracket", "c4_too_few_sentences")


class C4Config(BaseModel):
    """C4's rules. Line rules drop lines (the document keeps the rest); the others remove
    the document. Defaults differ from C4's where Python documentation needs it; C4's
    value is in each description."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="Apply the C4 rules below (after the language, blocklist and "
                          "Gopher rules, on the text they kept).")
    drop_lines_without_terminal_punctuation: bool = Field(
        False, description="Drop lines that do not end in . ! ? \" or ' (or that end in "
                           "'...'). C4: true. Off by default, as FineWeb ran C4's rules: on "
                           "the default corpus it drops 72% of the lines and 70% of the "
                           "characters (every signature and code line).")
    min_words_per_line: int = Field(
        0, ge=0, description="Drop lines with fewer whitespace-separated words; 0 keeps "
                             "every line. C4: 3, which on the default corpus drops 34% of "
                             "the lines and 16% of the characters (headings, names, short "
                             "code lines).")
    max_word_length: int = Field(
        1000, ge=0, description="Drop lines holding a word longer than this many characters "
                                "(minified code, base64); 0 disables. C4: 1000.")
    remove_citations: bool = Field(
        False, description="Delete Wikipedia-style citation marks ([1], [edit], [citation "
                           "needed]) from lines. C4: true. Off by default because in code "
                           "it deletes indexing too ('argv[1]' becomes 'argv'): 167 marks "
                           "in 44 pages of the default corpus, none a citation.")
    drop_javascript_lines: bool = Field(
        True, description="Drop lines mentioning 'javascript' (\"please enable "
                          "JavaScript\" notices). C4: true. On the default corpus it drops "
                          "5 lines, from the json module's page.")
    drop_policy_lines: bool = Field(
        True, description="Drop lines mentioning terms of use, a privacy or cookie policy, "
                          "or the use of cookies. C4: true.")
    remove_lorem_ipsum: bool = Field(
        True, description="Remove documents containing 'lorem ipsum' (placeholder text) "
                          "(c4_lorem_ipsum). C4: true.")
    remove_curly_bracket: bool = Field(
        False, description="Remove documents containing '{' (c4_curly_bracket), C4's test "
                           "for code. C4: true. Off by default: it removes 30% of the "
                           "default corpus's pages, with 56% of its text (dict literals, "
                           "format strings).")
    min_sentences: int = Field(
        5, ge=0, description="Remove documents with fewer sentences left after the line "
                             "rules (c4_too_few_sentences). C4: 5, which removes no page of "
                             "the default corpus. Every kept line counts as at least one "
                             "sentence.")


@dataclass
class C4Result:
    text: str
    reason: str | None = None
    dropped: Counter = field(default_factory=Counter)  # LINE_RULES name -> lines dropped


def count_sentences(line: str) -> int:
    """Sentence ends in a line (at least 1: a line is a sentence even without a period)."""
    return max(1, len(_SENTENCE_END.findall(line)))


def clean_c4(text: str, config: C4Config) -> C4Result:
    """Apply C4's rules to one document, in C4's order: each line is tested by the line
    rules and the page rules as it comes, so a page rule sees only lines kept so far."""
    kept: list[str] = []
    dropped: Counter = Counter()
    sentences = 0
    cited = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue  # blank lines carry no text: dropped, not counted as dropped lines
        words = line.split()
        if config.max_word_length and any(len(w) > config.max_word_length for w in words):
            dropped["too_long_word"] += 1
            continue
        if config.remove_citations:
            line, marks = CITATION.subn("", line)
            cited = cited or marks > 0
        if config.drop_lines_without_terminal_punctuation and (
                not line.endswith(END_PUNCTUATION) or line.endswith(ELLIPSIS)):
            dropped["no_terminal_punctuation"] += 1
            continue
        if len(words) < config.min_words_per_line:
            dropped["too_few_words"] += 1
            continue
        lower = line.lower()
        if config.remove_lorem_ipsum and "lorem ipsum" in lower:
            return C4Result(text, "c4_lorem_ipsum", dropped)
        if config.drop_javascript_lines and "javascript" in lower:
            dropped["javascript"] += 1
            continue
        if config.remove_curly_bracket and "{" in line:
            return C4Result(text, "c4_curly_bracket", dropped)
        if config.drop_policy_lines and any(p in lower for p in POLICY_PHRASES):
            dropped["policy"] += 1
            continue
        sentences += count_sentences(line)
        kept.append(line)
    if sentences < max(1, config.min_sentences):
        return C4Result(text, "c4_too_few_sentences", dropped)
    if not dropped and not cited:
        return C4Result(text, None, dropped)  # nothing changed: keep the text as it came
    return C4Result("\n".join(kept), None, dropped)
