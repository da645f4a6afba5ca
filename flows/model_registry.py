"""The trained model as an MLflow model: logged with a signature and an input example,
registered by name in the Model Registry, and fetched back by any reference.

Layout in MLflow (one pipeline run that trained):

- a LoggedModel named ``model`` (``models:/<model_id>``) whose source run is the pipeline's
  parent run, in the run's experiment. It is a pyfunc (:class:`TextGenerationModel`) with
  ``artifacts/model.pt``, ``artifacts/tokenizer.model`` and ``artifacts/config.json``; its
  params are the run's (the flattened config), its metrics the run's headline metrics, its
  tags ``forgeline.stage`` (``finetune`` or ``pretrain``) and ``forgeline.stage_run_id``.
- a version of the registered model (``forgeline`` by default): ``models:/forgeline/<n>``,
  linked to the run and the LoggedModel, with the headline metrics as tags and in its
  description, and the same ``forgeline.*`` tags.

Everything goes through an explicit ``MlflowClient`` for the given tracking URI; nothing
here sets MLflow's global tracking URI or active run, so it is safe beside Prefect's
threads. Errors never show the password of a tracking URI.

The pyfunc needs forgeline importable where it is loaded (``mlflow models serve
--env-manager local`` from forgeline's environment): its class lives in this module and
the model code in ``models``.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.artifacts
import mlflow.pyfunc
import pandas as pd
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from tasks.redact import redact_exception, redact_secrets, redact_url

MODEL_FILES = ("model.pt", "tokenizer.model", "config.json")
ARTIFACT_KEYS = {"model": "model.pt", "tokenizer": "tokenizer.model", "config": "config.json"}
LOGGED_MODEL_NAME = "model"  # so the run's model is also runs:/<run_id>/model
PROMPT_COLUMN = "prompt"
OUTPUT_COLUMN = "generated_text"
DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.8, "top_k": None,
                                  "top_p": None, "seed": None}
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", PROMPT_COLUMN)]),
    outputs=Schema([ColSpec("string", OUTPUT_COLUMN)]),
    params=ParamSchema([
        ParamSpec("max_new_tokens", "long", DEFAULT_PARAMS["max_new_tokens"]),
        ParamSpec("temperature", "double", DEFAULT_PARAMS["temperature"]),
        ParamSpec("top_k", "long", None),
        ParamSpec("top_p", "double", None),
        ParamSpec("seed", "long", None),
    ]))
RUN_ID = re.compile(r"[0-9a-f]{32}")
REFERENCE_FORMS = ("a model directory, an MLflow run id, runs:/<run_id>[/<path>], "
                   "models:/<name>/<version>, models:/<name>/latest, models:/<name>@<alias> "
                   "or models:/<model_id>")


# The pyfunc is logged as code (MLflow's "models from code", no pickle): this file, which
# takes the class from the installed forgeline package.
MODEL_CODE = """\
\"\"\"forgeline's text-generation model (flows.model_registry.TextGenerationModel).\"\"\"
import mlflow

from flows.model_registry import TextGenerationModel

