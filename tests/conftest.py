"""Shared test set-up: no progress bars, no telemetry, no stray MLflow server."""

import os

os.environ["FORGELINE_PROGRESS"] = "0"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# stage cores are called outside flows here, after a flow test has wired their loggers
os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)
