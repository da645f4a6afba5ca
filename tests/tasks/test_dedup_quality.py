"""Dedup quality on a labelled near-duplicate set, with the default settings.

Clusters: an original and its copies as they occur on the web (exact copies, case and
whitespace variants, light word edits of about 1%, boilerplate lines added at the top
and bottom). Distinct documents: unrelated texts, and pairs that share a third of their
text. At least 99% of the clusters must collapse to one survivor and at most 0.5% of the
distinct documents may be removed.
"""

from __future__ import annotations

import random

from faker import Faker

from tasks.dedup import DedupConfig, deduplicate
from tasks.shards import iter_records, write_records

HEADERS = ["Home | About us | Products | Blog | Contact", "Skip to main content",
           "Menu Search Sign in Register", "You are here: Home > Articles > News"]
FOOTERS = ["Copyright 2024 Example Media Group. All rights reserved.",
           "Privacy policy | Terms of use | Cookie settings",
           "Share this article on Facebook Twitter LinkedIn Email",
           "Subscribe to our newsletter for weekly updates."]


def prose(fake: Faker, words: int = 325) -> str:
    out: list[str] = []
    while len(out) < words:
        out += fake.paragraph(nb_sentences=8).split()
    return " ".join(out[:words])


def edit_words(rng: random.Random, text: str, fraction: float = 0.01) -> str:
    words = text.split()
    for position in rng.sample(range(len(words)), max(1, round(len(words) * fraction))):
        words[position] = rng.choice(["changed", "updated", "edited", "revised", "new"])
    return " ".join(words)


def case_and_space(rng: random.Random, text: str) -> str:
    words = text.split()
    out = [w.upper() if rng.random() < 0.2 else w for w in words]
    return "  " + "".join(w + rng.choice([" ", "  ", "\n", "\t "]) for w in out)


def with_boilerplate(rng: random.Random, text: str) -> str:
    top = rng.sample(HEADERS, 2)
    bottom = rng.sample(FOOTERS, 2)
    return "\n".join([*top, text, *bottom])


def labelled_set(clusters: int = 300, unrelated: int = 400, overlapping_pairs: int = 150,
                 seed: int = 7) -> tuple[list[dict], list[list[str]], list[str]]:
    """(records in a shuffled order, the id lists of duplicate clusters, distinct ids)."""
    fake, rng = Faker("en_US"), random.Random(seed)
    fake.seed_instance(seed)
    docs: list[tuple[str, str]] = []
    groups: list[list[str]] = []
    for c in range(clusters):
        original = prose(fake)
        variants = [original, original, case_and_space(rng, original),
                    edit_words(rng, original), with_boilerplate(rng, original),
                    with_boilerplate(rng, edit_words(rng, original))]
        members = rng.sample(variants[1:], rng.randint(1, 4))
        ids = [f"c{c}-{k}" for k in range(len(members) + 1)]
        docs += list(zip(ids, [original, *members]))
        groups.append(ids)
    distinct = []
    for u in range(unrelated):
        docs.append((f"u{u}", prose(fake)))
        distinct.append(f"u{u}")
    for p in range(overlapping_pairs):
        shared = prose(fake, 110)
        first = f"{prose(fake, 215)} {shared}"
        second = f"{shared} {prose(fake, 215)}"
        docs += [(f"p{p}-a", first), (f"p{p}-b", second)]
        distinct += [f"p{p}-a", f"p{p}-b"]
    rng.shuffle(docs)
    records = [{"id": i, "text": t, "url": f"https://example.org/{i}"} for i, t in docs]
    return records, groups, distinct


def test_default_settings_collapse_clusters_and_keep_distinct_documents(tmp_path):
    records, groups, distinct = labelled_set()
    write_records(records, tmp_path / "in", shard_size=250)
    result = deduplicate(DedupConfig(), tmp_path / "in", tmp_path / "out")
    kept = {r["id"] for r in iter_records(tmp_path / "out" / "data", ["id"])}
    removed = {r["id"]: r for r in iter_records(tmp_path / "out" / "removed")}

    collapsed = sum(sum(i in kept for i in ids) == 1 for ids in groups)
    assert collapsed / len(groups) >= 0.99, f"{collapsed} of {len(groups)} clusters collapsed"
    lost = [i for i in distinct if i not in kept]
    assert len(lost) / len(distinct) <= 0.005, f"distinct documents removed: {lost}"
    # every removal names a kept document of its own cluster, with its similarity
    for doc_id, row in removed.items():
        assert row["duplicate_of"] in kept
        assert row["duplicate_of"].split("-")[0] == doc_id.split("-")[0]
        assert 0.0 < row["similarity"] <= 1.0 and row["cluster_id"] >= 0
    assert result["stats"]["kept"] == len(kept) == len(records) - len(removed)


def test_survivor_is_the_first_in_corpus_order_whatever_the_sharding(tmp_path):
    records, groups, _ = labelled_set(clusters=40, unrelated=30, overlapping_pairs=10)
    outputs = []
    for shard_size in (17, 1000):
        folder = tmp_path / str(shard_size)
        write_records(records, folder / "in", shard_size=shard_size)
        deduplicate(DedupConfig(), folder / "in", folder / "out")
        outputs.append([r["id"] for r in iter_records(folder / "out" / "data", ["id"])])
    assert outputs[0] == outputs[1]
    order = {r["id"]: n for n, r in enumerate(records)}
    kept = set(outputs[0])
    for ids in groups:
        survivors = [i for i in ids if i in kept]
        assert survivors == [min(ids, key=order.get)]


def test_buckets_split_into_hash_ranges_give_the_same_result(tmp_path, monkeypatch):
    """A corpus too big for one bucket task per band is split by hash range: same output."""
    from tasks import dedup

    records, _, _ = labelled_set(clusters=40, unrelated=30, overlapping_pairs=10)
    outputs = []
    for limit in (dedup.BUCKET_DOCUMENTS, 16):
        monkeypatch.setattr(dedup, "BUCKET_DOCUMENTS", limit)
        folder = tmp_path / str(limit)
        write_records(records, folder / "in", shard_size=50)
        deduplicate(DedupConfig(), folder / "in", folder / "out")
        outputs.append([(r["id"], r.get("duplicate_of")) for r in
                        iter_records(folder / "out" / "removed")])
    assert dedup.bucket_parts(len(records)) == 16 and len(list(
        (tmp_path / "16" / "out" / "pairs").glob("band-000-*.npy"))) == 16
    assert outputs[0] == outputs[1] and outputs[0]
