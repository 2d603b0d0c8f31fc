"""K-fold cross-validation by patient, then the K fold models as one ensemble on the test patients
(the protocol nnU-Net made standard), in one resumable command.

    LGG_DATA=/path/to/kaggle_3m python benchmarks/cross_validate.py --run-dir runs/cv5
    LGG_DATA=... python benchmarks/cross_validate.py --run-dir runs/cv5 --fold 3   # one fold only

1. The train + validation patients of the fixed split (split_by_patient seed 0 == split.json:
   77 + 11 = 88 on LGG) are dealt into K folds by patient; the 22 test patients stay untouched.
2. Fold k trains on the other K-1 folds (recipe flags as in train_lgg.py) into run-dir/fold-k/.
   Its held-out patients give the progress line, but the fold model is the last epoch (last.pt,
   no early stopping), not the epoch that scored best on them: so its predictions of its own
   held-out patients are honest out-of-fold predictions.
3. The out-of-fold predictions of all patients choose flip TTA, threshold and post-processing.
4. Reported: the cross-validation per-patient Dice over all pool patients at those settings (with
   a bootstrap CI; the figure comparable with Buda et al. 2019, also cross-validated) and at plain
   threshold 0.5; then, once, the ensemble's (mean probability of the K models) test Dice and each
   fold model's own test Dice (the spread a single run has).
Everything lands in run-dir/cv_summary.json. A finished fold is skipped, a half-trained one
resumed; `--fold K` trains fold K only (run folds side by side as processes on one machine, each
with its share of OMP_NUM_THREADS, or on several machines, then copy the fold-k/ folders into one
run-dir), then run without --fold to gather. `--with DIR` (repeatable)
gathers a bigger ensemble: DIR is another finished cross_validate.py folder of the same folds
(another recipe, say); fold k's out-of-fold prediction is then the mean of the fold-k models of
run-dir and every DIR, and all of them score the test patients (notebook 04 follows cv_summary.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from train_lgg import add_recipe_arguments, machine_line, recipe_from_args, train_run

import seg_utils as su
from seg_ensemble import fold_dir
from seg_runs import write_json

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)  # probability cut-offs tried on the out-of-fold predictions
MIN_SIZES = (
    0,
    100,
    500,
    1000,
)  # smallest kept 3D blob, voxels (LGG's worst errors: small FP blobs)
# keep every blob, the one with the most voxels, or the one with the largest probability mass
# (a big faint false blob at the skull base loses to a smaller confident tumour)
LARGEST = (False, True, "mass")
# drop blobs lying wholly within this fraction of the slices at either end of the stack: skull-base
# and vertex false positives (TCGA_CS_6668's, out of fold); no tumour of the 88 LGG patients lies there
ENDS = (0.0, 0.1, 0.2)
BEFORE = {"ema": 0.0}  # recipe keys newer than some folds.json files: what those folds trained with


def fold_status(where: Path, epochs: int) -> str:
    """ "done" (last.pt holds every epoch), "partial" (resume it) or "new"."""
    if not (where / "last.pt").exists():
        return "new"
    return "done" if su.read_checkpoint(where / "last.pt")["epoch"] >= epochs else "partial"


def run_fold(k: int, folds: list, pool: list, run_dir: Path, recipe: dict) -> None:
    """Train fold k (or resume it) unless it is done; print one progress line."""
    where = fold_dir(run_dir, k)
    status = fold_status(where, recipe["epochs"])
    held_out = set(folds[k])
    train = [r for r in pool if r.patient not in held_out]
    val = [r for r in pool if r.patient in held_out]
    line = f"fold {k + 1}/{len(folds)}: {len(folds[k])} held-out patients"
    if status == "done":
        print(f"{line}: already done ({where / 'last.pt'})", flush=True)
        return
    start = time.perf_counter()
    history = train_run(train, val, where, recipe, resume=status == "partial", progress=False)
    print(f"{line}: {len(history)} epochs, held-out Dice at the last epoch "
          f"{history[-1]['val_dice']:.3f}, {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip


def out_of_fold(folds: list, pool: list, run_dirs: list) -> tuple[list, dict]:
    """Every pool patient predicted by the fold model(s) that never saw it (the mean over
    run_dirs, folders of the same folds): volumes and
    {tta: {patient: (D, H, W) float32 probabilities}} (float16 would halve the memory, ~1.7 GB on
    LGG, but NumPy computes on it about 3x slower, and the sweep reads each one ~60 times)."""
    volumes, probs = [], {False: {}, True: {}}
    for k, held_out in enumerate(folds):
        members = su.load_ensemble([fold_dir(d, k) for d in run_dirs])
        records = [r for r in pool if r.patient in set(held_out)]
        for _, _, state in members:
            su.check_split(state, {"val": records, "test": []})  # it never trained on them
        vols = su.load_volumes(records, progress=False)
        pairs = [(model, pre) for model, pre, _ in members]
        for tta in probs:
            probs[tta] |= su.predict_ensemble(pairs, vols, tta, progress=False)
        volumes += vols
        print(f"out-of-fold predictions: fold {k + 1}/{len(folds)} done", flush=True)
    return volumes, probs


def fold_seconds(run_dir: Path, k: int) -> float:
    """Training wall-clock of fold k, summed over its epochs (history.json)."""
    return sum(
        h["seconds"] for h in json.loads((fold_dir(run_dir, k) / "history.json").read_text())
    )


def gather(folds: list, pool: list, test: list, run_dir: Path, recipe: dict, others=()) -> dict:
    """Choose settings out-of-fold, score the cross-validation, then the test patients once
    (`others`: more folders of the same folds, their fold models joining run_dir's)."""
    run_dirs = [run_dir, *others]
    volumes, oof = out_of_fold(folds, pool, run_dirs)
    print(f"sweeping {len(THRESHOLDS)} thresholds x blob rules x TTA on them", flush=True)
    sweeps = {
        tta: su.sweep_postprocessing(oof[tta], volumes, THRESHOLDS, MIN_SIZES, LARGEST, ENDS)
        for tta in oof
    }
    chosen = su.choose_settings(sweeps)
    print(f"chosen out of fold: {chosen}; now the test patients, once", flush=True)
    settings = tuple(chosen[k] for k in ("threshold", "min_size", "keep_largest", "drop_ends"))
    cv_patients, cv_slices = su.evaluate_patients(oof[chosen["tta"]], volumes, *settings)
    plain, _ = su.evaluate_patients(oof[False], volumes, 0.5)
    test_volumes = su.load_volumes(test, progress=False)
    members = su.load_ensemble([fold_dir(d, k) for d in run_dirs for k in range(len(folds))])
    per_fold = []
    test_probs = []
    for model, pre, state in members:
        su.check_split(state, {"val": [], "test": test})  # no test patient trained or chose
        test_probs.append(su.predict_volumes(model, test_volumes, pre, chosen["tta"], False))
        table, _ = su.evaluate_patients(test_probs[-1], test_volumes, *settings)
        per_fold.append(dict(mean=table.dice.mean(), median=table.dice.median()))
        print(f"test: fold model {len(per_fold)}/{len(members)} scored", flush=True)
    ensemble = {p: np.mean([probs[p] for probs in test_probs], axis=0) for p in test_probs[0]}
    test_patients, test_slices = su.evaluate_patients(ensemble, test_volumes, *settings)
    return dict(
        recipe=recipe, folds=folds, machine=machine_line(),
        with_folders=with_folders(others, run_dir),
        fold_train_seconds=[fold_seconds(run_dir, k) for k in range(len(folds))],
        chosen_out_of_fold=chosen, cv=su.summarise(cv_patients, cv_slices),
        cv_plain_threshold_0_5_mean=float(plain.dice.mean()),
        cv_patient_dice=dict(zip(cv_patients.patient, cv_patients.dice.round(4))),
        test_ensemble=su.summarise(test_patients, test_slices),
        test_ensemble_patient_dice=dict(zip(test_patients.patient, test_patients.dice.round(4))),
        test_per_fold_model=per_fold,
    )  # fmt: skip


def with_folders(others: list, run_dir: Path) -> list[str]:
    """The --with folders as cv_summary.json records them: relative to run_dir, so the runs/
    folder can move or be copied to another machine and notebook 04 still finds them."""
    return [os.path.relpath(Path(d).resolve(), run_dir.resolve()) for d in others]


def check_others(others: list, folds: list, run_dir: Path) -> None:
    """Refuse a --with folder of other folds, with unfinished folds, run-dir itself or twice, and
    a gather whose summary would replace that of another ensemble in run_dir."""
    resolved = [Path(d).resolve() for d in [run_dir, *others]]
    if len(set(resolved)) < len(resolved):
        raise SystemExit("--with: each folder once, and not --run-dir itself (its models would "
                         "count twice)")  # fmt: skip
    for other in others:
        plan = other / "folds.json"
        theirs = json.loads(plan.read_text()) if plan.exists() else {}
        if theirs.get("folds") != folds:
            raise SystemExit(f"--with {other}: not a cross_validate.py folder of the same folds "
                             "(same data, --folds and --cv-seed)")  # fmt: skip
        epochs = theirs["recipe"]["epochs"]  # its own recipe's length
        missing = [k + 1 for k in range(len(folds)) if fold_status(fold_dir(other, k), epochs) != "done"]  # fmt: skip
        if missing:
            raise SystemExit(f"--with {other}: folds {missing} are not trained; train them there")
    summary = run_dir / "cv_summary.json"
    wanted = with_folders(others, run_dir)
    if summary.exists() and json.loads(summary.read_text()).get("with_folders", []) != wanted:
        raise SystemExit(f"{summary} gathers another ensemble (other --with folders): keep it, "
                         "and gather this one in a new --run-dir (a copy of folds.json and hard "
                         "links of the fold folders will do)")  # fmt: skip


def report(summary: dict) -> None:
    """The headline lines of a gathered summary."""
    cv, ens, folds = summary["cv"], summary["test_ensemble"], summary["test_per_fold_model"]
    means = np.array([f["mean"] for f in folds])
    print(f"chosen out-of-fold: {summary['chosen_out_of_fold']}")
    print(f"cross-validation ({len(summary['cv_patient_dice'])} patients): per-patient Dice mean "
          f"{cv['patient Dice mean']:.3f} (95% CI {cv['patient Dice 95% CI low']:.3f}-"
          f"{cv['patient Dice 95% CI high']:.3f}), median {cv['patient Dice median']:.3f}; "
          f"plain threshold 0.5: {summary['cv_plain_threshold_0_5_mean']:.3f}")  # fmt: skip
    print(f"test, ensemble of {len(folds)}: mean {ens['patient Dice mean']:.3f} (95% CI "
          f"{ens['patient Dice 95% CI low']:.3f}-{ens['patient Dice 95% CI high']:.3f}), median "
          f"{ens['patient Dice median']:.3f}, pooled {ens['pooled Dice']:.3f}")  # fmt: skip
    print(
        f"test, each fold model: {', '.join(f'{m:.3f}' for m in means)} "
        f"(mean {means.mean():.3f} +- {means.std(ddof=1) if len(means) > 1 else 0:.3f} sd)"
    )
    worst = sorted(summary["cv_patient_dice"].items(), key=lambda kv: kv[1])[:5]
    print("worst out-of-fold patients: " + ", ".join(f"{p} {d:.2f}" for p, d in worst))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/cv5")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold", type=int, help="train this fold only (1-based), then stop")
    parser.add_argument("--cv-seed", type=int, default=0, help="how patients are dealt into folds")
    parser.add_argument("--with", dest="others", action="append", default=[], type=Path,
                        help="another finished folder of the same folds: its fold models join "
                        "the ensemble, out of fold and on test (repeatable)")  # fmt: skip
    add_recipe_arguments(parser)
    args = parser.parse_args()
    if args.fold is not None and not 1 <= args.fold <= args.folds:
        raise SystemExit(f"--fold {args.fold}: choose one of 1..{args.folds}")
    if args.fold is not None and args.others:
        raise SystemExit("--with joins finished folders when gathering: leave out --fold")
    recipe = recipe_from_args(args)
    recipe["patience"] = recipe["epochs"]  # the fold model is the last epoch: never stop early
    run_dir = Path(args.run_dir)
    print(machine_line())
    splits = su.split_by_patient(su.scan_dataset(su.resolve_data_dir()))
    pool = splits["train"] + splits["val"]
    folds = su.cross_validation_folds([r.patient for r in pool], args.folds, args.cv_seed)
    plan = run_dir / "folds.json"  # the deal is fixed at the first run: every machine agrees
    saved = json.loads(plan.read_text()) if plan.exists() else None
    if saved and dict(saved, recipe={**BEFORE, **saved["recipe"]}) != dict(folds=folds, recipe=recipe):  # fmt: skip
        raise SystemExit(f"{plan} holds other folds or another recipe: use the same data and "
                         "flags as its first run, or a new --run-dir")  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(plan, dict(folds=folds, recipe=recipe))  # atomic: a hard link is not written through
    if not args.fold:  # gathering: a wrong --with folder fails now, before any training
        check_others(args.others, folds, run_dir)
    for k in [args.fold - 1] if args.fold else range(args.folds):
        run_fold(k, folds, pool, run_dir, recipe)
    if args.fold:
        return
    summary = gather(folds, pool, splits["test"], run_dir, recipe, args.others)
    write_json(run_dir / "cv_summary.json", summary)
    report(summary)
    print(f"wrote {run_dir / 'cv_summary.json'}")


if __name__ == "__main__":
    main()
