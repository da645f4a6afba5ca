"""Extract: raw crawled bodies -> clean main text, one document per page.

HTML goes through trafilatura, which finds the main content and drops navigation, forms
and boilerplate; plain text passes through. Both are normalized (Unicode NFC, plain
spaces, no trailing blanks) so later stages see one kind of text. The raw HTML is not
carried forward: it is the crawl stage's output and stays there.

trafilatura only ever gets the HTML string we already hold (never a URL to fetch), so
this stage makes no network requests.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.shard_runner import Mapper, Removed, ShardStep, run_sharded
from tasks.stage import StageInputError

log = logging.getLogger(__name__)

REASONS = ("no_main_text", "extraction_failed")
METADATA_FIELDS = ("author", "date", "description")
# What removed/ keeps of a document's text: enough to see why it went, not a corpus copy.
REMOVED_SNIPPET_CHARS = 500


class ExtractConfig(BaseModel):
    """How main text is taken out of crawled pages."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run this stage; when off, crawled text goes on "
                                            "unchanged (HTML included).")
    favor_recall: bool = Field(
        True, description="Ask trafilatura to keep more text when unsure whether it is main "
                          "content. On Python's pydoc pages, whose documentation sits in layout "
                          "tables, this keeps ~97% of the documentation words instead of 25-70%.")
    favor_precision: bool = Field(
        False, description="Ask trafilatura to drop text when unsure (less boilerplate, but it "
                           "loses most of a pydoc page). Cannot be combined with favor_recall.")
    include_tables: bool = Field(
        True, description="Keep the text of HTML tables. Needed for pydoc pages, where tables "
                          "hold the functions and classes; turn off for sites whose tables are "
                          "only data grids.")
    flatten_tables: bool = Field(
        True, description="Write tables as plain text: one non-empty cell per line, keeping the "
                          "line breaks inside cells, instead of trafilatura's '| a | b |' rows "
                          "with each cell squeezed onto one line. pydoc keeps whole docstrings "
                          "in table cells, so this keeps their line structure.")
    include_comments: bool = Field(
        False, description="Append the page's user comments section (as trafilatura detects it) "
                           "to the main text.")
    with_metadata: bool = Field(
        False, description="Also extract author, date and description columns with "
                           "trafilatura's metadata extractor (about 2.5x slower). The title is "
                           "always kept.")
    deduplicate: bool = Field(
        False, description="trafilatura's own deduplication: drop text segments already seen "
                           "more than twice in this run (repeated boilerplate across pages). "
                           "Document-level duplicates are the dedup stage's job.")
    min_chars: int = Field(
        200, ge=0, description="Documents whose extracted text has fewer characters are removed "
                               "with reason 'no_main_text' (index pages, error pages).")
    max_input_bytes: int = Field(
        2_000_000, ge=1_000, description="HTML bodies larger than this many bytes are cut to "
                                         "this size before parsing, bounding time and memory "
                                         "per page.")

    @model_validator(mode="after")
    def _one_bias(self) -> ExtractConfig:
        if self.favor_recall and self.favor_precision:
            raise ValueError("extract.favor_recall and extract.favor_precision cannot both be "
                             "true; pick one (or neither for trafilatura's balanced mode)")
        return self


