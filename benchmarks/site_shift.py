"""Site-shift check: how much a checkpoint's test Dice drops on scans that look like another site's.

    LGG_DATA=/path/to/kaggle_3m python benchmarks/site_shift.py runs/lgg/best.pt [--quick]

Scores the test patients of notebook 04's split (seg_utils.split_by_patient(..., seed 0)) clean
and under each simulated shift of seg_predict.SHIFTS (skull stripping, intensity scale, gamma,
bias field, Rician noise, thinner slices, zoom out / in), seeded per patient and shift, with the
threshold and post-processing that notebook 04 chose (test_metrics.json beside the checkpoint;
else threshold 0.5, none). Prints the mean per-patient Dice per shift and its change vs clean.
--quick scores 3 patients; --shifts picks some shifts by name (comma-separated); --split val
scores the validation patients instead, where augmentations against these shifts are chosen.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # seg_utils lives in the root
import seg_predict as sp  # noqa: E402
import seg_utils as su  # noqa: E402


def main() -> None:
    """Parse the flags, score, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint", type=Path, help="best.pt of a run (notebook 03, train_lgg.py)"
    )
    parser.add_argument("--quick", action="store_true", help="3 test patients: a smoke test")
    parser.add_argument(
        "--shifts", help=f"comma-separated subset of: {', '.join(sp.SHIFTS)}".replace("%", "%%")
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds every simulated shift")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="val: choose augmentations there, never on test")  # fmt: skip
    args = parser.parse_args()
    shifts = [s.strip() for s in args.shifts.split(",")] if args.shifts else list(sp.SHIFTS)
    unknown = [s for s in shifts if s not in sp.SHIFTS]
    if unknown:
        parser.error(f"unknown shift(s) {unknown}; choose from {list(sp.SHIFTS)}")

    start = time.perf_counter()
    model, pre, state = su.load_checkpoint(args.checkpoint)
    settings, source = sp.run_settings(args.checkpoint)
    data_dir = su.resolve_data_dir()
    splits = su.split_by_patient(su.scan_dataset(data_dir), seed=0)
    su.check_split(state, splits)  # stops if a test patient helped train this checkpoint
    records = splits[args.split]
    if args.quick:
        records = [r for r in records if r.patient in sorted({r.patient for r in records})[:3]]
    volumes = su.load_volumes(records)
    print(f"checkpoint {args.checkpoint}: inputs {sp.needed_inputs(pre)}")
    print(f"settings   {settings} from {source}")
    print(f"data       {data_dir}: {len(volumes)} {args.split} patients; shift seed {args.seed}\n")
    scores = sp.site_shift_scores(model, pre, volumes, settings, shifts, seed=args.seed)
    print(sp.site_shift_table(scores).round(3).to_string())
    print(f"\nworst patient per condition:\n{scores.min().round(3).to_string()}")
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
