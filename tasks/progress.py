"""Progress bars for long stages: shown on a terminal, silent in logs and CI.

``FORGELINE_PROGRESS=1`` forces them on, ``FORGELINE_PROGRESS=0`` off.
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar on standard error; by default only when standard error is a terminal."""
    setting = os.environ.get("FORGELINE_PROGRESS", "").strip()
    disable = None if setting == "" else setting in {"0", "false", "no"}
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=disable, **kwargs)
