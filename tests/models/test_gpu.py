"""The CUDA paths: bf16 training through the stage, the KV cache in bf16, fused AdamW.

Skipped where there is no CUDA device (CI); run them on a GPU machine with
``pytest -m gpu``. The CPU paths of the same code are covered by the other tests.
"""

import json
import random

import pytest
import torch

from models.checkpoint import load_model
from models.lightning import CausalLM
from models.llama import KVCache, Llama, ModelConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_kv_cache_matches_the_full_forward_pass_in_bf16():
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=512, context_length=64, d_model=128, n_layers=2,
                              n_heads=4, n_kv_heads=2)).cuda().eval()
    idx = torch.randint(0, 512, (2, 40), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        full = model(idx)[0].float()
        cache = KVCache(model.config, 2, torch.device("cuda"), torch.bfloat16)
        parts = [model(idx[:, :30], cache=cache)[0]]
        parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(30, 40)]
    cached = torch.cat(parts, dim=1).float()
    assert (cached - full).abs().max().item() < 0.1  # bf16 rounding, not a wrong position
    assert (cached.argmax(-1) == full.argmax(-1)).float().mean().item() > 0.95
    prompt = idx[:, :8]
    assert torch.equal(model.generate(prompt, 30, temperature=0),
                       model.generate(prompt, 30, temperature=0, use_cache=False))


def test_adamw_is_fused_on_cuda():
    model = Llama(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=1,
                              n_heads=2)).cuda()
    optimizer = CausalLM(model, 1e-3, 0.1, 1, 10, 0.1).configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True


def test_pretrain_on_the_gpu_trains_in_bf16_and_reports_mfu(tmp_path):
    from tasks.pretrain import PretrainConfig, pretrain
    from tasks.shards import write_records
    from tasks.tokenize import TokenizeConfig, tokenize_corpus

    rng = random.Random(0)
    write_records([{"id": f"d{i}", "url": f"http://x/{i}", "text": "\n".join(
        f"the {rng.choice(['parser', 'socket', 'module'])} reads file {n}." for n in range(8))}
        for i in range(60)], tmp_path / "corpus")
    tokenize_corpus(TokenizeConfig(vocab_size=300, val_fraction=0.2), tmp_path / "corpus",
                    tmp_path / "tokens")
    calls = []
    config = PretrainConfig(d_model=64, n_layers=2, n_heads=4, context_length=32,
                            batch_size=16, max_steps=60, warmup_steps=5, val_every_steps=30,
                            val_batches=2, log_every_steps=10)
    result = pretrain(config, tmp_path / "tokens", tmp_path / "out",
                      on_metrics=lambda metrics, step: calls.append((step, metrics)))
    resolved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert resolved["resolved"]["precision"] == "bf16-mixed"
    assert resolved["resolved"]["accelerator"] == "CUDAAccelerator"
    logged = [m for _, m in calls if "tokens_per_second" in m]
    assert logged and all(m["peak_memory_mb"] > 0 for m in logged)
    name = torch.cuda.get_device_name()
    if any(key in name for key in ("H100", "H200", "A100", "L4")):  # peaks it knows
        assert all(0 < m["mfu"] < 1 for m in logged)
    losses = [m["train_loss"] for _, m in calls if "train_loss" in m]
    assert losses[-1] < 0.5 * losses[0]
    assert result["stats"]["val_loss"] < losses[0]
    # the saved model is plain float32 on the CPU and gives the GPU model's outputs
    model = load_model(tmp_path / "out" / "model.pt")
    assert next(model.parameters()).device.type == "cpu"
    idx = torch.randint(0, 300, (2, 32))
    gpu_model = load_model(tmp_path / "out" / "model.pt", map_location="cuda")
    with torch.no_grad():
        torch.testing.assert_close(gpu_model(idx.cuda())[0].cpu(), model(idx)[0],
                                   atol=1e-2, rtol=1e-2)  # TF32 matmuls on the GPU
