"""MLflow bookkeeping: one parent run per pipeline run, one nested run per stage.

MLflow's active run is thread-local and Prefect may run tasks in worker threads, so
everything here logs to an explicit run id through ``MlflowClient``; nothing relies on
``mlflow.active_run()``.

A tracking URI may hold credentials (``http://user:secret@host:5000``,
``postgresql://user:secret@db/mlflow``): ``tracking_uri`` returns it as it is, to connect
with, and everything meant for people goes through ``display_uri``. Params and tags are
masked the same way before they are logged.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from tasks.redact import install_log_redaction, redact_exception, redact_secrets, redact_url

FLOW_RUN_TAG = "prefect.flow_run_id"
MAX_BATCH = 100  # MLflow's log_batch takes at most 100 params / 1000 metrics per call


def tracking_uri(workdir: str | os.PathLike) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an embedded SQLite store in the work directory.

    The URI as given, credentials included: to connect with, never to show (``display_uri``)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(workdir) / 'mlflow.db').resolve()}"


def display_uri(uri: str) -> str:
    """The tracking URI to show people: any user and password masked
    (``http://user:secret@host:5000`` -> ``http://***@host:5000``)."""
    return redact_url(uri)


def ui_command(uri: str, workdir: str | os.PathLike) -> str:
    """How a person opens the MLflow UI for this store; it never holds credentials (a
    browser asks for them; a store URI with a password is referred to through the
    environment variable it came from)."""
    if uri.startswith(("http://", "https://")):
        return f"open {redact_url(uri, mask='')}"
    shown, given = display_uri(uri), os.environ.get("MLFLOW_TRACKING_URI") or ""
    if given and display_uri(given) != given and display_uri(given) == shown:
        store = '"$MLFLOW_TRACKING_URI"'  # the store holds a password: use it from there
    else:
        store = shlex.quote(shown)
    mlflow = Path(sys.executable).parent / "mlflow"
    if mlflow.exists():
        try:
            mlflow = mlflow.relative_to(Path.cwd())
        except ValueError:
            pass
    else:
        mlflow = Path("mlflow")
    return f"{shlex.quote(str(mlflow))} ui --backend-store-uri {store} --port 5000"


def _numeric(stats: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in stats.items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
    return out


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return redact_secrets(text)[:6000]


def _tags(tags: dict[str, Any]) -> dict[str, str]:
    return {k: redact_secrets(str(v)) for k, v in tags.items()}


class _MaskedErrors:
    """An ``MlflowClient`` whose errors show no credentials: MLflow quotes the tracking URI,
    password included, when it cannot reach the server."""

    def __init__(self, client: MlflowClient):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except Exception as exc:  # re-raised as it is, only masked
                redact_exception(exc)
                raise

        return call


class Tracker:
    """Logs a pipeline run to MLflow through explicit run ids."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | os.PathLike | None = None):
        install_log_redaction()  # a library's message quoting the URI shows it masked
        if display_uri(uri) != uri:
            # MLflow prints "View run ... at: <uri>/#/..." on standard output as each run
            # ends, credentials included; the summary shows the run's link without them.
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.uri = uri
        self.client = _MaskedErrors(MlflowClient(tracking_uri=uri))
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            location = None
            if artifact_root is not None and not uri.startswith(("http://", "https://")):
                location = Path(artifact_root).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(experiment,
                                                               artifact_location=location)

    # runs -----------------------------------------------------------------------------
    def start_parent(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        """The pipeline's run; a retried Prefect flow run continues its unfinished run."""
        flow_run_id = tags.get(FLOW_RUN_TAG)
        if flow_run_id:
            previous = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}' "
                              "and tags.`forgeline.kind` = 'pipeline'",
                max_results=1)
            if previous:
                run_id = previous[0].info.run_id
                self.client.update_run(run_id, status="RUNNING")
                return run_id
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags=_tags({**tags, "forgeline.kind": "pipeline"}))
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def start_stage(self, parent_id: str, stage: str, params: dict[str, Any],
                    tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=stage,
            tags=_tags({"mlflow.parentRunId": parent_id, "forgeline.kind": "stage",
                        "forgeline.stage": stage, **(tags or {})}))
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def finished_stage_run(self, parent_id: str, stage: str, key: str) -> str | None:
        """The id of this parent's finished run of ``stage`` for the output ``key``, if any:
        a retried flow run finds the stages its earlier attempt already recorded."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' "
                          f"and tags.`forgeline.stage` = '{stage}' "
                          f"and tags.`stage_key` = '{key}' and attributes.status = 'FINISHED'",
            max_results=1)
        return runs[0].info.run_id if runs else None

    def finish(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")

    # logging --------------------------------------------------------------------------
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(run_id, params=items[i:i + MAX_BATCH])

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in _numeric(metrics).items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _tags(tags).items()])

    def log_artifact(self, run_id: str, path: str | os.PathLike,
                     artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(run_id, str(path), artifact_path)

    @contextmanager
    def system_metrics(self, run_id: str, every_seconds: float = 5.0) -> Iterator[None]:
        """MLflow's system metrics (CPU, memory, disk, network, GPU) logged to ``run_id``
        every few seconds while the block runs (training stages)."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=every_seconds,
                                       tracking_uri=self.uri)
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()
            # MLflow publishes a sample only after a full interval; a short stage would
            # have none, so the last sample is published when the stage ends
            try:
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
            except Exception as exc:  # noqa: BLE001 - metrics are not worth failing a stage
                logging.getLogger(__name__).warning("system metrics not logged: %s",
                                                    type(exc).__name__)

    def metrics_callback(self, run_id: str) -> Callable[[dict[str, float], int], None]:
        """For training loops: ``on_metrics(metrics, step)`` logs to ``run_id``."""
        def on_metrics(metrics: dict[str, float], step: int) -> None:
            self.log_metrics(run_id, metrics, step)
        return on_metrics

    def run_url(self, run_id: str) -> str | None:
        """The run's page in the MLflow UI (without any credentials of the URI)."""
        if self.uri.startswith(("http://", "https://")):
            base = redact_url(self.uri, mask="").rstrip("/")
            return f"{base}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return None
