"""Few-shot stage: multiple-choice questions scored by log-likelihood, with k solved
examples in the prompt, for each k in ``shots`` (k = 0 always).

A prompt is lm-evaluation-harness's: an optional description, then k solved examples
(``question`` + target delimiter + answer, each followed by the few-shot delimiter), then
the question; every choice is scored as the continuation ``target delimiter + choice``
and the most likely one is the model's answer (``length_normalized`` also reports the
choice with the highest log-likelihood per character, lm-eval's ``acc_norm``). The
examples are drawn (seeded, per question) from a pool of questions that are never
evaluated, so a model cannot copy the answer from its own example.

Questions come from a JSON-lines file (``data_path``: {"question", "choices", "answer"})
or are derived from the corpus: "which module is this passage from?", a passage of a
document with its label (the module name in the title, else the URL's file stem) and
``num_choices - 1`` other documents' labels as choices. Evaluated passages come from the
documents the tokenize stage held out of pretraining, their wrong choices from the other
held-out documents (a held-out module's name is rarer in the training text, and must not
give the answer away by that); the examples come from the documents the model trained on.

Each question's choices share one context, which ``models.scoring`` reads once; the
stage's cost is about one forward pass per question and k.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.shards import atomic_path, iter_records, write_text_atomic
from tasks.stage import StageInputError
from tasks.tokenize import read_val_ids

if TYPE_CHECKING:
    import sentencepiece as spm
    import torch

    from models.llama import Llama

log = logging.getLogger(__name__)

STAGE = "fewshot"
MAX_SHOTS = 64
PYDOC_MODULE = r"^Pydoc: (?:built-in module|module|package) ([\w.]+)$"


class FewshotConfig(BaseModel):
    """Few-shot multiple-choice evaluation: the task, the prompt and k."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run the few-shot evaluation.")
    shots: list[int] = Field(
        default_factory=lambda: [0, 3],
        description="Numbers of solved examples put before each question (k); k = 0 is "
                    "always evaluated. Each k gives the metric fewshot_accuracy_k<k>.")
    data_path: str | None = Field(
        None,
        description="A .jsonl file of {\"question\": str, \"choices\": [str, ...], "
                    "\"answer\": index into choices} records (the user's task). Empty = "
                    "derive \"which module is this passage from?\" from the corpus.")
    max_questions: int = Field(
        100, ge=1, description="Evaluate at most this many questions (per k).")
    shot_pool: int = Field(
        24, ge=0,
        description="Questions set aside as the pool that examples are drawn from, never "
                    "evaluated: the first ones of a shuffled data_path file, or passages of "
                    "documents that were not held out of pretraining for the derived task. "
                    "Must be at least the largest k.")
    num_choices: int = Field(
        4, ge=2, le=26, description="Choices per derived question: the passage's own label "
                                    "and this many minus one other documents' labels.")
    passage_chars: int = Field(
        150, ge=20,
        description="Characters per derived passage (whitespace collapsed, cut at word "
                    "boundaries). Keep k+1 passages within the model's context.")
    label_pattern: str = Field(
        PYDOC_MODULE,
        description="Regular expression on each document's title whose first group is the "
                    "document's label (the answer of its passages); a title that does not "
                    "match gives the URL's file stem (json.html -> json). Labels shared by "
                    "several documents are left out.")
    derived_template: str = Field(
        "Passage: {passage}\nModule:",
        description="Question text of a derived question; {passage} is the passage.")
    question_template: str = Field(
        "Question: {question}\nAnswer:",
        description="Question text of a data_path record; {question} is its \"question\".")
    description: str = Field(
        "", description="Text put before the examples and the question (lm-eval's "
                        "description), e.g. an instruction; empty = none.")
    target_delimiter: str = Field(
        " ", description="Between a question and its answer (the choice is scored as this "
                         "delimiter + the choice).")
    fewshot_delimiter: str = Field(
        "\n\n", description="After each solved example.")
    length_normalized: bool = Field(
        True, description="Also report accuracy when choices are ranked by log-likelihood "
                          "per character (lm-eval's acc_norm), as fewshot_accuracy_norm_k<k>; "
                          "it favours long choices less than the plain sum does.")
    sample_size: int = Field(
        20, ge=0, description="Questions (with answers and predictions) written to "
                              "fewshot.json for people to read.")
    seed: int = Field(0, description="Seed for passages, choices, the example pool and the "
                                     "examples drawn per question.")
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass.")
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = Field(
        "auto", description="'auto' (a CUDA GPU when present), 'cpu', or 'gpu'/'cuda'.")
    num_threads: int = Field(
        1, ge=0,
        description="CPU threads for torch while scoring (the setting is restored "
                    "afterwards); 0 = torch's default (all cores). One thread suits the small "
                    "per-question forward passes and does not fight other work for the "
                    "cores (on a busy 2-core machine two threads were 10x slower).")

    @field_validator("shots")
    @classmethod
    def _shots(cls, value: list[int]) -> list[int]:
        bad = [k for k in value if not 0 <= k <= MAX_SHOTS]
        if bad:
            raise ValueError(f"each k in shots must be between 0 and {MAX_SHOTS}; got {bad}")
        return sorted({0, *value})

    @model_validator(mode="after")
    def _pool_holds_k(self) -> FewshotConfig:
        if self.shot_pool < max(self.shots):
            raise ValueError(f"shot_pool ({self.shot_pool}) must be at least the largest k "
                             f"in shots ({max(self.shots)}): the examples are drawn from it")
        return self

    @field_validator("label_pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"label_pattern is not a regular expression: {exc}") from exc
        if compiled.groups < 1:
            raise ValueError("label_pattern needs a group, (...), around the label")
        return value


@dataclass
class Question:
    """A multiple-choice question: ``text`` is the prompt's question part (lm-eval's
    doc_to_text), ``answer`` the index of the right choice, ``source`` where it came from."""

    text: str
    choices: list[str]
    answer: int
    source: str

    @property
    def answer_text(self) -> str:
        return self.choices[self.answer]

    def record(self) -> dict:
        """The question as a JSON record of the lm-eval local task (doc_to_text etc.)."""
        return {"question": self.text, "choices": self.choices, "answer": self.answer}


# --- questions from a file ---------------------------------------------------------------

def read_questions(path: Path, template: str = "{question}") -> list[Question]:
    """The questions of a JSON-lines file, ``template`` applied; a bad record is reported
    as file:line with what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise StageInputError(STAGE, f"fewshot.data_path {path} does not exist or is not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise StageInputError(STAGE, f"cannot read fewshot.data_path {path}: {exc}") from exc
    questions = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StageInputError(STAGE, f"{where}: not valid JSON ({exc.msg})") from exc
        questions.append(_question(record, where, template))
    return questions


def _question(record, where: str, template: str) -> Question:
    if not isinstance(record, dict):
        raise StageInputError(STAGE, f"{where}: expected an object with \"question\", "
                                     "\"choices\" and \"answer\"")
    question, choices, answer = (record.get(k) for k in ("question", "choices", "answer"))
    if not isinstance(question, str) or not question.strip():
        raise StageInputError(STAGE, f"{where}: \"question\" must be a non-empty string")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise StageInputError(STAGE, f"{where}: \"choices\" must be a list of at least 2 "
                                     "non-empty strings")
    if len(set(choices)) != len(choices):
        raise StageInputError(STAGE, f"{where}: \"choices\" repeats a choice; each must be "
                                     "different")
    if isinstance(answer, bool) or not isinstance(answer, int) \
            or not 0 <= answer < len(choices):
        raise StageInputError(STAGE, f"{where}: \"answer\" must be the index (0 to "
                                     f"{len(choices) - 1}) of the right choice; got "
                                     f"{answer!r}")
    return Question(template.replace("{question}", question), list(choices), answer, where)


def split_pool(questions: list[Question], pool_size: int, max_questions: int, seed: int
               ) -> tuple[list[Question], list[Question]]:
    """(evaluated, example pool): a seeded shuffle, the pool first, then at most
    ``max_questions`` to evaluate."""
    order = list(questions)
    random.Random(seed).shuffle(order)
    pool, rest = order[:pool_size], order[pool_size:]
    if not rest:
        raise StageInputError(STAGE, f"{len(questions)} question(s) in the file and "
                                     f"{pool_size} set aside as examples (fewshot.shot_pool) "
                                     "leave none to evaluate; add questions or lower "
                                     "shot_pool")
    return rest[:max_questions], pool


# --- the task derived from the corpus ---------------------------------------------------

def document_label(record: dict, pattern: re.Pattern) -> str | None:
    """The label of a document: ``pattern``'s first group on its title, else the file stem
    of its URL (``/library/json.html`` -> ``json``), else None."""
    match = pattern.match((record.get("title") or "").strip())
    if match and match.group(1):
        return match.group(1)
    name = urlparse(record.get("url") or "").path.rstrip("/").rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return stem or None


def passages(text: str, max_chars: int) -> list[str]:
    """The text with its whitespace collapsed, cut into consecutive passages of whole words
    of at most ``max_chars`` characters (a longer word is cut)."""
    chunks, current = [], ""
    for word in text.split():
        word = word[:max_chars]
        if current and len(current) + 1 + len(word) > max_chars:
            chunks.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        chunks.append(current)
    return chunks


def derive_questions(config: FewshotConfig, corpus_dir: Path, held_out: set[str]
                     ) -> tuple[list[Question], list[Question], dict]:
    """(evaluated, example pool, facts) for "which document (module) is this passage from?".

    Evaluated passages come from the documents in ``held_out`` when any of them has a
    label, spread evenly over them; the pool has one passage from each of ``shot_pool``
    other documents."""
    pattern = re.compile(config.label_pattern)
    docs: dict[str, tuple[str, list[str]]] = {}  # id -> (label, passages)
    by_label: dict[str, list[str]] = {}
    for record in iter_records(corpus_dir, columns=None):
        text = (record.get("text") or "").strip()
        label = document_label(record, pattern)
        if not text or not label:
            continue
        doc_id = str(record["id"])
        docs[doc_id] = (label, passages(text, config.passage_chars))
        by_label.setdefault(label, []).append(doc_id)
    shared = {label for label, ids in by_label.items() if len(ids) > 1}
    docs = {i: d for i, d in docs.items() if d[0] not in shared}
    labels = sorted({label for label, _ in docs.values()})
    if len(labels) < config.num_choices:
        raise StageInputError(STAGE, f"the corpus in {corpus_dir} gives {len(labels)} distinct "
                                     f"document label(s) ({len(shared)} shared ones left "
                                     f"out); {config.num_choices} are needed for the derived "
                                     "task: lower fewshot.num_choices, change "
                                     "fewshot.label_pattern or give a data_path")
    rng = random.Random(config.seed)
    evaluated_ids = sorted(i for i in docs if i in held_out)
    unseen = bool(evaluated_ids)
    if not unseen:  # no labelled document was held out: evaluate a seeded fifth of them
        evaluated_ids = sorted(rng.sample(sorted(docs), max(1, len(docs) // 5)))
        log.warning("fewshot: no labelled document is held out of pretraining; evaluating "
                    "passages of %d documents the model may have trained on",
                    len(evaluated_ids))
    pool_ids = sorted(set(docs) - set(evaluated_ids))
    if len(pool_ids) < max(config.shots) or (max(config.shots) and not pool_ids):
        raise StageInputError(STAGE, f"{len(pool_ids)} labelled document(s) are left for the "
                                     f"examples; k = {max(config.shots)} needs at least as "
                                     "many: lower fewshot.shots or use a larger corpus")

    def question(doc_id: str, passage: str, group: list[str]) -> Question:
        label = docs[doc_id][0]
        # distractors from the same group of documents when it has enough labels: held-out
        # documents' names are rarer in training, and an answer must not stand out by that
        among = group if len(group) >= config.num_choices else labels
        others = rng.sample([lb for lb in among if lb != label], config.num_choices - 1)
        choices = [label, *others]
        rng.shuffle(choices)
        text = config.derived_template.replace("{passage}", passage)
        return Question(text, choices, choices.index(label), doc_id)

    per_doc = math.ceil(config.max_questions / len(evaluated_ids))
    evaluated_labels = sorted({docs[i][0] for i in evaluated_ids})
    evaluated = []
    for doc_id in evaluated_ids:
        chunks = docs[doc_id][1]
        for passage in rng.sample(chunks, min(per_doc, len(chunks))):
            evaluated.append(question(doc_id, passage, evaluated_labels))
    rng.shuffle(evaluated)
    evaluated = evaluated[:config.max_questions]
    pool_docs = rng.sample(pool_ids, min(config.shot_pool, len(pool_ids)))
    pool_labels = sorted({docs[i][0] for i in pool_docs})
    pool = [question(doc_id, rng.choice(docs[doc_id][1]), pool_labels) for doc_id in pool_docs]
    facts = {"labels": len(labels), "documents": len(docs),
             "evaluated_documents": len(evaluated_ids), "held_out": unseen}
    log.info("fewshot: derived %d questions from %d %sdocuments and a pool of %d examples "
             "(%d labels)", len(evaluated), len(evaluated_ids),
             "held-out " if unseen else "", len(pool), len(labels))
    return evaluated, pool, facts


# --- prompts and scoring ------------------------------------------------------------------

def draw_examples(pool: list[Question], question: Question, index: int, k: int, seed: int,
                  exclude_choices: bool) -> list[Question]:
    """The first k of a seeded order of the pool for this question (so the examples for a
    smaller k are the start of those for a larger one). With ``exclude_choices`` an
    example whose answer is one of the question's choices is skipped: in the derived task
    each label is one document, so such an example would mark a choice as another
    passage's answer."""
    order = list(pool)
    random.Random(f"{seed}:{index}").shuffle(order)
    if exclude_choices:
        order = [q for q in order if q.answer_text not in question.choices]
    return order[:k]


def build_prompt(config: FewshotConfig, question: Question, examples: list[Question]) -> str:
    """Description, solved examples and the question, as lm-eval writes them."""
    solved = "".join(f"{q.text}{config.target_delimiter}{q.answer_text}"
                     f"{config.fewshot_delimiter}" for q in examples)
    return f"{config.description}{solved}{question.text}"


def score_prompts(model: Llama, sp: spm.SentencePieceProcessor, prompts: list[str],
                  questions: list[Question], target_delimiter: str, batch_size: int,
                  device: torch.device, eos_id: int) -> list[list[float]]:
    """Log-likelihood of each choice (as ``target_delimiter + choice``) after each prompt."""
    from models.scoring import loglikelihood

    requests = [(prompt, f"{target_delimiter}{choice}")
                for prompt, q in zip(prompts, questions, strict=True) for choice in q.choices]
    scores = [lp for lp, _ in loglikelihood(model, sp, requests, batch_size, device, eos_id)]
    out, start = [], 0
    for q in questions:
        out.append(scores[start:start + len(q.choices)])
        start += len(q.choices)
    return out


def predictions(scores: list[list[float]], questions: list[Question],
                normalized: bool = False) -> list[int]:
    """The chosen index per question: the highest log-likelihood (per character of the
    choice when ``normalized``); ties go to the first choice, as numpy's argmax does."""
    chosen = []
    for row, q in zip(scores, questions, strict=True):
        values = [s / len(c) for s, c in zip(row, q.choices, strict=True)] if normalized \
            else row
        chosen.append(max(range(len(values)), key=lambda i: (values[i], -i)))
    return chosen


def accuracy(chosen: list[int], questions: list[Question]) -> float:
    return sum(c == q.answer for c, q in zip(chosen, questions, strict=True)) / len(questions)


def plot_accuracy(path: Path, per_k: dict[int, float], chance: float, title: str,
                  per_k_norm: dict[int, float] | None = None) -> None:
    """Accuracy against k, with the chance level, as a small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(per_k)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(ks, [per_k[k] for k in ks], "o-", label="accuracy")
    if per_k_norm:
        ax.plot(ks, [per_k_norm[k] for k in ks], "s--", label="accuracy (length-normalised)",
                alpha=0.7)
    ax.axhline(chance, linestyle=":", color="gray", label=f"chance ({chance:.2f})")
    ax.set_xticks(ks)
    ax.set_ylim(0, 1)
    ax.set_xlabel("solved examples in the prompt (k)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_jsonl(path: Path, questions: list[Question]) -> None:
    write_text_atomic(path, "".join(json.dumps(q.record()) + "\n" for q in questions))


def load_scorer(model_dir: Path, tokenized_dir: Path | None, accelerator: str):
    """The model (eval mode, on the device), its tokenizer and the device."""
    import sentencepiece as spm

    from models.checkpoint import load_model
    from models.evaluation import pick_device

    model_dir = Path(model_dir)
    if not (model_dir / "model.pt").is_file():
        raise StageInputError(STAGE, f"{model_dir} holds no model.pt: give a training stage's "
                                     "output directory")
    tokenizer = model_dir / "tokenizer.model"
    if not tokenizer.is_file() and tokenized_dir is not None:
        tokenizer = Path(tokenized_dir) / "tokenizer.model"
    if not tokenizer.is_file():
        raise StageInputError(STAGE, f"no tokenizer.model in {model_dir}"
                                     + (f" or {tokenized_dir}" if tokenized_dir else ""))
    device = pick_device(accelerator)
    model = load_model(model_dir / "model.pt", device)
    if not model.config.causal:
        raise StageInputError(STAGE, f"{model_dir} holds a masked-LM encoder (causal=false), "
                                     "which cannot score answers; evaluate a causal model")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    if sp.eos_id() < 0:
        raise StageInputError(STAGE, f"the tokenizer {tokenizer} has no EOS token")
    return model, sp, device


@contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Torch's CPU threads set to ``num_threads`` (0: left as they are) for the block."""
    import torch

    before = torch.get_num_threads()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fewshot(config: FewshotConfig, tokenized_dir: Path | None, model_dir: Path,
            corpus_dir: Path | None, out_dir: Path, on_metrics=None) -> dict:
    """Accuracy of the model for each k on the user's or the derived multiple-choice task;
    writes fewshot.json, fewshot_accuracy.png and the questions (fewshot_questions.jsonl,
    fewshot_pool.jsonl: an lm-eval local task can be made of them)."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    facts: dict = {}
    if config.data_path:
        task = Path(config.data_path).name
        questions, pool = split_pool(read_questions(Path(config.data_path),
                                                    config.question_template),
                                     config.shot_pool, config.max_questions, config.seed)
        exclude = False
    else:
        if corpus_dir is None:
            raise StageInputError(STAGE, "no fewshot.data_path and no corpus to derive a "
                                         "task from")
        task = "derived: which module is this passage from?"
        held_out = read_val_ids(Path(tokenized_dir)) if tokenized_dir is not None else set()
        questions, pool, facts = derive_questions(config, Path(corpus_dir), held_out)
        exclude = True
    if len(pool) < max(config.shots):
        raise StageInputError(STAGE, f"the example pool holds {len(pool)} question(s); k = "
                                     f"{max(config.shots)} needs at least as many")

    with torch_threads(config.num_threads):
        return _evaluate(config, model_dir, tokenized_dir, out_dir, task, questions, pool,
                         exclude, facts, on_metrics, started)


def _evaluate(config: FewshotConfig, model_dir: Path, tokenized_dir: Path | None,
              out_dir: Path, task: str, questions: list[Question], pool: list[Question],
              exclude: bool, facts: dict, on_metrics, started: float) -> dict:
    model, sp, device = load_scorer(model_dir, tokenized_dir, config.accelerator)
    eos = sp.eos_id()
    window = model.max_tokens
    examples = [draw_examples(pool, q, i, max(config.shots), config.seed, exclude)
                for i, q in enumerate(questions)]
    short = sum(len(e) < max(config.shots) for e in examples)
    if short:
        log.warning("fewshot: %d question(s) get fewer than %d examples: the pool holds too "
                    "few whose answer is not among their choices; raise fewshot.shot_pool",
                    short, max(config.shots))
    accuracy_k, accuracy_norm_k, chosen_k, stats = {}, {}, {}, {}
    first_prompts = {}
    for k in config.shots:
        prompts = [build_prompt(config, q, ex[:k]) for q, ex in zip(questions, examples,
                                                                    strict=True)]
        lengths = [1 + len(sp.encode(p)) for p in prompts]
        # with the answer's first token after it, a prompt longer than the window is cut
        truncated = sum(n > window for n in lengths)
        scores = score_prompts(model, sp, prompts, questions, config.target_delimiter,
                               config.batch_size, device, eos)
        chosen_k[k] = predictions(scores, questions)
        accuracy_k[k] = accuracy(chosen_k[k], questions)
        stats[f"fewshot_accuracy_k{k}"] = round(accuracy_k[k], 5)
        if config.length_normalized:
            accuracy_norm_k[k] = accuracy(predictions(scores, questions, True), questions)
            stats[f"fewshot_accuracy_norm_k{k}"] = round(accuracy_norm_k[k], 5)
        stats[f"fewshot_prompt_tokens_k{k}"] = round(sum(lengths) / len(lengths), 1)
        stats[f"fewshot_truncated_k{k}"] = truncated
        first_prompts[k] = prompts[0]
        if on_metrics is not None:
            on_metrics({"fewshot_accuracy": accuracy_k[k]}, k)
        log.info("fewshot: k=%d accuracy %.3f%s over %d questions (prompts %.0f tokens on "
                 "average, %d cut to the %d-token window)", k, accuracy_k[k],
                 f" (length-normalised {accuracy_norm_k[k]:.3f})" if k in accuracy_norm_k
                 else "", len(questions), stats[f"fewshot_prompt_tokens_k{k}"], truncated,
                 window)
    chance = sum(1 / len(q.choices) for q in questions) / len(questions)
    best = max(config.shots, key=lambda k: (accuracy_k[k], -k))
    stats.update({"fewshot_chance_accuracy": round(chance, 5),
                  "fewshot_questions": len(questions), "fewshot_pool": len(pool),
                  "fewshot_best_k": best,
                  "fewshot_gain": round(accuracy_k[max(config.shots)] - accuracy_k[0], 5),
                  "seconds": round(time.perf_counter() - started, 2)})

    sample = []
    for i, q in enumerate(questions[:config.sample_size]):
        sample.append({**asdict(q), "answer_text": q.answer_text,
                       "predicted": {str(k): q.choices[chosen_k[k][i]] for k in config.shots},
                       "examples": [e.source for e in examples[i][:max(config.shots)]]})
    report = {"task": task, "shots": config.shots, "questions": len(questions),
              "pool": len(pool), "chance_accuracy": chance,
              "accuracy": {str(k): v for k, v in accuracy_k.items()},
              "accuracy_norm": {str(k): v for k, v in accuracy_norm_k.items()},
              "window_tokens": window, **facts,
              "prompt_example": {str(k): first_prompts[k] for k in config.shots},
              "sample": sample}
    write_text_atomic(out_dir / "fewshot.json", json.dumps(report, indent=2))
    write_jsonl(out_dir / "fewshot_questions.jsonl", questions)
    write_jsonl(out_dir / "fewshot_pool.jsonl", pool)
    plot_accuracy(out_dir / "fewshot_accuracy.png", accuracy_k, chance,
                  f"few-shot: {task}"[:70], accuracy_norm_k or None)
    log.info("fewshot: done in %.1fs: accuracy %s vs chance %.3f", stats["seconds"],
             ", ".join(f"k={k} {accuracy_k[k]:.3f}" for k in config.shots), chance)
    return {"count": len(questions), "unit": "questions", "stats": stats,
            "artifacts": {"fewshot": "fewshot.json", "fewshot_plot": "fewshot_accuracy.png",
                          "questions": "fewshot_questions.jsonl",
                          "pool": "fewshot_pool.jsonl"},
            "task": task}
