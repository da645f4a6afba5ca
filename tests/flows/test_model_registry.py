"""The final model as an MLflow model: logged with signature and input example, registered
with its run's metrics, loaded back, served by a real `mlflow models serve` on loopback,
and fetched by every kind of reference. A real SQLite MLflow store, no mocks."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.model_registry import (
    OUTPUT_COLUMN,
    SIGNATURE,
    ModelReferenceError,
    download_model,
    log_and_register,
)
from flows.tracking import Tracker
from models.checkpoint import save_model
from models.generation import decode_continuation, encode_prompt, load_generator
from models.llama import Llama, ModelConfig
from tasks.shards import write_records
from tasks.tokenize import TokenizeConfig, tokenize_corpus
from tests.flows.conftest import synthetic_document

PROMPT = "The river"
METRICS = {"val_perplexity": 123.456, "pretrain_val_loss": 4.8}
SECRET = "s3cret-pw"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tokenizer trained on synthetic prose and an untrained tiny model, laid out as a
    training stage writes them."""
    root = tmp_path_factory.mktemp("tiny-model")
    rng = random.Random(0)
    write_records([{"id": f"d{i}", "url": "", "text": synthetic_document(rng)}
                   for i in range(40)], root / "corpus")
    tokenize_corpus(TokenizeConfig(vocab_size=400, val_fraction=0.1), root / "corpus",
                    root / "tokens")
    meta = json.loads((root / "tokens" / "meta.json").read_text())
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=meta["vocab_size"], context_length=32, d_model=32,
                              n_layers=1, n_heads=2))
    out = root / "pretrain"
    out.mkdir()
    save_model(out / "model.pt", model)
    shutil.copyfile(root / "tokens" / "tokenizer.model", out / "tokenizer.model")
    (out / "config.json").write_text(json.dumps({"d_model": 32, "n_layers": 1}))
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_dir):
    """A pipeline-like parent run with a pretrain stage run holding the model files, the
    model logged on the parent run and registered as forgeline version 1."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = Tracker(uri, "registry-test", artifact_root=root / "mlartifacts")
    parent = tracker.start_parent("pipeline-test", {"pretrain.d_model": 32}, {})
    stage = tracker.start_stage(parent, "pretrain", {})
    for name in ("model.pt", "tokenizer.model", "config.json"):
        tracker.log_artifact(stage, model_dir / name)
    tracker.finish(stage)
    tracker.log_metrics(parent, METRICS)
    registered = log_and_register(model_dir, uri, parent, "forgeline", stage="pretrain",
                                  stage_run_id=stage, metrics=METRICS, example_prompt=PROMPT)
    tracker.finish(parent)
    return {"uri": uri, "tracker": tracker, "parent": parent, "stage": stage,
            "registered": registered, "root": root}


def greedy(model_dir, prompt=PROMPT, max_new_tokens=5):
    return load_generator(model_dir, device="cpu").generate(
        prompt, max_new_tokens=max_new_tokens, temperature=0)


def test_generator_returns_the_continuation_only(model_dir):
    generator = load_generator(model_dir, device="cpu")
    sp, eos = generator.tokenizer, generator.eos_id
    assert encode_prompt(sp, PROMPT, eos) == [eos, *sp.encode(PROMPT)]
    assert decode_continuation(sp, [*sp.encode(" a b"), eos, *sp.encode("c")], eos) == \
        sp.decode(sp.encode(" a b"))
    text = generator.generate(PROMPT, max_new_tokens=5, temperature=0)
    assert text and text == generator.generate(PROMPT, max_new_tokens=5, temperature=0)
    out = generator.model.generate(
        torch.tensor([encode_prompt(sp, PROMPT, eos)]), 5, temperature=0, stop_token=eos)
    assert text == decode_continuation(sp, out[0, len(sp.encode(PROMPT)) + 1:].tolist(), eos)
    sampled = [generator.generate(PROMPT, max_new_tokens=8, temperature=1.0, top_k=20,
                                  top_p=0.9, seed=7) for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable
    assert generator.generate(PROMPT, max_new_tokens=0) == ""


def test_generator_names_missing_files(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_generator(tmp_path)


def test_logged_with_signature_input_example_and_registered_with_metrics(store, monkeypatch):
    registered, client = store["registered"], MlflowClient(store["uri"])
    assert (registered.name, registered.version, registered.model_uri) == \
        ("forgeline", "1", "models:/forgeline/1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])  # for MLflow's models:/ loading
    info = mlflow.models.get_model_info("models:/forgeline/1")
    assert info.signature == SIGNATURE
    assert info.signature.params.to_dict()[0] == {"name": "max_new_tokens", "type": "long",
                                                  "default": 64, "shape": None}
    assert info.saved_input_example_info["type"] == "dataframe"
    example = mlflow.models.Model.load("models:/forgeline/1").load_input_example()
    assert list(example["prompt"]) == [PROMPT]

    version = client.get_model_version("forgeline", "1")
    assert version.run_id == store["parent"]
    assert version.tags["forgeline.stage"] == "pretrain"
    assert version.tags["forgeline.stage_run_id"] == store["stage"]
    assert version.tags["val_perplexity"] == "123.456"
    assert "val_perplexity | 123.456" in version.description
    logged = client.get_logged_model(registered.model_id)
    assert logged.source_run_id == store["parent"] and logged.status == "READY"
    assert {m.key: m.value for m in logged.metrics} == METRICS
    assert logged.params["pretrain.d_model"] == "32"
    outputs = client.get_run(store["parent"]).outputs.model_outputs
    assert [o.model_id for o in outputs] == [registered.model_id]

    model = mlflow.pyfunc.load_model("models:/forgeline/1")
    prompts = pd.DataFrame({"prompt": [PROMPT, "Winter"]})
    out = model.predict(prompts, params={"max_new_tokens": 5, "temperature": 0})
    assert list(out.columns) == [OUTPUT_COLUMN]
    assert out[OUTPUT_COLUMN].tolist() == [greedy(store_model_dir(store)),
                                           greedy(store_model_dir(store), "Winter")]
    defaults = model.predict(pd.DataFrame({"prompt": [PROMPT]}), params={"seed": 3})
    assert isinstance(defaults[OUTPUT_COLUMN][0], str)


def store_model_dir(store) -> Path:
    return download_model(f"runs:/{store['stage']}", store["uri"], store["root"] / "stage")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlflow_models_serve_generates_text_over_http(store, model_dir, tmp_path):
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"],
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # serve runs uvicorn
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(bin_dir / "mlflow"), "models", "serve", "-m", "models:/forgeline/1",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"mlflow models serve exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no /ping answer:\n{log.read_text()}"
            try:
                if httpx.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        response = httpx.post(f"{base}/invocations", timeout=60, json={
            "dataframe_records": [{"prompt": PROMPT}],
            "params": {"max_new_tokens": 5, "temperature": 0}})
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert predictions == [{OUTPUT_COLUMN: greedy(model_dir)}]
        assert predictions[0][OUTPUT_COLUMN]  # some text came back

        bad = httpx.post(f"{base}/invocations", timeout=60, json={
            "dataframe_records": [{"prompt": PROMPT}], "params": {"max_new_tokens": "many"}})
        assert bad.status_code == 400 and "max_new_tokens" in bad.text
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the CLI and the uvicorn it started
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.parametrize("form", ["run_id", "runs", "runs_model", "stage_run_id", "version",
                                  "latest", "alias", "model_id", "local", "local_mlflow"])
def test_download_model_accepts_every_reference(store, model_dir, tmp_path, form):
    client = MlflowClient(store["uri"])
    client.set_registered_model_alias("forgeline", "champion", "1")
    registered = store["registered"]
    local_mlflow = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_logged_model(registered.model_id).artifact_location,
        dst_path=str(tmp_path / "mlflow-model")))
    ref = {"run_id": store["parent"], "runs": f"runs:/{store['parent']}",
           "runs_model": f"runs:/{store['parent']}/model", "stage_run_id": store["stage"],
           "version": "models:/forgeline/1", "latest": "models:/forgeline/latest",
           "alias": "models:/forgeline@champion", "model_id": f"models:/{registered.model_id}",
           "local": str(model_dir), "local_mlflow": str(local_mlflow)}[form]
    found = download_model(ref, store["uri"], tmp_path / "dest")
    if form == "local":
        assert found == model_dir.resolve()  # used where it is
    elif form == "local_mlflow":
        assert found == (local_mlflow / "artifacts").resolve()
    else:
        assert found == tmp_path / "dest"
    assert sorted(p.name for p in found.iterdir()) == ["config.json", "model.pt",
                                                        "tokenizer.model"]
    for name in ("model.pt", "tokenizer.model", "config.json"):
        assert (found / name).read_bytes() == (model_dir / name).read_bytes()
    assert greedy(found) == greedy(model_dir)


def test_a_pipeline_run_without_a_logged_model_gives_its_stage_model(store, model_dir,
                                                                      tmp_path):
    tracker = store["tracker"]
    parent = tracker.start_parent("registry-off", {}, {})
    for stage, files in (("pretrain", ("model.pt", "tokenizer.model", "config.json")),
                         ("tokenize", ("tokenizer.model",))):
        run = tracker.start_stage(parent, stage, {})
        for name in files:
            tracker.log_artifact(run, model_dir / name)
        tracker.finish(run)
    tracker.finish(parent)
    found = download_model(parent, store["uri"], tmp_path / "dest")
    assert (found / "model.pt").read_bytes() == (model_dir / "model.pt").read_bytes()


@pytest.mark.parametrize("ref, message", [
    ("0123456789abcdef0123456789abcdef", "no MLflow run 0123456789abcdef0123456789abcdef"),
    ("runs:/0123456789abcdef0123456789abcdef", "no MLflow run"),
    ("empty-run", "holds no model"),
    ("runs-missing-path", "has no logged model or artifact 'nowhere'"),
    ("models:/nope/1", "no registered model named 'nope'"),
    ("models:/nope/latest", "no registered model named 'nope'"),
    ("models:/forgeline/99", "registered model 'forgeline' has no version 99"),
    ("models:/forgeline@nope", "registered model 'forgeline' has no alias 'nope'"),
    ("models:/forgeline/Production", "stages are not supported"),
    ("models:/m-0123456789abcdef0123456789abcdef", "no logged model"),
    ("no/such/dir", "is not a directory, MLflow run id or model URI"),
    ("", "no model given"),
    ("empty-dir", "is not a model directory: no model.pt, tokenizer.model, config.json"),
])
def test_download_model_says_what_is_missing(store, tmp_path, ref, message):
    if ref == "empty-run":
        ref = store["tracker"].start_parent("nothing", {}, {})
    elif ref == "runs-missing-path":
        ref = f"runs:/{store['parent']}/nowhere"
    elif ref == "empty-dir":
        ref = str(tmp_path)
    with pytest.raises(ModelReferenceError, match=message):
        download_model(ref, store["uri"], tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_a_retried_run_reuses_its_version_and_a_new_run_registers_another(store, model_dir):
    uri, tracker = store["uri"], store["tracker"]
    parent = tracker.start_parent("retry", {}, {})
    first = log_and_register(model_dir, uri, parent, "forgeline-retry", stage="pretrain",
                             stage_run_id=store["stage"], metrics=METRICS)
    again = log_and_register(model_dir, uri, parent, "forgeline-retry", stage="pretrain",
                             stage_run_id=store["stage"], metrics=METRICS)
    assert (first.version, first.reused) == ("1", False)
    assert (again.version, again.model_id, again.reused) == ("1", first.model_id, True)
    rerun = tracker.start_parent("rerun", {}, {})
    second = log_and_register(model_dir, uri, rerun, "forgeline-retry", stage="pretrain",
                              stage_run_id=store["stage"])
    assert second.version == "2" and second.model_id != first.model_id


def test_an_unreachable_store_is_reported_without_its_password(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    for ref in ("models:/forgeline/1", "0123456789abcdef0123456789abcdef"):
        with pytest.raises(Exception) as error:
            download_model(ref, f"http://user:{SECRET}@127.0.0.1:9", tmp_path)
        assert "127.0.0.1:9" in str(error.value) and SECRET not in str(error.value)