# Unicode spaces that render like a space (pydoc writes &nbsp; between every word).
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
# Control and zero-width characters carry no text and confuse tokenizers.
_INVISIBLE = re.compile(r"[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f\u200b-\u200d\u2060\ufeff]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
# trafilatura squeezes each table cell onto one line. To keep the line breaks inside cells,
# a visible marker (U+23CE, which trafilatura leaves alone, unlike control or private-use
# characters) is put after each line-breaking element of a cell and turned into a newline
# after extraction. trafilatura may copy a marker, so a run of them is one break.
_BREAK = "\u23ce"
_BREAK_RUN = re.compile(r"[ \t]*\u23ce+[ \t]?")
_LINE_BREAKING = frozenset({"br", "p", "div", "dl", "dt", "dd", "li", "pre", "tr",
                            "h1", "h2", "h3", "h4", "h5", "h6"})


def normalize_text(text: str) -> str:
    """NFC, plain spaces, no invisible characters or trailing blanks, at most one blank line
    in a row. Leading indentation survives: it carries meaning in code."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _INVISIBLE.sub("", _SPACES.sub(" ", text))
    text = _TRAILING.sub("", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def flatten_table_rows(text: str) -> str:
    """Turn trafilatura's '| cell | cell |' table lines into one line per non-empty cell.

    Escaped pipes ('\\|', from tables drawn inside a cell's text) stay as literal '|'.
    """
    lines = []
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped.startswith("|") and stripped.endswith("|") and len(stripped) > 1:
            cells = [c.strip() for c in _CELL_SPLIT.split(stripped[1:-1])]
            lines.extend(c.replace("\\|", "|") for c in cells if c)
        else:
            lines.append(line.replace("\\|", "|"))
    return "\n".join(lines)


def _mark_preformatted(text: str) -> str:
    """Keep a <pre> block's lines and indentation through trafilatura's whitespace squeezing:
    newlines become markers, leading spaces no-break spaces (normalize_text turns them back)."""
    lines = []
    for line in text.split("\n"):
        body = line.lstrip(" ")
        lines.append("\u00a0" * (len(line) - len(body)) + body)
    # the space keeps consecutive markers apart, so a blank line stays a blank line
    return f"{_BREAK} ".join(lines)


def mark_cell_breaks(tree) -> None:
    """Put a break marker wherever a table cell's content breaks a line."""
    for cell in tree.iter("td", "th"):
        for element in cell.iter(*_LINE_BREAKING):
            if element is not cell:
                element.tail = _BREAK + (element.tail or "")
        for pre in cell.iter("pre"):
            for element in pre.iter():
                if element.text:
                    element.text = _mark_preformatted(element.text)
                if element is not pre and element.tail:
                    element.tail = _mark_preformatted(element.tail)


def is_html(record: dict, body: str) -> bool:
    """Trust the content type; without one, sniff the start of the body."""
    content_type = (record.get("content_type") or "").lower()
    if content_type:
        return "html" in content_type
    head = body[:1000].lstrip().lower()
    return head.startswith(("<!doctype html", "<html")) or "<body" in head


def _truncate_utf8(text: str, max_bytes: int) -> tuple[str, bool]:
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text, False
    return data[:max_bytes].decode("utf-8", errors="ignore"), True


def _page_title(tree) -> str:
    """The <title> (or og:title) of a parsed page: cheap, unlike full metadata extraction."""
    title = tree.findtext(".//title") or ""
    if not title.strip():
        og = tree.xpath('.//meta[@property="og:title"]/@content')
        title = og[0] if og else ""
    return " ".join(title.split())


def extract_html(html: str, url: str | None, config: ExtractConfig, cache=None) -> dict:
    """Main text and metadata of one HTML page; text is "" when nothing was found."""
    import trafilatura
    from trafilatura.utils import load_html

    tree = load_html(html)
    if tree is None:
        return {"text": "", "title": ""}
    title = _page_title(tree)
    flatten = config.flatten_tables and config.include_tables
    if flatten:
        mark_cell_breaks(tree)
    doc = trafilatura.bare_extraction(
        tree, url=url, favor_precision=config.favor_precision, favor_recall=config.favor_recall,
        include_tables=config.include_tables, include_comments=config.include_comments,
        deduplicate=cache if config.deduplicate else False, with_metadata=config.with_metadata)
    if doc is None:
        return {"text": "", "title": title}
    text = doc.text or ""
    if config.include_comments and doc.comments:
        text = f"{text}\n\n{doc.comments}"
    if flatten:
        text = _BREAK_RUN.sub("\n", flatten_table_rows(text))
    result = {"text": normalize_text(text), "title": normalize_text(doc.title or title)}
    if config.with_metadata:
        result.update({f: normalize_text(str(getattr(doc, f) or "")) for f in METADATA_FIELDS})
    return result


def _output_record(record: dict, extracted: dict, config: ExtractConfig) -> dict:
    """The input row with its body replaced by the extracted text and metadata added."""
    out = {k: v for k, v in record.items() if k not in {"text", "title", *METADATA_FIELDS}}
    out["text"] = extracted["text"]
    out["title"] = extracted.get("title") or record.get("title") or ""
    if config.with_metadata:
        for field in METADATA_FIELDS:
            out[field] = extracted.get(field) or record.get(field) or ""
    return out


def _removed_record(out: dict, detail: str) -> dict:
    return {**out, "text": out["text"][:REMOVED_SNIPPET_CHARS], "detail": detail}


def _new_cache():
    """trafilatura's segment cache for ``deduplicate``, one per shard so that a shard's
    output does not depend on which shards its worker ran before."""
    from trafilatura.deduplication import LRUCache
    from trafilatura.settings import LRU_SIZE

    return LRUCache(maxsize=LRU_SIZE)


def _extract_one(record: dict, config: ExtractConfig, cache, stats: Counter
                 ) -> tuple[dict, str | None, str]:
    """Returns (output record, removal reason or None, detail)."""
    raw = record.get("text") or ""
    if isinstance(raw, bytes):  # a binary body column: decode rather than fail on it
        raw = raw.decode("utf-8", errors="replace")
    stats["chars_in"] += len(raw)
    if not is_html(record, raw):
        stats["text_documents"] += 1
        extracted = {"text": normalize_text(raw)}
    else:
        stats["html_documents"] += 1
        html, truncated = _truncate_utf8(raw, config.max_input_bytes)
        stats["truncated_inputs"] += int(truncated)
        try:
            extracted = extract_html(html, record.get("url"), config, cache)
        except Exception as exc:  # noqa: BLE001
            # Parsers fail in many ways on malformed pages; the page stays visible in
            # removed/ with the error's class (its message may quote the page).
            log.warning("extract: %s failed: %s", record.get("url"), type(exc).__name__)
            out = _output_record(record, {"text": ""}, config)
            return out, "extraction_failed", type(exc).__name__
    out = _output_record(record, extracted, config)
    if len(out["text"]) < config.min_chars:
        return out, "no_main_text", f"{len(out['text'])} chars < min_chars {config.min_chars}"
    return out, None, ""


class ExtractStep(ShardStep):
    """Main text of each page of a shard."""

    name = "extract"
    batch_size = 16

    def open_shard(self, shard: str) -> None:
        self.cache = _new_cache() if self.config.deduplicate else None

    def apply(self, records: list[dict], stats: Counter) -> list[dict | Removed]:
        outcomes: list[dict | Removed] = []
        for record in records:
            out, reason, detail = _extract_one(record, self.config, self.cache, stats)
            if reason is None:
                stats["chars_out"] += len(out["text"])
                outcomes.append(out)
            else:
                outcomes.append(Removed(_removed_record(out, detail), reason))
        return outcomes

    @classmethod
    def summary(cls, config: ExtractConfig, stats: dict) -> str:
        line = (f"{stats.get('html_documents', 0)} HTML and {stats.get('text_documents', 0)} "
                f"plain-text documents; {stats.get('chars_in', 0)} -> "
                f"{stats.get('chars_out', 0)} chars")
        if stats.get("truncated_inputs"):
            line += (f"; {stats['truncated_inputs']} HTML bodies were cut to "
                     f"max_input_bytes={config.max_input_bytes} before parsing")
        return line

    @classmethod
    def check_result(cls, config: ExtractConfig, stats: dict) -> None:
        if stats.get("kept", 0) == 0:
            counts = ", ".join(f"{r}: {stats.get('removed_' + r, 0)}" for r in REASONS)
            raise StageInputError(
                "extract", f"no document kept out of {stats['input_documents']} ({counts}); "
                f"lower extract.min_chars (now {config.min_chars}), set extract.favor_recall, "
                "or check that the crawl fetched real pages")


def extract_text(config: ExtractConfig, input_dir: Path, out_dir: Path,
                 mapper: Mapper | None = None) -> dict:
    """Replace each page's raw body by its main text; pages without enough text go to removed/.

    Output columns: every input column except the raw body, with ``text`` now the extracted
    text, plus ``title`` (and author/date/description with ``with_metadata``).
    """
    result = run_sharded(ExtractStep, config, input_dir, out_dir, mapper)
    for reason in REASONS:  # every reason is a tracked metric, even when it never happened
        result["stats"].setdefault(f"removed_{reason}", 0)
    return result
