"""Shared pytest fixtures for the brain-tumour-unet tests."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import seg_utils as su

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Headless, non-interactive plotting in tests. Subprocesses inherit this: drop it from the env of
# any Voila/Jupyter kernel a test starts, or its matplotlib figures will not be displayed.
os.environ["MPLBACKEND"] = "Agg"

REPO_ROOT = Path(__file__).resolve().parents[1]


def whole_image_volume(image, mask=None, patient="P") -> su.PreparedVolume:
    """A PreparedVolume of a (D, S, S, 3) uint8 image as it is: no crop, no resize (the box is
    the whole image); the mask all background unless given."""
    depth, height, width = image.shape[:3]
    mask = np.zeros((depth, height, width), np.uint8) if mask is None else mask
    return su.PreparedVolume(patient, image, mask, (0, height, 0, width), (height, width),
                             su.volume_norm(image))  # fmt: skip


@pytest.fixture(scope="session")
def lgg_dir() -> Path:
    """The real LGG archives (with split.json) in ../shared/data/lgg next to the repo, or skip."""
    path = (REPO_ROOT / ".." / "shared" / "data" / "lgg").resolve()
    if not (path / "split.json").is_file():
        pytest.skip(f"real LGG archives not present at {path} (no split.json)")
    return path


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory):
    """Factory: synthetic_set(n_patients, seed) -> a kaggle_3m folder, generated once a session."""

    def make(n_patients: int, seed: int = 0) -> Path:
        root = tmp_path_factory.getbasetemp() / f"synthetic-{n_patients}-{seed}"
        if not (root / "kaggle_3m").is_dir():  # make_synthetic_dataset renames into place
            su.make_synthetic_dataset(root, n_patients=n_patients, seed=seed)
        return root / "kaggle_3m"

    return make


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module that asks (pytestmark): the same numbers on any
    machine, and no OpenMP oversubscription (with 2 threads on 2 busy cores an epoch took
    20-50 s instead of ~1 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
