"""Scoring text with a forgeline model: the three requests of lm-evaluation-harness.

- ``loglikelihood``: the summed log-probability of a continuation after a context, and
  whether greedy decoding would have produced it (multiple-choice questions score each
  choice this way);
- ``loglikelihood_rolling``: the log-likelihood of a whole text, over as many windows of
  the model's context as it needs, every token predicted once;
- ``greedy_until``: greedy generation until a stop string, EOS or a token budget.

Tokenization follows lm-eval's default for causal models: trailing whitespace of the
context moves to the continuation, context and context + continuation are encoded, and
the continuation's tokens are the whole's after the context's. Every sequence starts with
an EOS, which marks the start of a document as in training (``models.generation``). A
sequence longer than the model's window (``model.max_tokens``) keeps its last tokens.

Batches hold sequences of similar length (sorted by length, longest first) padded on the
right, which a causal model never attends to; only the continuation's positions go
through the output head.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    import sentencepiece as spm

    from models.llama import Llama

log = logging.getLogger(__name__)

PAD = 0  # any id: right padding is never attended to by a causal model, nor scored


def encode_pair(sp: spm.SentencePieceProcessor, context: str,
                continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval splits them for causal models."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = sp.encode(context + continuation)
    context_ids = sp.encode(context) if context else []
    return context_ids, whole[len(context_ids):]


def _prepare(model: Llama, device: torch.device | str | None) -> tuple[torch.device, bool]:
    if not model.config.causal:
        raise ValueError("a masked-LM encoder (causal=False) does not assign probabilities to "
                         "continuations; score a causal model")
    where = torch.device(device) if device is not None else next(model.parameters()).device
    return where, model.training


class _Cache:
    """A KV cache sized for one scoring call (``models.llama.KVCache`` holds the whole
    context for every row): the layers' keys and values, as the model reads them."""

    def __init__(self, layers: list):
        self.layers = layers

    @property
    def length(self) -> int:
        return self.layers[0].length


def _new_cache(model: Llama, batch: int, length: int, device: torch.device) -> _Cache:
    from models.llama import LayerCache

    c = model.config
    return _Cache([LayerCache(batch, c.n_kv_heads, length, c.head_dim, device,
                              model.head.weight.dtype) for _ in range(c.n_layers)])


@torch.no_grad()
def score_tokens(model: Llama, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                 device: torch.device | str | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation tokens | everything before), greedy?) per (context ids,
    continuation ids) pair. The context must hold at least one token (the leading EOS);
    when context + continuation is longer than the window, the context's first tokens go.

    Requests that share their context (the choices of one question) read it once: the
    context's keys and values are cached and each continuation runs after them."""
    where, was_training = _prepare(model, device)
    window = model.max_tokens
    rows = []  # (the tokens that fit in the window, number of continuation tokens)
    for i, (context, continuation) in enumerate(pairs):
        if not context:
            raise ValueError(f"request {i}: the context holds no token (it needs at least the "
                             "leading EOS)")
        if len(continuation) > window:
            raise ValueError(f"request {i}: the continuation has {len(continuation)} tokens, "
                             f"more than the model's window of {window}")
        full = [*context, *continuation]
        rows.append((full[-(window + 1):], len(continuation)))
    results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)  # empty continuations
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (full, n) in enumerate(rows):
        if n:
            groups.setdefault(tuple(full[:len(full) - n]), []).append(i)
    single = [members[0] for members in groups.values() if len(members) == 1]
    shared = sorted(((prefix, members) for prefix, members in groups.items()
                     if len(members) > 1), key=lambda g: (-len(g[0]), g[0]))
    model.to(where).eval()
    try:
        _score_padded(model, rows, single, max(1, batch_size), where, results)
        _score_shared(model, rows, shared, max(1, batch_size), where, results)
    finally:
        model.train(was_training)
    return results


def _token_scores(logits: torch.Tensor, targets: list[int], device: torch.device
                  ) -> tuple[list[float], list[bool]]:
    """log p(target) and whether it is the argmax, per row of logits (N, V)."""
    logits = logits.float()
    target = torch.tensor(targets, device=device)
    log_probs = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)
    return log_probs.double().cpu().tolist(), (logits.argmax(dim=-1) == target).cpu().tolist()


