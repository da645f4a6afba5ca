"""The decoder itself: shapes, causality, rotary embeddings, learning, generation, config."""

import math

import pytest
import torch

from models.checkpoint import load_model, save_model
from models.llama import (
    KVCache,
    Llama,
    ModelConfig,
    apply_rope,
    default_mlp_hidden,
    rope_cache,
    sample_next,
)


def tiny(**overrides) -> Llama:
    torch.manual_seed(0)
    settings = {"vocab_size": 64, "context_length": 16, "d_model": 32, "n_layers": 2,
                "n_heads": 4}
    return Llama(ModelConfig(**{**settings, **overrides}))


def test_forward_shapes_and_initial_loss_near_uniform():
    model = tiny()
    idx, targets = torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 64)
    assert model(idx)[1] is None
    # small init: predictions start close to uniform over the vocabulary
    assert abs(loss.item() - math.log(64)) < 0.3


def test_future_tokens_do_not_change_earlier_logits():
    model = tiny().eval()
    idx = torch.randint(0, 64, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 64
    before, after = model(idx)[0], model(changed)[0]
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_rotary_scores_depend_only_on_relative_position():
    cos, sin = rope_cache(32, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> float:
        rq = apply_rope(q.view(1, 1, 1, 8), cos[m:m + 1], sin[m:m + 1]).flatten()
        rk = apply_rope(k.view(1, 1, 1, 8), cos[n:n + 1], sin[n:n + 1]).flatten()
        return float(rq @ rk)

    assert score(3, 1) == pytest.approx(score(20, 18), rel=1e-4)
    x = torch.randn(1, 1, 32, 8)
    # a rotation keeps lengths
    assert torch.allclose(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_overfits_a_tiny_batch():
    model = tiny()
    idx = torch.randint(0, 64, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first


def test_loss_mask_limits_the_loss_to_marked_targets():
    model = tiny()
    idx = torch.randint(0, 64, (2, 16))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 12:] = True
    logits, masked = model(idx, idx, mask)
    by_hand = torch.nn.functional.cross_entropy(logits[:, 12:].reshape(-1, 64),
                                                idx[:, 12:].reshape(-1))
    assert masked.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_generate_appends_tokens_and_crops_long_prompts():
    model = tiny()
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=5, top_k=10)
    assert out.shape == (2, 8)
    long_prompt = torch.randint(0, 64, (1, 40))  # longer than the 16-token context
    assert model.generate(long_prompt, max_new_tokens=4).shape == (1, 44)
    greedy = [model.generate(long_prompt, 4, temperature=0)[0, -4:] for _ in range(2)]
    assert torch.equal(*greedy)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_kv_cache_gives_the_full_forward_passs_logits(n_kv_heads):
    model = tiny(n_kv_heads=n_kv_heads).eval()
    idx = torch.randint(0, 64, (2, 12))
    full = model(idx)[0]
    cache = KVCache(model.config, 2, torch.device("cpu"))
    pieces = [model(idx[:, :5], cache=cache)[0],  # a prompt, then 3 tokens, then one at a time
              model(idx[:, 5:8], cache=cache)[0]]
    pieces += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 12)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceeds context_length"):
        model(torch.zeros(2, 5, dtype=torch.long), cache=cache)  # 12 + 5 > 16


def test_cached_generation_matches_uncached_within_the_window():
    model = tiny()
    prompt = torch.randint(0, 64, (2, 4))
    cached = model.generate(prompt, 12, temperature=0)  # 16 tokens: the whole window
    plain = model.generate(prompt, 12, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)
    sampled = [model.generate(prompt, 12, top_k=20, top_p=0.9,
                              generator=torch.Generator().manual_seed(3), use_cache=use)
               for use in (True, False)]
    assert torch.equal(*sampled)
    # past the window the cache restarts from its last half and generation goes on
    assert model.generate(prompt, 40, temperature=0).shape == (2, 44)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {sample_next(logits, 1.0, top_p=0.8, generator=torch.Generator().manual_seed(s)).item()
             for s in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reach 0.8: tokens 2 and 3 are never drawn
    draws = {sample_next(logits, 1.0, top_p=0.81, generator=torch.Generator().manual_seed(s)).item()
             for s in range(200)}
    assert draws == {0, 1, 2}
    assert sample_next(logits, 0.0).item() == 0


def test_grouped_query_attention_and_untied_head():
    grouped = tiny(n_kv_heads=2)
    assert grouped(torch.randint(0, 64, (1, 8)))[0].shape == (1, 8, 64)
    assert grouped.num_params() < tiny().num_params()
    untied = tiny(tie_embeddings=False)
    assert untied.num_params() == tiny().num_params() + 64 * 32


@pytest.mark.parametrize("overrides, message", [
    ({"d_model": 30, "n_heads": 4}, "divisible by n_heads"),
    ({"n_heads": 4, "n_kv_heads": 3}, "multiple of n_kv_heads"),
    ({"d_model": 12, "n_heads": 4}, "must be even"),
    ({"dropout": 1.5}, "dropout"),
    ({"prompt_tokens": 256}, "leave room"),
    ({"prompt_tokens": 2, "causal": False}, "causal decoder"),
])
def test_config_validation_names_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(vocab_size=64, **overrides)


def test_defaults_and_round_trip_through_a_model_file(tmp_path):
    assert default_mlp_hidden(128) == 352 and default_mlp_hidden(96) % 32 == 0
    model = tiny().eval()
    save_model(tmp_path / "model.pt", model)
    loaded = load_model(tmp_path / "model.pt")
    idx = torch.randint(0, 64, (2, 16))
    assert loaded.config == model.config
    assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_an_encoder_sees_both_sides_and_never_the_padding():
    encoder = tiny(causal=False).eval()
    idx = torch.randint(1, 64, (1, 8))
    changed = idx.clone()
    changed[0, 6] = (idx[0, 6] + 1) % 64
    # a later token changes an earlier position's state (the decoder's would not change)
    assert not torch.allclose(encoder.hidden_states(idx)[:, :3],
                              encoder.hidden_states(changed)[:, :3])
    padded = torch.cat([idx, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[True] * 8 + [False] * 4])
    assert torch.allclose(encoder.hidden_states(padded, attention_mask=mask)[:, :8],
                          encoder.hidden_states(idx), atol=1e-5)
    assert not torch.allclose(encoder.hidden_states(padded)[:, :8], encoder.hidden_states(idx))
    with pytest.raises(ValueError, match="does not generate"):
        encoder.generate(idx, 2)


def test_a_soft_prompt_comes_first_and_generation_keeps_it():
    plain, prompted = tiny().eval(), tiny(prompt_tokens=4).eval()
    assert prompted.max_tokens == 12 and prompted.num_params() == plain.num_params() + 4 * 32
    idx = torch.randint(0, 64, (2, 5))
    assert prompted(idx)[0].shape == (2, 5, 64)
    with torch.no_grad():
        prompted.prompt.add_(1.0)  # the soft prompt changes every position's prediction
        assert not torch.allclose(prompted(idx)[0], tiny(prompt_tokens=4).eval()(idx)[0])
    with pytest.raises(ValueError, match="soft prompt"):
        prompted(torch.randint(0, 64, (1, 13)))
    cached = prompted.generate(idx, 10, temperature=0)  # the window refills past 12 tokens
    uncached = prompted.generate(idx, 10, temperature=0, use_cache=False)
    assert cached.shape == (2, 15) and torch.equal(cached[:, :12], uncached[:, :12])
