"""When does predict say a scan is unlike the training scans? seg_checks on real and shifted scans.

    LGG_DATA=/path/to/kaggle_3m python benchmarks/scan_checks.py --ranges
    LGG_DATA=... python benchmarks/scan_checks.py --checkpoint models/lgg_unet.pt --dev DEV_DIR

--ranges measures the 88 training and validation patients of the fixed split and prints each
measure's range beside seg_checks.TRAINING (which holds these figures). With a model, its masks
go into the checks of the 22 test patients (where they should stay quiet), of the same patients
under each simulated shift of site_shift.SHIFTS, and of the cases of --dev (other hospitals'
NIfTI scans, every input given): the table counts the scans that get each finding.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
from site_shift import SHIFTS, shift_rng

import seg_utils as su
from seg_checks import (
    TRAINING,
    flair_head,
    flair_quantiles,
    rescaled_flair,
    scan_findings,
    scan_measures,
)
from seg_scan import read_scan

KINDS = {  # a finding's first words -> its name in the table
    "looks skull-stripped": "skull-stripped",
    "slices": "slices",
    "the head fills": "field of view",
    "the FLAIR's grey levels": "grey levels",
    "no tumour found": "empty mask, bright FLAIR",
}


def kinds(findings: list[str]) -> set:
    """The table names of a scan's findings."""
    return {name for start, name in KINDS.items() for f in findings if start in f.split(":")[0]}


def print_ranges(volumes: list) -> None:
    """Each measure over the volumes (empty masks: bright_share is about the scan only)."""
    rows = [scan_measures(v.image, v.mask) for v in volumes]
    print(f"{'measure':<20} {'min':>7} {'5th pct':>8} {'median':>7} {'max':>7}  TRAINING")
    for key in TRAINING:
        a = np.array([r[key] for r in rows], float)
        low5, median = np.percentile(a, [5, 50])
        print(
            f"{key:<20} {a.min():>7.3f} {low5:>8.3f} {median:>7.3f} {a.max():>7.3f}  {TRAINING[key]}"
        )
    heads = [flair_head(v.image) for v in volumes]
    rescaled = [rescaled_flair(v.image, head) for v, head in zip(volumes, heads)]
    typical = np.mean([flair_quantiles(*pair) for pair in zip(rescaled, heads)], axis=0)
    print(f"mean FLAIR quantiles: {np.round(typical, 2).tolist()}")


def count(segmenter: su.Segmenter, images: dict) -> Counter:
    """How many of the (D, H, W, 3) images get each kind of finding, with the model's masks."""
    counted = Counter()
    for image in images.values():
        counted.update(kinds(scan_findings(scan_measures(image, segmenter.mask(image)))))
    return counted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranges", action="store_true", help="measure the training scans")
    parser.add_argument("--checkpoint", type=Path, help="model whose masks the checks use")
    parser.add_argument("--dev", type=Path, help="folder of <case>/{flair,t1,t1c}.nii")
    args = parser.parse_args(argv)
    splits = su.split_by_patient(su.scan_dataset(su.resolve_data_dir()))
    if args.ranges:
        print_ranges(su.load_volumes(splits["train"] + splits["val"], progress=False))
    if not args.checkpoint:
        return
    segmenter = su.load_segmenter(args.checkpoint)
    test = su.load_volumes(splits["test"], progress=False)
    groups = {"LGG test": {v.patient: v.image for v in test}}
    for name, shift in SHIFTS.items():
        groups[name] = {
            v.patient: shift(v, shift_rng(0, i, name)).image for i, v in enumerate(test)
        }
    if args.dev:
        cases = sorted(p for p in args.dev.iterdir() if (p / "flair.nii").exists())
        scans = {p.name: read_scan(p / "flair.nii", p / "t1.nii", p / "t1c.nii") for p in cases}
        groups["other hospitals (dev)"] = {name: scan.image for name, scan in scans.items()}
    print(f"{'scans':<32} {'n':>3}  " + "  ".join(KINDS.values()))
    for name, images in groups.items():
        counted = count(segmenter, images)
        cells = "  ".join(f"{counted[k]:>{len(k)}}" for k in KINDS.values())
        print(f"{name:<32} {len(images):>3}  {cells}")


if __name__ == "__main__":
    main()
