"""The trained model outside the pipeline: find it, export it, sample from it.

``forgeline export`` and ``forgeline generate`` are thin wrappers around these. A model is
named by any of:

- a training stage's output directory (``model.pt`` + ``tokenizer.model``), or its
  ``model.pt``;
- a training checkpoint (``checkpoints/step-NNNNNN.ckpt``, ``checkpoints/best.ckpt``),
  even of a run that was interrupted;
- a Hugging Face export (``forgeline export``'s output), sampled with ``transformers``;
- an MLflow run id, ``runs:/...`` or ``models:/...`` URI (``flows.model_registry``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path

from mlflow.tracking import MlflowClient

from flows.model_registry import ModelReferenceError, download_model, registry_version
from flows.tracking import tracking_uri
from tasks.shards import file_sha256

log = logging.getLogger(__name__)

TRAINING_STAGES = ("dpo", "finetune", "domain", "pretrain")  # the final model first


def latest_model_run(workdir: str | os.PathLike) -> str:
    """The id of the newest pipeline run of ``workdir`` whose training finished."""
    work = str(Path(workdir).resolve())
    uri = tracking_uri(work)
    if not os.environ.get("MLFLOW_TRACKING_URI") and not (Path(work) / "mlflow.db").is_file():
        raise ModelReferenceError(f"{work} holds no MLflow store (mlflow.db): no pipeline has "
                                  "run in this work directory; run `forgeline run` first or "
                                  "pass --workdir or --run")
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments, filter_string="tags.`forgeline.kind` = 'stage' and "
                                   "attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=500) if experiments else []
    runs = [r for r in runs if r.data.tags.get("forgeline.stage") in TRAINING_STAGES]
    for run in runs:
        parent_id = run.data.tags.get("mlflow.parentRunId")
        if not parent_id:
            continue
        parent = client.get_run(parent_id)
        if parent.data.tags.get("forgeline.kind", "pipeline") != "pipeline":
            continue  # a sweep's trial: its model is not a pipeline run's final one
        if parent.data.tags.get("forgeline.workdir", work) == work:
            return parent_id
    raise ModelReferenceError(f"no pipeline run in {work} has finished training (looked in "
                              f"MLflow store {uri.split('@')[-1]}); run `forgeline run` first")


def is_hf_export(path: Path) -> bool:
    config = path / "config.json"
    if not (path.is_dir() and config.is_file() and (path / "tokenizer.json").is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "llama"
    except (json.JSONDecodeError, OSError):
        return False


def resolve_model_dir(ref: str, workdir: str | os.PathLike, scratch: Path) -> Path:
    """A local directory with ``model.pt`` and ``tokenizer.model`` for a stage output, a
    ``model.pt`` file, a run id or an MLflow model URI (downloads go under ``scratch``)."""
    local = Path(ref).expanduser()
    if local.is_file() and local.name == "model.pt":
        local = local.parent
    if local.is_dir() and (local / "model.pt").is_file():
        return local
    return download_model(ref, tracking_uri(workdir), scratch)


def export(out: str | os.PathLike, *, workdir: str | os.PathLike = "work",
           run: str | None = None) -> tuple[Path, str]:
    """Export the final model of ``run`` (an MLflow run id or model URI), or of the newest
    pipeline run in ``workdir``, to ``out`` in Hugging Face format; returns ``out`` and
    what was exported."""
    from models.hf_export import export_model

    source = run or latest_model_run(workdir)
    with tempfile.TemporaryDirectory(prefix="forgeline-export-") as scratch:
        model_dir = resolve_model_dir(source, workdir, Path(scratch))
        return export_model(model_dir, out), source


class _HFGenerator:
    """Sampling from a Hugging Face export with ``transformers``' own ``generate``."""

    def __init__(self, path: Path, device: str | None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True).to(self.device).eval()

    def generate(self, prompt: str, max_new_tokens: int, temperature: float,
                 top_k: int | None, top_p: float | None, seed: int | None) -> str:
        import torch

        eos = self.tokenizer.eos_token_id
        ids = [eos, *self.tokenizer(prompt, add_special_tokens=False).input_ids]
        if seed is not None:
            torch.manual_seed(seed)
        sample = temperature > 0
        options = {"do_sample": sample, "max_new_tokens": max_new_tokens,
                   "eos_token_id": eos, "pad_token_id": self.tokenizer.pad_token_id}
        if sample:
            options.update(temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids], device=self.device), **options)
        new = out[0, len(ids):].tolist()
        if eos in new:
            new = new[:new.index(eos)]
        return self.tokenizer.decode(new)


