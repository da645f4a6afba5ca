"""Measure what a rerun with the same configuration costs against the first run.

Runs the pipeline twice, side by side in one process, on the same work directory and
prints both wall times and their ratio. The first run does every stage; the second
should find every stage finished and reuse it.

    .venv/bin/python benchmarks/rerun_reuse.py                      # the default pipeline
    .venv/bin/python benchmarks/rerun_reuse.py --config configs/tiny.yaml
"""

from __future__ import annotations

import argparse
import tempfile
import time

from flows.config import load_config
from flows.pipeline import pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--workdir", help="default: a fresh temporary directory")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    workdir = args.workdir or tempfile.mkdtemp(prefix="forgeline-bench-")

    timings = []
    for label in ("first run", "rerun"):
        started = time.perf_counter()
        result = pipeline(config=config, workdir=workdir)
        timings.append(time.perf_counter() - started)
        reused = sum(1 for s in result["stages"].values() if s.get("reused"))
        print(f"{label:>10}: {timings[-1]:7.1f}s  ({reused}/{len(result['stages'])} stages reused)")
    print(f"{'ratio':>10}: {timings[1] / timings[0]:.3f} (rerun / first run)")


if __name__ == "__main__":
    main()
