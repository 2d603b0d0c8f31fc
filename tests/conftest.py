"""Shared pytest fixtures for the brain-tumour-unet tests."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Headless, non-interactive plotting in tests. Subprocesses inherit this: drop it from the env of
# any Voila/Jupyter kernel a test starts, or its matplotlib figures will not be displayed.
os.environ["MPLBACKEND"] = "Agg"

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def lgg_dir() -> Path:
    """The real LGG archives (with split.json) in ../shared/data/lgg next to the repo, or skip."""
    path = (REPO_ROOT / ".." / "shared" / "data" / "lgg").resolve()
    if not (path / "split.json").is_file():
        pytest.skip(f"real LGG archives not present at {path} (no split.json)")
    return path