def load_any_generator(ref: str, *, workdir: str | os.PathLike = "work",
                       device: str | None = None, stack: ExitStack):
    """A text generator for any model reference (see the module's docstring)."""
    from models.generation import TextGenerator, default_device, load_generator

    local = Path(ref).expanduser()
    if is_hf_export(local):
        return _HFGenerator(local, device)
    if local.suffix == ".ckpt" and local.is_file():
        import sentencepiece as spm

        from models.checkpoint import load_training_checkpoint

        tokenizer = next((p / "tokenizer.model" for p in (local.parent, local.parent.parent)
                          if (p / "tokenizer.model").is_file()), None)
        if tokenizer is None:
            raise ModelReferenceError(f"no tokenizer.model beside {local} or in its stage "
                                      "directory: copy the tokenize stage's tokenizer.model there")
        where = default_device(device)
        return TextGenerator(load_training_checkpoint(local, where),
                             spm.SentencePieceProcessor(model_file=str(tokenizer)), where)
    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="forgeline-model-")))
    return load_generator(resolve_model_dir(ref, workdir, scratch), device)


def registered_version(ref: str, tracking_uri: str) -> str | None:
    """``models:/<name>/<version>`` for a registry reference, ``latest`` and aliases
    resolved. None only where the reference asks for the latest version
    (``models:/<name>``, ``models:/<name>/latest``) of a name that has none yet; anything
    else that cannot be resolved (an unknown version or alias, an unreachable store)
    raises ModelReferenceError."""
    from mlflow.exceptions import MlflowException

    from tasks.redact import redact_secrets

    body = ref[len("models:/"):].strip("/")
    if "/" not in body and "@" not in body:
        ref = f"models:/{body}/latest"
    try:
        found = registry_version(MlflowClient(tracking_uri), ref, missing_ok=True)
    except MlflowException as exc:
        raise ModelReferenceError(f"{redact_secrets(ref)}: {redact_secrets(exc.message)}") \
            from None
    return f"models:/{found[0]}/{found[1]}" if found else None


FRESH = "fresh"  # the parent_model tag of a run that found no version and started fresh


def fetch_init_model(ref: str, if_missing: str, workdir: str | os.PathLike, uri: str,
                     pinned: str | None = None) -> dict | None:
    """The model that pretraining continues from, in ``<workdir>/init-models/<digest>/``
    (named by the content of its model.pt, so a new version is a new directory and a new
    stage key): ``{"ref", "resolved", "dir", "sha256", "tokenizer_sha256"}``. None when
    ``if_missing`` is 'fresh' and ``ref`` asks for the latest version of a registered
    model that has none. ``pinned`` is what an earlier attempt of the same pipeline run
    resolved (its ``forgeline.parent_model`` tag): a retry continues from the same model,
    not from a version registered since (perhaps by that attempt)."""
    import shutil

    from tasks.redact import redact_secrets

    if pinned == FRESH:
        return None
    resolved = pinned or (registered_version(ref, uri) if ref.startswith("models:/") else ref)
    if resolved is None:
        if if_missing == "fresh":
            log.info("pretrain.init_from %s: the registered model has no version yet, so a "
                     "fresh model is trained (pretrain.init_if_missing=fresh)", ref)
            return None
        raise ModelReferenceError(f"pretrain.init_from {ref}: the registered model has no "
                                  "version yet; register one first, or set "
                                  "pretrain.init_if_missing=fresh to start fresh when there "
                                  "is none")
    root = Path(workdir) / "init-models"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as scratch:
        found = download_model(resolved, uri, Path(scratch))
        digest = file_sha256(found / "model.pt")
        target = root / digest[:16]
        if not (target / "model.pt").is_file():
            staging = Path(scratch) / "copy"
            staging.mkdir()
            for name in ("model.pt", "tokenizer.model", "config.json"):
                if (found / name).is_file():
                    shutil.copyfile(found / name, staging / name)
            try:
                staging.rename(target)  # whole, or not at all
            except OSError:
                if not (target / "model.pt").is_file():  # not a concurrent run's copy
                    raise
    tokenizer = file_sha256(target / "tokenizer.model")
    log.info("pretrain continues from %s (model.pt sha256 %s…)", redact_secrets(resolved),
             digest[:12])
    return {"ref": redact_secrets(ref), "resolved": redact_secrets(resolved),
            "dir": str(target), "sha256": digest, "tokenizer_sha256": tokenizer}
