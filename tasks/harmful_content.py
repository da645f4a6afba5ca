"""Harmful content: domain and word blocklists, and a hook for a user's own scorer.

* **Domains** (``blocked_domain``): the host of a document's ``url`` is looked up with
  each of its parent domains in a set, so ``example.com`` blocks ``www.example.com`` and
  ``xxx`` blocks every ``.xxx`` host; the cost is one lookup per label of the host,
  whatever the list's size.
* **Words** (``blocked_words``): the text is split into lower-cased word runs once, and
  each is looked up in a set (phrases: the following words too), so whole words match,
  ignoring case, and a list of thousands costs what a list of ten does. A document is
  removed when it holds more than ``max_blocked_words`` of them.
* **Scorer** (``scorer``): ``package.module:function`` is called with each document's
  record (``text``, ``url``, ``id``, ``language``, ``language_score`` and the other
  columns) and returns a number or a bool; a classifier of toxicity or of quality plugs in
  here. Its score is kept in a ``scorer_score`` column.

Lists are files of one entry per line (``#`` starts a comment). A short default list of
each kind ships in ``tasks/data/``; the files in config are added to it.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_DOMAINS = DATA_DIR / "blocked_domains.txt"
DEFAULT_WORDS = DATA_DIR / "blocked_words.txt"
REASONS = ("blocked_domain", "blocked_words", "scorer")

_WORD = re.compile(r"\w+")
_SCORER_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class HarmfulContentConfig(BaseModel):
    """Domain and word blocklists, and a scoring function of your own."""

    model_config = ConfigDict(extra="forbid")

    use_default_blocklists: bool = Field(
        True, description="Use the short lists shipped with forgeline (tasks/data/"
                          "blocked_domains.txt: adult top-level domains and sites; "
                          "blocked_words.txt: a few unambiguous adult and piracy words) "
                          "besides the files below.")
    blocked_domain_files: list[str] = Field(
        default_factory=list,
        description="Files of blocked domains, one per line ('#' comments). A domain blocks "
                    "itself and its subdomains; documents whose url is on one are removed "
                    "(blocked_domain).")
    blocked_word_files: list[str] = Field(
        default_factory=list,
        description="Files of blocked words or phrases, one per line ('#' comments), "
                    "matched as whole words ignoring case (blocked_words).")
    max_blocked_words: int = Field(
        2, ge=0, description="Documents holding more blocked words than this are removed "
                             "(blocked_words); counts every occurrence. C4: 0 (one word of "
                             "its list removed the page), which Dodge et al. 2021 found "
                             "removes text about and by minorities disproportionately.")
    scorer: str = Field(
        "", description="A function of yours as package.module:function, called with each "
                        "document's record (a dict with text, url, id, language, ...) and "
                        "returning a number or a bool; empty: no scorer. Documents are "
                        "removed by scorer_threshold and scorer_removes (scorer); the score "
                        "is kept in a scorer_score column. It runs last, on the documents "
                        "every other rule kept.")
    scorer_threshold: float = Field(
        0.5, description="The score the scorer's verdict turns on (a bool counts as 1 or 0).")
    scorer_removes: Literal["below", "above"] = Field(
        "below", description="below: the scorer rates quality, documents scoring below the "
                             "threshold are removed (False removes). above: it rates harm, "
                             "documents scoring above the threshold are removed (True "
                             "removes).")

    @field_validator("blocked_domain_files", "blocked_word_files")
    @classmethod
    def _files_exist(cls, paths: list[str]) -> list[str]:
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise ValueError(f"no such file: {', '.join(missing)}; give files of one entry "
                             "per line")
        return paths

    @field_validator("scorer")
    @classmethod
    def _scorer_imports(cls, path: str) -> str:
        if path:
            load_scorer(path)  # fails here, naming the field, rather than in every worker
        return path


def read_entries(paths: Iterable[Path]) -> list[str]:
    """Entries of list files: one per line, stripped, without blank lines and comments."""
    entries = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            entry = line.split("#", 1)[0].strip()
            if entry:
                entries.append(entry)
    return entries


def normalize_host(host: str) -> str:
    """Lower case, no trailing dot, international names as punycode."""
    host = host.strip().lower().rstrip(".")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return host


def url_host(url: str | None) -> str:
    if not url:
        return ""
    try:
        return normalize_host(urlsplit(url).hostname or "")
    except ValueError:  # a malformed URL (bad port, brackets) has no usable host
        return ""


class DomainBlocklist:
    """Blocked domains, matched on a host and each of its parent domains."""

    def __init__(self, entries: Iterable[str]):
        domains = set()
        for entry in entries:
            if "://" in entry:  # a URL pasted into the list: its host
                entry = url_host(entry)
            entry = normalize_host(entry.lstrip("*").lstrip("."))
            if entry:
                domains.add(entry)
        self.domains = frozenset(domains)

    def __len__(self) -> int:
        return len(self.domains)

    def blocks(self, url: str | None) -> bool:
        host = url_host(url)
        if not host or not self.domains:
            return False
        labels = host.split(".")
        return any(".".join(labels[i:]) in self.domains for i in range(len(labels)))


class WordBlocklist:
    """Blocked words and phrases, matched as whole words ignoring case."""

    def __init__(self, entries: Iterable[str]):
        self.words: set[str] = set()
        self.phrases: dict[str, list[tuple[str, ...]]] = {}  # first word -> the rest
        for entry in entries:
            tokens = tuple(_WORD.findall(entry.casefold()))
            if len(tokens) == 1:
                self.words.add(tokens[0])
            elif tokens:
                self.phrases.setdefault(tokens[0], []).append(tokens[1:])

    def __len__(self) -> int:
        return len(self.words) + sum(map(len, self.phrases.values()))

    def count(self, text: str) -> int:
        """Occurrences of blocked words and phrases in ``text``."""
        if not self.words and not self.phrases:
            return 0
        tokens = _WORD.findall(text.casefold())
        found = sum(token in self.words for token in tokens)
        if self.phrases:
            for i, token in enumerate(tokens):
                for rest in self.phrases.get(token, ()):
                    found += tuple(tokens[i + 1:i + 1 + len(rest)]) == rest
        return found


@dataclass(frozen=True)
class Blocklists:
    domains: DomainBlocklist
    words: WordBlocklist


@lru_cache(maxsize=4)
def _load_blocklists(domain_files: tuple[str, ...], word_files: tuple[str, ...],
                     defaults: bool) -> Blocklists:
    domains = [DEFAULT_DOMAINS] * defaults + [Path(p) for p in domain_files]
    words = [DEFAULT_WORDS] * defaults + [Path(p) for p in word_files]
    return Blocklists(DomainBlocklist(read_entries(domains)), WordBlocklist(read_entries(words)))


def blocklists(config: HarmfulContentConfig) -> Blocklists:
    """The config's lists, read once per process."""
    return _load_blocklists(tuple(config.blocked_domain_files), tuple(config.blocked_word_files),
                            config.use_default_blocklists)


