"""Tokenizer encoding throughput: forgeline's tokenize stage against sentencepiece alone.

One tokenizer is trained on a generated corpus (parquet shards); then the same documents
are encoded twice, in this one process:

* baseline: ``SentencePieceProcessor.encode`` on the texts already in memory, in batches
  of the same size, with the same threads; nothing read or written.
* forgeline: the stage's per-shard half, ``tasks.tokenize.encode_shard`` on every shard
  (read the parquet shard, encode, append EOS, write the token files, count) and
  ``join_parts`` (the train.bin / val.bin concatenation).

The two run alternately, ``--repeat`` times each; the best time of each is compared.

``ratio`` = forgeline tokens/s / baseline tokens/s (the goal: at least 0.9, within 10%).

    .venv/bin/python benchmarks/tokenizer_throughput.py
    .venv/bin/python benchmarks/tokenizer_throughput.py --docs 5000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _corpus import Corpus

from tasks.shards import shard_paths, write_records
from tasks.tokenize import ENCODE_BATCH, TokenizeConfig, encode_shard, join_parts, tokenize_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20000, help="documents (default 20000)")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (best kept)")
    args = parser.parse_args()
    import sentencepiece as spm

    with tempfile.TemporaryDirectory(prefix="forgeline-tokenizer-") as tmp:
        root = Path(tmp)
        texts = Corpus(args.docs, seed=0, min_words=150, max_words=300).texts(0, args.docs)
        texts = texts.to_pylist()
        write_records([{"id": str(i), "text": t, "url": f"https://example.org/{i}"}
                       for i, t in enumerate(texts)], root / "corpus", shard_size=args.shard_size)
        config = TokenizeConfig()
        tokenize_corpus(config, root / "corpus", root / "trained")  # trains the tokenizer
        model = str(root / "trained" / "tokenizer.model")
        sp = spm.SentencePieceProcessor(model_file=model)
        threads = os.cpu_count() or 1

        def sentencepiece_alone() -> int:
            count = 0
            for start in range(0, len(texts), ENCODE_BATCH):
                encoded = sp.encode(texts[start:start + ENCODE_BATCH], num_threads=threads)
                count += sum(len(ids) for ids in encoded)
            return count

        shards = shard_paths(root / "corpus")

        def forgeline_stage(attempt: int) -> int:
            parts_dir = root / f"parts-{attempt}"
            parts = [encode_shard(model, str(shard), str(parts_dir), config.val_fraction, {},
                                  "uint16") for shard in shards]
            join_parts(parts_dir, [shard.stem for shard in shards], parts_dir)
            return sum(p["train_tokens"] + p["val_tokens"] for p in parts)

        # alternating, best of --repeat each: neither side gets the warm caches alone
        baseline = ours = float("inf")
        for attempt in range(args.repeat):
            started = time.perf_counter()
            baseline_tokens = sentencepiece_alone()
            baseline = min(baseline, time.perf_counter() - started)
            started = time.perf_counter()
            forgeline_tokens = forgeline_stage(attempt)
            ours = min(ours, time.perf_counter() - started)

    assert forgeline_tokens == baseline_tokens + args.docs  # the same ids, plus one EOS each
    result = {
        "docs": args.docs, "tokens": baseline_tokens,
        "baseline_tokens_per_second": round(baseline_tokens / baseline),
        "forgeline_tokens_per_second": round(baseline_tokens / ours),
        "ratio": round(baseline / ours, 3),
    }
    print(f"sentencepiece alone: {baseline:.2f}s, forgeline's stage: {ours:.2f}s for "
          f"{baseline_tokens:,} tokens")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
