"""Learning from preferences: Direct Preference Optimization (Rafailov et al., 2023).

A preference pair is a prompt with a chosen and a rejected response. DPO trains the policy
(the model being tuned) to raise the log-likelihood of the chosen response relative to a
frozen reference model more than that of the rejected one, with no reward model and no
sampling:

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

where ``pi_*`` and ``ref_*`` are the summed log-probabilities of the response tokens under
the policy and the reference. ``label_smoothing`` eps gives conservative DPO (cDPO), which
assumes a share eps of the labels is flipped. The implicit reward of a response is
``beta * (pi - ref)``.

DPO alone only widens the gap between the two sides: both likelihoods usually fall, the
chosen one less (likelihood displacement), which can hurt the model as a language model.
``sft_weight`` adds that many times the chosen response's mean token negative
log-likelihood to the loss (RPO, Pang et al. 2024; Llama 3 does the same), which keeps the
chosen responses likely.

The reference is the model before tuning; its log-probabilities of every pair do not change
during training, so they are computed once (:func:`reference_logprobs`) and travel with the
data: no second model in memory, in the optimizer or in the checkpoints.

Batches are ``(ids, mask, ref)``: ``ids`` (B, 2, L) token ids of ``[EOS] prompt response``
for the chosen (index 0) and the rejected (index 1) side, right-padded; ``mask`` (B, 2, L)
true at the response tokens; ``ref`` (B, 2) the reference's summed log-probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sentencepiece as spm
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from models.lightning import CausalLM


@dataclass
class PreferencePair:
    """A prompt with a preferred (chosen) and a dispreferred (rejected) response."""

    prompt: str
    chosen: str
    rejected: str
    source: str = ""  # where it comes from: a document id or file:line
    negative: str = "given"  # how the rejected side was made: given, near_duplicate, corrupted


def sequence_logprobs(model: Callable, ids: torch.Tensor, loss_mask: torch.Tensor
                      ) -> torch.Tensor:
    """Summed log-probability of the masked tokens of each row: (N,) for ids (N, L).

    ``loss_mask`` (N, L) is true at the tokens to score (the response); token ``t`` is
    scored by the model's prediction from the tokens before it, so position 0 never
    counts. ``model`` is a Llama (or anything called like one, e.g. a peft wrapper)."""
    logits = model(ids[:, :-1])[0]  # (N, L-1, V)
    targets = ids[:, 1:]
    token_logps = -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                   reduction="none").view_as(targets)  # (N, L-1)
    return (token_logps * loss_mask[:, 1:].to(token_logps.dtype)).sum(dim=-1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss (B,) and implicit reward margin (B,) from the summed log-probs
    (B, 2) of the chosen (column 0) and rejected (column 1) responses under the policy
    and the reference."""
    rewards = beta * (policy - reference)  # (B, 2) implicit rewards
    margin = rewards[:, 0] - rewards[:, 1]
    loss = -(1.0 - label_smoothing) * F.logsigmoid(margin) \
        - label_smoothing * F.logsigmoid(-margin)
    return loss, margin


