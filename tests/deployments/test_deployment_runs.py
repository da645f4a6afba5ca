"""The deployments work against a real Prefect server: registered from prefect.yaml, the
nightly schedule creates runs, and a run triggered with edited parameters (what the UI
form posts) is picked up by a process worker, completes and is recorded in MLflow."""

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

    # what the UI form posts: the whole config, edited, plus the work directory
    corpus = write_corpus(tmp_path / "corpus")
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["source"] = {"paths": [str(corpus)]}
    config["experiment"] = "forgeline-deployed"
    workdir = tmp_path / "work"
    run = client.post(f"/deployments/{deployments['on-demand']['id']}/create_flow_run",
                      json={"parameters": {"config": config, "workdir": str(workdir)}}).json()

    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "forgeline-process",
         "--run-once"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        state = wait_for(lambda: (client.get(f"/flow_runs/{run['id']}").json()["state"]["type"]
                                  in TERMINAL) and client.get(f"/flow_runs/{run['id']}").json(),
                         600, "the deployed run to finish", interval=2)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
        output = worker.communicate(timeout=60)[0]
    assert state["state"]["type"] == "COMPLETED", output[-5000:]

    # recorded in MLflow with the edited parameters, linked both ways
    mlflow = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("forgeline-deployed")
    parents = mlflow.search_runs([experiment.experiment_id],
                                 filter_string=f"tags.`prefect.flow_run_id` = '{run['id']}'")
    parent = next(r for r in parents if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["pretrain.max_steps"] == str(config["pretrain"]["max_steps"])
    assert str(corpus) in parent.data.params["source.paths"]
    artifacts = client.post("/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).json()
    summary = next(a for a in artifacts if a["key"] == "forgeline-summary")
    assert parent.info.run_id in summary["data"]
