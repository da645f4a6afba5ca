"""A small Llama-style decoder, readable in one sitting.

Pre-norm transformer blocks with RMSNorm, rotary position embeddings, grouped-query
attention through ``F.scaled_dot_product_attention`` and a SwiGLU MLP; token embeddings
tied to the output head by default. With ``causal=False`` the same stack is a
bidirectional encoder (masked-LM pretraining); with ``prompt_tokens`` it carries a learned
soft prompt before every sequence (prompt tuning). Initialisation follows GPT-2/nanoGPT: normal(0.02)
everywhere, with the projections that write into the residual stream scaled down by
``1/sqrt(2 * n_layers)`` so the residual variance does not grow with depth.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from models.config import ModelConfig, default_mlp_hidden  # noqa: F401 (re-exported)

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """Scale by the root mean square only: cheaper than LayerNorm and works as well."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 so bf16 training does not lose the small variances
        norm = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return norm.type_as(x) * self.weight


def rope_cache(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (T, hs/2): position t turns pair i by t*theta^(-2i/hs)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(seq_len).float(), inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) feature pair of x (B, nh, T, hs) by its position's angle."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]  # (B, nh, T, hs/2)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, nh, T, hs/2, 2)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads, config.n_kv_heads, config.head_dim)
        self.q_proj = nn.Linear(config.d_model, config.n_heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(config.d_model, 2 * config.n_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.out_proj.residual = True
        self.dropout = config.dropout
        self.causal = config.causal

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_heads, self.head_dim).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal, mask = self.causal, None
        if not self.causal and key_mask is not None:  # padding is never attended to
            mask = key_mask[:, None, None, :]  # (B, 1, 1, T)
        if cache is not None:  # earlier positions' keys and values come from the cache
            past = cache.length
            k, v = cache.append(k, v)  # (B, nkv, past + T, hs)
            if past and T == 1:
                causal = False  # one new token sees every cached one
            elif past:  # T new tokens after `past` cached ones: row i sees keys up to past+i
                causal = False
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        if self.n_kv_heads != self.n_heads:  # grouped-query: share each kv head with a group
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, nh, S, hs)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return F.dropout(self.out_proj(y), self.dropout, self.training)


class LayerCache:
    """One layer's keys and values so far, in buffers allocated once for the whole window."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so that each generated
    token costs one position's forward pass instead of the whole context's."""

    def __init__(self, config: ModelConfig, batch: int, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        self.layers = [LayerCache(batch, config.n_kv_heads, config.context_length,
                                  config.head_dim, device, dtype)
                       for _ in range(config.n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.d_model, 2 * config.mlp_hidden, bias=False)
        self.down = nn.Linear(config.mlp_hidden, config.d_model, bias=False)
        self.down.residual = True
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return F.dropout(self.down(F.silu(gate) * up), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, key_mask)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        # prompt tuning: vectors in embedding space, learned while the rest stays frozen
        self.prompt = nn.Parameter(torch.empty(config.prompt_tokens, config.d_model)) \
            if config.prompt_tokens else None
        cos, sin = rope_cache(config.context_length, config.head_dim, config.rope_theta)
        # not saved in the state_dict: recomputed from the config on load
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual", False):
                std /= math.sqrt(2 * self.config.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module is self and self.prompt is not None:
            nn.init.normal_(self.prompt, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counted once when tied; ``non_embedding`` leaves the token table out."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.embed.weight.numel()
        return total

    @property
    def max_tokens(self) -> int:
        """Tokens a sequence may hold: the context less the soft prompt's positions."""
        return self.config.context_length - self.config.prompt_tokens

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalised hidden states (B, T, C) of token ids (B, T), one per token
        (the soft prompt's positions, if any, are dropped). ``attention_mask`` (B, T), true
        at real tokens, keeps an encoder from attending to padding; a causal model never
        sees the padding after a token, so it needs none for right-padded batches."""
        B, T = idx.shape
        x = F.dropout(self.embed(idx), self.config.dropout, self.training)  # (B, T, C)
        start = cache.length if cache is not None else 0
        prompt = self.prompt is not None and start == 0
        if prompt:  # the soft prompt comes first, at positions 0..P-1
            x = torch.cat((self.prompt.to(x.dtype).expand(B, -1, -1), x), dim=1)
            if attention_mask is not None:
                attention_mask = F.pad(attention_mask.bool(), (self.config.prompt_tokens, 0),
                                       value=True)
        length = x.size(1)
        if start + length > self.config.context_length:
            raise ValueError(f"sequence length {start + length} exceeds context_length "
                             f"{self.config.context_length}"
                             + (f" ({self.config.prompt_tokens} of them the soft prompt)"
                                if self.prompt is not None else ""))
        cos, sin = self.rope_cos[start:start + length], self.rope_sin[start:start + length]
        key_mask = attention_mask.bool() if attention_mask is not None else None
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache.layers[i] if cache is not None else None, key_mask)
        x = self.norm(x)
        return x[:, -T:] if prompt else x  # (B, T, C)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for token ids (B, T); with ``targets`` (B, T) also the mean loss.

        ``loss_mask`` (B, T), true where a target counts, restricts the loss (e.g. to the
        response tokens in fine-tuning); targets equal to IGNORE_INDEX never count. With a
        ``cache``, idx holds the tokens after those already in it, at the positions after
        theirs, and the cache takes in their keys and values. ``attention_mask``: see
        :meth:`hidden_states`.
        """
        logits = self.head(self.hidden_states(idx, cache, attention_mask))  # (B, T, V)
        if targets is None:
            return logits, None
        if loss_mask is not None:
            targets = targets.masked_fill(~loss_mask.bool(), IGNORE_INDEX)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, stop_token: int | None = None,
                 generator: torch.Generator | None = None, top_p: float | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to idx (B, T); ``temperature`` 0 means
        greedy, ``top_k`` and ``top_p`` (nucleus) restrict the candidates. Stops early when
        every row has produced ``stop_token``.

        With ``use_cache`` (the default) a KV cache makes each new token one position's
        forward pass, so the cost grows linearly with the length. The model sees at most
        ``context_length`` tokens: a longer prompt is cropped to its last ones, and when the
        window fills up the cache restarts from its last half (without the cache, every
        step sees exactly the last ``context_length`` tokens).
        """
        if not self.config.causal:
            raise ValueError("a masked-LM encoder (causal=False) does not generate text")
        was_training = self.training
        self.eval()
        window = self.max_tokens
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        cache, pending = None, idx  # pending: the tokens the cache has not seen yet
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(idx[:, -window:])[0][:, -1, :]
            else:
                if cache is None or cache.length + pending.size(1) > window:
                    keep = window if cache is None else max(1, window // 2)
                    cache = KVCache(self.config, idx.size(0), idx.device, self.head.weight.dtype)
                    pending = idx[:, -min(keep, window):]
                logits = self(pending, cache=cache)[0][:, -1, :]
            next_id = sample_next(logits.float(), temperature, top_k, top_p, generator)
            idx = torch.cat((idx, next_id), dim=1)
            pending = next_id
            if stop_token is not None:
                done |= next_id.squeeze(1) == stop_token
                if bool(done.all()):
                    break
        self.train(was_training)
        return idx


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row (B, 1) from last-position logits (B, V): the argmax at
    temperature 0, else a draw from the softmax at that temperature, limited to the
    ``top_k`` most likely tokens and to the smallest set whose probability reaches
    ``top_p``."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the ones above it already reach top_p (the first always stays)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
