"""seg_checks: what predict measures of a new scan, and the findings it draws from the measures.

Known answers on small scans built here, (D, 64, 64, 3) uint8: a disk of head on a background
that is exactly 0 or noise; the findings from measures dicts set just inside or outside the
training ranges (seg_checks.TRAINING, whatever their values).
"""

import numpy as np
import pytest

from seg_checks import QUANTILES, STRIPPED, TRAINING, TYPICAL_FLAIR, scan_findings, scan_measures

SIDE = 64


def disk(radius: float) -> np.ndarray:
    """(SIDE, SIDE) bool: a centred disk."""
    yy, xx = np.mgrid[:SIDE, :SIDE]
    return (yy - SIDE / 2) ** 2 + (xx - SIDE / 2) ** 2 <= radius**2


def scan(flair: np.ndarray) -> np.ndarray:
    """(D, H, W) grey levels -> (D, H, W, 3) uint8 with them in every channel."""
    return np.repeat(np.asarray(flair, np.uint8)[..., None], 3, -1)


def head_of(values, radius=24, depth=4, background=0) -> np.ndarray:
    """A scan of `depth` slices whose head (a disk) holds `values` (one per head voxel, in a
    shuffled order) on `background`."""
    head = np.broadcast_to(disk(radius), (depth, SIDE, SIDE))
    flair = np.broadcast_to(background, head.shape).astype(np.uint8)
    flair[head] = np.random.default_rng(0).permutation(np.asarray(values))
    return scan(flair)


def measures(image, mask=None) -> dict:
    return scan_measures(image, np.zeros(image.shape[:3], np.uint8) if mask is None else mask)


# ----------------------------------------------------------------------------- scan_measures


def test_slices_head_share_and_mask_voxels_known_answers():
    widest, smaller = disk(20), disk(12)
    flair = np.stack([smaller, widest, smaller]) * 200
    mask = np.zeros(flair.shape, np.uint8)
    mask[1, 30:33, 30:34] = 1
    found = measures(scan(flair), mask)
    assert found["slices"] == 3 and found["mask_voxels"] == 12
    assert found["head_share"] == widest.mean()  # of the widest slice, not the mean


def test_background_zero_is_the_share_of_background_voxels_exactly_0():
    head = np.full(disk(24).sum() * 4, 200)
    assert measures(head_of(head))["background_zero"] == 1.0  # skull-stripped
    noise = np.random.default_rng(1).integers(1, 15, (4, SIDE, SIDE))  # below 10% of 200
    assert measures(head_of(head, background=noise))["background_zero"] == 0.0  # MRI noise
    striped = noise * (np.arange(SIDE) % 4 != 0)  # every 4th column exactly 0
    expected = ((striped == 0) & ~disk(24)).sum() / (~disk(24)).sum() / 4
    assert measures(head_of(head, background=striped))["background_zero"] == pytest.approx(expected)


def test_bright_share_is_the_largest_bright_blob_of_the_head():
    """FLAIR 100 with blobs of 250: rescaled between the head's 10th and 99th percentiles, the
    blobs are 1 and the rest 0; the larger blob counts, as a share of the head."""
    head = disk(24)
    flair = np.where(head, 100, 0)[None].repeat(4, 0)
    assert measures(scan(flair))["bright_share"] == 0.0  # nothing brighter than the rest
    flair[1:3, 20:28, 20:30] = 250  # 2 x 8 x 10 = 160 voxels, one 3D blob
    flair[1, 40:44, 36:40] = 250  # 16 voxels, another
    assert measures(scan(flair))["bright_share"] == pytest.approx(160 / (4 * head.sum()))


def test_histogram_distance_small_for_the_training_scans_grey_levels_large_for_others():
    """Head grey levels whose quantiles are TYPICAL_FLAIR between the 10th and 99th percentile
    (0 and 1 after rescaling) measure near 0; a head of two grey levels as many voxels each
    (quantiles 0 below the median, 0.5 at it, 1 above), far from it."""
    count = disk(24).sum() * 4
    u = (np.arange(count) + 0.5) / count  # evenly spread quantiles
    knots = np.r_[0.0, QUANTILES, 0.99, 1.0]
    typical = np.interp(u, knots, np.r_[0.0, TYPICAL_FLAIR, 1.0, 1.0])
    near = measures(head_of(np.round(40 + 200 * typical)))["histogram_distance"]
    two_levels = measures(head_of(np.where(u < 0.5, 60, 240)))["histogram_distance"]
    steps = np.r_[[0.0] * 9, 0.5, [1.0] * 9]  # at QUANTILES: 0.05, ..., 0.5, ..., 0.95
    assert near < 0.01
    assert two_levels == pytest.approx(np.abs(steps - TYPICAL_FLAIR).mean())
    assert two_levels > TRAINING["histogram_distance"]


# ----------------------------------------------------------------------------- scan_findings


def in_range(**changes) -> dict:
    """Measures inside every training range (a tumour found), with `changes`."""
    low, high = TRAINING["slices"]
    typical = dict(
        slices=(low + high) // 2,
        head_share=TRAINING["head_share"] * 1.5,
        background_zero=TRAINING["background_zero"] / 2,
        histogram_distance=TRAINING["histogram_distance"] / 2,
        bright_share=TRAINING["bright_share"] * 2,
        mask_voxels=500,
    )
    return typical | changes


def test_measures_within_the_training_ranges_give_no_finding():
    low, high = TRAINING["slices"]
    assert scan_findings(in_range()) == []
    edges = [dict(slices=low, head_share=TRAINING["head_share"]), dict(slices=high, head_share=1.0)]
    edges += [dict(histogram_distance=TRAINING["histogram_distance"])]
    edges += [dict(background_zero=np.nextafter(STRIPPED, 0))]
    edges += [dict(mask_voxels=0, bright_share=np.nextafter(TRAINING["bright_share"], 0))]
    for edge in edges:  # at the ends of the ranges; an empty mask where nothing is bright
        assert scan_findings(in_range(**edge)) == [], edge


@pytest.mark.parametrize(
    "changes, filled, words",
    [
        (dict(background_zero=STRIPPED), (), f"looks skull-stripped: {STRIPPED:.0%} of the"),
        (dict(slices=TRAINING["slices"][0] - 1), (), f"{TRAINING['slices'][0] - 1} slices, "),
        (dict(slices=TRAINING["slices"][1] + 1), (), f"{TRAINING['slices'][1] + 1} slices, "),
        (dict(head_share=TRAINING["head_share"] - 0.01), (), "a wider field of view"),
        (dict(histogram_distance=TRAINING["histogram_distance"] + 0.01), (), "grey levels differ"),
        ({}, ("pre-contrast",), "pre-contrast filled in from FLAIR"),
        (
            dict(mask_voxels=0, bright_share=TRAINING["bright_share"]),
            (),
            "no tumour found, but a bright FLAIR region",
        ),
    ],
    ids=["stripped", "few slices", "many slices", "small head", "grey levels", "filled", "empty"],
)
def test_each_measure_out_of_its_range_gives_one_finding_naming_it(changes, filled, words):
    (finding,) = scan_findings(in_range(**changes), filled)
    assert words in finding


def test_a_tumour_found_in_a_bright_scan_is_no_finding_and_slices_say_their_thickness():
    assert scan_findings(in_range(mask_voxels=1, bright_share=0.5)) == []
    many = TRAINING["slices"][1] + 10
    (finding,) = scan_findings(in_range(slices=many), slice_mm=1.0)
    assert finding.startswith(f"{many} slices of 1.0 mm, the training scans had")
