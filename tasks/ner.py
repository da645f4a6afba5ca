"""NER stage: token classification (BIO tags) with a head on the pretrained model.

The examples are the user's words and BIO tags (``data_path`` or ``dataset``) or derived
from the corpus (``tasks.labelled``: the functions and classes a page documents, tagged
where they occur). Each word is encoded on its own, after a space (as in the words joined
by spaces); its tag sits on its first sub-token
(the others are not scored), except with a causal decoder, which sees only the words to
the left: there the tag sits on the token right after the word (``label_position``), so
the state that predicts it has read the whole word and what follows it.

Training, folds and the saved classifier work as in the classify stage
(``tasks.classify.tune_folds``). Measured on the held-out examples with seqeval's
entity-level definitions (CoNLL: an entity counts only when its type and both ends are
right): precision, recall and F1 of the tuned model, of the untuned one (same backbone,
fresh head) and of tagging every word with the most common training tag (normally O,
which finds no entity: F1 0); a per-entity-type report goes to the metrics JSON.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from tasks.classify import (
    TaskSpec,
    TuningConfig,
    load_tokenizer,
    max_tokens,
    saved_model_config,
    tune_folds,
)
from tasks.labelled import (
    TaggedExample,
    data_path_field,
    derived_ner,
    load_tagged_examples,
    nothing_derived,
    split_examples,
)
from tasks.launch import across_devices
from tasks.shards import write_text_atomic
from tasks.stage import StageInputError
from tasks.tokenize import read_val_ids

if TYPE_CHECKING:
    from models.lightning import MetricsFn

log = logging.getLogger(__name__)

STAGE = "ner"


class NerConfig(TuningConfig):
    """Named-entity recognition: BIO-tagged words (or the derived function/class-name
    task), a token head on the pretrained model, entity-level F1 on held-out data."""

    data_path: str = data_path_field("with a list of words and a list of BIO tags")
    tokens_column: str = Field("tokens", description="Column holding the list of words.")
    tags_column: str = Field(
        "tags", description="Column holding the BIO tags, one per word: strings (O, "
                            "B-<type>, I-<type>) or integer class ids (named by the "
                            "dataset's ClassLabel feature or label_names).")
    label_position: Literal["auto", "first", "next"] = Field(
        "auto", description="Which token carries a word's tag: 'first' = its first "
                            "sub-token; 'next' = the token after the word (for a causal "
                            "decoder, which then has read the word and what follows); "
                            "'auto' = 'next' for a causal model, 'first' for an encoder.")
    max_length: int = Field(
        96, ge=8, description="Tokens per example (words that do not fit are predicted O; "
                              "at most the model's context).")
    passage_words: int = Field(
        40, ge=4, description="Derived task only: words per passage (cut at line ends).")
    keep_empty_fraction: float = Field(
        0.1, ge=0.0, le=1.0,
        description="Derived task only: share of the passages without any entity kept.")
    max_passages: int = Field(
        600, ge=2, description="Derived task only: at most this many passages (a stable "
                               "hash picks which).")


def ner_scores(examples: list[TaggedExample], predicted: list[list[int]], labels: list[str]
               ) -> tuple[dict[str, float], dict]:
    """Entity-level precision, recall and F1 (seqeval, default CoNLL mode, micro average),
    word accuracy, and the per-type report. A word left out by truncation counts as O."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    gold = [e.tags for e in examples]
    guess = [[labels[i] for i in row] + ["O"] * (len(e.tags) - len(row))
             for e, row in zip(examples, predicted, strict=True)]
    words = sum(len(tags) for tags in gold)
    right = sum(g == p for tags, preds in zip(gold, guess, strict=True)
                for g, p in zip(tags, preds, strict=True))
    scores = {"precision": float(precision_score(gold, guess, zero_division=0)),
              "recall": float(recall_score(gold, guess, zero_division=0)),
              "f1": float(f1_score(gold, guess, zero_division=0)),
              "word_accuracy": right / max(1, words)}
    report = {}
    if any(tag != "O" for tags in gold for tag in tags):
        raw = classification_report(gold, guess, output_dict=True, zero_division=0)
        report = {name: {k.replace("f1-score", "f1"): round(float(v), 5) if k != "support"
                         else int(v) for k, v in row.items()} for name, row in raw.items()}
    return scores, {"per_type": report}


def load_examples(config: NerConfig, corpus_dir: Path) -> tuple[list[TaggedExample], bool]:
    if config.data_path or config.dataset:
        return load_tagged_examples(STAGE, config), False
    return derived_ner(STAGE, Path(corpus_dir), config), True


