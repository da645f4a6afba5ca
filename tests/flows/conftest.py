"""Fixtures for flow tests: a Prefect test server and a small synthetic corpus."""

import json
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"

WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "his", "her", "they", "this", "which", "river", "mountain", "village", "market", "winter", "summer", "garden", "teacher", "student", "engine", "library", "bridge", "harbor", "forest", "letter", "window", "kitchen", "morning", "evening", "journey", "history", "music", "painter", "farmer", "doctor", "soldier", "captain", "station", "island", "castle", "valley", "meadow", "orchard", "walked", "carried", "opened", "studied", "painted", "repaired", "visited", "followed", "gathered", "remembered", "quietly", "slowly", "bright", "heavy", "ancient", "narrow", "golden", "distant", "careful", "gentle", "famous", "early", "stone", "water", "bread", "paper", "candle", "silver", "copper", "timber", "cotton", "wool", "salt", "honey", "apple"]


def synthetic_document(rng: random.Random, sentences: int = 12) -> str:
    """Plain English-like prose: passes quality rules, varied enough not to be a duplicate."""
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 16))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def write_corpus(directory: Path, count: int = 40, seed: int = 0) -> Path:
    """A .jsonl corpus with given ids, one exact duplicate and some personal data."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"doc-{i:03d}", "text": synthetic_document(rng),
             "url": f"https://example.org/{i}"} for i in range(count)]
    rows[1]["text"] += " Write to jane.roe@example.com or call 212-555-0198 for details."
    rows.append({"id": "doc-dup", "text": rows[0]["text"].upper(), "url": "https://example.org/dup"})
    path = directory / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
