"""Prefect flows that compose forgeline's stages, and the ``forgeline`` CLI."""

import logging
import os

# No DNS here or in many clusters: Prefect's telemetry would only log errors.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The stage cores are plain functions, also called outside any flow run: their logs then
# stay local instead of warning that they cannot reach the Prefect API.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

PROJECT_LOGGERS = ("tasks", "models", "flows")

# httpx logs every request at INFO; the crawler logs its own progress and failures.
logging.getLogger("httpx").setLevel(logging.WARNING)
# Lightning's start-up notes (GPU/TPU available, tips); the training stages log their own.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


def forward_stage_logs() -> None:
    """Send the stage cores' standard-library logs to Prefect (console and UI).

    Prefect wires ``PREFECT_LOGGING_EXTRA_LOGGERS`` only when it first configures logging,
    which may have happened before this package was imported (a worker), so the handlers
    of Prefect's ``prefect.extra`` logger are copied here.
    """
    handlers = logging.getLogger("prefect.extra").handlers
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        for handler in handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
