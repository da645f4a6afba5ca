"""C4's rules, one at a time: line rules drop lines and keep the page, page rules remove it."""

from __future__ import annotations

import pytest

from tasks.c4_rules import C4Config, clean_c4, count_sentences
from tests.tasks.test_filter import SENTENCES

PROSE = SENTENCES[:5]  # the filter tests' varied English prose
PAGE = "\n".join(PROSE)
# C4 as the paper ran it (the defaults loosen some rules for code-heavy documentation)
PAPER = C4Config(drop_lines_without_terminal_punctuation=True, min_words_per_line=3,
                 remove_citations=True, remove_curly_bracket=True, min_sentences=5)


def with_line(line: str) -> str:
    return "\n".join(PROSE[:2] + [line] + PROSE[2:])


def test_a_clean_page_is_kept_unchanged():
    result = clean_c4(PAGE, PAPER)
    assert result.reason is None and result.text == PAGE and not result.dropped


@pytest.mark.parametrize("line, rule", [
    ("Home | About | Contact", "no_terminal_punctuation"),
    ("Read more...", "no_terminal_punctuation"),  # an ellipsis is not an end
    ("Thanks!", "too_few_words"),
    ("Please enable JavaScript in your browser to see this page.", "javascript"),
    ("By using this site you agree to our Terms of Use and Privacy Policy.", "policy"),
    ("This website uses cookies to give you the best experience.", "policy"),
    ("The key is " + "x" * 1001 + ".", "too_long_word"),
])
def test_each_line_rule_drops_its_line_and_keeps_the_page(line, rule):
    result = clean_c4(with_line(line), PAPER)
    assert result.reason is None
    assert result.text == PAGE
    assert result.dropped == {rule: 1}


@pytest.mark.parametrize("line, reason", [
    ("Lorem ipsum dolor sit amet, consectetur adipiscing elit.", "c4_lorem_ipsum"),
    ("Call it as render({'name': 'value'}) in the template.", "c4_curly_bracket"),
])
def test_page_rules_remove_the_page(line, reason):
    result = clean_c4(with_line(line), PAPER)
    assert result.reason == reason
    assert result.text == with_line(line)  # a removed page keeps its text


def test_too_few_sentences_after_the_line_rules():
    page = "\n".join(PROSE[:3] + ["Menu", "Login", "Share this"])
    assert clean_c4(page, PAPER).reason == "c4_too_few_sentences"
    assert clean_c4(page, PAPER.model_copy(update={"min_sentences": 3})).reason is None
    # sentences are counted inside lines too
    assert clean_c4(" ".join(PROSE), PAPER).reason is None


def test_citations_are_removed_from_kept_lines():
    line = "The river floods every spring.[1] Farmers plan for it.[citation needed]"
    result = clean_c4(with_line(line), PAPER)
    assert "The river floods every spring. Farmers plan for it." in result.text.splitlines()
    assert "[1]" not in result.text and not result.dropped


def test_a_page_rule_only_sees_lines_that_passed_the_line_rules():
    # C4 tests lorem ipsum on lines it keeps: a two-word line is dropped before it
    assert clean_c4(with_line("Lorem ipsum."), PAPER).reason is None


def test_the_defaults_keep_code_documentation():
    lines = [
        "json.dumps(obj, *, skipkeys=False, indent=None)",
        "Serialize ``obj`` to a JSON formatted ``str``.",
        ">>> json.dumps({'a': 1})",
        "'{\"a\": 1}'",
        "If ``skipkeys`` is true then keys that are not basic types are skipped.",
        "If ``indent`` is a non-negative integer, arrays are pretty-printed.",
        "sys.argv[1] names the input file.",
        "Raises TypeError for objects that are not serializable.",
    ]
    doc = "\n".join(lines)
    result = clean_c4(doc, C4Config())
    assert result.reason is None and result.text == doc
    # C4's own settings strip it to its prose, and its citation rule mangles the code
    paper = clean_c4(doc, PAPER)
    assert paper.reason is None and "json.dumps" not in paper.text
    assert paper.dropped == {"no_terminal_punctuation": 2, "too_few_words": 1}
    assert "sys.argv names the input file." in paper.text.splitlines()


def test_switched_off_rules_do_nothing():
    off = C4Config(drop_lines_without_terminal_punctuation=False, min_words_per_line=0,
                   max_word_length=0, drop_javascript_lines=False, drop_policy_lines=False,
                   remove_lorem_ipsum=False, remove_curly_bracket=False, min_sentences=1)
    page = with_line("JavaScript { lorem ipsum } uses cookies " + "y" * 2000)
    assert clean_c4(page, off).text == page


def test_count_sentences():
    assert count_sentences("One. Two! Three? Four") == 3
    assert count_sentences("No end mark at all") == 1
    assert count_sentences('He said "stop." Then he left.') == 2
    assert count_sentences("Version 3.11 is out.") == 1
