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
3. The out-of-fold predictions of all pool patients choose the PostProcess (flip TTA, threshold
   and blob rule, over the grid seg_utils.SWEEP).
4. Reported: the cross-validation per-patient Dice over all pool patients with that PostProcess
   (with a bootstrap CI; the figure comparable with Buda et al. 2019, also cross-validated) and at
   plain threshold 0.5; then, once, the ensemble's (mean probability of the K models) test Dice
   and each fold model's own test Dice (the spread a single run has).
The ensemble, with the PostProcess chosen out of fold, is saved as run-dir/ensemble.pt: the model
file that notebook 04 and `unet-seg predict` take for a cross-validation folder. The figures land
in run-dir/cv_summary.json. A finished fold is skipped, a half-trained one resumed; `--fold K`
trains fold K only (run folds side by side as processes on one machine, each with its share of
OMP_NUM_THREADS, or on several machines, then copy the fold-k/ folders into one run-dir), then run
without --fold to gather. `--with DIR` (repeatable) gathers a bigger ensemble: DIR is another
finished cross_validate.py folder of the same folds (another recipe, say); fold k's out-of-fold
prediction is then the mean of the fold-k models of run-dir and every DIR, and ensemble.pt holds
all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from train_lgg import add_recipe_arguments, machine_line, recipe_from_args, train_run

import seg_utils as su
from seg_runs import write_json


def cross_validation_folds(patients, k: int = 5, seed: int = 0) -> list[list[str]]:
    """k disjoint folds of patient ids: sorted, seeded shuffle, dealt out in turn (sizes differ
    by at most one), so every patient is validated exactly once."""
    ids = sorted(set(patients))
    if not 2 <= k <= len(ids):
        raise ValueError(f"{k} folds need 2 <= k <= the number of patients ({len(ids)})")
    random.Random(seed).shuffle(ids)
    return [sorted(ids[i::k]) for i in range(k)]


def fold_dir(run_dir, k: int) -> Path:
    """Where fold k (0-based) trains: run-dir/fold-1 ... fold-K, as --fold counts."""
    return Path(run_dir) / f"fold-{k + 1}"


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
    print(
        f"{line}: {len(history)} epochs, held-out Dice at the last epoch "
        f"{history[-1]['val_dice']:.3f}, {time.perf_counter() - start:.0f} s",
        flush=True,
    )


def fold_models(run_dirs: list, k: int) -> list[Path]:
    """The fold-k models (last.pt) of every folder of the same folds."""
    return [fold_dir(d, k) / "last.pt" for d in run_dirs]


def out_of_fold(folds: list, pool: list, run_dirs: list) -> tuple[list, dict]:
    """Every pool patient predicted by the fold model(s) that never saw it (the mean over
    run_dirs): its volumes and {tta: {patient: (D, H, W) float32 probabilities}}. float32, not
    float16: the sweep reads each map once per threshold, and NumPy is slow on float16."""
    volumes, probs = [], {False: {}, True: {}}
    for k, held_out in enumerate(folds):
        records = [r for r in pool if r.patient in set(held_out)]
        segmenter = su.load_segmenter(*fold_models(run_dirs, k))
        su.check_split(segmenter, {"val": records})  # it never trained on them
        for volume in su.load_volumes(records, progress=False):
            both = segmenter.probabilities_with_and_without_tta(volume.image)
            for tta, prob in both.items():
                probs[tta][volume.patient] = prob
            volumes.append(volume)
        print(f"out-of-fold predictions: fold {k + 1}/{len(folds)} done", flush=True)
    return volumes, probs


def fold_seconds(run_dir: Path, k: int) -> float:
    """Training wall-clock of fold k, summed over its epochs (history.json)."""
    history = json.loads((fold_dir(run_dir, k) / "history.json").read_text())
    return sum(h["seconds"] for h in history)


