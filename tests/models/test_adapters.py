"""LoRA and prompt tuning: what trains, what is saved, and that base + adapter rebuilds the
tuned model exactly."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from models.adapters import (
    AdapterSettings,
    finish_model,
    load_adapter,
    prepare_model,
    set_dropout,
    trainable_summary,
)
from models.checkpoint import load_model, save_model
from models.llama import Llama, ModelConfig


def tiny(**overrides) -> Llama:
    torch.manual_seed(0)
    settings = {"vocab_size": 64, "context_length": 24, "d_model": 32, "n_layers": 2,
                "n_heads": 4}
    return Llama(ModelConfig(**{**settings, **overrides}))


def nudge_lora(model) -> None:
    """Give LoRA's B matrices (zero at the start) values, as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def test_settings_import_neither_torch_nor_peft():
    code = ("import sys, models.adapters as a; a.AdapterSettings(method='lora'); "
            "print(any(m in sys.modules for m in ('torch', 'peft')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_full_keeps_the_model_and_trains_everything():
    model = tiny()
    prepared = prepare_model(model, AdapterSettings())
    assert prepared is model
    summary = trainable_summary(prepared)
    assert summary["trainable_params"] == summary["total_params"] == model.num_params()
    assert summary["trainable_share"] == 1.0


def test_lora_trains_a_few_percent_and_merges_into_a_plain_llama(tmp_path):
    base = tiny()
    reference = copy.deepcopy(base)
    settings = AdapterSettings(method="lora", lora_rank=2, lora_alpha=4, lora_dropout=0.0)
    wrapped = prepare_model(base, settings)
    summary = trainable_summary(wrapped)
    assert 0 < summary["trainable_share"] < 0.10
    assert summary["total_params"] == reference.num_params() + summary["trainable_params"]
    idx = torch.randint(0, 64, (2, 12))
    nudge_lora(wrapped)
    wrapped.eval()
    with torch.no_grad():
        tuned = wrapped(idx)[0]
        assert not torch.allclose(tuned, reference.eval()(idx)[0], atol=1e-4)

    merged = finish_model(wrapped, settings, tmp_path)
    assert type(merged) is Llama and all(p.requires_grad for p in merged.parameters())
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {
        "adapter_config.json", "adapter_model.safetensors"}
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 2
    save_model(tmp_path / "model.pt", merged)
    loaded = load_model(tmp_path / "model.pt")
    assert set(loaded.state_dict()) == set(reference.state_dict())  # no peft keys
    rebuilt = load_adapter(reference, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(idx)[0], tuned, atol=1e-5)
        assert torch.allclose(rebuilt(idx)[0], tuned, atol=1e-5)
    # the base model given to load_adapter is left as it was
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(),
                                                 tiny().state_dict().values(), strict=True))


def test_unknown_lora_target_names_the_model_layers():
    with pytest.raises(ValueError, match=r"lora_targets|LoRA targets.*q_proj"):
        prepare_model(tiny(), AdapterSettings(method="lora", lora_targets=["query"]))


def test_prompt_tuning_freezes_everything_but_the_prompt(tmp_path):
    base = tiny()
    settings = AdapterSettings(method="prompt_tuning", prompt_tokens=4)
    tuned = prepare_model(base, settings, seed=3)
    assert tuned.config.prompt_tokens == 4 and tuned.max_tokens == 20
    assert [n for n, p in tuned.named_parameters() if p.requires_grad] == ["prompt"]
    summary = trainable_summary(tuned)
    assert summary["trainable_params"] == 4 * 32
    # vocab init: each prompt vector is some token's embedding
    same = tuned.prompt.detach()[:, None, :] == base.embed.weight.detach()[None]
    assert same.all(dim=-1).any(dim=-1).all()
    assert not torch.allclose(prepare_model(base, settings, seed=4).prompt, tuned.prompt)
    random_init = prepare_model(base, settings.model_copy(update={"prompt_init": "random"}))
    assert torch.cdist(random_init.prompt.detach(), base.embed.weight.detach()).min() > 1e-3

    # one optimizer step changes the prompt only
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=0.1)
    idx = torch.randint(0, 64, (2, 12))
    tuned(idx, idx)[1].backward()
    optimizer.step()
    state, original = tuned.state_dict(), base.state_dict()
    assert all(torch.equal(state[k], original[k]) for k in original)

    saved = finish_model(tuned, settings, tmp_path)
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {
        "prompt.safetensors", "prompt_config.json"}
    save_model(tmp_path / "model.pt", saved)
    loaded, rebuilt = load_model(tmp_path / "model.pt"), load_adapter(base, tmp_path / "adapter")
    with torch.no_grad():
        expected = saved.eval()(idx)[0]
        assert torch.equal(loaded(idx)[0], expected)
        assert torch.equal(rebuilt.eval()(idx)[0], expected)
    out = loaded.generate(idx[:, :5], max_new_tokens=6, temperature=0)
    assert out.shape == (2, 11)


def test_prompt_tuning_adapter_must_match_the_base_width(tmp_path):
    settings = AdapterSettings(method="prompt_tuning", prompt_tokens=2)
    finish_model(prepare_model(tiny(), settings), settings, tmp_path)
    with pytest.raises(ValueError, match="width 32"):
        load_adapter(tiny(d_model=64), tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="holds no adapter"):
        load_adapter(tiny(), tmp_path)


def test_set_dropout_reaches_every_layer():
    model = tiny()
    assert set_dropout(model, 0.2) == 0.0
    assert model.config.dropout == 0.2
    assert model.blocks[1].attn.dropout == 0.2 and model.blocks[0].mlp.dropout == 0.2
    with pytest.raises(ValueError):
        set_dropout(model, 1.5)
