"""Where the data stages' shard tasks run: both local cores, or a Dask cluster.

The data flow's task runner comes from ``execution`` in the config, so the same flow
code runs in one process pool on a laptop and on a multi-machine Dask cluster. Every
shard is a Prefect task run with its own retries; the stage cores only see a ``Mapper``
(``prefect_mapper`` here), which submits a task per item and returns the results in
item order, so the output does not depend on which worker finished first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

from flows.config import ExecutionConfig
from tasks.progress import progress
from tasks.stage import StageInputError


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_count(config: ExecutionConfig) -> int:
    return config.workers or cores()


def task_runner(config: ExecutionConfig) -> TaskRunner:
    """The task runner for the data flow's shard tasks, as ``execution`` says."""
    if config.engine == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:  # pragma: no cover - a dependency of forgeline
            raise StageInputError("execution", "execution.engine=dask needs prefect-dask: "
                                               "pip install prefect-dask") from None
        if config.dask_address:
            return DaskTaskRunner(address=config.dask_address)
        return DaskTaskRunner(cluster_kwargs={
            "n_workers": worker_count(config), "threads_per_worker": config.threads_per_worker,
            "processes": True, "dashboard_address": ":0"})
    return ProcessPoolTaskRunner(max_workers=worker_count(config))


def describe(config: ExecutionConfig) -> str:
    if config.engine == "dask":
        where = config.dask_address or (f"a local Dask cluster of {worker_count(config)} "
                                        f"workers x {config.threads_per_worker} threads")
        return f"dask ({where})"
    return f"local ({worker_count(config)} worker processes)"


@contextmanager
def api_url_for_workers() -> Iterator[None]:
    """Worker processes report their task runs to the Prefect API of this flow run. With
    no PREFECT_API_URL, Prefect runs a temporary server in this process that the workers
    cannot find, and each would start one of its own: point them at ours meanwhile."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = str(client.api_url)
    os.environ["PREFECT_API_URL"] = url
    try:
        yield
    finally:
        if os.environ.get("PREFECT_API_URL") == url:
            del os.environ["PREFECT_API_URL"]


def retry_unless_input_error(task, task_run, state) -> bool:
    """Bad input will be just as bad next time: retry only other failures."""
    return not isinstance(getattr(state, "data", None), StageInputError)


# Every forgeline task: no result caching (stage directories are the cache), and no retry
# of bad input.
RETRIES = {"retry_condition_fn": retry_unless_input_error, "cache_policy": NO_CACHE}


@task(name="shard", retries=2, retry_delay_seconds=[2, 10], **RETRIES)
def shard_task(function: Callable[..., Any], arguments: tuple) -> Any:
    """One item of a stage (a shard, a band, ...): finished items are skipped inside."""
    return function(*arguments)


def prefect_mapper(label: str, function: Callable[..., Any], arguments: list[tuple]) -> list:
    """Submit one task run per item to the flow's task runner; results in item order."""
    width = len(str(max(len(arguments) - 1, 0)))
    futures = [shard_task.with_options(task_run_name=f"{label}-{number:0{width}d}")
               .submit(function, args) for number, args in enumerate(arguments)]
    results = []
    with progress(total=len(futures), desc=label, unit="task") as bar:
        for future in futures:
            results.append(future.result())
            bar.update(1)
    return results