def _add(results: list, owners: list[int], log_probs: list[float], hits: list[bool]) -> None:
    """Add each token's log-probability (and greedy hit) to its request's total."""
    for owner, lp, hit in zip(owners, log_probs, hits, strict=True):
        total, greedy = results[owner]
        results[owner] = (total + lp, greedy and bool(hit))


def _score_padded(model: Llama, rows: list, indices: list[int], batch_size: int,
                  where: torch.device, results: list) -> None:
    """Whole sequences, longest first, right-padded; only continuation positions go
    through the output head. Ties are broken by content, so the same requests form the
    same batches in any order."""
    order = sorted(indices, key=lambda i: (-len(rows[i][0]), rows[i][0]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        length = len(rows[batch[0]][0]) - 1
        inputs = torch.full((len(batch), length), PAD, dtype=torch.long)
        row_idx, col_idx, targets, owners = [], [], [], []
        for b, i in enumerate(batch):
            full, n = rows[i]
            inputs[b, :len(full) - 1] = torch.tensor(full[:-1])
            row_idx += [b] * n
            col_idx += range(len(full) - 1 - n, len(full) - 1)
            targets += full[len(full) - n:]
            owners += [i] * n
        hidden = model.hidden_states(inputs.to(where))  # (B, T, C)
        logits = model.head(hidden[torch.tensor(row_idx, device=where),
                                   torch.tensor(col_idx, device=where)])  # (N, V)
        _add(results, owners, *_token_scores(logits, targets, where))


def _score_shared(model: Llama, rows: list, groups: list, batch_size: int,
                  where: torch.device, results: list) -> None:
    """Groups of requests with one context: the contexts (several at once when they are
    equally long) run once into a KV cache, then every continuation after its context."""
    prompt = model.config.prompt_tokens
    batches, current = [], []
    for prefix, members in groups:
        if current and (len(current[0][0]) != len(prefix) or len(current) >= batch_size):
            batches.append(current)
            current = []
        current.append((prefix, members))
    if current:
        batches.append(current)
    for batch in batches:
        length = len(batch[0][0])
        cache = _new_cache(model, len(batch), prompt + length, where)
        hidden = model.hidden_states(torch.tensor([list(p) for p, _ in batch], device=where),
                                     cache=cache)  # (G, L, C)
        last = model.head(hidden[:, -1])  # (G, V): predicts each continuation's first token
        members = [(g, i) for g, (_, ids) in enumerate(batch) for i in ids]
        firsts = [rows[i][0][len(rows[i][0]) - rows[i][1]] for _, i in members]
        _add(results, [i for _, i in members],
             *_token_scores(last[torch.tensor([g for g, _ in members], device=where)],
                            firsts, where))
        longer = [(g, i) for g, i in members if rows[i][1] > 1]
        for start in range(0, len(longer), batch_size):
            chunk = longer[start:start + batch_size]
            steps = max(rows[i][1] for _, i in chunk) - 1
            inputs = torch.full((len(chunk), steps), PAD, dtype=torch.long)
            row_idx, col_idx, targets, owners = [], [], [], []
            for b, (_, i) in enumerate(chunk):
                full, n = rows[i]
                continuation = full[len(full) - n:]
                inputs[b, :n - 1] = torch.tensor(continuation[:-1])
                row_idx += [b] * (n - 1)
                col_idx += range(n - 1)
                targets += continuation[1:]
                owners += [i] * (n - 1)
            rows_of = torch.tensor([g for g, _ in chunk], device=where)
            expanded = _new_cache(model, len(chunk), cache.length + steps, where)
            for mine, theirs in zip(expanded.layers, cache.layers, strict=True):
                mine.append(theirs.k[rows_of, :, :theirs.length],
                            theirs.v[rows_of, :, :theirs.length])
            hidden = model.hidden_states(inputs.to(where), cache=expanded)  # (M, S, C)
            logits = model.head(hidden[torch.tensor(row_idx, device=where),
                                       torch.tensor(col_idx, device=where)])
            _add(results, owners, *_token_scores(logits, targets, where))


def loglikelihood(model: Llama, sp: spm.SentencePieceProcessor,
                  requests: Sequence[tuple[str, str]], batch_size: int = 16,
                  device: torch.device | str | None = None,
                  eos_id: int | None = None) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is the continuation the greedy one) per request:
    lm-eval's ``loglikelihood`` contract. An empty context means "at the start of a
    document"; an empty continuation scores 0."""
    eos = sp.eos_id() if eos_id is None else eos_id
    pairs = []
    for context, continuation in requests:
        context_ids, continuation_ids = encode_pair(sp, context, continuation)
        pairs.append(([eos, *context_ids], continuation_ids))
    return score_tokens(model, pairs, batch_size, device)


def rolling_windows(tokens: list[int], prefix: int,
                    window: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that predict every token once, each with as much
    context as the window allows (lm-eval's rolling windows with one token of context,
    made disjoint): the first is predicted from ``prefix`` on."""
    if not tokens:
        return []
    first = min(window, len(tokens))
    pairs = [([prefix, *tokens[:first - 1]], tokens[:first])]
    pairs[0] = (pairs[0][0][:1], pairs[0][1])  # disjoint: the continuation is its own input
    done = first
    while done < len(tokens):
        size = min(len(tokens) - done, window)
        end = done + size
        context = tokens[max(0, end - window - 1):end - 1]
        pairs.append((context[:len(context) - (size - 1)], tokens[end - size:end]))
        done = end
    return pairs


def loglikelihood_rolling(model: Llama, sp: spm.SentencePieceProcessor, texts: Sequence[str],
                          batch_size: int = 16, device: torch.device | str | None = None,
                          eos_id: int | None = None) -> list[float]:
    """The log-likelihood of each whole text after a document-start EOS, scored over
    windows of the model's context (every token once, each with the longest context the
    window allows)."""
    eos = sp.eos_id() if eos_id is None else eos_id
    pairs, owners = [], []
    for i, text in enumerate(texts):
        windows = rolling_windows(sp.encode(text), eos, model.max_tokens)
        pairs += windows
        owners += [i] * len(windows)
    totals = [0.0] * len(texts)
    for owner, (lp, _) in zip(owners, score_tokens(model, pairs, batch_size, device),
                              strict=True):
        totals[owner] += lp
    return totals


@torch.no_grad()
def greedy_until(model: Llama, sp: spm.SentencePieceProcessor,
                 requests: Sequence[tuple[str, Sequence[str], int]], batch_size: int = 16,
                 device: torch.device | str | None = None,
                 eos_id: int | None = None) -> list[str]:
    """Greedy continuations of (context, stop strings, max new tokens) requests: each stops
    at EOS, at the first stop string (which is cut off, as lm-eval does) or after its
    token budget. The context keeps its last tokens when context + budget exceed the
    window. Requests whose prompts have the same length share a batch (no padding)."""
    from models.llama import KVCache

    where, was_training = _prepare(model, device)
    eos = sp.eos_id() if eos_id is None else eos_id
    window = model.max_tokens
    prompts = []
    for context, _, max_new in requests:
        budget = max(0, min(int(max_new), window - 1))
        ids = [eos, *sp.encode(context)] if context else [eos]
        prompts.append((ids[-(window - budget):], budget))
    out = [""] * len(requests)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (ids, budget) in enumerate(prompts):
        groups.setdefault((len(ids), budget), []).append(i)
    model.to(where).eval()
    dtype = model.head.weight.dtype
    try:
        for (_, budget), members in sorted(groups.items(), reverse=True):
            for start in range(0, len(members), max(1, batch_size)):
                batch = members[start:start + batch_size]
                if budget == 0:
                    continue
                stops = [list(requests[i][1] or []) for i in batch]
                pending = torch.tensor([prompts[i][0] for i in batch], device=where)
                cache = KVCache(model.config, len(batch), where, dtype)
                generated: list[list[int]] = [[] for _ in batch]
                done = [False] * len(batch)
                for _ in range(budget):
                    logits = model(pending, cache=cache)[0][:, -1, :]
                    pending = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
                    for b, token in enumerate(pending[:, 0].tolist()):
                        if done[b]:
                            continue
                        if token == eos:
                            done[b] = True
                            continue
                        generated[b].append(token)
                        if stops[b] and any(s in sp.decode(generated[b]) for s in stops[b]):
                            done[b] = True
                    if all(done):
                        break
                for b, i in enumerate(batch):
                    text = sp.decode(generated[b])
                    for stop in stops[b]:
                        if stop:
                            text = text.split(stop)[0]
                    out[i] = text
    finally:
        model.train(was_training)
    return out