class DirectPreference(CausalLM):
    """DPO on ``(ids, mask, ref)`` batches; the optimizer and schedule are CausalLM's.

    ``self.model`` is the policy; the reference enters only through the precomputed
    ``ref`` log-probabilities of each batch. Logs ``train_loss`` / ``val_loss`` (the DPO
    loss, plus the SFT term when ``sft_weight`` is set) and the reward accuracy (share of pairs whose chosen response gets the higher
    implicit reward) and margin."""

    def __init__(self, model: torch.nn.Module, learning_rate: float, weight_decay: float,
                 warmup_steps: int, max_steps: int, min_lr_ratio: float, beta: float = 0.1,
                 label_smoothing: float = 0.0, sft_weight: float = 0.0):
        super().__init__(model, learning_rate, weight_decay, warmup_steps, max_steps,
                         min_lr_ratio)
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if sft_weight < 0:
            raise ValueError(f"sft_weight must be at least 0, got {sft_weight}")
        self.beta, self.label_smoothing, self.sft_weight = beta, label_smoothing, sft_weight

    def policy_logprobs(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 2) summed response log-probs of both sides, in one forward pass."""
        B, _, L = ids.shape
        return sequence_logprobs(self.forward_fn, ids.view(2 * B, L),
                                 mask.view(2 * B, L)).view(B, 2)

    def preference_terms(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's loss (mean DPO loss, plus ``sft_weight`` x the chosen responses'
        mean token NLL) and the per-pair reward margins (B,)."""
        ids, mask, reference = batch
        policy = self.policy_logprobs(ids, mask)
        loss, margin = dpo_loss(policy, reference.float(), self.beta, self.label_smoothing)
        loss = loss.mean()
        if self.sft_weight:
            tokens = mask[:, 0, 1:].sum(dim=-1).clamp(min=1)
            loss = loss - self.sft_weight * (policy[:, 0] / tokens).mean()
        return loss, margin

    def compute_loss(self, batch) -> torch.Tensor:
        return self.preference_terms(batch)[0]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, margin = self.preference_terms(batch)
        self.last_loss = loss.detach()
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_reward_accuracy", (margin > 0).float().mean())
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, margin = self.preference_terms(batch)
        size = margin.numel()
        self.log("val_loss", loss, prog_bar=True, on_epoch=True, sync_dist=True,
                 batch_size=size)
        self.log("val_reward_accuracy", (margin > 0).float().mean(), on_epoch=True,
                 sync_dist=True, batch_size=size)
        self.log("val_reward_margin", margin.mean(), on_epoch=True, sync_dist=True,
                 batch_size=size)


def _fit(prompt: list[int], chosen: list[int], rejected: list[int], max_len: int
         ) -> tuple[list[int], list[int], list[int]]:
    """Cut a pair to at most ``max_len`` tokens per side: responses to at most half of it,
    the prompt to what is left, keeping its end (the words right before the response)."""
    room = max(1, max_len // 2)
    chosen, rejected = chosen[:room], rejected[:room]
    keep = max_len - max(len(chosen), len(rejected))
    if len(prompt) > keep:
        prompt = prompt[len(prompt) - keep:]
    return prompt, chosen, rejected


def encode_preference(sp: spm.SentencePieceProcessor, pair: PreferencePair, max_len: int,
                      eos_id: int, end_with_eos: bool = True, equal_length: bool = False
                      ) -> tuple[list[int], list[int], list[int]] | None:
    """Token ids (prompt, chosen, rejected) of a pair, each side ``[EOS] prompt response``
    at most ``max_len`` tokens long. ``end_with_eos`` ends each response with EOS (a
    complete answer); ``equal_length`` cuts both responses to the shorter one's length,
    so that summed log-likelihoods compare like with like. None when a response is empty
    or both sides are the same tokens."""
    prompt = [eos_id] + sp.encode(pair.prompt)
    tail = [eos_id] if end_with_eos else []
    chosen, rejected = sp.encode(pair.chosen) + tail, sp.encode(pair.rejected) + tail
    if equal_length:
        shorter = min(len(chosen), len(rejected))
        chosen, rejected = chosen[:shorter], rejected[:shorter]
    prompt, chosen, rejected = _fit(prompt, chosen, rejected, max_len)
    if not chosen or not rejected or chosen == rejected:
        return None
    return prompt, chosen, rejected


class PreferenceDataset(Dataset):
    """Encoded preference pairs; ``reference`` (N, 2) holds the reference model's summed
    response log-probs once :func:`reference_logprobs` has filled it."""

    def __init__(self, pairs: list[PreferencePair], sp: spm.SentencePieceProcessor,
                 max_len: int, eos_id: int, pad_id: int, end_with_eos: bool = True,
                 equal_length: bool = False):
        self.pad_id = pad_id
        self.pairs: list[PreferencePair] = []
        self.rows: list[tuple[list[int], list[int], list[int]]] = []
        self.skipped = 0
        for pair in pairs:
            encoded = encode_preference(sp, pair, max_len, eos_id, end_with_eos, equal_length)
            if encoded is None:
                self.skipped += 1
                continue
            self.pairs.append(pair)
            self.rows.append(encoded)
        self.reference = torch.zeros(len(self.rows), 2)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[list[int], list[int], list[int], torch.Tensor]:
        return (*self.rows[i], self.reference[i])

    def collate(self, rows: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (B, 2, L), mask (B, 2, L), ref (B, 2)), padded to the batch's longest side."""
        length = max(len(p) + max(len(c), len(r)) for p, c, r, _ in rows)
        ids = torch.full((len(rows), 2, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), 2, length), dtype=torch.bool)
        for i, (prompt, chosen, rejected, _) in enumerate(rows):
            for side, response in enumerate((chosen, rejected)):
                sequence = prompt + response
                ids[i, side, :len(sequence)] = torch.tensor(sequence)
                mask[i, side, len(prompt):len(sequence)] = True
        return ids, mask, torch.stack([ref for *_, ref in rows])


