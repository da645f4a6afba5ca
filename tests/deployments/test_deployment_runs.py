"""The deployments work against a real Prefect server: registered from prefect.yaml, the
nightly schedule creates runs, and a run triggered with edited parameters (what the UI
form posts) is picked up by a process worker, completes and is recorded in MLflow."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from tests.flows.conftest import ROOT, TINY_CONFIG, write_corpus

pytestmark = pytest.mark.slow
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, (args, result.stdout[-3000:], result.stderr[-3000:])
    return result


def wait_for(check, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "FORGELINE_HOME": str(ROOT),
           "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
           # the scheduler normally wakes once a minute
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (home / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                             "127.0.0.1", "--port", str(port)], cwd=home, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def healthy():
        assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
        try:
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 120, "the Prefect server")
        yield env, api
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_deployments_register_schedule_and_run_with_edited_parameters(server, tmp_path):
    env, api = server
    prefect("work-pool", "create", "forgeline-process", "--type", "process", env=env)
    # the README's `make deploy`
    prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml",
            env=env)
    client = httpx.Client(base_url=api, timeout=30)
    deployments = {d["name"]: d for d in client.post("/deployments/filter", json={}).json()}
    assert set(deployments) == {"nightly", "on-demand", "data-only"}

    # the scheduler creates the nightly runs, at 02:00 UTC
    nightly = deployments["nightly"]
    scheduled = wait_for(lambda: client.post("/flow_runs/filter", json={
        "deployments": {"id": {"any_": [nightly["id"]]}},
        "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}).json(),
        60, "the scheduler to create nightly runs")
    assert all(r["expected_start_time"][11:16] == "02:00" for r in scheduled)
    assert scheduled[0]["parameters"]["config"]["crawl"]["snapshot"] == "daily"

    # what the UI form posts: the whole config, edited, plus the work directory. The
    # fine-tuning pairs do not exist yet, so the run fails at finetune.
    corpus = write_corpus(tmp_path / "corpus")
    pairs = tmp_path / "pairs.jsonl"
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["source"] = {"paths": [str(corpus)]}
    config["finetune"]["data_path"] = str(pairs)
    config["experiment"] = "forgeline-deployed"
    workdir = tmp_path / "work"
    run = client.post(f"/deployments/{deployments['on-demand']['id']}/create_flow_run",
                      json={"parameters": {"config": config, "workdir": str(workdir)}}).json()
    failed, output = run_with_worker(client, run["id"], env, tmp_path)
    assert failed["state"]["type"] == "FAILED", output[-5000:]
    assert "finetune" in failed["state"]["message"]

    # the cause is fixed; the UI's Retry button puts the same flow run back in the queue
    pairs.write_text("".join(json.dumps({"prompt": f"Say {w}:", "response": f" {w} {w}."})
                             + "\n" for w in ["river", "stone", "apple", "music"] * 8))
    client.post(f"/flow_runs/{run['id']}/set_state", json={
        "state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True}).raise_for_status()
    done, output = run_with_worker(client, run["id"], env, tmp_path)
    assert done["state"]["type"] == "COMPLETED", output[-5000:]
    assert done["run_count"] == 2

    # one MLflow run for the flow run, with the edited parameters; the retry recorded only
    # the stages it ran
    mlflow = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("forgeline-deployed")
    runs = mlflow.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`prefect.flow_run_id` = '{run['id']}'")
    assert len(runs) == 1
    parent = runs[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["pretrain.max_steps"] == str(config["pretrain"]["max_steps"])
    assert str(corpus) in parent.data.params["source.paths"]
    children = mlflow.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_stage = {}
    for child in children:
        by_stage.setdefault(child.data.tags["forgeline.stage"], []).append(child.info.status)
    assert by_stage.pop("finetune") in (["FAILED", "FINISHED"], ["FINISHED", "FAILED"])
    assert by_stage == {s: ["FINISHED"] for s in (
        "crawl", "extract", "filter", "dedup", "pii", "tokenize", "pretrain", "dpo",
        "classify", "ner", "evaluate", "fewshot")}
    artifacts = client.post("/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).json()
    summary = next(a for a in artifacts if a["key"] == "forgeline-summary")
    assert parent.info.run_id in summary["data"]


def run_with_worker(client: httpx.Client, flow_run_id: str, env: dict, cwd) -> tuple[dict, str]:
    """Let a process worker pick up the scheduled flow run; wait for it to end."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "forgeline-process",
         "--run-once"], cwd=cwd, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def ended():
        flow_run = client.get(f"/flow_runs/{flow_run_id}").json()
        return flow_run if flow_run["state"]["type"] in TERMINAL else None

    try:
        flow_run = wait_for(ended, 600, "the deployed run to end", interval=2)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
        output = worker.communicate(timeout=60)[0]
    return flow_run, output