def score_test(ensemble: su.Segmenter, test_volumes: list) -> tuple:
    """Each network's and the ensemble's test scores from one prediction per network: the
    per-patient tables (score_patients) of the ensemble, and [{mean, median}] per network."""
    ensemble_probs, member_dice = {}, [[] for _ in ensemble.nets]
    for volume in test_volumes:
        each = ensemble.member_probabilities(volume.image)  # per network (D, H, W)
        for dice, prob in zip(member_dice, each):
            table, _, _ = su.score_patients({volume.patient: prob}, [volume], ensemble.post)
            dice.append(float(table.dice.iloc[0]))
        ensemble_probs[volume.patient] = np.mean(each, axis=0)  # = ensemble.probabilities()
        print(f"test: {volume.patient} scored", flush=True)
    patients, slices, _ = su.score_patients(ensemble_probs, test_volumes, ensemble.post)
    per_model = [dict(mean=float(np.mean(d)), median=float(np.median(d))) for d in member_dice]
    return patients, slices, per_model


def gather(folds: list, pool: list, test: list, run_dir: Path, recipe: dict, others=()) -> dict:
    """Choose the PostProcess out of fold, score the cross-validation, save the ensemble of all
    fold models as run_dir/ensemble.pt, then score the test patients once (`others`: more
    folders of the same folds, their fold models joining run_dir's)."""
    run_dirs = [run_dir, *others]
    volumes, oof = out_of_fold(folds, pool, run_dirs)
    table = su.sweep_postprocessing(oof, volumes)
    post, dice = su.choose_postprocess(table)
    print(f"chosen out of fold among {len(table)} settings: {post}", flush=True)
    cv_patients, cv_slices, _ = su.score_patients(oof[post.tta], volumes, post)
    plain, _, _ = su.score_patients(oof[False], volumes, su.PostProcess())
    paths = [fold_dir(d, k) / "last.pt" for d in run_dirs for k in range(len(folds))]
    ensemble = replace(su.load_segmenter(*paths), post=post, chosen_on="out of fold")
    su.check_split(ensemble, {"test": test})  # no test patient trained or chose an epoch
    ensemble.save(run_dir / "ensemble.pt")
    print(f"wrote {run_dir / 'ensemble.pt'}; now the test patients, once", flush=True)
    test_patients, test_slices, per_model = score_test(
        ensemble, su.load_volumes(test, progress=False)
    )
    return dict(
        recipe=recipe,
        folds=folds,
        machine=machine_line(),
        with_folders=with_folders(others, run_dir),
        fold_train_seconds=[fold_seconds(run_dir, k) for k in range(len(folds))],
        chosen_out_of_fold=asdict(post) | dict(dice=dice),
        cv=su.summarise(cv_patients, cv_slices),
        cv_plain_threshold_0_5_mean=float(plain.dice.mean()),
        cv_patient_dice=dict(zip(cv_patients.patient, cv_patients.dice.round(4))),
        test_ensemble=su.summarise(test_patients, test_slices),
        test_ensemble_patient_dice=dict(zip(test_patients.patient, test_patients.dice.round(4))),
        test_per_fold_model=per_model,
    )


def with_folders(others: list, run_dir: Path) -> list[str]:
    """The --with folders as cv_summary.json records them: relative to run_dir, so the runs/
    folder can move or be copied to another machine as a whole."""
    return [os.path.relpath(Path(d).resolve(), run_dir.resolve()) for d in others]


