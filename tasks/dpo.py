"""DPO stage: preference tuning on chosen/rejected pairs, given or derived from the corpus.

Pairs come from a JSON-lines file of ``{"prompt", "chosen", "rejected"}`` records
(``data_path``) or, by default, from the corpus: passages are cut from documents, the
first ``prompt_chars`` characters of a passage are the prompt, the true next
``continuation_chars`` characters the chosen response, and a hard negative the rejected
one. Hard negatives look right but are not, which is also what adversarial fine-tuning
data is:

- ``near_duplicate``: the continuation of the most similar passage of another document
  (exact word-set Jaccard over whole passages), fluent text from the same site that
  does not follow this prompt; candidates whose continuation nearly equals the true one
  are passed over, since neither side would be wrong;
- ``corrupted``: the true continuation with a span of its words shuffled, a span
  replaced by words of another passage, or two of its sentences (lines) swapped.

Both sides of a derived pair are cut to the same number of tokens, so summed
log-likelihoods compare like with like. Pairs are split by a hash of the document id
(documents the tokenize stage held out of pretraining always validate; user pairs by a
hash of the prompt): held-out pairs are never trained on, and their negatives come from
held-out documents too. The stage reports the held-out preference accuracy (the model's
log-likelihood of the chosen response above the rejected one's) before and after, the DPO
reward accuracy and margin, and the language-model loss on val.bin before and after (DPO
must not wreck the model). Its output is a model directory usable by later stages.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.adapters import AdapterSettings
from models.config import Accelerator, Precision, check_devices, check_strategy
from tasks.launch import across_devices, world_size
from tasks.shards import iter_records, write_text_atomic
from tasks.stage import StageInputError
from tasks.tokenize import is_validation, read_val_ids
from tasks.training import (
    ResumeSampler,
    TrainSettings,
    accelerator_field,
    checkpoint_every_field,
    devices_field,
    early_stopping_field,
    finish_model,
    keep_checkpoints_field,
    max_minutes_field,
    num_nodes_field,
    num_threads_field,
    precision_field,
    run_training,
    strategy_field,
)

if TYPE_CHECKING:  # torch and Lightning load when training starts, not with the config
    from models.lightning import MetricsFn
    from models.preference import PreferencePair

log = logging.getLogger(__name__)

STAGE = "dpo"
FIRST_STEPS = 5  # train_loss_first averages this many steps: one step alone is noisy
NEGATIVE_KINDS = ("near_duplicate", "corrupted")
Corruption = Literal["shuffle", "replace_span", "swap_sentences"]
_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"(\s+)")
_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+|\n+")


class DpoConfig(BaseModel):
    """Direct Preference Optimization: where the pairs come from and how long to train."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        False, description="Run preference tuning (DPO) on the fine-tuned model (the last "
                           "generative mode: its output becomes the final model). Off by "
                           "default: on the derived pairs of the default corpus it gains "
                           "little and raises the held-out language-model loss; switch it on "
                           "with your own pairs (data_path), or with sft_weight > 0.")
    data_path: str | None = Field(
        None,
        description="A .jsonl file of {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...} "
                    "records. Empty = derive pairs from the corpus: a passage's true "
                    "continuation is chosen, a hard negative (see negatives) rejected.")
    max_pairs: int = Field(
        600, ge=2, description="Use at most this many pairs (the first ones), train + val.")
    val_fraction: float = Field(
        0.2, gt=0.0, lt=1.0,
        description="Share of pairs held out to measure preference accuracy before and "
                    "after (chosen by a hash of the document id, or of the prompt for "
                    "user pairs; documents held out of pretraining always validate).")
    prompt_chars: int = Field(
        160, ge=10, description="Derived pairs: characters of a passage that form the "
                                "prompt (cut back to a word boundary).")
    continuation_chars: int = Field(
        96, ge=10, description="Derived pairs: characters after the prompt that form the "
                               "true continuation, the chosen response (cut back to a word "
                               "boundary).")
    passages_per_document: int = Field(
        2, ge=1, description="Derived pairs: non-overlapping passages taken per document, "
                             "spread over its length.")
    negatives: Literal["near_duplicate", "corrupted", "both"] = Field(
        "both",
        description="Derived pairs: the hard negative that is rejected. 'near_duplicate': "
                    "the continuation of the most similar passage of another document "
                    "(plausible but wrong); 'corrupted': the true continuation corrupted "
                    "as in corruptions; 'both': one pair of each kind per passage.")
    corruptions: list[Corruption] = Field(
        default_factory=lambda: ["shuffle", "replace_span", "swap_sentences"], min_length=1,
        description="Corrupted negatives: the edits to pick from at random (shuffle a span "
                    "of words, replace a span by words of another passage, swap two "
                    "sentences or lines).")
    corrupt_fraction: float = Field(
        0.25, gt=0.0, le=1.0,
        description="Corrupted negatives: share of the continuation's words a shuffled or "
                    "replaced span covers.")
    max_continuation_overlap: float = Field(
        0.6, ge=0.0, le=1.0,
        description="Near-duplicate negatives: skip a candidate whose continuation shares "
                    "more than this word-set Jaccard with the true one (a near copy is no "
                    "negative).")
    beta: float = Field(
        0.1, gt=0.0,
        description="DPO's beta: how far the policy may move from the reference model "
                    "(larger = stays closer); rewards are beta * (log pi - log ref).")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5,
        description="Conservative DPO (cDPO): the assumed share of wrongly labelled pairs; "
                    "0 = plain DPO.")
    sft_weight: float = Field(
        0.0, ge=0.0,
        description="Add this many times the chosen responses' mean token NLL to the DPO "
                    "loss (RPO): keeps the chosen text likely, which plain DPO lets fall; "
                    "0 = plain DPO.")
    learning_rate: float = Field(
        3e-4, gt=0.0,
        description="Peak AdamW learning rate (full tuning; LoRA wants several times more, "
                    "prompt tuning far more).")
    min_lr_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="Final learning rate as a fraction of the peak.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay on matrices.")
    warmup_steps: int = Field(5, ge=0, description="Optimizer steps of linear warmup.")
    max_steps: int = Field(40, ge=1, description="Optimizer steps of preference tuning.")
    batch_size: int = Field(
        16, ge=1, description="Pairs per optimizer step (per device); each pair is two "
                              "sequences.")
    grad_clip: float = Field(1.0, ge=0.0, description="Gradient-norm clip; 0 = none.")
    val_every_steps: int = Field(
        20, ge=1, description="Measure the held-out DPO loss every this many steps.")
    log_every_steps: int = Field(
        5, ge=1, description="Report train loss and learning rate every N steps.")
    general_val_windows: int = Field(
        16, ge=0,
        description="Windows of the tokenize stage's val.bin on which the language-model "
                    "loss is measured before and after (does DPO hurt the model?); 0 = skip.")
    sample_pairs: int = Field(
        20, ge=0, description="Training pairs written to pairs_sample.jsonl for inspection.")
    adapter: AdapterSettings = Field(
        default_factory=AdapterSettings,
        description="Which weights DPO changes: all (full), LoRA adapters or a soft prompt; "
                    "the reference is always the input model.")
    checkpoint_every_steps: int = checkpoint_every_field(50)
    keep_checkpoints: int = keep_checkpoints_field()
    early_stopping_patience: int = early_stopping_field()
    max_minutes: float = max_minutes_field()
    precision: Precision = precision_field()
    accelerator: Accelerator = accelerator_field()
    devices: str | int = devices_field()
    strategy: str = strategy_field()
    num_nodes: int = num_nodes_field()
    seed: int = Field(0, description="Seed for the negatives, the order of pairs and dropout.")
    num_threads: int = num_threads_field()

    _strategy = field_validator("strategy")(check_strategy)
    _devices = field_validator("devices")(check_devices)


