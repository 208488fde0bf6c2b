"""Small helpers shared by tests (no fixtures here: see conftest.py)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mirror() -> Path:
    """The offline data mirror: $NANOSTUDIO_DATA_MIRROR or ../shared/data beside the checkout."""
    value = os.environ.get("NANOSTUDIO_DATA_MIRROR")
    path = Path(value) if value else REPO.parent / "shared" / "data"
    assert (path / "pretrain").is_dir(), (
        f"offline data mirror not found at {path}; set NANOSTUDIO_DATA_MIRROR to a folder laid out like shared/data"
    )
    return path
