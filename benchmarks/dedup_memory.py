"""Peak memory and speed of the dedup stage, and how much of a planted truth it finds.

Writes ``--docs`` seeded documents (100-150 words from a Faker-made vocabulary; about
10% near copies of an earlier document with 2 words replaced and 5% exact copies) as
parquet shards of 1000, streaming (one shard in memory at a time), then runs
``tasks.dedup.deduplicate(DedupConfig(), in, out)`` serially in a fresh subprocess, so
that its peak resident memory (``ru_maxrss``) counts the dedup only. With ``--docs``
100000 or more it also runs a corpus ten times smaller: how memory grows with the corpus.

    .venv/bin/python benchmarks/dedup_memory.py                   # 100k (and 10k)
    .venv/bin/python benchmarks/dedup_memory.py --docs 1000000    # 1M (and 100k)

``planted_duplicates_removed_fraction`` is the share of the planted copies that dedup
removed; ``originals_removed`` counts originals it removed (should be 0). The last line
of standard output is one JSON object; ``within_limit`` compares the larger run's peak
with ``--limit-mb``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_dedup(directory: Path) -> None:
    """The subprocess: dedup ``directory/in`` into ``directory/out``; one JSON line."""
    from tasks.dedup import DedupConfig, deduplicate

    before = peak_rss_mb()
    started = time.perf_counter()
    result = deduplicate(DedupConfig(), directory / "in", directory / "out")
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(),
                      "rss_after_imports_mb": before, "count": result["count"],
                      "stats": result["stats"]}))


def measure(docs: int, seed: int, shard_size: int, keep: bool) -> dict:
    from _corpus import ORIGINAL, Corpus

    directory = Path(tempfile.mkdtemp(prefix=f"forgeline-dedup-{docs}-"))
    try:
        started = time.perf_counter()
        corpus = Corpus(docs, seed=seed)
        corpus.write_parquet(directory / "in", shard_size)
        generation = time.perf_counter() - started
        print(f"{docs} docs: generated in {generation:.1f}s into {directory / 'in'}", flush=True)
        env = {**os.environ, "FORGELINE_PROGRESS": "0"}
        done = subprocess.run([sys.executable, __file__, "--run", str(directory)], env=env,
                              check=True, stdout=subprocess.PIPE, text=True)
        run = json.loads(done.stdout.strip().splitlines()[-1])
        removed = set()
        for path in sorted((directory / "out" / "removed").glob("*.parquet")):
            removed.update(pq.read_table(path, columns=["id"]).column(0).to_pylist())
        planted = corpus.planted_ids()
        originals_removed = sum(1 for i in removed if i not in planted)
        stats = run["stats"]
        out = {"docs": docs, "generation_seconds": round(generation, 2),
               "seconds": round(run["seconds"], 2),
               "docs_per_second": round(docs / run["seconds"], 1),
               "peak_rss_mb": round(run["peak_rss_mb"], 1),
               "rss_after_imports_mb": round(run["rss_after_imports_mb"], 1),
               "kept": run["count"], "removed": len(removed),
               "removed_exact": stats.get("removed_exact_duplicate", 0),
               "removed_near": stats.get("removed_near_duplicate", 0),
               "planted_exact": int((corpus.kinds == 1).sum()),
               "planted_near": int((corpus.kinds == 2).sum()),
               "planted_duplicates_removed_fraction":
                   round(len(planted & removed) / max(1, len(planted)), 5),
               "originals_removed": originals_removed,
               "originals": int((corpus.kinds == ORIGINAL).sum())}
        print(f"{docs} docs: dedup {out['seconds']}s ({out['docs_per_second']} docs/s), peak "
              f"RSS {out['peak_rss_mb']} MB; removed {out['removed_exact']} exact + "
              f"{out['removed_near']} near; planted copies removed "
              f"{out['planted_duplicates_removed_fraction']:.2%}, originals removed "
              f"{originals_removed}", flush=True)
        return out
    finally:
        if keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000, help="documents (default 100000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--limit-mb", type=float, default=4096,
                        help="peak RSS the larger run must stay within (default 4096)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument("--run", metavar="DIR", help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args()
    if args.run:
        run_dedup(Path(args.run))
        return

    started = time.perf_counter()
    smaller = measure(args.docs // 10, args.seed, args.shard_size, args.keep) \
        if args.docs >= 100_000 else None
    larger = measure(args.docs, args.seed, args.shard_size, args.keep)
    summary = {**larger, "peak_rss_limit_mb": args.limit_mb,
               "within_limit": larger["peak_rss_mb"] <= args.limit_mb}
    if smaller:
        summary["smaller"] = {k: smaller[k] for k in (
            "docs", "seconds", "docs_per_second", "peak_rss_mb", "generation_seconds",
            "planted_duplicates_removed_fraction")}
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
