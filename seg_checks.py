"""Is a new scan like the training scans? Measures predict checks before it trusts its mask.

    findings = scan_findings(scan_measures(image, mask), filled=["pre-contrast"])

Each measure is compared with its range over the 88 training and validation patients of the LGG
set (TRAINING, measured by benchmarks/scan_checks.py); each finding is one sentence saying what
was measured and what it means. predict writes the measures and findings to summary.json and
the findings to stderr.
"""

from __future__ import annotations

import numpy as np

from seg_files import FLAIR

QUANTILES = np.linspace(0.05, 0.95, 19)  # of the head's FLAIR, rescaled to its p10-p99
TRAINING = dict(  # benchmarks/scan_checks.py --ranges, LGG training + validation patients
    slices=(20, 88),
    head_share=0.32,  # (0.328, rounded down) least share of its widest slice the head fills
    background_zero=0.79,  # most of the background that is exactly 0 (noise elsewhere)
    histogram_distance=0.16,  # (0.154, rounded up) most mean |quantile - TYPICAL_FLAIR|
    bright_share=0.008,  # below the LGG tumours' bright regions (fewest of the head: 5th pct)
)
TYPICAL_FLAIR = np.array(  # mean of the training scans' QUANTILES
    [0.0, 0.0, 0.04, 0.08, 0.12, 0.15, 0.18, 0.21, 0.23, 0.25]
    + [0.27, 0.29, 0.31, 0.33, 0.37, 0.42, 0.49, 0.6, 0.76]
)
STRIPPED = 0.9  # share of exactly-0 background above which a scan looks skull-stripped


def flair_head(image: np.ndarray) -> np.ndarray:
    """(D, H, W) bool: FLAIR brighter than 10% of its 99th percentile (not of its brightest
    voxel: a few hot voxels would shrink the head), from FLAIR alone so that a scan is measured
    alike with every input or FLAIR alone."""
    flair = image[..., FLAIR]
    return flair > 0.1 * np.percentile(flair, 99)


def rescaled_flair(image: np.ndarray, head: np.ndarray) -> np.ndarray:
    """(D, H, W) FLAIR rescaled so the head's 10th and 99th percentiles are 0 and 1 (clipped)."""
    flair = image[..., FLAIR].astype(np.float32)
    lo, hi = np.percentile(flair[head], [10, 99]) if head.any() else (0.0, 1.0)
    return np.clip((flair - lo) / max(hi - lo, 1.0), 0, 1)


def flair_quantiles(flair: np.ndarray, head: np.ndarray) -> np.ndarray:
    """QUANTILES of the head's rescaled FLAIR (rescaled_flair)."""
    return np.quantile(flair[head], QUANTILES) if head.any() else QUANTILES * 0


def scan_measures(image: np.ndarray, mask: np.ndarray) -> dict:
    """What predict measures of a (D, H, W, 3) uint8 scan and its (D, H, W) predicted mask."""
    from scipy import ndimage

    head = flair_head(image)  # (D, H, W)
    flair = rescaled_flair(image, head)
    background = image[..., FLAIR][~head]
    bright, count = ndimage.label(head & (flair >= 0.8))  # 3D blobs of bright FLAIR
    largest = np.bincount(bright.ravel())[1:].max() if count else 0
    return dict(
        slices=len(image),
        head_share=float(head.mean((1, 2)).max()),
        background_zero=float((background == 0).mean()) if background.size else 0.0,
        histogram_distance=float(np.abs(flair_quantiles(flair, head) - TYPICAL_FLAIR).mean()),
        bright_share=float(largest / max(head.sum(), 1)),
        mask_voxels=int(mask.sum()),
    )


def scan_findings(measures: dict, filled=(), slice_mm=None) -> list[str]:
    """One sentence per way the scan differs from the training scans (none: an empty list)."""
    found, m = [], measures
    if m["background_zero"] >= STRIPPED:
        found.append(
            f"looks skull-stripped: {m['background_zero']:.0%} of the background is exactly 0 "
            f"(training scans at most {TRAINING['background_zero']:.0%}: they keep skull and "
            "scalp); expect some bright rims or missed edges"
        )
    low, high = TRAINING["slices"]
    if not low <= m["slices"] <= high:
        each = f" of {slice_mm:.1f} mm" if slice_mm else ""
        found.append(
            f"{m['slices']} slices{each}, the training scans had {low}-{high} through the whole "
            "head: thinner slices, or part of the head, than the model learnt from"
        )
    if m["head_share"] < TRAINING["head_share"]:
        found.append(
            f"the head fills {m['head_share']:.0%} of its widest slice, the training scans at "
            f"least {TRAINING['head_share']:.0%}: a wider field of view; tumours look smaller"
        )
    if m["histogram_distance"] > TRAINING["histogram_distance"]:
        found.append(
            f"the FLAIR's grey levels differ from the training scans' ({m['histogram_distance']:.2f}"
            f" against at most {TRAINING['histogram_distance']:.2f}): another scanner or "
            "protocol; check the mask by eye"
        )
    if filled:
        found.append(
            f"{', '.join(filled)} filled in from FLAIR: the mask rests on fewer inputs than "
            "the model can use"
        )
    if m["mask_voxels"] == 0 and m["bright_share"] >= TRAINING["bright_share"]:
        found.append(
            f"no tumour found, but a bright FLAIR region covers {m['bright_share']:.1%} of the "
            "head (LGG tumours are bright on FLAIR): look at overlay.png before trusting it"
        )
    return found