def check_others(others: list, folds: list, run_dir: Path) -> None:
    """Refuse a --with folder of other folds, with unfinished folds, run-dir itself or twice, and
    a gather whose summary would replace that of another ensemble in run_dir."""
    resolved = [Path(d).resolve() for d in [run_dir, *others]]
    if len(set(resolved)) < len(resolved):
        raise SystemExit(
            "--with: each folder once, and not --run-dir itself (its models would count twice)"
        )
    for other in others:
        plan = Path(other) / "folds.json"
        theirs = json.loads(plan.read_text()) if plan.exists() else {}
        if theirs.get("folds") != folds:
            raise SystemExit(
                f"--with {other}: not a cross_validate.py folder of the same folds (same data, "
                "--folds and --cv-seed)"
            )
        epochs = theirs["recipe"]["epochs"]  # its own recipe's length
        missing = [
            k + 1 for k in range(len(folds)) if fold_status(fold_dir(other, k), epochs) != "done"
        ]
        if missing:
            raise SystemExit(f"--with {other}: folds {missing} are not trained; train them there")
    summary = run_dir / "cv_summary.json"
    wanted = with_folders(others, run_dir)
    if summary.exists() and json.loads(summary.read_text()).get("with_folders", []) != wanted:
        raise SystemExit(
            f"{summary} gathers another ensemble (other --with folders): keep it, and gather "
            "this one in a new --run-dir (a copy of folds.json and hard links of the fold "
            "folders will do)"
        )


def report(summary: dict) -> None:
    """The headline lines of a gathered summary."""
    cv, ens, folds = summary["cv"], summary["test_ensemble"], summary["test_per_fold_model"]
    means = np.array([f["mean"] for f in folds])
    spread = means.std(ddof=1) if len(means) > 1 else 0.0
    print(f"chosen out of fold: {summary['chosen_out_of_fold']}")
    print(
        f"cross-validation ({len(summary['cv_patient_dice'])} patients): per-patient Dice mean "
        f"{cv['patient Dice mean']:.3f} (95% CI {cv['patient Dice 95% CI low']:.3f}-"
        f"{cv['patient Dice 95% CI high']:.3f}), median {cv['patient Dice median']:.3f}; "
        f"plain threshold 0.5: {summary['cv_plain_threshold_0_5_mean']:.3f}"
    )
    print(
        f"test, ensemble of {len(folds)}: mean {ens['patient Dice mean']:.3f} (95% CI "
        f"{ens['patient Dice 95% CI low']:.3f}-{ens['patient Dice 95% CI high']:.3f}), median "
        f"{ens['patient Dice median']:.3f}, pooled {ens['pooled Dice']:.3f}"
    )
    print(
        f"test, each fold model: {', '.join(f'{m:.3f}' for m in means)} "
        f"(mean {means.mean():.3f} +- {spread:.3f} sd)"
    )
    worst = sorted(summary["cv_patient_dice"].items(), key=lambda kv: kv[1])[:5]
    print("worst out-of-fold patients: " + ", ".join(f"{p} {d:.2f}" for p, d in worst))


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, train the folds that are not done, then gather (unless --fold)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/cv5")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold", type=int, help="train this fold only (1-based), then stop")
    parser.add_argument("--cv-seed", type=int, default=0, help="how patients are dealt into folds")
    parser.add_argument(
        "--with",
        dest="others",
        action="append",
        default=[],
        type=Path,
        help="another finished folder of the same folds: its fold models join the ensemble, out "
        "of fold and on test (repeatable)",
    )
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    if args.fold is not None and not 1 <= args.fold <= args.folds:
        raise SystemExit(f"--fold {args.fold}: choose one of 1..{args.folds}")
    if args.fold is not None and args.others:
        raise SystemExit("--with joins finished folders when gathering: leave out --fold")
    recipe = recipe_from_args(args) | dict(patience=0)  # the fold model is the last epoch
    run_dir = Path(args.run_dir)
    print(machine_line())
    splits = su.split_by_patient(su.scan_dataset(su.resolve_data_dir()))
    pool = splits["train"] + splits["val"]
    try:
        folds = cross_validation_folds([r.patient for r in pool], args.folds, args.cv_seed)
    except ValueError as e:
        raise SystemExit(f"--folds {args.folds}: {e}") from e
    plan = run_dir / "folds.json"  # the deal is fixed at the first run: every machine agrees
    saved = json.loads(plan.read_text()) if plan.exists() else None
    if saved and saved != dict(folds=folds, recipe=recipe):
        raise SystemExit(
            f"{plan} holds other folds or another recipe: use the same data and flags as its "
            "first run, or a new --run-dir"
        )
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