# --- pairs from a file ---------------------------------------------------------------

def file_pairs(path: Path, max_pairs: int) -> list[PreferencePair]:
    """Pairs from a JSON-lines file; a bad line is reported as file:line."""
    from models.preference import PreferencePair

    if not path.is_file():
        raise StageInputError(STAGE, f"dpo.data_path {path} does not exist or is not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise StageInputError(STAGE, f"cannot read dpo.data_path {path}: {exc}") from exc
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StageInputError(STAGE, f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not all(
                isinstance(record.get(k), str) and record[k].strip() for k in ("chosen",
                                                                                "rejected")):
            raise StageInputError(STAGE, f"{path}:{number}: expected an object with string "
                                         "fields \"prompt\", \"chosen\" and \"rejected\" (the "
                                         "last two non-empty)")
        if record["chosen"] == record["rejected"]:
            raise StageInputError(STAGE, f"{path}:{number}: \"chosen\" and \"rejected\" are the "
                                         "same text, so nothing is preferred")
        pairs.append(PreferencePair(record["prompt"], record["chosen"], record["rejected"],
                                    source=f"{path.name}:{number}", negative="given"))
        if len(pairs) >= max_pairs:
            break
    return pairs


def split_file_pairs(pairs: list[PreferencePair], val_fraction: float
                     ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split by a hash of the prompt, so pairs sharing a prompt stay on one side; at least
    one pair lands on each side."""
    if len(pairs) < 2:
        raise StageInputError(STAGE, f"{len(pairs)} preference pair(s) found; at least 2 are "
                                     "needed (one to train, one to validate)")
    train, val = [], []
    for pair in pairs:
        (val if is_validation(pair.prompt, val_fraction) else train).append(pair)
    if not val:
        val.append(train.pop())
    if not train:
        train.append(val.pop())
    return train, val


# --- pairs derived from the corpus ---------------------------------------------------

def word_end(text: str, start: int, max_chars: int) -> int:
    """Where a piece of at most ``max_chars`` characters from ``start`` ends: before the
    whitespace that ends its last whole word (the whole budget when no word boundary
    lies in its second half)."""
    end = min(start + max_chars, len(text))
    if end == len(text) or text[end].isspace():
        return end
    space = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
    return space if space > start + max_chars // 2 else end


def passages(text: str, prompt_chars: int, continuation_chars: int, count: int
             ) -> list[tuple[str, str]]:
    """Up to ``count`` non-overlapping (prompt, continuation) passages spread evenly over
    ``text``, each starting at a word and cut at word ends; the continuation keeps the
    whitespace that separates it from the prompt."""
    span = prompt_chars + continuation_chars
    if len(text) < span:
        return []
    count = min(count, len(text) // span)
    found = []
    for j in range(count):
        start = int(min(max((j + 0.5) * len(text) / count - span / 2, 0), len(text) - span))
        if start and not text[start - 1].isspace():  # move to the start of the next word
            space = _SPACE.search(text, start, start + span // 4)
            if space:
                start = space.end()
        middle = word_end(text, start, prompt_chars)
        prompt = text[start:middle]
        continuation = text[middle:word_end(text, middle, continuation_chars)]
        if prompt.strip() and continuation.strip():
            found.append((prompt, continuation))
    return found


def word_set(text: str) -> frozenset[str]:
    return frozenset(word.lower() for word in _WORD.findall(text))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def similar_candidates(sets: list[frozenset[str]], groups: list[str], top: int = 10
                       ) -> list[list[int]]:
    """For each set, the indices of the ``top`` most similar sets (exact Jaccard) of
    another group, most similar first."""
    import numpy as np
    from scipy import sparse

    n = len(sets)
    vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, words in enumerate(sets):
        for word in words:
            rows.append(i)
            cols.append(vocab.setdefault(word, len(vocab)))
    if not n:
        return []
    matrix = sparse.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)),
                               shape=(n, max(1, len(vocab))))
    sizes = np.asarray(matrix.sum(axis=1)).ravel()
    group_ids = np.unique(np.asarray(groups), return_inverse=True)[1]
    out: list[list[int]] = []
    for begin in range(0, n, 512):  # a block of rows at a time: memory stays O(512 n)
        inter = (matrix[begin:begin + 512] @ matrix.T).toarray()
        union = sizes[begin:begin + 512, None] + sizes[None, :] - inter
        similarity = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        similarity[group_ids[begin:begin + 512, None] == group_ids[None, :]] = -1.0
        for row in similarity:
            order = np.argsort(-row, kind="stable")[:top]
            out.append([int(j) for j in order if row[j] >= 0])
    return out


def _words(text: str) -> tuple[list[str], list[int]]:
    """The pieces of ``text`` split at whitespace (separators kept) and the indices of
    the words among them."""
    parts = _SPACE.split(text)
    return parts, [i for i, part in enumerate(parts) if part and not part.isspace()]


def _span(count: int, fraction: float, rng: random.Random) -> tuple[int, int]:
    length = max(2, min(count, round(count * fraction)))
    start = rng.randrange(0, count - length + 1)
    return start, start + length


def corrupt(text: str, kind: str, rng: random.Random, fraction: float,
            donor: str = "") -> str:
    """``text`` with one edit: ``shuffle`` a span of words, ``replace_span`` a span by the
    words of ``donor`` (another passage), or ``swap_sentences`` (two sentences or lines).
    Whitespace stays where it was. May return ``text`` unchanged when it is too short."""
    parts, words = _words(text)
    if kind == "swap_sentences":
        pieces = re.split(f"({_SENTENCE_END.pattern})", text)  # separators kept
        sentences = [i for i, p in enumerate(pieces) if p.strip()]
        if len(sentences) >= 2:
            a, b = rng.sample(sentences, 2)
            pieces[a], pieces[b] = pieces[b], pieces[a]
            return "".join(pieces)
        kind = "shuffle"  # one sentence only: fall back to a shuffle
    if len(words) < 2:
        return text
    start, end = _span(len(words), fraction, rng)
    span = [parts[i] for i in words[start:end]]
    if kind == "replace_span":
        donor_words = _WORD.findall(donor) or []
        if len(donor_words) >= len(span):
            offset = rng.randrange(0, len(donor_words) - len(span) + 1)
            replacement = donor_words[offset:offset + len(span)]
            if replacement != span:
                for i, word in zip(words[start:end], replacement, strict=True):
                    parts[i] = word
                return "".join(parts)
        kind = "shuffle"  # no usable donor
    shuffled = span[:]
    for _ in range(5):  # a shuffle that leaves the span as it was is no corruption
        rng.shuffle(shuffled)
        if shuffled != span:
            break
    for i, word in zip(words[start:end], shuffled, strict=True):
        parts[i] = word
    return "".join(parts)


def negatives_for(group: list[tuple[str, str, str]], config: DpoConfig, rng: random.Random
                  ) -> tuple[list[PreferencePair], int]:
    """Pairs for (doc id, prompt, continuation) passages of one split, with negatives
    drawn from that split only; and how many passages got no negative of a kind."""
    from models.preference import PreferencePair

    kinds = NEGATIVE_KINDS if config.negatives == "both" else (config.negatives,)
    continuations = [word_set(c) for _, _, c in group]
    candidates = similar_candidates([word_set(p + c) for _, p, c in group],
                                    [doc for doc, _, _ in group]) \
        if "near_duplicate" in kinds else []
    pairs, missing = [], 0
    for i, (doc, prompt, continuation) in enumerate(group):
        for kind in kinds:
            rejected = None
            if kind == "near_duplicate":
                for j in candidates[i]:
                    other = group[j][2]
                    if other.strip() != continuation.strip() and jaccard(
                            continuations[i], continuations[j]) <= config.max_continuation_overlap:
                        rejected = other
                        break
            else:
                others = [k for k in range(len(group)) if group[k][0] != doc]
                donor = group[rng.choice(others)][2] if others else ""
                rejected = corrupt(continuation, rng.choice(config.corruptions), rng,
                                   config.corrupt_fraction, donor)
                if rejected == continuation:
                    rejected = None
            if rejected is None:
                missing += 1
                continue
            pairs.append(PreferencePair(prompt, continuation, rejected, source=doc,
                                        negative=kind))
    return pairs, missing


def corpus_pairs(config: DpoConfig, corpus_dir: Path, held_out: set[str]
                 ) -> tuple[list[PreferencePair], list[PreferencePair], dict]:
    """(train pairs, val pairs, counts) derived from the corpus; the split is by document,
    so no passage of a held-out document is trained on, as chosen or as rejected."""
    per_passage = 2 if config.negatives == "both" else 1
    limit = math.ceil(config.max_pairs / per_passage)
    found: list[tuple[str, str, str]] = []
    documents = 0
    for record in iter_records(corpus_dir, columns=["id", "text"]):
        text = record.get("text") or ""
        cut = passages(text, config.prompt_chars, config.continuation_chars,
                       config.passages_per_document)
        if cut:
            documents += 1
        found += [(str(record["id"]), p, c) for p, c in cut][:limit - len(found)]
        if len(found) >= limit:
            break
    doc_ids = list(dict.fromkeys(doc for doc, _, _ in found))
    if len(doc_ids) < 2:
        raise StageInputError(STAGE, f"{len(doc_ids)} document(s) in {corpus_dir} are long "
                                     f"enough for a passage of dpo.prompt_chars + "
                                     f"dpo.continuation_chars = "
                                     f"{config.prompt_chars + config.continuation_chars} "
                                     "characters; at least 2 are needed: shorten them or "
                                     "provide dpo.data_path")
    val_docs = {d for d in doc_ids if d in held_out or is_validation(d, config.val_fraction)}
    if not val_docs:
        val_docs.add(doc_ids[-1])
    if len(val_docs) == len(doc_ids):
        movable = [d for d in doc_ids if d not in held_out]
        if not movable:
            raise StageInputError(STAGE, "every usable document is held out of pretraining; "
                                         "provide more documents or dpo.data_path")
        val_docs.discard(movable[-1])
    rng = random.Random(config.seed)
    train, missing_train = negatives_for([p for p in found if p[0] not in val_docs], config, rng)
    val, missing_val = negatives_for([p for p in found if p[0] in val_docs], config, rng)
    counts = {"documents": documents, "passages": len(found),
              "val_documents": len(val_docs), "no_negative": missing_train + missing_val}
    return train, val, counts


def write_sample(path: Path, pairs: list[PreferencePair], count: int) -> None:
    """The first ``count`` pairs, alternating negative kinds, as JSON lines."""
    by_kind: dict[str, list[PreferencePair]] = {}
    for pair in pairs:
        by_kind.setdefault(pair.negative, []).append(pair)
    mixed = [p for group in zip(*by_kind.values(), strict=False) for p in group]
    mixed += [p for p in pairs if p not in mixed]
    lines = [json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                         "negative": p.negative, "source": p.source}, ensure_ascii=False)
             for p in mixed[:count]]
    write_text_atomic(path, "\n".join(lines) + ("\n" if lines else ""))


# --- the stage -----------------------------------------------------------------------

def _accuracy_by_kind(pairs: list[PreferencePair], scores, prefix: str) -> dict[str, float]:
    """Preference accuracy per negative kind, when there is more than one kind."""
    kinds = sorted({p.negative for p in pairs})
    if len(kinds) < 2:
        return {}
    out = {}
    for kind in kinds:
        rows = [i for i, p in enumerate(pairs) if p.negative == kind]
        out[f"{prefix}_{kind}"] = round(float((scores[rows, 0] > scores[rows, 1])
                                              .float().mean()), 5)
    return out


@across_devices
def dpo(config: DpoConfig, tokenized_dir: Path, model_dir: Path, corpus_dir: Path,
        out_dir: Path, on_metrics: MetricsFn | None = None) -> dict:
    """Tune the model in ``model_dir`` with DPO; returns held-out preference accuracy
    before and after, reward accuracy and margin, and the losses."""
    import lightning as L
    import sentencepiece as spm
    import torch
    from torch.utils.data import DataLoader, Subset

    from models import adapters
    from models.checkpoint import load_model
    from models.data import StridedWindows, read_meta
    from models.evaluation import evaluate_loss, pick_device
    from models.lightning import resolve_precision, set_threads
    from models.preference import (
        DirectPreference,
        PreferenceDataset,
        pair_logprobs,
        preference_metrics,
        reference_logprobs,
        response_tokens,
    )
    from tasks.finetune import pair_order

    tokenized_dir, model_dir, out_dir = Path(tokenized_dir), Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = read_meta(tokenized_dir)
    derived = not config.data_path
    if derived:  # documents held out of pretraining stay held out
        train_pairs, val_pairs, counts = corpus_pairs(config, Path(corpus_dir),
                                                      read_val_ids(tokenized_dir))
        log.info("dpo: %d passages from %d documents (%d held out) -> %d train / %d val pairs "
                 "(negatives: %s; %d not found)", counts["passages"],
                 counts["documents"], counts["val_documents"], len(train_pairs),
                 len(val_pairs), config.negatives, counts["no_negative"])
    else:
        pairs = file_pairs(Path(config.data_path), config.max_pairs)
        train_pairs, val_pairs = split_file_pairs(pairs, config.val_fraction)
        log.info("dpo: %d pairs from %s -> %d train / %d val", len(pairs), config.data_path,
                 len(train_pairs), len(val_pairs))

    L.seed_everything(config.seed, workers=True, verbose=False)
    set_threads(config.num_threads)
    device = pick_device(config.accelerator)
    reference = load_model(model_dir / "model.pt", device)
    if not reference.config.causal:
        raise StageInputError(STAGE, f"{model_dir} holds a masked-LM encoder; DPO needs a "
                                     "causal decoder")
    room = reference.max_tokens - (config.adapter.prompt_tokens
                                   if config.adapter.method == "prompt_tuning" else 0)
    sp = spm.SentencePieceProcessor(model_file=str(tokenized_dir / "tokenizer.model"))
    encode = {"max_len": room + 1, "eos_id": meta["eos_id"], "pad_id": meta["pad_id"],
              "end_with_eos": not derived, "equal_length": derived}
    train_data = PreferenceDataset(train_pairs, sp, **encode)
    val_data = PreferenceDataset(val_pairs, sp, **encode)
    if len(train_data) == 0 or len(val_data) == 0:
        raise StageInputError(STAGE, f"{len(train_data)} train / {len(val_data)} val pairs are "
                                     "usable (a pair needs two different, non-empty "
                                     "responses); provide more documents or pairs, or raise "
                                     "dpo.max_pairs or dpo.val_fraction")
    write_sample(out_dir / "pairs_sample.jsonl", train_data.pairs, config.sample_pairs)

    # the reference model's log-probs of every pair, once: it never changes
    reference_logprobs(reference, train_data, config.batch_size, device)
    reference_logprobs(reference, val_data, config.batch_size, device)
    general = None
    if config.general_val_windows:
        # windows the tuned model can take too (a soft prompt takes positions)
        general = StridedWindows(tokenized_dir / "val.bin", meta["dtype"], room,
                                 config.general_val_windows)
    general_before = evaluate_loss(reference, general, config.batch_size, device)[0] \
        if general is not None and len(general) else None
    tokens = response_tokens(val_data)
    scoring = {"beta": config.beta, "label_smoothing": config.label_smoothing,
               "sft_weight": config.sft_weight, "tokens": tokens}
    chosen_before = float(val_data.reference[:, 0].sum() / tokens[:, 0].sum())

    policy = adapters.prepare_model(reference.train(), config.adapter, config.seed)
    trainable = adapters.trainable_summary(policy)
    module = DirectPreference(policy, config.learning_rate, config.weight_decay,
                              config.warmup_steps, config.max_steps, config.min_lr_ratio,
                              config.beta, config.label_smoothing, config.sft_weight)
    # untrained, full and LoRA tuning give the reference's outputs (LoRA's B starts at
    # zero); a fresh soft prompt does not
    start = pair_logprobs(policy, val_data, config.batch_size, device) \
        if config.adapter.method == "prompt_tuning" else val_data.reference
    before = preference_metrics(start, val_data.reference, **scoring)
    log.info("dpo: %d train / %d val pairs (%d skipped), %s tuning of %d of %d parameters; "
             "held-out preference accuracy before %.3f", len(train_data), len(val_data),
             train_data.skipped + val_data.skipped, config.adapter.method,
             trainable["trainable_params"], trainable["total_params"],
             float((val_data.reference[:, 0] > val_data.reference[:, 1]).float().mean()))

    precision = resolve_precision(config.precision, config.accelerator)
    resolved = {"model": reference.config.to_dict(), "dpo": config.model_dump(mode="json"),
                "tuned_from": str(model_dir.resolve()),
                "pairs_train": len(train_data), "pairs_val": len(val_data)}
    order = pair_order(len(train_data), config.max_steps * config.batch_size
                       * world_size(config), config.seed)
    ordered = Subset(train_data, order)

    def train_loader(samples_seen: int) -> DataLoader:
        return DataLoader(ordered, batch_size=config.batch_size, collate_fn=train_data.collate,
                          sampler=ResumeSampler(samples_seen, len(ordered)),
                          generator=torch.Generator().manual_seed(config.seed))

    val_loader = DataLoader(val_data, batch_size=config.batch_size, collate_fn=val_data.collate)
    settings = TrainSettings.of(config, STAGE, precision)
    settings.flops_per_token = reference.config.flops_per_token()
    outcome = run_training(settings, module, train_loader, val_loader, out_dir, resolved,
                           on_metrics, files={"tokenizer.model": tokenized_dir / "tokenizer.model"})
    if not outcome.is_global_zero:  # rank zero evaluates, writes and reports
        return {}
    trainer, callback, seconds = outcome.trainer, outcome.callback, outcome.seconds
    tuned = adapters.finish_model(module.model, config.adapter, out_dir).to(device)
    after = pair_logprobs(tuned, val_data, config.batch_size, device)
    held_out = preference_metrics(after, val_data.reference, **scoring)
    general_after = evaluate_loss(tuned, general, config.batch_size, device)[0] \
        if general_before is not None else None
    chosen_after = float(after[:, 0].sum() / tokens[:, 0].sum())

    first, final = outcome.first_and_final_loss(FIRST_STEPS)
    log.info("dpo: %d steps in %.0fs; held-out preference accuracy %.3f -> %.3f, reward "
             "accuracy %.3f, margin %.3f, DPO loss %.3f -> %.3f", trainer.global_step, seconds,
             held_out["preference_accuracy_before"], held_out["preference_accuracy"],
             held_out["reward_accuracy"], held_out["reward_margin"], before["loss"],
             held_out["loss"])

    stats = {"dpo_pairs_train": len(train_data), "dpo_pairs_val": len(val_data),
             "dpo_pairs_skipped": train_data.skipped + val_data.skipped,
             "dpo_preference_accuracy_before": round(held_out["preference_accuracy_before"], 5),
             "dpo_preference_accuracy": round(held_out["preference_accuracy"], 5),
             "dpo_reward_accuracy": round(held_out["reward_accuracy"], 5),
             "dpo_reward_margin": round(held_out["reward_margin"], 5),
             "dpo_val_loss_before": round(before["loss"], 5),
             "dpo_val_loss_after": round(held_out["loss"], 5),
             "dpo_train_loss_first": round(first, 5), "dpo_train_loss_final": round(final, 5),
             "dpo_chosen_logprob_before": round(chosen_before, 5),
             "dpo_chosen_logprob_after": round(chosen_after, 5),
             "trainable_params": trainable["trainable_params"],
             "trainable_share": round(trainable["trainable_share"], 6),
             "seconds": round(seconds, 2)}
    stats |= _accuracy_by_kind(val_data.pairs, val_data.reference,
                               "dpo_preference_accuracy_before")
    stats |= _accuracy_by_kind(val_data.pairs, after, "dpo_preference_accuracy")
    if general_before is not None:
        stats["dpo_general_val_loss_before"] = round(general_before, 5)
        stats["dpo_general_val_loss_after"] = round(general_after, 5)
    if on_metrics is not None:  # the held-out results, as the run's last point
        on_metrics({k: v for k, v in stats.items() if k.startswith("dpo_")},
                   trainer.global_step)

    val_points = [p for p in callback.val_history if p[0] != trainer.global_step]
    finish_model(outcome, tuned, out_dir, resolved,
                 [(0, before["objective"]), *val_points,
                  (trainer.global_step, held_out["objective"])],
                 "DPO (-log sigmoid of the reward margin"
                 + (f" + {config.sft_weight:g} x chosen NLL)" if config.sft_weight else ")"),
                 extra={"dpo_beta": config.beta})
    artifacts = {"model": "model.pt", "config": "config.json",
                 "tokenizer_model": "tokenizer.model", "loss_curve": "loss_curve.png",
                 "pairs_sample": "pairs_sample.jsonl"}
    if config.adapter.method != "full":
        artifacts["adapter"] = adapters.ADAPTER_DIR
    return {"count": trainer.global_step, "unit": "steps", "stats": stats,
            "artifacts": artifacts, "method": config.adapter.method,
            "pairs_source": config.data_path or "derived from the corpus",
            "negatives": config.negatives if derived else "given",
            "resumed_from_step": outcome.resumed_from}