mlflow.models.set_model(TextGenerationModel())
"""


class ModelReferenceError(LookupError):
    """A model reference names no model: unknown run, model name or version, or a run or
    directory without a model in it. The message says which and what was looked for."""


# the pyfunc -----------------------------------------------------------------------------
class TextGenerationModel(mlflow.pyfunc.PythonModel):
    """An MLflow pyfunc around :class:`models.generation.TextGenerator`.

    Input: a DataFrame with a string column ``prompt`` (one row per prompt). Params (all
    optional): ``max_new_tokens`` (64), ``temperature`` (0.8; 0 is greedy), ``top_k``,
    ``top_p``, ``seed`` (each prompt is sampled from a generator seeded with it). Output: a
    DataFrame with one string column ``generated_text``, each prompt's continuation.
    """

    def load_context(self, context) -> None:
        from models.generation import load_generator

        folders = {Path(path).parent for path in context.artifacts.values()}
        if len(folders) != 1:
            raise MlflowException(f"the model's artifacts are not in one folder: {folders}")
        self._generator = load_generator(folders.pop())

    def predict(self, context, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        settings = dict(DEFAULT_PARAMS)
        settings.update({k: v for k, v in (params or {}).items()
                         if k in DEFAULT_PARAMS and v is not None})
        texts = [self._generator.generate(prompt, **settings) for prompt in _prompts(model_input)]
        return pd.DataFrame({OUTPUT_COLUMN: texts})


def _prompts(model_input: Any) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        if PROMPT_COLUMN in model_input.columns:
            column = model_input[PROMPT_COLUMN]
        elif len(model_input.columns) == 1:
            column = model_input.iloc[:, 0]
        else:
            raise MlflowException.invalid_parameter_value(
                f"expected a column {PROMPT_COLUMN!r}, got {list(model_input.columns)}")
        return ["" if value is None else str(value) for value in column]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict) and PROMPT_COLUMN in model_input:
        value = model_input[PROMPT_COLUMN]
        return [value] if isinstance(value, str) else [str(v) for v in value]
    return [str(value) for value in model_input]


# masked errors and small helpers ----------------------------------------------------------
@contextmanager
def _masked_errors() -> Iterator[None]:
    """MLflow quotes the tracking URI, password included, in some errors: mask it."""
    try:
        yield
    except Exception as exc:
        redact_exception(exc)
        raise


def _client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def _requirements() -> list[str]:
    """What the pyfunc imports, pinned to the versions it was logged with. forgeline itself
    is not listed (it is not on PyPI): serve it from forgeline's environment."""
    pins = []
    for name in ("mlflow", "torch", "sentencepiece", "pandas"):
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def _is_rest(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://", "databricks"))


def _check_model_dir(model_dir: Path) -> None:
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise ModelReferenceError(f"{model_dir} is not a model directory: no "
                                  f"{', '.join(missing)} in it")


def _metric_tag(value: float) -> str:
    return f"{value:.6g}"


# logging and registering --------------------------------------------------------------------
@dataclass
class RegisteredVersion:
    """What :func:`log_and_register` logged and registered."""

    name: str | None  # None: logged, not registered
    version: str | None
    model_uri: str  # models:/<name>/<version>, or models:/<model_id> when not registered
    model_id: str  # the LoggedModel
    run_id: str  # the run it was logged on
    stage: str | None  # the training stage the weights come from
    reused: bool = False  # found on the run, logged there by an earlier attempt

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def log_model(model_dir: str | Path, tracking_uri: str, run_id: str, *,
              metrics: dict[str, float] | None = None, tags: dict[str, Any] | None = None,
              example_prompt: str = "The ") -> str:
    """Log the model in ``model_dir`` (model.pt, tokenizer.model, config.json) on run
    ``run_id`` as an MLflow pyfunc with signature and input example; returns the
    LoggedModel's id (``models:/<id>``).

    The LoggedModel is in the run's experiment, carries the run's params, ``tags`` and
    ``metrics`` (logged on the run at step 0, linked to the model)."""
    model_dir = Path(model_dir)
    _check_model_dir(model_dir)
    client = _client(tracking_uri)
    with _masked_errors():
        run = client.get_run(run_id)
        model = client.create_logged_model(
            experiment_id=run.info.experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id,
            tags=redact_secrets({k: str(v) for k, v in (tags or {}).items()}),
            params=dict(run.data.params), model_type="text-generation")
        try:
            client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
            with tempfile.TemporaryDirectory(prefix="forgeline-mlflow-model-") as tmp:
                local = Path(tmp) / "model"
                code = Path(tmp) / "forgeline_text_model.py"
                code.write_text(MODEL_CODE, encoding="utf-8")
                mlflow.pyfunc.save_model(
                    path=str(local), python_model=str(code),
                    artifacts={key: str(model_dir / name) for key, name in ARTIFACT_KEYS.items()},
                    signature=SIGNATURE,
                    input_example=(pd.DataFrame({PROMPT_COLUMN: [example_prompt]}),
                                   {"max_new_tokens": 16, "temperature": 0.8}),
                    pip_requirements=_requirements(),
                    mlflow_model=Model(artifact_path=model.artifact_location, run_id=run_id,
                                       model_uuid=model.model_id, model_id=model.model_id),
                    metadata={"forgeline": redact_secrets(
                        {k: str(v) for k, v in (tags or {}).items()})})
                client.log_model_artifacts(model.model_id, str(local))
            if metrics:
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[
                    Metric(key, float(value), now, 0, model_id=model.model_id, run_id=run_id)
                    for key, value in metrics.items()])
        except BaseException:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def register_model(model_id: str, tracking_uri: str, name: str, *,
                   tags: dict[str, Any] | None = None,
                   description: str | None = None) -> str:
    """Add the LoggedModel ``model_id`` as a new version of registered model ``name``
    (created when missing), linked to the model's source run; returns the version."""
    client = _client(tracking_uri)
    with _masked_errors():
        model = client.get_logged_model(model_id)
        try:
            client.create_registered_model(
                name, description="Small Llama-style language models trained by forgeline; "
                                  "each version generates text from a 'prompt' column.")
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        # The SQL registry resolves a models:/<id> source through MLflow's global tracking
        # URI, not this client's: hand it the artifact location (a server resolves the id).
        source = f"models:/{model_id}" if _is_rest(tracking_uri) else model.artifact_location
        version = client.create_model_version(
            name, source=source, run_id=model.source_run_id,
            tags=redact_secrets({k: str(v) for k, v in (tags or {}).items()}),
            description=description, model_id=model_id)
        # as MLflow's own registration does: the LoggedModel lists its registered versions
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        listed = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
            [*listed, {"name": version.name, "version": version.version}])})
    return str(version.version)


