"""Site-shift check: how much a model's test Dice drops on scans that look like another site's.

    LGG_DATA=/path/to/kaggle_3m python benchmarks/site_shift.py runs/lgg/best.pt [--quick]

Scores the test patients of notebook 04's split (seg_utils.split_by_patient(..., seed 0)) clean
and under each simulated shift of SHIFTS below (skull stripping, intensity scale, gamma, bias
field, Rician noise, thinner slices, zoom out / in), seeded per patient and shift, with the model
file's own PostProcess (chosen on validation by notebook 04, out of fold by cross_validate.py,
else the defaults). Prints the mean per-patient Dice per shift and its change vs clean.
--quick scores 3 patients; --shifts picks some shifts by name (comma-separated); --split val
scores the validation patients instead, where augmentations against these shifts are chosen.
"""

from __future__ import annotations

import argparse
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

import seg_predict as sp
import seg_utils as su
from seg_synthetic import smooth_noise


def _with(volume: su.Volume, image: np.ndarray, mask: np.ndarray | None = None) -> su.Volume:
    """A copy of `volume` with a new (D, H, W, 3) image (float: clipped to uint8) and mask."""
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    mask = volume.mask if mask is None else mask.astype(np.uint8)
    return su.Volume(volume.patient, list(range(1, len(image) + 1)), image, mask)


def skull_strip(volume: su.Volume, rng=None) -> su.Volume:
    """Zero everything outside a brain mask: the head (>10% of max) eroded by 6% of the slice
    width per slice, i.e. without scalp and skull, then dilated by 1%."""
    from scipy import ndimage

    width = volume.image.shape[2]
    head = volume.image.max(3) > 0.1 * volume.image.max()  # (D, H, W)
    brain = np.zeros_like(head)
    for z, h in enumerate(head):
        inside = ndimage.distance_transform_edt(ndimage.binary_fill_holes(h))
        brain[z] = inside > 0.06 * width
    brain = ndimage.binary_dilation(brain, iterations=max(1, int(0.01 * width)))
    return _with(volume, volume.image * brain[..., None])


def _resample_z(volume: su.Volume, depth: int) -> su.Volume:
    """Linear interpolation along z to `depth` slices (image and mask, mask >= 0.5)."""
    z = np.linspace(0, len(volume.image) - 1, depth)
    lo = np.floor(z).astype(int)
    hi = np.minimum(lo + 1, len(volume.image) - 1)
    w = (z - lo).astype(np.float32)[:, None, None]  # (depth, 1, 1) weight of the upper slice
    image = volume.image[lo] * (1 - w[..., None]) + volume.image[hi] * w[..., None]
    mask = volume.mask[lo] * (1 - w) + volume.mask[hi] * w
    return _with(volume, image, mask >= 0.5)