def tag_labels(examples: list[TaggedExample]) -> list[str]:
    """O, then B- and I- of every entity type found (both, even if one never occurs)."""
    types = sorted({tag[2:] for e in examples for tag in e.tags if tag != "O"})
    return ["O"] + [f"{prefix}-{kind}" for kind in types for prefix in ("B", "I")]


@across_devices
def ner(config: NerConfig, tokenized_dir: Path, model_dir: Path, corpus_dir: Path,
        out_dir: Path, on_metrics: MetricsFn | None = None) -> dict:
    """Fine-tune a token classifier on the BIO-tagged (or derived) examples; see the module
    docstring."""
    from models.heads import (
        EncodedDataset,
        TokenClassificationModule,
        TokenClassifier,
        encode_words,
    )

    tokenized_dir, model_dir, out_dir = Path(tokenized_dir), Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_config = saved_model_config(model_dir, STAGE)
    derived = not (config.data_path or config.dataset)
    held_out = read_val_ids(tokenized_dir) if derived and config.folds == 1 else set()
    try:
        examples, derived = load_examples(config, corpus_dir)
        splits = split_examples(STAGE, examples, config.val_fraction, config.folds, held_out)
    except StageInputError as exc:
        if not derived:
            raise
        return nothing_derived(STAGE, exc)
    labels = tag_labels(examples)
    if len(labels) < 2:
        raise StageInputError(STAGE, f"the {len(examples)} examples hold no entity (every tag "
                                     "is O); NER needs tagged entities to learn from")
    index = {label: i for i, label in enumerate(labels)}

    sp, eos_id, pad_id, unk_id = load_tokenizer(tokenized_dir)
    max_length = min(config.max_length, max_tokens(model_config))
    causal = model_config.get("causal", True)
    label_next = config.label_position == "next" or (config.label_position == "auto"
                                                     and causal)
    pieces: dict[str, list[int]] = {}

    def encode_word(word: str) -> list[int]:
        # as in the words joined by spaces: sentencepiece never merges across a space
        if word not in pieces:
            pieces[word] = sp.encode(" " + word)
        return pieces[word]

    def encode(items: list[TaggedExample]) -> EncodedDataset:
        rows, cut = [], 0
        for e in items:
            ids, tags, fitted = encode_words(encode_word, e.tokens,
                                             [index[tag] for tag in e.tags], max_length,
                                             eos_id, unk_id, label_next)
            cut += len(e.tokens) - fitted
            rows.append((ids, tags))
        if cut:
            log.info("%s: %d words of %d examples do not fit in %d tokens (predicted O)",
                     STAGE, cut, len(items), max_length)
        return EncodedDataset(rows)

    def score(val: list[TaggedExample], data, predicted: list) -> tuple[dict, dict]:
        return ner_scores(val, predicted, labels)

    def write_fold(run_dir: Path, result: dict, val: list) -> dict:
        write_text_atomic(run_dir / "metrics.json", json.dumps(
            {"metrics": result["metrics"], **result["details"], "labels": labels}, indent=2))
        return {"metrics": "metrics.json", "loss_curve": "loss_curve.png"}

    spec = TaskSpec(STAGE, labels, TokenClassifier, TokenClassificationModule, encode, score,
                    f"{STAGE}_f1", {"max_length": max_length, "eos_id": eos_id,
                                    "pad_id": pad_id, "unk_id": unk_id,
                                    "label_next": label_next, "derived": derived})
    answer = tune_folds(spec, config, splits, model_dir, tokenized_dir, out_dir, on_metrics,
                        write_fold)
    if not answer:
        return {}
    results = answer.pop("results")
    if len(results) > 1:  # pooled over folds: every example held out once
        gold = [e for _, val in results for e in val]
        guess = [row for r, _ in results for row in r["tuned"]]
        pooled, details = ner_scores(gold, guess, labels)
        write_text_atomic(out_dir / "metrics.json", json.dumps(
            {"metrics": answer["stats"], "pooled": pooled, **details, "labels": labels,
             "folds": [{"fold": i, "metrics": r["metrics"], **r["details"]}
                       for i, (r, _) in enumerate(results)]}, indent=2))
    answer["artifacts"]["metrics"] = "metrics.json"
    if len(results) == 1:
        answer["artifacts"]["loss_curve"] = "loss_curve.png"
    answer["derived"] = derived
    stats = answer["stats"]
    log.info("%s: entity F1 %.3f (precision %.3f, recall %.3f; untuned %.3f, majority %.3f) "
             "on %d held-out examples", STAGE, stats[f"{STAGE}_f1"],
             stats[f"{STAGE}_precision"], stats[f"{STAGE}_recall"],
             stats[f"{STAGE}_untuned_f1"], stats[f"{STAGE}_majority_f1"], answer["count"])
    return answer
