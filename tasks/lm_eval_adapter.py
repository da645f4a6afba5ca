"""EleutherAI's lm-evaluation-harness on forgeline models, offline.

``ForgelineLM`` is lm-eval's ``LM`` interface over a model directory (model.pt +
tokenizer.model), registered as the model type ``forgeline``; its three requests
(``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) are
``models.scoring``'s, so lm-eval's numbers are the ones forgeline's own few-shot stage
computes. ``write_local_task`` writes a multiple-choice task as an lm-eval YAML over a
local JSON-lines file (no hub access), and ``run_lm_eval`` runs tasks through
``lm_eval.simple_evaluate``.

The class is built (and registered) on first use, so importing this module for its
config stays cheap: ``from tasks.lm_eval_adapter import ForgelineLM`` builds it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.shards import write_text_atomic
from tasks.stage import StageInputError

log = logging.getLogger(__name__)

STAGE = "lm_eval"
MODEL_NAME = "forgeline"
FEWSHOT_TASK = "forgeline_fewshot"  # the few-shot stage's questions as a local task


class LmEvalConfig(BaseModel):
    """lm-evaluation-harness on the trained model."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        False, description="Run lm-evaluation-harness on the trained model.")
    tasks: list[str] = Field(
        default_factory=lambda: [FEWSHOT_TASK],
        description=f"lm-eval task names. '{FEWSHOT_TASK}' is the few-shot stage's questions "
                    "written as a local task (offline); others come from include_path or "
                    "lm-eval's own tasks (which download their data from the Hugging Face "
                    "hub).")
    include_path: str | None = Field(
        None, description="A directory of lm-eval task YAML files to load tasks from (as "
                          "lm_eval --include_path); empty = none.")
    limit: int | None = Field(
        None, ge=1, description="Evaluate at most this many documents per task; empty = all.")
    num_fewshot: int | None = Field(
        None, ge=0, description="Examples in each prompt (lm-eval draws them from the task's "
                                "few-shot split); empty = each task's own setting.")
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass.")
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = Field(
        "auto", description="'auto' (a CUDA GPU when present), 'cpu', or 'gpu'/'cuda'.")
    num_threads: int = Field(
        1, ge=0, description="CPU threads for torch while scoring (restored afterwards); 0 = "
                             "torch's default (all cores).")
    seed: int = Field(0, description="lm-eval's seeds (python, numpy, torch, few-shot "
                                     "sampling).")


def _int_or(value: Any, default: int) -> int:
    """lm-eval passes batch sizes as numbers, strings or 'auto' (which here means the
    default)."""
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return default


