"""Shared pytest fixtures: synthetic data sets and tiny models trained once per session."""

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
torch.set_num_threads(1)  # the same numbers on any machine; no OpenMP oversubscription

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = su.TrainConfig(epochs=3, batch_size=8, precision="fp32", ema_decay=0.99)


def whole_image_volume(image, mask=None, patient="P") -> su.PreparedVolume:
    """A PreparedVolume of a (D, S, S, 3) uint8 image as it is: no crop, no resize (the box is
    the whole image); the mask all background unless given."""
    depth, height, width = image.shape[:3]
    mask = np.zeros((depth, height, width), np.uint8) if mask is None else mask
    pre = su.Preprocess(size=height, crop_brain=False)
    norm = su.volume_norm(image)
    return su.PreparedVolume(
        patient, image, mask, (0, height, 0, width), (height, width), norm, pre
    )


def train_tiny(data_dir: Path, run_dir: Path, channels=(0, 1, 2), config=TINY) -> Path:
    """A width-8, depth-3 U-Net trained on a synthetic set at 64 px; returns its best.pt."""
    split = su.split_by_patient(su.scan_dataset(data_dir), seed=0)
    pre = su.Preprocess(size=64, channels=channels)
    train_set = su.SliceDataset.from_records(split["train"], pre, su.train_transform(0), False)
    val = su.prepare_volumes(su.load_volumes(split["val"], progress=False), pre)
    su.seed_everything(0)
    model = su.UNet(in_channels=len(channels), base_width=8, depth=3)
    su.train(model, train_set, val, run_dir, config, progress=False)
    return run_dir / "best.pt"


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


@pytest.fixture(scope="session")
def tiny_model(synthetic_set, tmp_path_factory) -> Path:
    """best.pt of a 3-channel tiny U-Net trained on 8 synthetic patients (TINY), once a session;
    copy it before changing it."""
    return train_tiny(synthetic_set(8, 0), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def flair_model(synthetic_set, tmp_path_factory) -> Path:
    """best.pt of a FLAIR-only tiny U-Net, as tiny_model."""
    return train_tiny(synthetic_set(8, 0), tmp_path_factory.mktemp("flair"), (su.FLAIR,))
