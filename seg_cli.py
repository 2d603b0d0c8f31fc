"""The command line: segment new scans, export the model, say what a model needs.

    unet-seg predict runs/unet/best.pt PATIENT_FOLDER --out results/
    unet-seg predict runs/unet/best.pt flair.nii.gz --t1 t1.nii.gz --t1c t1c.nii.gz --out results/
    unet-seg export runs/unet/best.pt model.onnx
    unet-seg inputs runs/unet/best.pt          # which scans a model needs
    unet-seg data                              # where the data set is (or make the synthetic one)

`unet-seg` is installed with the project (pyproject.toml); `python -m seg_cli ...` is the same.
Errors the user can fix print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import seg_utils as su
from seg_export import export_onnx
from seg_files import DataError
from seg_predict import needed_inputs, predict
from seg_runs import CheckpointError

MODEL_HELP = "best.pt of training, or a model file of notebook 04 / cross_validate.py"


def parser() -> argparse.ArgumentParser:
    """The subcommands and their flags."""
    main = argparse.ArgumentParser(prog="unet-seg", description=__doc__.splitlines()[0])
    sub = main.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="segment a new scan")
    p.add_argument("model", type=Path, help=MODEL_HELP)
    p.add_argument("input", type=Path, help="patient folder, folder of slices, or NIfTI FLAIR")
    p.add_argument("--out", type=Path, required=True, help="folder for the results (new or empty)")
    p.add_argument("--t1", type=Path, help="NIfTI pre-contrast volume on the FLAIR's grid")
    p.add_argument("--t1c", type=Path, help="NIfTI post-contrast volume on the FLAIR's grid")
    p.add_argument("--threshold", type=float, help="probability cut-off (default: the model's)")
    p.add_argument("--min-size", type=int, help="drop 3D blobs under this many voxels")
    p.add_argument("--keep", choices=["all", "largest", "mass"], help="which blobs to keep")
    p.add_argument(
        "--drop-ends",
        type=float,
        help="drop blobs wholly within this share of the slices at either end (skull base, vertex)",
    )
    tta = "flip test-time augmentation (default: the model's)"
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, help=tta)
    p.add_argument("--fill-missing", choices=["flair"], help="copy FLAIR into missing channels")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    e = sub.add_parser("export", help="write the model as ONNX (dynamic batch)")
    e.add_argument("model", type=Path, help=MODEL_HELP)
    e.add_argument("onnx", type=Path, help="output file, e.g. model.onnx")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    i = sub.add_parser("inputs", help="say which scans a model needs")
    i.add_argument("model", type=Path, help=MODEL_HELP)
    sub.add_parser("data", help="find (or generate) the data set and print where it is")
    return main


def run_predict(args: argparse.Namespace) -> None:
    """predict with the flags given, then one line on what was found."""
    names = ("threshold", "min_size", "keep", "drop_ends", "tta")
    changes = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    summary = predict(
        args.model,
        args.input,
        args.out,
        args.t1,
        args.t1c,
        changes,
        args.fill_missing,
        args.overwrite,
        not args.quiet,
    )
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    size = summary.get("tumour_volume_ml")
    found = f"{size:.2f} mL" if size is not None else f"{summary['tumour_pixels']} px"
    dice = f", Dice {summary['dice']:.3f}" if "dice" in summary else ""
    print(
        f"{summary['tumour_slice_count']} of {summary['slices']} slices with tumour, {found}"
        f"{dice}; results in {args.out}/"
    )


def main(argv=None) -> int:
    """Run one command; errors the user can fix print one line and return 2."""
    args = parser().parse_args(argv)
    try:
        if args.command == "data":
            found = su.resolve_data_dir()
            print(f"data: {found} ({len(su.scan_dataset(found))} slices)")
        elif args.command == "predict":
            run_predict(args)
        elif args.command == "export":
            print(f"wrote {export_onnx(args.model, args.onnx, args.overwrite)}")
        else:
            print(f"{args.model} needs: {needed_inputs(su.load_segmenter(args.model).channels)}")
    except (DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
