"""The data phase (filter, dedup, pii) with 2 worker processes against 1.

Writes ``--docs`` seeded English-like documents of about 2 KB (sentences and paragraphs
of words from a Faker-made vocabulary, with stop words, so they pass the default quality
filter; about 10% end with a Faker name, email address and phone number; about 3% are
exact and 2% near copies of earlier ones) as parquet files into a source folder,
streaming. Then runs the CLI twice, each in a fresh work directory and Prefect home (so
nothing is reused), with ``execution.workers=1`` and ``=2``:

    forgeline run --until pii --json --set source.paths='[SRC]' --set source.shard_size=1000
                  --set execution.workers=N

and sums the ``seconds`` of filter, dedup and pii from each run's JSON line.
``ratio`` = seconds with 1 worker / seconds with 2 workers. ``identical_output`` says
whether both runs' pii output holds the same (id, text) rows, shard by shard and in
order; ``identical_files`` whether its parquet files are byte-identical.

    .venv/bin/python benchmarks/data_phase_scaling.py               # 100k documents
    .venv/bin/python benchmarks/data_phase_scaling.py --docs 3000   # a smoke test

The last line of standard output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MEASURED = ("filter", "dedup", "pii")


def forgeline_command() -> list[str]:
    script = Path(sys.executable).parent / "forgeline"
    return [str(script)] if script.exists() else [sys.executable, "-m", "flows.cli"]


def run_cli(source: Path, directory: Path, workers: int, args) -> dict:
    """One CLI run in ``directory``; its JSON summary plus the wall time."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", FORGELINE_PROGRESS="0",
               PREFECT_HOME=str(directory / ".prefect"))
    command = forgeline_command() + [
        "run", "--until", "pii", "--json", "--workdir", str(directory / "work"),
        "--set", f"source.paths=['{source}']", "--set", f"source.shard_size={args.shard_size}",
        "--set", f"execution.engine={args.engine}", "--set", f"execution.workers={workers}"]
    directory.mkdir(parents=True)
    started = time.perf_counter()
    with open(directory / "stderr.log", "w") as log:
        done = subprocess.run(command, check=False, env=env, cwd=HERE.parent,
                              stdout=subprocess.PIPE, stderr=log, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = (directory / "stderr.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"forgeline exited {done.returncode} with {workers} worker(s):\n{tail}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    summary["wall_seconds"] = wall
    return summary


def compare_outputs(left: Path, right: Path) -> tuple[bool, bool]:
    """(same id/text rows in the same shards and order, byte-identical parquet files)."""
    names = sorted(p.name for p in left.glob("*.parquet"))
    if names != sorted(p.name for p in right.glob("*.parquet")):
        return False, False
    rows = files = True
    for name in names:  # one shard of each run in memory at a time
        a, b = (pq.read_table(d / name, columns=["id", "text"]) for d in (left, right))
        rows = rows and a.equals(b)
        files = files and (left / name).read_bytes() == (right / name).read_bytes()
    return rows, files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000, help="documents (default 100000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="documents per source file and per shard (default 1000)")
    parser.add_argument("--engine", choices=("local", "dask"), default="local",
                        help="execution.engine (default local)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    from _corpus import Corpus

    root = Path(tempfile.mkdtemp(prefix="forgeline-scaling-"))
    try:
        started = time.perf_counter()
        corpus = Corpus(args.docs, seed=args.seed, min_words=300, max_words=380,
                        exact=0.03, near=0.02, sentences=True, pii=0.10)
        corpus.write_parquet(root / "source", args.shard_size)
        print(f"generated {args.docs} documents in {time.perf_counter() - started:.1f}s "
              f"into {root / 'source'}", flush=True)
        runs = {}
        for workers in (1, 2):
            runs[workers] = run_cli(root / "source", root / f"workers-{workers}", workers, args)
            stages = runs[workers]["stages"]
            print(f"{workers} worker(s): " + ", ".join(
                f"{n} {stages[n]['seconds']:.1f}s ({stages[n]['count']} docs)" for n in stages)
                + f"; CLI wall {runs[workers]['wall_seconds']:.1f}s", flush=True)
        seconds = {w: sum(r["stages"][n]["seconds"] for n in MEASURED) for w, r in runs.items()}
        per_stage = {n: {"seconds_1_worker": round(runs[1]["stages"][n]["seconds"], 2),
                         "seconds_2_workers": round(runs[2]["stages"][n]["seconds"], 2),
                         "ratio": round(runs[1]["stages"][n]["seconds"]
                                        / max(runs[2]["stages"][n]["seconds"], 1e-9), 3),
                         "count": runs[2]["stages"][n]["count"]} for n in MEASURED}
        identical, same_files = compare_outputs(Path(runs[1]["stages"]["pii"]["output"]),
                                                Path(runs[2]["stages"]["pii"]["output"]))
        ratio = seconds[1] / seconds[2]
        print(f"filter+dedup+pii: {seconds[1]:.1f}s with 1 worker, {seconds[2]:.1f}s with 2: "
              f"ratio {ratio:.2f}; identical output: {identical} (files: {same_files})")
        print(json.dumps({"docs": args.docs, "seconds_1_worker": round(seconds[1], 2),
                          "seconds_2_workers": round(seconds[2], 2), "ratio": round(ratio, 3),
                          "per_stage": per_stage, "identical_output": identical,
                          "identical_files": same_files, "engine": args.engine,
                          "cli_wall_seconds": {str(w): round(r["wall_seconds"], 1)
                                               for w, r in runs.items()},
                          "cpu_count": os.cpu_count()}))
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