def _build_class():
    import lm_eval.api.model
    from lm_eval.api.registry import register_model

    @register_model(MODEL_NAME)
    class ForgelineLM(lm_eval.api.model.LM):
        """lm-eval's language-model interface over a forgeline model directory:
        ``ForgelineLM(model_dir=..., batch_size=16, device=None)``, or
        ``ForgelineLM.create_from_arg_string("model_dir=...,batch_size=8,device=cpu")``."""

        def __init__(self, model_dir: str | Path, batch_size: int | str = 16,
                     device: str | None = None, max_gen_toks: int = 256,
                     **kwargs: Any) -> None:
            super().__init__()
            from models.generation import load_generator

            ignored = {k: v for k, v in kwargs.items() if v is not None}
            if ignored:
                log.info("lm_eval: ForgelineLM ignores %s", ", ".join(sorted(ignored)))
            generator = load_generator(model_dir, device)
            self.model, self.sp = generator.model, generator.tokenizer
            self.eos_id = generator.eos_id
            self.model_dir = Path(model_dir)
            self._device = generator.device
            self.batch_size = _int_or(batch_size, 16)
            self.max_gen_toks = _int_or(max_gen_toks, 256)
            self._warned_sampling = False

        @property
        def max_length(self) -> int:
            return self.model.max_tokens

        @property
        def tokenizer_name(self) -> str:
            return str(self.model_dir / "tokenizer.model")

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            from models.scoring import loglikelihood

            pairs = [tuple(r.args) for r in requests]
            results = loglikelihood(self.model, self.sp, pairs, self.batch_size, self._device,
                                    self.eos_id)
            for pair, result in zip(pairs, results, strict=True):
                self.cache_hook.add_partial("loglikelihood", pair, result)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from models.scoring import loglikelihood_rolling

            texts = [r.args[0] for r in requests]
            results = loglikelihood_rolling(self.model, self.sp, texts, self.batch_size,
                                            self._device, self.eos_id)
            for text, result in zip(texts, results, strict=True):
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
            return results

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            from models.scoring import greedy_until

            prepared = []
            for request in requests:
                context, kwargs = request.args[0], dict(request.args[1] or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                budget = next((kwargs[k] for k in ("max_gen_toks", "max_new_tokens",
                                                   "max_tokens") if k in kwargs),
                              self.max_gen_toks)
                if (kwargs.get("do_sample") or kwargs.get("temperature", 0) > 0) \
                        and not self._warned_sampling:
                    log.warning("lm_eval: forgeline generates greedily; sampling settings "
                                "are ignored")
                    self._warned_sampling = True
                prepared.append((context, until, int(budget)))
            results = greedy_until(self.model, self.sp, prepared, self.batch_size,
                                   self._device, self.eos_id)
            for request, result in zip(requests, results, strict=True):
                self.cache_hook.add_partial("generate_until", request.args, result)
            return results

    return ForgelineLM


_CLASS = None


def forgeline_lm_class():
    """The ``ForgelineLM`` class, built and registered with lm-eval as 'forgeline' on
    first use."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _build_class()
    return _CLASS


def __getattr__(name: str):
    if name == "ForgelineLM":
        return forgeline_lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def write_local_task(directory: str | Path, name: str, questions: list,
                     fewshot_questions: list | None = None, target_delimiter: str = " ",
                     fewshot_delimiter: str = "\n\n", description: str = "") -> Path:
    """Write the lm-eval task ``name`` as ``<name>.yaml`` beside its data ``<name>.jsonl``
    (and ``<name>_fewshot.jsonl``, the split examples are drawn from, when given) in
    ``directory``; returns the YAML's path. Questions are {"question", "choices",
    "answer"} records (or objects with ``.record()``, such as ``tasks.fewshot.Question``):
    the question is the prompt text, choices are scored as ``target_delimiter + choice``,
    and lm-eval reports acc and acc_norm. The dataset is read with the ``json`` builder
    from local files, cached inside ``directory``: nothing is downloaded."""
    import yaml

    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)

    def dump(path: Path, rows: list) -> None:
        records = [q.record() if hasattr(q, "record") else dict(q) for q in rows]
        for i, record in enumerate(records):
            if not {"question", "choices", "answer"} <= set(record):
                raise ValueError(f"question {i} of task {name} lacks one of question, "
                                 "choices, answer")
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))

    if not questions:
        raise ValueError(f"task {name} has no questions")
    data_files = {"test": str(directory / f"{name}.jsonl")}
    dump(directory / f"{name}.jsonl", questions)
    spec: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files,
                           "cache_dir": str(directory / "hf_cache")},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "question",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": target_delimiter,
        "fewshot_delimiter": fewshot_delimiter,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                        for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0},
    }
    if description:
        spec["description"] = description
    if fewshot_questions:
        data_files["train"] = str(directory / f"{name}_fewshot.jsonl")
        dump(directory / f"{name}_fewshot.jsonl", fewshot_questions)
        spec["fewshot_split"] = "train"
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value: str):  # delimiters as "\n\n", not as folded line breaks
        style = '"' if any(c in value for c in "\n\t") or value != value.strip() else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    path = directory / f"{name}.yaml"
    write_text_atomic(path, yaml.dump(spec, Dumper=Dumper, sort_keys=False,
                                      allow_unicode=True))
    return path


def _task_manager(tasks: list[str], include_path: Path | list[Path] | None):
    """lm-eval's task index: only include_path when it has every task (indexing lm-eval's
    own thousands of tasks takes seconds), else lm-eval's tasks too."""
    from lm_eval.tasks import TaskManager

    paths = include_path if isinstance(include_path, list) else [include_path]
    include = [str(p) for p in paths if p] or None
    if include:
        manager = TaskManager(include_path=include, include_defaults=False)
        if all(task in manager.all_tasks for task in tasks):
            return manager
    manager = TaskManager(include_path=include)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval knows no task {', '.join(unknown)}"
                         + (f" (nor does {', '.join(include)})" if include else ""))
    return manager


