"""MLflow bookkeeping never shows the credentials of a tracking URI or a seed URL."""

import os

import pytest
from mlflow.exceptions import MlflowException

from flows.tracking import Tracker, display_uri, tracking_uri, ui_command

SECRET = "s3cret-pw"


def test_tracking_uri_keeps_credentials_and_display_uri_masks_them(monkeypatch, tmp_path):
    uri = f"postgresql://mlflow:{SECRET}@db.internal:5432/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking_uri(tmp_path) == uri  # to connect with
    assert display_uri(uri) == "postgresql://***@db.internal:5432/mlflow"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    local = tracking_uri(tmp_path)
    assert local.startswith("sqlite:///") and display_uri(local) == local


def test_ui_command_holds_no_credentials(monkeypatch):
    assert ui_command(f"http://user:{SECRET}@mlflow.internal:5000", "") == \
        "open http://mlflow.internal:5000"
    uri = f"postgresql://mlflow:{SECRET}@db/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for given in (uri, display_uri(uri)):  # the URI itself, or the one a result shows
        assert ui_command(given, "").endswith(
            ' ui --backend-store-uri "$MLFLOW_TRACKING_URI" --port 5000')
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    command = ui_command(uri, "")
    assert SECRET not in command and "postgresql://***@db/mlflow" in command
    assert "sqlite:////w/mlflow.db" in ui_command("sqlite:////w/mlflow.db", "")


def test_params_tags_and_run_url_are_masked(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "redaction")
    seed = f"https://user:{SECRET}@example.org/"
    parent = tracker.start_parent("p", {"crawl.seeds": [seed], "crawl.max_pages": 3},
                                  {"source": seed})
    stage = tracker.start_stage(parent, "crawl", {"crawl.seeds": seed}, {"seed": seed})
    tracker.set_tags(stage, {"error": f"crawl: no pages could be fetched from ['{seed}']"})
    for run_id in (parent, stage):
        data = tracker.client.get_run(run_id).data
        assert SECRET not in repr(data.params) + repr(data.tags)
    assert tracker.client.get_run(parent).data.params["crawl.seeds"] == \
        "['https://***@example.org/']"
    tracker.uri = f"https://user:{SECRET}@mlflow.example.org/"
    assert tracker.run_url(parent).startswith("https://mlflow.example.org/#/experiments/")


def test_an_unreachable_server_is_reported_without_its_password(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(MlflowException) as error:
        Tracker(f"http://user:{SECRET}@127.0.0.1:9", "unreachable")
    assert "127.0.0.1:9" in str(error.value) and SECRET not in str(error.value)


def test_mlflow_does_not_print_run_links_with_credentials(monkeypatch):
    """MLflow writes "View run ... at: <tracking URI>/..." to stdout as a run ends."""

    class FakeClient:
        def __init__(self, tracking_uri):
            self.tracking_uri = tracking_uri

        def get_experiment_by_name(self, name):
            return type("Experiment", (), {"experiment_id": "1"})()

    monkeypatch.setattr("flows.tracking.MlflowClient", FakeClient)
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    Tracker("http://mlflow.internal:5000", "plain")
    assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ
    Tracker(f"http://user:{SECRET}@mlflow.internal:5000", "with-password")
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