def log_and_register(model_dir: str | Path, tracking_uri: str, run_id: str,
                     name: str | None = "forgeline", *, stage: str | None = None,
                     stage_run_id: str | None = None, metrics: dict[str, float] | None = None,
                     example_prompt: str = "The ") -> RegisteredVersion:
    """Log ``model_dir`` on run ``run_id`` as an MLflow model and register it as a new
    version of ``name`` (``None``: log only), with ``metrics`` linked to the LoggedModel
    and, as tags and in the description, on the version.

    With ``stage_run_id``, a model this run already holds for that stage run (an earlier
    attempt of a retried flow run) is not logged again, and its registered version, if it
    has one, is returned (``reused``)."""
    tags = {"forgeline.stage": stage or "", "forgeline.stage_run_id": stage_run_id or "",
            "forgeline.pipeline_run_id": run_id}
    tags = {k: v for k, v in tags.items() if v}
    metrics = {k: float(v) for k, v in (metrics or {}).items()
               if not isinstance(v, bool) and math.isfinite(float(v))}
    earlier = _earlier_attempt(tracking_uri, run_id, tags, name) if stage_run_id else None
    if earlier and (earlier[1] or name is None):
        model_id, version = earlier
        uri = f"models:/{name}/{version}" if name else f"models:/{model_id}"
        return RegisteredVersion(name, version, uri, model_id, run_id, stage, reused=True)
    if earlier:
        model_id = earlier[0]
    else:
        model_id = log_model(model_dir, tracking_uri, run_id, metrics=metrics, tags=tags,
                             example_prompt=example_prompt)
    if name is None:
        return RegisteredVersion(None, None, f"models:/{model_id}", model_id, run_id, stage)
    label = {"finetune": "fine-tuned", "pretrain": "pretrained", "dpo": "preference-tuned",
             "domain": "domain-tuned"}.get(stage or "", "trained")
    lines = [f"forgeline {label} model from pipeline run `{run_id}`"
             + (f" (weights of stage run `{stage_run_id}`)." if stage_run_id else "."),
             "", ("Input: a `prompt` column; params `max_new_tokens`, `temperature`, `top_k`, "
                  "`top_p`, `seed`. Output: a `generated_text` column.")]
    if metrics:
        lines += ["", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {_metric_tag(v)} |" for k, v in metrics.items()]
    version = register_model(model_id, tracking_uri, name,
                             tags={**tags, **{k: _metric_tag(v) for k, v in metrics.items()}},
                             description="\n".join(lines))
    return RegisteredVersion(name, version, f"models:/{name}/{version}", model_id, run_id, stage,
                           reused=earlier is not None)


def _earlier_attempt(tracking_uri: str, run_id: str, tags: dict[str, str],
                     name: str | None) -> tuple[str, str | None] | None:
    """(model id, its existing version of ``name`` or None) of a READY model on the run
    with these tags, if any."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client = _client(tracking_uri)
    with _masked_errors():
        for model in _logged_models(client, client.get_run(run_id)):
            if model.status != LoggedModelStatus.READY or any(
                    model.tags.get(k) != v for k, v in tags.items()):
                continue
            listed = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
            for entry in reversed(listed):
                if entry.get("name") != name:
                    continue
                try:
                    client.get_model_version(name, str(entry["version"]))
                except MlflowException as exc:
                    if _not_found(exc):
                        continue
                    raise
                return model.model_id, str(entry["version"])
            return model.model_id, None
    return None


# fetching a model back -------------------------------------------------------------------
def download_model(ref: str, tracking_uri: str, dest: str | Path) -> Path:
    """A local directory holding ``model.pt``, ``tokenizer.model`` and ``config.json`` for
    ``ref``, one of:

    - a local directory: a training stage's output, or an MLflow model of this module
      (its ``artifacts/`` folder); returned as it is, nothing is copied;
    - an MLflow run id or ``runs:/<run_id>``: the model logged on the run (a pipeline run),
      else the run's own ``model.pt`` (a pretrain or finetune stage run), else that of the
      pipeline run's finetune (else pretrain) stage run;
    - ``runs:/<run_id>/<path>``: the run's logged model named ``<path>`` (``model``), or
      the run's artifacts under ``<path>``;
    - ``models:/<name>/<version>``, ``models:/<name>/latest``, ``models:/<name>@<alias>``
      (Model Registry) or ``models:/<model_id>`` (a LoggedModel).

    Downloaded files are written into ``dest`` (created), which is returned. Raises
    :class:`ModelReferenceError` for an unknown run, model name, version or alias, or
    where there is no model."""
    ref = str(ref).strip()
    if not ref:
        raise ModelReferenceError(f"no model given; expected {REFERENCE_FORMS}")
    dest = Path(dest)
    local = Path(ref).expanduser()
    if local.is_dir():
        return _local_model_dir(local)
    if not ref.startswith(("models:/", "runs:/")) and not RUN_ID.fullmatch(ref):
        if local.exists():
            raise ModelReferenceError(f"{ref} is a file; expected {REFERENCE_FORMS}")
        raise ModelReferenceError(f"{ref!r} is not a directory, MLflow run id or model URI; "
                                  f"expected {REFERENCE_FORMS}")
    client = _client(tracking_uri)  # only now: a client of a SQLite store creates it
    with _masked_errors():
        if ref.startswith("models:/"):
            return _fetch(client, tracking_uri, _registry_location(client, ref), ref, dest)
        if ref.startswith("runs:/"):
            run_id, _, path = ref[len("runs:/"):].strip("/").partition("/")
            return _from_run(client, tracking_uri, run_id, path, dest, ref)
        return _from_run(client, tracking_uri, ref, "", dest, ref)


def _local_model_dir(directory: Path) -> Path:
    for candidate in (directory, directory / "artifacts"):
        if all((candidate / name).is_file() for name in MODEL_FILES):
            return candidate.resolve()
    _check_model_dir(directory)  # raises, naming the missing files
    return directory  # pragma: no cover


def _not_found(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _registry_location(client: MlflowClient, ref: str) -> str:
    """The artifact location of the model a models:/ URI names."""
    body = ref[len("models:/"):].strip("/")
    if "/" not in body and body.startswith("m-"):
        try:
            return client.get_logged_model(body).artifact_location
        except MlflowException as exc:
            if _not_found(exc):
                raise ModelReferenceError(f"no logged model {body}") from None
            raise
    name, version = registry_version(client, ref)
    return client.get_model_version_download_uri(name, version)


def registry_version(client: MlflowClient, ref: str, *,
                     missing_ok: bool = False) -> tuple[str, str] | None:
    """The registered model name and (existing) version a ``models:/<name>/<version>``,
    ``models:/<name>/latest`` or ``models:/<name>@<alias>`` URI names. With
    ``missing_ok``, None where the latest version is asked of a name that has none (or
    is not registered); every other failure raises ModelReferenceError."""
    body = ref[len("models:/"):].strip("/")
    if "@" in body and "/" not in body:
        name, alias = body.split("@", 1)
        try:
            version = client.get_model_version_by_alias(name, alias).version
        except MlflowException as exc:
            if _not_found(exc) or exc.error_code == "INVALID_PARAMETER_VALUE":
                _require_registered(client, name)
                raise ModelReferenceError(f"registered model {name!r} has no alias "
                                          f"{alias!r}") from None
            raise
        return name, _existing_version(client, name, str(version))
    parts = body.split("/")
    if len(parts) != 2 or not parts[0]:
        raise ModelReferenceError(f"{ref!r} is not a model URI; expected "
                                  "models:/<name>/<version>, models:/<name>/latest, "
                                  "models:/<name>@<alias> or models:/<model_id>")
    name, version = parts
    if version == "latest":
        try:
            _require_registered(client, name)
        except ModelReferenceError:
            if missing_ok:
                return None
            raise
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            if missing_ok:
                return None
            raise ModelReferenceError(f"registered model {name!r} has no versions")
        version = str(max(int(v.version) for v in versions))
    elif not version.isdigit():
        raise ModelReferenceError(f"{ref!r}: the version must be a number or 'latest' "
                                  "(stages are not supported; use an alias: "
                                  "models:/<name>@<alias>)")
    return name, _existing_version(client, name, version)


def _require_registered(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if _not_found(exc):
            raise ModelReferenceError(f"no registered model named {name!r}") from None
        raise


def _existing_version(client: MlflowClient, name: str, version: str) -> str:
    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        if _not_found(exc):
            _require_registered(client, name)
            raise ModelReferenceError(f"registered model {name!r} has no version "
                                      f"{version}") from None
        raise
    return version


def _fetch(client: MlflowClient, tracking_uri: str, location: str, ref: str,
           dest: Path) -> Path:
    """Download the model files of the MLflow model at artifact ``location`` into dest."""
    with tempfile.TemporaryDirectory(prefix="forgeline-download-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=location.rstrip("/") + "/artifacts", dst_path=tmp,
                tracking_uri=tracking_uri))
        except (MlflowException, OSError):
            raise ModelReferenceError(f"{ref} is not a forgeline model: no artifacts/ "
                                      f"with {', '.join(MODEL_FILES)} in it") from None
        return _place(local, dest, ref)


def _place(found: Path, dest: Path, ref: str) -> Path:
    missing = [name for name in MODEL_FILES if not (found / name).is_file()]
    if missing:
        raise ModelReferenceError(f"{ref} holds no forgeline model: {', '.join(missing)} "
                                  "missing")
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copyfile(found / name, dest / name)
    return dest


def _get_run(client: MlflowClient, run_id: str, tracking_uri: str):
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if _not_found(exc) or exc.error_code == "INVALID_PARAMETER_VALUE":
            raise ModelReferenceError(f"no MLflow run {run_id} in "
                                      f"{redact_url(tracking_uri)}") from None
        raise


def _logged_models(client: MlflowClient, run) -> list:
    """The run's logged models, the last logged first."""
    outputs = run.outputs.model_outputs if run.outputs else []
    models = []
    for output in sorted(outputs, key=lambda o: o.step, reverse=True):
        try:
            models.append(client.get_logged_model(output.model_id))
        except MlflowException as exc:
            if not _not_found(exc):
                raise
    return sorted(models, key=lambda m: m.creation_timestamp, reverse=True)


def _from_run(client: MlflowClient, tracking_uri: str, run_id: str, path: str, dest: Path,
              ref: str) -> Path:
    run = _get_run(client, run_id, tracking_uri)
    models = [m for m in _logged_models(client, run) if m.status == LoggedModelStatus.READY]
    if path:
        named = [m for m in models if m.name == path]
        if named:
            return _fetch(client, tracking_uri, named[0].artifact_location, ref, dest)
        with tempfile.TemporaryDirectory(prefix="forgeline-download-") as tmp:
            try:
                local = Path(client.download_artifacts(run_id, path, tmp))
            except (MlflowException, OSError):
                raise ModelReferenceError(f"run {run_id} has no logged model or artifact "
                                          f"{path!r}") from None
            if local.is_dir() and (local / "artifacts").is_dir() and (local / "MLmodel").is_file():
                local = local / "artifacts"
            return _place(local, dest, ref)
    if models:
        return _fetch(client, tracking_uri, models[0].artifact_location, ref, dest)
    if _has_model_files(client, run_id):
        return _download_run_files(client, run_id, dest, ref)
    for stage in ("dpo", "finetune", "domain", "pretrain"):  # a run logged without a model
        children = client.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and "
                          f"tags.`forgeline.stage` = '{stage}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1)
        if children and _has_model_files(client, children[0].info.run_id):
            return _download_run_files(client, children[0].info.run_id, dest, ref)
    raise ModelReferenceError(
        f"run {run_id} holds no model: no logged MLflow model, no {', '.join(MODEL_FILES)} "
        "among its artifacts, and no finished dpo, finetune, domain or pretrain stage run "
        "under it")


def _has_model_files(client: MlflowClient, run_id: str) -> bool:
    names = {Path(a.path).name for a in client.list_artifacts(run_id) if not a.is_dir}
    return set(MODEL_FILES) <= names


def _download_run_files(client: MlflowClient, run_id: str, dest: Path, ref: str) -> Path:
    with tempfile.TemporaryDirectory(prefix="forgeline-download-") as tmp:
        for name in MODEL_FILES:
            client.download_artifacts(run_id, name, tmp)
        return _place(Path(tmp), dest, ref)