def flatten_results(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results ("acc,none" -> "acc", another
    filter's "acc,strict" -> "acc_strict"; text and missing values left out)."""
    flat: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}_{filt}"
            if not math.isnan(float(value)):
                flat.setdefault(task, {})[name] = float(value)
    return flat


def run_lm_eval(model_dir: str | Path, tasks: list[str],
                include_path: Path | list[Path] | None = None,
                limit: int | None = None, num_fewshot: int | None = None,
                batch_size: int = 16, device: str | None = None, seed: int = 0,
                bootstrap_iters: int = 1000) -> dict[str, dict[str, float]]:
    """Evaluate the model in ``model_dir`` on lm-eval ``tasks`` (from ``include_path``, one
    directory or several, or lm-eval's own); returns {task: {metric: value}}, e.g.
    {"my_task": {"acc": 0.61, "acc_stderr": 0.04, "acc_norm": 0.58, ...}}."""
    from lm_eval import simple_evaluate

    if not tasks:
        raise ValueError("no lm-eval task given")
    lm = forgeline_lm_class()(model_dir=model_dir, batch_size=batch_size, device=device)
    manager = _task_manager(tasks, include_path)
    output = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot,
                             limit=limit, task_manager=manager, log_samples=False,
                             bootstrap_iters=bootstrap_iters, random_seed=seed,
                             numpy_random_seed=seed, torch_random_seed=seed,
                             fewshot_random_seed=seed)
    if output is None:  # not rank zero
        return {}
    return flatten_results(output["results"])


def lm_eval_stage(config: LmEvalConfig, model_dir: Path, out_dir: Path,
                  fewshot_dir: Path | None = None, on_metrics=None) -> dict:
    """Run the configured lm-eval tasks on the model; ``fewshot_dir`` (the few-shot stage's
    output) supplies the questions of the local task 'forgeline_fewshot'. Writes
    lm_eval_results.json; stats are lm_eval_<task>_<metric>."""
    from tasks.fewshot import torch_threads

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (Path(model_dir) / "model.pt").is_file():
        raise StageInputError(STAGE, f"{model_dir} holds no model.pt")
    include = Path(config.include_path) if config.include_path else None
    if include is not None and not include.is_dir():
        raise StageInputError(STAGE, f"lm_eval.include_path {include} is not a directory")
    artifacts = {"lm_eval_results": "lm_eval_results.json"}
    if FEWSHOT_TASK in config.tasks:
        local = out_dir / "tasks"
        questions = Path(fewshot_dir or "") / "fewshot_questions.jsonl"
        if fewshot_dir is None or not questions.is_file():
            raise StageInputError(STAGE, f"the task {FEWSHOT_TASK} needs the few-shot stage's "
                                         "questions (fewshot_questions.jsonl); enable the "
                                         "few-shot stage or name other lm_eval.tasks")
        pool = Path(fewshot_dir) / "fewshot_pool.jsonl"
        read = [json.loads(line) for line in questions.read_text(encoding="utf-8").splitlines()
                if line.strip()]
        examples = [json.loads(line) for line in pool.read_text(encoding="utf-8").splitlines()
                    if line.strip()] if pool.is_file() else None
        write_local_task(local, FEWSHOT_TASK, read, examples or None)
        artifacts["task_yaml"] = f"tasks/{FEWSHOT_TASK}.yaml"
        include = [local, include] if include else local
    try:
        with torch_threads(config.num_threads):
            from models.evaluation import pick_device

            results = run_lm_eval(model_dir, config.tasks, include, config.limit,
                                  config.num_fewshot, config.batch_size,
                                  str(pick_device(config.accelerator)), config.seed)
    except ValueError as exc:
        raise StageInputError(STAGE, str(exc)) from exc
    write_text_atomic(out_dir / "lm_eval_results.json", json.dumps(results, indent=2))
    stats = {f"lm_eval_{task}_{metric}": round(value, 5)
             for task, metrics in results.items() for metric, value in metrics.items()}
    stats["seconds"] = round(time.perf_counter() - started, 2)
    if on_metrics is not None:
        on_metrics({k: v for k, v in stats.items() if k != "seconds"}, 0)
    for task, metrics in results.items():
        log.info("lm_eval: %s: %s", task, ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()))
    return {"count": len(results), "unit": "tasks", "stats": stats, "artifacts": artifacts,
            "results": results}
