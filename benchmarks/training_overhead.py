"""Pretraining tokens/s through forgeline against a plain PyTorch loop of the same model.

Both train the same decoder (the default `pretrain` shape, or the one given with --set)
from the same initial weights, on the same batches of the same token windows, with the
same AdamW parameter groups, learning-rate schedule and gradient clipping, in this one
process and with the same torch threads:

* baseline: a plain loop: forward, backward, clip, step, schedule; one validation batch
  at the end.
* forgeline: ``tasks.pretrain.pretrain``: Lightning's Trainer through the training
  runner, with its checkpoints (every ``pretrain.checkpoint_every_steps``) and its metrics
  logged to a real MLflow run (SQLite store in a temporary directory), one validation at
  the end.

``overhead`` = baseline tokens/s / forgeline tokens/s - 1 (wall time of the training
call, checkpoint writes and MLflow logging included).

    .venv/bin/python benchmarks/training_overhead.py
    .venv/bin/python benchmarks/training_overhead.py --steps 100 --set pretrain.d_model=64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _corpus import Corpus

from flows.config import load_config
from tasks.shards import write_records
from tasks.tokenize import tokenize_corpus


def tokenized_corpus(root: Path, docs: int, vocab_size: int) -> Path:
    corpus = Corpus(docs, seed=0, min_words=150, max_words=300)
    texts = corpus.texts(0, docs).to_pylist()
    write_records([{"id": str(i), "text": t, "url": f"https://example.org/{i}"}
                   for i, t in enumerate(texts)], root / "corpus", shard_size=1000)
    config = load_config(None, [f"tokenize.vocab_size={vocab_size}"]).tokenize
    tokenize_corpus(config, root / "corpus", root / "tokens")
    return root / "tokens"


def plain_loop(config, tokens: Path) -> float:
    """Seconds for ``max_steps`` steps of the same training in plain PyTorch."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from models.data import RandomWindows, StridedWindows, read_meta
    from models.lightning import CausalLM
    from models.llama import Llama
    from tasks.pretrain import model_config_for

    meta = read_meta(tokens)
    L.seed_everything(config.seed, verbose=False)
    model = Llama(model_config_for(config, meta["vocab_size"]))
    module = CausalLM(model, config.learning_rate, config.weight_decay, config.warmup_steps,
                      config.max_steps, config.min_lr_ratio)  # the same optimizer and schedule
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    samples = config.max_steps * config.batch_size
    train = DataLoader(RandomWindows(tokens / "train.bin", meta["dtype"], config.context_length,
                                     samples, seed=config.seed), batch_size=config.batch_size)
    val = StridedWindows(tokens / "val.bin", meta["dtype"], config.context_length,
                         max_windows=config.val_batches * config.batch_size)
    model.train()
    started = time.perf_counter()
    for inputs, targets in train:
        loss = model(inputs, targets)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    model.eval()
    with torch.no_grad():
        for inputs, targets in DataLoader(val, batch_size=config.batch_size):
            model(inputs, targets)
    return time.perf_counter() - started


def forgeline_run(config, tokens: Path, work: Path) -> float:
    """Seconds of the training runner's fit, with checkpoints and MLflow logging."""
    from flows.tracking import Tracker
    from tasks.pretrain import pretrain

    tracker = Tracker(f"sqlite:///{work / 'mlflow.db'}", "benchmark")
    run_id = tracker.start_parent(name="training-overhead", params={}, tags={})
    result = pretrain(config, tokens, work / "pretrain", on_metrics=tracker.metrics_callback(run_id))
    tracker.finish(run_id)
    return result["stats"]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--docs", type=int, default=3000, help="documents to tokenize")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="pretrain settings, e.g. --set pretrain.d_model=64")
    args = parser.parse_args()
    config = load_config(None, [f"pretrain.max_steps={args.steps}",
                                f"pretrain.val_every_steps={args.steps}",
                                "pretrain.val_batches=1", *args.overrides])
    pretrain_config = config.pretrain
    with tempfile.TemporaryDirectory(prefix="forgeline-overhead-") as tmp:
        root = Path(tmp)
        tokens = tokenized_corpus(root, args.docs, config.tokenize.vocab_size)
        # one short warm-up of each: imports, allocator, thread pools
        warm = pretrain_config.model_copy(update={"max_steps": 5, "val_every_steps": 5})
        plain_loop(warm, tokens)
        forgeline_run(warm, tokens, root / "warm")
        baseline = plain_loop(pretrain_config, tokens)
        ours = forgeline_run(pretrain_config, tokens, root / "run")
        checkpoints = args.steps // pretrain_config.checkpoint_every_steps
    tokens_per_run = args.steps * pretrain_config.batch_size * pretrain_config.context_length
    result = {
        "steps": args.steps, "tokens": tokens_per_run,
        "baseline_tokens_per_second": round(tokens_per_run / baseline, 1),
        "forgeline_tokens_per_second": round(tokens_per_run / ours, 1),
        "overhead": round(ours / baseline - 1, 4),
        "checkpoints_written": checkpoints, "mlflow_logging": True,
    }
    print(f"plain PyTorch: {baseline:.1f}s, forgeline: {ours:.1f}s "
          f"({result['overhead']:+.1%}) for {tokens_per_run:,} tokens")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
