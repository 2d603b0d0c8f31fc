"""The seeded synthetic MRI set that stands in for the LGG data when it is absent.

MRI-like heads (scalp, skull, grey and white matter, ventricles, one lesion with FLAIR edema)
written in the kaggle_3m layout, so that every notebook runs without a download. Its numbers say
nothing about real tumours. No lesson teaches this file: seg_utils.resolve_data_dir calls it, and
`su.make_synthetic_dataset` is the same function.

    unet-seg data     # generates data/synthetic/kaggle_3m once, if no real data is found
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from seg_files import FLAIR, DataError


def smooth_noise(rng: np.random.Generator, shape: tuple, grid: tuple) -> np.ndarray:
    """Low-frequency noise in [-1, 1] of `shape` (D, H, W), upsampled from a coarse `grid`."""
    depth, height, width = shape
    coarse = rng.standard_normal(grid).astype(np.float32)
    planes = np.stack(
        [cv2.resize(c, (width, height), interpolation=cv2.INTER_CUBIC) for c in coarse]
    )
    z = np.linspace(0, grid[0] - 1, depth)
    lo = np.floor(z).astype(int)
    hi = np.minimum(lo + 1, grid[0] - 1)
    frac = (z - lo)[:, None, None].astype(np.float32)
    vol = planes[lo] * (1 - frac) + planes[hi] * frac
    return vol / (np.abs(vol).max() + 1e-6)


def _synthetic_patient(rng: np.random.Generator, depth: int, size: int = 256):
    """One MRI-like head: (D, H, W, 3) uint8 images and (D, H, W) uint8 0/255 masks."""
    z, y, x = np.meshgrid(
        np.linspace(-0.95, 0.95, depth),
        np.linspace(-1, 1, size),
        np.linspace(-1, 1, size),
        indexing="ij",
    )  # each (D, H, W)
    cy, cx = rng.uniform(-0.08, 0.08, 2)
    ry = rng.uniform(0.68, 0.86)
    rx = ry * rng.uniform(0.78, 0.9)  # heads are longer front to back
    section = np.sqrt(np.clip(1 - z**2, 1e-3, None))  # the head's cross-section shrinks at the ends
    wobble = 0.03 * smooth_noise(rng, z.shape, (4, 6, 6))
    r = np.sqrt(((y - cy) / (ry * section)) ** 2 + ((x - cx) / (rx * section)) ** 2) + wobble
    brain = r < 0.86
    folds = smooth_noise(rng, z.shape, (max(depth // 3, 2), 20, 20))
    white = brain & (folds > -0.05) & (r < 0.72)
    vx = 0.11 * section
    ventricles = (((np.abs(x - cx) - vx) / 0.05) ** 2 + ((y - cy + 0.05) / 0.22) ** 2 < 1) & (
        np.abs(z - 0.15) < 0.3
    )
    lz = rng.uniform(-0.35, 0.45)
    ly, lx = cy + rng.uniform(-0.35, 0.35) * ry, cx + rng.uniform(-0.4, 0.4) * rx
    rl, rlz = rng.uniform(0.1, 0.28), rng.uniform(0.2, 0.4)
    shape_noise = smooth_noise(rng, z.shape, (6, 8, 8))
    dl = np.sqrt(((z - lz) / rlz) ** 2 + ((y - ly) / rl) ** 2 + ((x - lx) / (rl * 0.8)) ** 2)
    lesion = (dl + 0.35 * shape_noise < 1) & brain & ~ventricles
    edema = np.clip(1.4 - dl, 0, 1) * brain  # FLAIR brightening that fades around the lesion
    # tissue:        scalp  skull  csf   grey  white  ventricle lesion  (pre, FLAIR, post)
    table = np.array(
        [
            [0.75, 0.12, 0.15, 0.45, 0.60, 0.10, 0.35],
            [0.45, 0.08, 0.08, 0.50, 0.38, 0.05, 0.85],
            [0.70, 0.12, 0.20, 0.47, 0.58, 0.12, 0.40],
        ],
        dtype=np.float32,
    )
    label = np.select(
        [lesion, ventricles, white, brain, r < 0.9, r < 0.96, r < 1.02],
        [6, 5, 4, 3, 2, 1, 0],
        default=-1,
    )
    bias = 1 + 0.15 * smooth_noise(rng, z.shape, (3, 3, 3))
    texture = 0.06 * smooth_noise(rng, z.shape, (max(depth // 2, 2), 48, 48))
    images = np.zeros((depth, size, size, 3), np.float32)
    for c in range(3):
        value = np.where(label >= 0, table[c][label], 0.0) + np.where(label >= 2, texture, 0)
        if c == FLAIR:
            value = value + 0.25 * edema * (label >= 3) * (label != 6)
        value = value * bias * rng.uniform(0.8, 1.15)
        noise = rng.normal(0, rng.uniform(0.015, 0.035), value.shape).astype(np.float32)
        images[..., c] = np.abs(value + noise)  # magnitude images have Rician-like noise
    images = np.stack([cv2.GaussianBlur(s, (3, 3), 0.7) for s in images])
    masks = (lesion * 255).astype(np.uint8)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), masks


def make_synthetic_dataset(root: str | Path, n_patients: int = 20, seed: int = 0) -> Path:
    """Write a seeded MRI-like set in the kaggle_3m layout under `root`; return its folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / "kaggle_3m"
    if target.exists():
        raise DataError(f"{target} already exists: delete it to generate a new synthetic set")
    staging = Path(tempfile.mkdtemp(prefix="kaggle_3m.", dir=root))  # atomic: rename at the end
    try:
        for i in tqdm(range(n_patients), desc="synthetic patients", leave=False):
            rng = np.random.default_rng([seed, i])
            patient = f"SYN_P{i:03d}_{seed:04d}"
            images, masks = _synthetic_patient(rng, depth=int(rng.integers(20, 36)))
            folder = staging / patient
            folder.mkdir()
            for n, (image, mask) in enumerate(zip(images, masks), start=1):
                cv2.imwrite(str(folder / f"{patient}_{n}.tif"), image[..., ::-1])  # RGB -> BGR
                cv2.imwrite(str(folder / f"{patient}_{n}_mask.tif"), mask)
        staging.rename(target)
    except BaseException:  # Ctrl-C included: leave no half-written set behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