@torch.no_grad()
def pair_logprobs(model: Callable, data: PreferenceDataset, batch_size: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, 2) summed chosen/rejected response log-probs of every pair under ``model``
    (in eval mode; its training mode is restored), on the CPU. Pairs of similar length
    are batched together, so little is spent on padding."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.rows[i][0])
                   + max(len(data.rows[i][1]), len(data.rows[i][2])))
    out = torch.zeros(len(data), 2)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask, _ = data.collate([data[i] for i in chunk])
        B, _, L = ids.shape
        ids, mask = ids.to(device), mask.to(device)
        out[chunk] = sequence_logprobs(model, ids.view(2 * B, L), mask.view(2 * B, L)) \
            .view(B, 2).float().cpu()
    if hasattr(model, "train"):
        model.train(was_training)
    return out


def reference_logprobs(model: Callable, data: PreferenceDataset, batch_size: int,
                       device: torch.device | str = "cpu") -> None:
    """Fill ``data.reference`` with ``model``'s log-probs: call with the model before tuning."""
    data.reference = pair_logprobs(model, data, batch_size, device)


def preference_metrics(policy: torch.Tensor, reference: torch.Tensor, beta: float,
                       label_smoothing: float = 0.0, sft_weight: float = 0.0,
                       tokens: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out numbers from (N, 2) summed log-probs of the tuned and the reference model:
    preference accuracy (the policy's chosen log-likelihood above the rejected one's), the
    same for the reference, reward accuracy and mean margin, the DPO loss, and the
    objective :class:`DirectPreference` trains (the DPO loss plus ``sft_weight`` x the
    chosen side's mean token NLL, for which ``tokens`` (N, 2) counts response tokens)."""
    loss, margin = dpo_loss(policy, reference, beta, label_smoothing)
    objective = loss.mean().item()
    if sft_weight:
        if tokens is None:
            raise ValueError("an sft_weight needs the response token counts")
        objective -= sft_weight * (policy[:, 0] / tokens[:, 0].clamp(min=1)).mean().item()
    return {"preference_accuracy": (policy[:, 0] > policy[:, 1]).float().mean().item(),
            "preference_accuracy_before": (reference[:, 0] > reference[:, 1]).float().mean()
            .item(),
            "reward_accuracy": (margin > 0).float().mean().item(),
            "reward_margin": margin.mean().item(),
            "loss": loss.mean().item(), "objective": objective}


def response_tokens(data: PreferenceDataset) -> torch.Tensor:
    """(N, 2) number of response tokens of each side, for per-token averages."""
    return torch.tensor([[len(c), len(r)] for _, c, r in data.rows], dtype=torch.float)

