"""GPU pretraining throughput and MFU: forgeline against a plain compiled PyTorch loop.

Both train the GPT-2-small-class preset (768 wide, 12 layers, 12 heads, 1024 context,
a 50,304-token vocabulary: GPT-2's 50,257 padded to a multiple of 64, 124M parameters)
in bf16 mixed precision with ``torch.compile``, from the same initial weights, on the
same batches, with the same fused AdamW, schedule and gradient clipping:

* baseline: a plain loop: autocast forward, backward, clip, step, schedule; nothing
  else. Timed over ``--steps`` steps after ``--warmup`` steps (compilation, autotuning).
* forgeline: ``tasks.pretrain.pretrain``: Lightning's Trainer through the training
  runner, with the callbacks that time the steps and a checkpoint at the end; its
  throughput is the one it reports itself (``tokens_per_second`` every 5 steps) over
  the same steps after the same warm-up. MLflow logging is measured by
  ``benchmarks/training_overhead.py`` (CPU): MLflow is not installed on the GPU hosts
  this was written for.

The tokens are random (throughput does not depend on their values), so no tokenizer is
trained; the tokenizer file the stage copies is a placeholder.

MFU (model FLOPs utilisation) = tokens/s x training FLOPs per token
(``ModelConfig.flops_per_token``: 6 per matmul weight plus attention, as nanoGPT and PaLM
count it) / the GPU's dense bf16 peak from its data sheet (989 TFLOP/s for H100 SXM and
H200). The dense bf16 matmul rate measured on this GPU (8192^3) is reported beside it.

    python benchmarks/gpu_mfu.py                     # prints "skipped" without a GPU
    python benchmarks/gpu_mfu.py --batch-size 16 --steps 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB = 50304


def write_tokens(root: Path, vocab_size: int, train_tokens: int, val_tokens: int) -> Path:
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rng.integers(0, vocab_size, train_tokens, dtype=np.uint16).tofile(root / "train.bin")
    rng.integers(0, vocab_size, val_tokens, dtype=np.uint16).tofile(root / "val.bin")
    (root / "tokenizer.model").write_bytes(b"placeholder: random tokens, no tokenizer")
    meta = {"dtype": "uint16", "vocab_size": vocab_size, "bos_id": 1, "eos_id": 2,
            "pad_id": 3, "unk_id": 0, "train_tokens": train_tokens, "val_tokens": val_tokens}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def matmul_tflops() -> float:
    """Dense bf16 8192^3 matmul rate on this GPU: the ceiling actually reachable."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def plain_loop(config, tokens: Path, warmup: int, steps: int) -> float:
    """Tokens/s of the same training in a plain compiled PyTorch loop."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from models.data import RandomWindows, read_meta
    from models.lightning import CausalLM
    from models.llama import Llama
    from tasks.pretrain import model_config_for

    meta = read_meta(tokens)
    L.seed_everything(config.seed, verbose=False)
    model = Llama(model_config_for(config, meta["vocab_size"])).cuda()
    module = CausalLM(model, config.learning_rate, config.weight_decay, config.warmup_steps,
                      config.max_steps, config.min_lr_ratio)  # the same optimizer and schedule
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    forward = torch.compile(model)
    data = RandomWindows(tokens / "train.bin", meta["dtype"], config.context_length,
                         (warmup + steps) * config.batch_size, seed=config.seed)
    model.train()
    started = None
    for step, (inputs, targets) in enumerate(DataLoader(data, batch_size=config.batch_size)):
        if step == warmup:
            torch.cuda.synchronize()
            started = time.perf_counter()
        inputs, targets = inputs.cuda(non_blocking=True), targets.cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(inputs, targets)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return steps * config.batch_size * config.context_length / seconds


def forgeline_run(config, tokens: Path, out: Path, warmup: int) -> tuple[float, dict]:
    """Tokens/s that forgeline's pretrain stage reports after the warm-up, and its last
    logged metrics."""
    from tasks.pretrain import pretrain

    windows: list[float] = []
    last: dict = {}

    def on_metrics(metrics: dict, step: int) -> None:
        if "tokens_per_second" in metrics and step > warmup:
            windows.append(metrics["tokens_per_second"])  # each over the same 5 steps
            last.update(metrics)

    pretrain(config, tokens, out, on_metrics=on_metrics)
    return statistics.harmonic_mean(windows), last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32, help="windows per step (32)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps (60)")
    parser.add_argument("--warmup", type=int, default=20,
                        help="untimed steps first: compilation and autotuning (20)")
    parser.add_argument("--preset", default="gpt2-small", help="pretrain.preset (gpt2-small)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU here: gpu_mfu skipped")
        print(json.dumps({"skipped": "no CUDA GPU", "device": "cpu"}))
        return

    from models.lightning import peak_flops
    from tasks.pretrain import PretrainConfig, model_config_for

    log_every = 5
    warmup = -(-args.warmup // log_every) * log_every  # whole logging windows
    total = warmup + args.steps
    config = PretrainConfig(
        preset=args.preset, batch_size=args.batch_size, max_steps=total, warmup_steps=10,
        precision="bf16-mixed", accelerator="cuda", devices=1, compile=True,
        val_every_steps=total, val_batches=1, log_every_steps=log_every,
        checkpoint_every_steps=total)
    model_config = model_config_for(config, VOCAB)
    flops_per_token = model_config.flops_per_token()
    peak, peak_source = peak_flops(0.0, "cuda")
    device = torch.cuda.get_device_name()
    measured = matmul_tflops()
    with tempfile.TemporaryDirectory(prefix="forgeline-gpu-mfu-") as tmp:
        root = Path(tmp)
        tokens = write_tokens(root / "tokens", VOCAB, 20_000_000, 200_000)
        baseline = plain_loop(config, tokens, warmup, args.steps)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ours, last = forgeline_run(config, tokens, root / "pretrain", warmup)

    def mfu(tokens_per_second: float) -> float | None:
        return round(tokens_per_second * flops_per_token / peak, 4) if peak else None

    result = {
        "device": device, "preset": args.preset,
        "params": model_config.parameter_count(), "flops_per_token": flops_per_token,
        "tokens_per_step": args.batch_size * config.context_length,
        "timed_steps": args.steps, "warmup_steps": warmup, "precision": "bf16-mixed",
        "compile": True, "peak_tflops": peak / 1e12 if peak else None,
        "peak_source": peak_source, "matmul_tflops_measured": round(measured, 1),
        "baseline_tokens_per_second": round(baseline, 1),
        "forgeline_tokens_per_second": round(ours, 1),
        "baseline_mfu": mfu(baseline), "mfu": mfu(ours),
        "ratio": round(ours / baseline, 4),
        "peak_memory_mb": round(last.get("peak_memory_mb", 0.0), 1),
    }
    print(f"{device}: plain compiled loop {baseline:,.0f} tokens/s (MFU {result['baseline_mfu']}), "
          f"forgeline {ours:,.0f} tokens/s (MFU {result['mfu']}), ratio {result['ratio']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