def _zoom(volume: su.Volume, factor: float) -> su.Volume:
    """factor < 1: pad and downscale (a smaller head in the frame); > 1: crop the centre and
    upscale (a larger one); the frame keeps its size."""
    _, height, width = volume.mask.shape
    side = round(height / factor)
    pad = max(0, (side - height) // 2)
    image = np.pad(volume.image, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    mask = np.pad(volume.mask, [(0, 0), (pad, pad), (pad, pad)]).astype(np.float32)
    crop = max(0, (image.shape[1] - side) // 2)
    window = (slice(None), slice(crop, crop + side), slice(crop, crop + side))
    size = (width, height)
    image = np.stack([cv2.resize(s, size, interpolation=cv2.INTER_AREA) for s in image[window]])
    mask = np.stack([cv2.resize(m, size, interpolation=cv2.INTER_LINEAR) for m in mask[window]])
    return _with(volume, image, mask >= 0.5)


def _rician(volume: su.Volume, rng, level: float) -> su.Volume:
    """Magnitude of complex Gaussian noise, sigma = level x the 99th percentile per channel."""
    x = volume.image.astype(np.float32)
    sigma = level * np.percentile(x, 99, axis=(0, 1, 2))  # (3,)
    real, imag = (rng.normal(0, 1, x.shape).astype(np.float32) * sigma for _ in range(2))
    return _with(volume, np.sqrt((x + real) ** 2 + imag**2))


def _bias(volume: su.Volume, rng, strength: float) -> su.Volume:
    """Multiply by a smooth field 1 +- strength (coarse 3x3x3 noise, upsampled)."""
    field = 1 + strength * smooth_noise(rng, volume.mask.shape, (3, 3, 3))  # (D, H, W)
    return _with(volume, volume.image * field[..., None])


def _gamma(volume: su.Volume, gamma: float) -> su.Volume:
    """A contrast change: (x / 255) ** gamma per voxel."""
    return _with(volume, 255 * (volume.image / 255.0) ** gamma)


SHIFTS = {  # name -> function(volume, rng) -> shifted volume; rng seeded per patient and shift
    "skull stripped": skull_strip,
    "intensity x0.6": lambda v, rng: _with(v, v.image * 0.6),
    "gamma 0.7 (brighter mid-tones)": lambda v, rng: _gamma(v, 0.7),
    "gamma 1.5 (darker mid-tones)": lambda v, rng: _gamma(v, 1.5),
    "bias field +-30%": lambda v, rng: _bias(v, rng, 0.3),
    "Rician noise 5%": lambda v, rng: _rician(v, rng, 0.05),
    "thinner slices (2x in z)": lambda v, rng: _resample_z(v, 2 * len(v.image) - 1),
    "zoom out 0.75 (smaller head)": lambda v, rng: _zoom(v, 0.75),
    "zoom in 1.25 (larger head)": lambda v, rng: _zoom(v, 1.25),
}


def shift_rng(seed: int, i: int, name: str) -> np.random.Generator:
    """The generator of shift `name` for the i-th patient: independent of which shifts run."""
    return np.random.default_rng([seed, i, zlib.crc32(name.encode())])


def site_shift_scores(segmenter: su.Segmenter, volumes, shifts=None, seed=0, progress=True):
    """pandas DataFrame of per-patient Dice with the segmenter's PostProcess: one row per
    patient, columns clean + each shift."""
    import pandas as pd

    rows = []
    for i, volume in enumerate(tqdm(volumes, desc="site shifts", disable=not progress)):
        row = {"patient": volume.patient, "clean": _shift_dice(segmenter, volume)}
        for name in shifts or SHIFTS:
            row[name] = _shift_dice(segmenter, SHIFTS[name](volume, shift_rng(seed, i, name)))
        rows.append(row)
    return pd.DataFrame(rows).set_index("patient")


def _shift_dice(segmenter: su.Segmenter, volume: su.Volume) -> float:
    """Patient Dice of the segmenter's mask (its TTA, threshold and blob rule)."""
    prob = segmenter.probabilities(volume.image)  # (D, H, W)
    patients, _, _ = su.score_patients({volume.patient: prob}, [volume], segmenter.post)
    return float(patients.dice.iloc[0])


def site_shift_table(scores):
    """Mean per-patient Dice per condition and its difference to clean."""
    import pandas as pd

    mean = scores.mean()
    return pd.DataFrame({"patient Dice mean": mean, "change vs clean": mean - mean["clean"]})


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, score, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="a model file: best.pt of a run (notebook 03, train_lgg.py) or ensemble.pt",
    )
    parser.add_argument("--quick", action="store_true", help="3 patients: a smoke test")
    parser.add_argument(
        "--shifts", help=f"comma-separated subset of: {', '.join(SHIFTS)}".replace("%", "%%")
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds every simulated shift")
    parser.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="val: choose augmentations there, never on test",
    )
    args = parser.parse_args(argv)
    shifts = [s.strip() for s in args.shifts.split(",")] if args.shifts else list(SHIFTS)
    unknown = [s for s in shifts if s not in SHIFTS]
    if unknown:
        parser.error(f"unknown shift(s) {unknown}; choose from {list(SHIFTS)}")

    start = time.perf_counter()
    segmenter = su.load_segmenter(args.checkpoint)
    data_dir = su.resolve_data_dir()
    records = su.split_by_patient(su.scan_dataset(data_dir), seed=0)[args.split]
    su.check_split(segmenter, {args.split: records})  # stops if one of them trained the model
    if args.quick:
        records = [r for r in records if r.patient in sorted({r.patient for r in records})[:3]]
    volumes = su.load_volumes(records)
    print(f"model      {args.checkpoint}: inputs {sp.needed_inputs(segmenter.channels)}")
    print(f"post       {segmenter.post} (chosen on: {segmenter.chosen_on})")
    print(f"data       {data_dir}: {len(volumes)} {args.split} patients; shift seed {args.seed}\n")
    scores = site_shift_scores(segmenter, volumes, shifts, seed=args.seed)
    print(site_shift_table(scores).round(3).to_string())
    print(f"\nworst patient per condition:\n{scores.min().round(3).to_string()}")
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
