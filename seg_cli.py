"""The command line: segment new scans, export the model, say what a model needs.

    unet-seg predict flair.nii.gz --t1 t1.nii.gz --t1c t1c.nii.gz --out results/
    unet-seg predict PATIENT_FOLDER --checkpoint runs/unet/best.pt --out results/
    unet-seg export model.onnx --checkpoint runs/unet/best.pt
    unet-seg inputs                            # which scans a model needs
    unet-seg data                              # where the data set is (or make the synthetic one)

Without --checkpoint each command uses the released model, models/lgg_unet.pt (its card:
models/MODEL_CARD.md).

`unet-seg` is installed with the project (pyproject.toml); `python -m seg_cli ...` is the same.
Errors the user can fix print one line and exit with status 2; Ctrl-C one line, status 130.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

try:  # Ctrl-C while torch loads, most of a short run, ends in one line as any Ctrl-C does
    import seg_utils as su
    from seg_export import export_onnx
    from seg_files import DataError
    from seg_predict import RELEASED_MODEL, model_file, needed_inputs, predict
    from seg_runs import CheckpointError
except KeyboardInterrupt:
    print("interrupted: nothing was written", file=sys.stderr)
    sys.exit(130)

MODEL_HELP = "best.pt of training, or a model file of notebook 04 / cross_validate.py (default: "
MODEL_HELP += f"the released model, {RELEASED_MODEL.parent.name}/{RELEASED_MODEL.name})"


def parser() -> argparse.ArgumentParser:
    """The subcommands and their flags."""
    main = argparse.ArgumentParser(prog="unet-seg", description=__doc__.splitlines()[0])
    sub = main.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="segment a new scan")
    p.add_argument("input", type=Path, help="patient folder, folder of slices, or NIfTI FLAIR")
    p.add_argument("--checkpoint", type=Path, help=MODEL_HELP)
    p.add_argument("--out", type=Path, required=True, help="folder for the results (new or empty)")
    p.add_argument("--t1", type=Path, help="NIfTI pre-contrast volume on the FLAIR's grid")
    p.add_argument("--t1c", type=Path, help="NIfTI post-contrast volume on the FLAIR's grid")
    p.add_argument("--threshold", type=float, help="probability cut-off (default: the model's)")
    p.add_argument("--min-size", type=int, help="drop 3D blobs under this many voxels")
    p.add_argument("--keep", choices=["all", "largest", "mass"], help="which blobs to keep")
    ends = "drop blobs wholly within this share of the slices at either end (skull base, vertex)"
    p.add_argument("--drop-ends", type=float, help=ends)
    tta = "flip test-time augmentation (default: the model's)"
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, help=tta)
    p.add_argument("--fill-missing", choices=["flair"], help="copy FLAIR into missing channels")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    e = sub.add_parser("export", help="write the model as ONNX (dynamic batch)")
    e.add_argument("onnx", help="output file, e.g. model.onnx")  # a str: "model/" keeps its /
    e.add_argument("--checkpoint", type=Path, help=MODEL_HELP)
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    i = sub.add_parser("inputs", help="say which scans a model needs")
    i.add_argument("--checkpoint", type=Path, help=MODEL_HELP)
    sub.add_parser("data", help="find (or generate) the data set and print where it is")
    return main


def say(text: str, file=None) -> None:
    """Print a line; bytes of a file name that are not UTF-8 show as \\xNN instead of raising."""
    print(text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), file=file)


def interrupted(args: argparse.Namespace, started: float) -> str:
    """What Ctrl-C left on disk: the command's output as it was, or complete if just written."""
    if args.command not in ("predict", "export"):
        return "interrupted: nothing was written"
    target = args.out if args.command == "predict" else args.onnx
    made = Path(target, "summary.json") if args.command == "predict" else target
    if os.path.exists(made) and os.path.getmtime(made) >= started:
        return f"interrupted after {target} was written in full"
    return f"interrupted: {target} is as it was before (nothing half-written)"


def run_predict(args: argparse.Namespace) -> None:
    """predict with the flags given, then one line on what was found."""
    names = ("threshold", "min_size", "keep", "drop_ends", "tta")
    changes = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    flags = (changes, args.fill_missing, args.overwrite, not args.quiet)
    summary = predict(args.checkpoint, args.input, args.out, args.t1, args.t1c, *flags)
    for warning in summary["warnings"]:
        say(f"warning: {warning}", sys.stderr)
    size = summary.get("tumour_volume_ml")
    found = f"{size:.2f} mL" if size is not None else f"{summary['tumour_pixels']} px"
    dice = f", Dice {summary['dice']:.3f}" if "dice" in summary else ""
    say(
        f"{summary['tumour_slice_count']} of {summary['slices']} slices with tumour, {found}"
        f"{dice}; results in {args.out}/"
    )


def main(argv=None) -> int:
    """Run one command; errors the user can fix print one line and return 2, Ctrl-C 130."""
    args, started = parser().parse_args(argv), time.time()
    try:
        if args.command == "data":
            found = su.resolve_data_dir()
            print(f"data: {found} ({len(su.scan_dataset(found))} slices)")
        elif args.command == "predict":
            run_predict(args)
        elif args.command == "export":
            model = model_file(args.checkpoint)
            say(f"wrote {export_onnx(model, args.onnx, args.overwrite)}")
        else:
            model = model_file(args.checkpoint)
            segmenter = su.load_segmenter(model)
            takes = (
                " (or FLAIR alone: it was trained to fill the rest)"
                if segmenter.fills_missing
                else ""
            )
            say(f"{model} needs: {needed_inputs(segmenter.channels)}{takes}")
    except (DataError, CheckpointError, ImportError, OSError) as e:  # one line, never a traceback
        say(f"error: {e}", sys.stderr)
        return 2
    except KeyboardInterrupt:
        say(interrupted(args, started), sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
