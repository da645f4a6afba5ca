"""Running a stage core once per distinct input: keyed output directories and manifests.

Each stage writes into ``<workdir>/stages/<stage>-<key>``, where the key hashes the
stage's config section, the content hashes of its inputs and the source of the code
that computes it. The directory is built under a temporary name and renamed into place
only when the core has finished and its ``manifest.json`` is written, so a directory
with a manifest is always complete: a rerun after a failure reuses every finished
stage and redoes only what failed or changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from tasks.shards import hash_tree, write_text_atomic

MANIFEST = "manifest.json"


class StageInputError(Exception):
    """The input of a stage cannot be used (empty corpus, unreadable file, ...).

    Raised by stage cores with a message that says what was wrong and what to do.
    It is a user error, not a flaky failure: it is never retried, and the CLI exits 2.
    """

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage, self.message = stage, message

    def __reduce__(self):  # survives pickling: process, Dask and Ray task runners
        return type(self), (self.stage, self.message)


def code_version(modules: Iterable[ModuleType | str | os.PathLike]) -> str:
    """Hash of the source files that compute a stage, so a code change invalidates its cache."""
    digest = hashlib.sha256()
    for item in modules:
        path = Path(item.__file__) if isinstance(item, ModuleType) else Path(item)
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def config_dict(config: BaseModel | dict | None) -> dict:
    if config is None:
        return {}
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json")
    return dict(config)


def stage_key(name: str, config: BaseModel | dict | None, input_hashes: Iterable[str],
              code: str, extra: dict | None = None) -> str:
    payload = json.dumps(
        {"stage": name, "config": config_dict(config), "inputs": list(input_hashes),
         "code": code, "extra": extra or {}},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_manifest(stage_dir: str | os.PathLike) -> dict | None:
    """The manifest of a finished stage directory (None if unfinished), its paths pointing
    into the directory where it is now, even if the work directory was moved since."""
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    here, then = Path(stage_dir).resolve(), Path(manifest["dir"])

    def rebase(p: str) -> str:
        try:
            return str(here / Path(p).relative_to(then))
        except ValueError:  # outside the stage directory: left as written
            return p

    manifest["output"] = rebase(manifest["output"])
    manifest["artifacts"] = {k: rebase(v) for k, v in manifest["artifacts"].items()}
    manifest["dir"] = str(here)
    return manifest


def _alive(pid: str) -> bool:
    """Whether the process that owns a temporary stage directory is still running here."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(pid) != os.getpid()  # our own leftover is from an earlier, failed attempt


def stage_dir(name: str, *, workdir: str | os.PathLike, config: BaseModel | dict | None = None,
              inputs: Iterable[dict] = (), code: Iterable[ModuleType | str | os.PathLike] = (),
              extra_key: dict | None = None) -> Path:
    """Where ``run_stage`` keeps this stage's output for these settings, inputs and code;
    it holds a finished output when ``load_manifest`` finds one there."""
    key = stage_key(name, config, [m["content_hash"] for m in inputs], code_version(code),
                    extra_key)
    return Path(workdir) / "stages" / f"{name}-{key}"


def run_stage(
    name: str,
    build: Callable[[Path], dict[str, Any]],
    *,
    workdir: str | os.PathLike,
    config: BaseModel | dict | None = None,
    inputs: Iterable[dict] = (),
    code: Iterable[ModuleType | str | os.PathLike] = (),
    extra_key: dict | None = None,
    log: Callable[[str], None] = print,
    resumable: bool = False,
) -> dict[str, Any]:
    """Run ``build`` into a fresh keyed directory, or reuse the directory if it is complete.

    ``build(stage_dir)`` writes the stage's files under ``stage_dir`` and returns a dict
    with ``count`` (documents or tokens produced), and optionally ``unit``, ``output`` (the
    data directory relative to ``stage_dir``, default ``"data"`` if it exists else ``"."``),
    ``stats`` (numbers worth tracking) and ``artifacts`` (name -> path relative to
    ``stage_dir``); any other keys are kept under ``info``. The returned manifest holds
    absolute paths.
    """
    inputs = list(inputs)
    return run_stage_in(stage_dir(name, workdir=workdir, config=config, inputs=inputs,
                                  code=code, extra_key=extra_key),
                        name, build, inputs=inputs, log=log, resumable=resumable)


def partial_dir(final_dir: Path) -> Path:
    """Where a resumable stage builds its output: one stable name per key, so a rerun
    after a kill finds the shards that finished (their completion markers) and keeps them."""
    return final_dir.parent / f".partial-{final_dir.name}"


def run_stage_in(final_dir: Path, name: str, build: Callable[[Path], dict[str, Any]], *,
                 inputs: Iterable[dict] = (), log: Callable[[str], None] = print,
                 resumable: bool = False) -> dict[str, Any]:
    """``run_stage`` once the stage's keyed directory (from ``stage_dir``) is known.

    A ``resumable`` stage builds in ``partial_dir`` and leaves it in place when it fails
    or is killed: its build skips the parts that finished (the sharded data stages keep a
    completion marker per shard). Other stages build in a directory of their own process
    and start over."""
    inputs = list(inputs)
    key = final_dir.name.removeprefix(f"{name}-")
    stages_dir = final_dir.parent

    manifest = load_manifest(final_dir)
    if manifest is not None:
        manifest["reused"] = True
        log(f"{name}: reusing finished output {final_dir} ({manifest['count']} {manifest['unit']})")
        return manifest

    stages_dir.mkdir(parents=True, exist_ok=True)
    for stale in stages_dir.glob(f".tmp-{name}-{key}-*"):
        if not _alive(stale.name.rsplit("-", 1)[-1]):  # left by an interrupted attempt
            shutil.rmtree(stale, ignore_errors=True)
    if final_dir.exists():  # a directory without manifest is an incomplete leftover
        shutil.rmtree(final_dir)
    if resumable:
        tmp_dir = partial_dir(final_dir)
        if tmp_dir.exists():
            log(f"{name}: resuming the unfinished output in {tmp_dir}")
            for partial_file in tmp_dir.rglob(".*.tmp"):  # a write the kill cut short
                partial_file.unlink(missing_ok=True)
        tmp_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp_dir = stages_dir / f".tmp-{name}-{key}-{os.getpid()}"
        tmp_dir.mkdir(parents=True)

    started = time.perf_counter()
    try:
        result = build(tmp_dir)
    except BaseException:
        if not resumable:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started

    output = result.get("output", "data" if (tmp_dir / "data").is_dir() else ".")
    manifest = {
        "stage": name,
        "key": key,
        "dir": str(final_dir.resolve()),
        "output": str((final_dir / output).resolve()),
        "count": int(result["count"]),
        "unit": result.get("unit", "documents"),
        "stats": result.get("stats", {}),
        "artifacts": {k: str((final_dir / v).resolve()) for k, v in
                      result.get("artifacts", {}).items()},
        "inputs": {m["stage"]: m["key"] for m in inputs},
        "info": {k: v for k, v in result.items()
                 if k not in {"count", "unit", "stats", "artifacts", "output"}},
        "content_hash": hash_tree(tmp_dir),
        "seconds": round(seconds, 3),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_text_atomic(tmp_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
    try:
        os.replace(tmp_dir, final_dir)
    except OSError:
        finished = load_manifest(final_dir)
        if finished is None:
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)  # another run finished it meanwhile
        log(f"{name}: another run finished {final_dir} first; using its output")
        return {**finished, "reused": True}
    manifest["reused"] = False
    log(f"{name}: wrote {manifest['count']} {manifest['unit']} to {final_dir} in {seconds:.1f}s")
    return manifest
