"""Score model files on scans from other hospitals (NIfTI, with the truth) with every input and
with inputs missing: per-case 3D Dice in the scan's own voxels, as `unet-seg predict` writes it.

    python benchmarks/external_dev.py DEV_DIR runs/a/last.pt [runs/b/last.pt ...] --out dev.json

DEV_DIR holds <case>/{flair,t1,t1c,truth}.nii (../shared/data/external-dev/README.md says how to
unpack the development set). Each model is scored on its own, with one PostProcess for all
(flip TTA and the largest blob, `--post model` for each file's own), and a missing scan is
replaced by FLAIR, as predict does. The table gives the mean over cases, then over models.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from leave_one_site_out import MISSING, with_missing

import seg_utils as su
from seg_runs import write_json
from seg_scan import from_axial_slices, read_scan

FIXED = su.PostProcess(tta=True, keep="largest")  # the protocol of issue 36's first figures


def read_case(folder: Path):
    """(scan with all three inputs, truth 0/1 in the file's voxels) of one case folder."""
    scan = read_scan(folder / "flair.nii", folder / "t1.nii", folder / "t1c.nii")
    truth = np.asarray(nib.load(folder / "truth.nii").dataobj) > 0
    return scan, truth.reshape(scan.nifti.image.shape)


def score_model(path: Path, cases: dict, own_post: bool) -> dict:
    """{condition: {case: Dice}} of one model file, with the networks predict would use."""
    model = su.load_segmenter(path)
    if not own_post:
        model.post = FIXED
    scores = {condition: {} for condition in MISSING}
    for name, (scan, truth) in cases.items():
        for condition, missing in MISSING.items():
            segmenter, image = with_missing(model, scan.image, missing)  # (D, 256, 256, 3)
            mask = from_axial_slices(segmenter.mask(image), scan.nifti).reshape(truth.shape)
            scores[condition][name] = su.dice_score(mask, truth)
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dev_dir", type=Path)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--post", choices=("fixed", "model"), default="fixed")
    parser.add_argument("--out", type=Path, help="write every score to this JSON file")
    args = parser.parse_args(argv)
    folders = sorted(p for p in args.dev_dir.iterdir() if (p / "truth.nii").exists())
    if not folders:
        raise SystemExit(f"{args.dev_dir}: no <case>/truth.nii: unpack the set (see its README)")
    cases = {p.name: read_case(p) for p in folders}
    scored = {str(m): score_model(m, cases, args.post == "model") for m in args.models}
    print(f"{'inputs':<18} {'Dice':>6} {'per model':>10}  ({len(cases)} cases, mean)")
    for condition in MISSING:
        means = [np.mean(list(s[condition].values())) for s in scored.values()]
        each = " ".join(f"{m:.3f}" for m in means)
        print(f"{condition:<18} {np.mean(means):>6.3f}  {each}")
    if args.out:
        write_json(args.out, dict(post=args.post, models=scored))


if __name__ == "__main__":
    main()