@lru_cache(maxsize=4)
def load_scorer(path: str) -> Callable[[dict], Any]:
    """The function ``package.module:function`` names; ValueError saying what is wrong."""
    if not _SCORER_PATH.match(path):
        raise ValueError(f"{path!r} is not an import path: give package.module:function")
    module_name, function_name = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a config error here
        raise ValueError(f"cannot import {module_name!r} ({type(exc).__name__}: {exc}); the "
                         "module must be importable where the filter runs") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        # a ValueError, which pydantic reports as a config error naming the field
        raise ValueError(f"module {module_name!r} has no function {function_name!r}")  # noqa: TRY004
    return function


def score_document(config: HarmfulContentConfig, record: dict) -> float:
    """The scorer's score of a record, as a float (bools as 1 or 0)."""
    value = load_scorer(config.scorer)(record)
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        score = float(value)  # bools, ints, numpy and 0-d tensor scalars
    except (TypeError, ValueError):
        score = math.nan
    if math.isnan(score):
        raise TypeError(f"filter.harmful.scorer {config.scorer} returned a "
                        f"{type(value).__name__}, not a number or a bool")
    return score


def scorer_removes(config: HarmfulContentConfig, score: float) -> bool:
    if config.scorer_removes == "below":
        return score < config.scorer_threshold
    return score > config.scorer_threshold

