"""The data phase gives the same output, byte for byte, on every engine: the default
local process pool, a Dask LocalCluster of 2 workers, and a Dask scheduler with 2 workers
started as separate processes on loopback. And a data stage killed halfway keeps its
finished shards when it is run again."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.config import load_config
from flows.pipeline import pipeline
from tasks.shards import iter_records, shard_paths
from tests.flows.conftest import write_corpus

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"
BIN = Path(sys.executable).parent


def data_phase(workdir: Path, corpus: Path, *overrides: str) -> dict:
    config = load_config(TINY_CONFIG, [f"source.paths=[{corpus}]", "source.shard_size=10",
                                       *overrides])
    return pipeline(config=config, workdir=str(workdir), until="pii")["stages"]


def fingerprint(stages: dict) -> dict:
    """Every data stage's output and removed shards: file names and bytes."""
    out = {}
    for name in ("extract", "filter", "dedup", "pii"):
        stage_dir = Path(stages[name]["output"]).parent
        for folder in ("data", "removed"):
            for path in shard_paths(stage_dir / folder):
                out[f"{name}/{folder}/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def dask_cluster(tmp_path, prefect_server):
    """`dask scheduler` and two `dask worker` processes on loopback, as on a real cluster
    (where each worker is told the Prefect API by PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL

    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "FORGELINE_PROGRESS": "0"}
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file",
                               str(scheduler_file)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    deadline = time.monotonic() + 60
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    address = json.loads(scheduler_file.read_text())["address"]
    for number in range(2):
        procs.append(subprocess.Popen(
            [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
             "--host", "127.0.0.1", "--no-dashboard", "--name", f"test-worker-{number}"],
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=90)
        assert len(client.scheduler_info()["workers"]) == 2
    yield address
    for proc in reversed(procs):
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_same_output_on_every_engine(prefect_server, corpus, tmp_path, dask_cluster):
    local = data_phase(tmp_path / "local", corpus, "execution.workers=2")
    assert len(shard_paths(Path(local["crawl"]["output"]))) == 5  # 41 documents, 10 a shard
    expected = fingerprint(local)
    assert {k.split("/")[0] for k in expected} == {"extract", "filter", "dedup", "pii"}
    cleaned = {r["id"]: r["text"] for r in iter_records(local["pii"]["output"])}
    assert "doc-dup" not in cleaned and "<EMAIL_ADDRESS>" in cleaned["doc-001"]

    local_cluster = data_phase(tmp_path / "dask-local", corpus, "execution.engine=dask",
                               "execution.workers=2")
    assert fingerprint(local_cluster) == expected

    remote = data_phase(tmp_path / "dask-remote", corpus, "execution.engine=dask",
                        f"execution.dask_address={dask_cluster}")
    assert fingerprint(remote) == expected


def test_a_killed_stage_keeps_its_finished_shards(tmp_path, corpus):
    """SIGKILL `forgeline run` while filter is halfway; the rerun reuses the shards that
    had finished (same files, untouched) and ends with the uninterrupted run's output."""
    big = write_corpus(tmp_path / "big", count=6000, seed=3).parent
    env = {**os.environ, "FORGELINE_PROGRESS": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)

    def command(workdir: Path) -> list[str]:
        return [str(BIN / "forgeline"), "run", "--config", str(TINY_CONFIG), "--workdir",
                str(workdir), "--until", "filter", "--json", "--set", f"source.paths=[{big}]",
                "--set", "source.shard_size=100", "--set", "execution.workers=1",
                "--set", "filter.min_words=20"]

    work = tmp_path / "killed"
    proc = subprocess.Popen(command(work), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    markers: list[Path] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        markers = sorted((work / "stages").glob(".partial-filter-*/shards/*.json"))
        if len(markers) >= 5:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(markers) >= 5, "filter did not get halfway before the run ended"
    partial = markers[0].parents[1]
    finished = {m.stem: (m.stat().st_ino, m.stat().st_mtime_ns) for m in
                (partial / "shards").glob("*.json")}
    outputs = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in
               (partial / "data").glob("shard-*.parquet") if p.stem in finished}
    assert 5 <= len(finished) < 60 and outputs

    rerun = subprocess.run(command(work), check=False, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming the unfinished output" in rerun.stdout + rerun.stderr
    stage = json.loads(rerun.stdout.strip().splitlines()[-1])["stages"]["filter"]
    final = Path(stage["output"]).parent
    assert final.name == partial.name.removeprefix(".partial-")
    for stem, stamp in finished.items():  # finished shards were not recomputed
        marker = final / "shards" / f"{stem}.json"
        assert (marker.stat().st_ino, marker.stat().st_mtime_ns) == stamp
    for name, stamp in outputs.items():
        path = final / "data" / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp

    clean = subprocess.run(command(tmp_path / "clean"), check=False, env=env, capture_output=True,
                           text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    reference = Path(json.loads(clean.stdout.strip().splitlines()[-1])["stages"]["filter"]
                     ["output"]).parent
    for folder in ("data", "removed"):
        assert [p.read_bytes() for p in shard_paths(final / folder)] == \
            [p.read_bytes() for p in shard_paths(reference / folder)]
