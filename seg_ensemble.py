"""Choosing post-processing, cross-validation folds and fold ensembles: notebook 04's sweep and
the protocol of benchmarks/cross_validate.py.

    python benchmarks/cross_validate.py --run-dir runs/cv5     # 5 folds, then the ensemble on test

No lesson teaches this module; its names are also su.<name> (seg_utils looks them up here on
first use): sweep_postprocessing, choose_settings, cross_validation_folds, predict_ensemble,
load_ensemble, models_to_score.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import seg_utils as su


def cross_validation_folds(patients, k: int = 5, seed: int = 0) -> list[list[str]]:
    """k disjoint folds of patient ids: sorted, seeded shuffle, dealt out in turn (sizes differ
    by at most one), so every patient is validated exactly once."""
    ids = sorted(set(patients))
    if not 2 <= k <= len(ids):
        raise ValueError(f"{k} folds need 2 <= k <= the number of patients ({len(ids)})")
    random.Random(seed).shuffle(ids)
    return [sorted(ids[i::k]) for i in range(k)]


def sweep_postprocessing(probs: dict, volumes: list[su.Volume], thresholds=(0.3, 0.4, 0.5, 0.6, 0.7),
                         min_sizes=(0, 50, 200, 500), largest=(False, True), ends=(0.0,)):  # fmt: skip
    """Mean per-patient Dice for every threshold / min_size / keep_largest / drop_ends (run on
    validation; largest=(False, True, "mass") tries the probability-mass choice of blob too).
    Each volume's blobs are found once per threshold; every setting then keeps some of them
    (blobs_to_keep, the rule postprocess applies), so the Dice are those evaluate_patients gives."""
    import pandas as pd

    dice = {}  # (threshold, drop_ends, keep_largest, min_size) -> per-patient Dice
    for threshold in thresholds:
        for vol in volumes:
            su.check_probabilities(probs[vol.patient], vol, threshold)
            blobs = _blob_counts(probs[vol.patient], vol.mask, threshold, ends)
            for setting, value in _dice_per_setting(blobs, threshold, min_sizes, largest, ends):
                dice.setdefault(setting, []).append(value)
    rows = [dict(threshold=t, min_size=m, drop_ends=e, keep_largest=k, dice=float(np.mean(d)))
            for (t, e, k, m), d in dice.items()]  # fmt: skip
    return pd.DataFrame(rows)


def _blob_counts(prob: np.ndarray, mask: np.ndarray, threshold: float, ends) -> dict:
    """Per 3D blob of prob >= threshold: voxels, probability mass, voxels on the truth, and
    whether it lies at the stack's ends for each drop_ends; plus the truth's voxel count."""
    from scipy import ndimage

    labels, n = ndimage.label(prob >= threshold)
    flat, truth = labels.ravel(), mask.astype(bool)

    def count(weights=None):  # per blob 1..n: voxels, or the sum of weights over its voxels
        return np.bincount(flat, weights, minlength=n + 1)[1:]

    at_ends = {e: su.blobs_at_the_ends(labels, n, e) for e in ends}
    return dict(voxels=count(), mass=count(prob.ravel()), hits=count(truth.ravel()),
                at_ends=at_ends, truth=int(truth.sum()))  # fmt: skip


def _dice_per_setting(blobs: dict, threshold, min_sizes, largest, ends):
    """((threshold, drop_ends, keep_largest, min_size), Dice) for one volume, in sweep order."""
    for drop_ends in ends:
        for keep_largest in largest:
            sizes = blobs["mass"] if keep_largest == "mass" else blobs["voxels"]
            for min_size in min_sizes if not keep_largest else (0,):
                keep = su.blobs_to_keep(sizes, blobs["at_ends"][drop_ends], min_size, keep_largest)
                pred, inter = blobs["voxels"][keep].sum(), blobs["hits"][keep].sum()
                value = float(su.dice_from_counts(inter, pred, blobs["truth"]))
                yield (threshold, drop_ends, keep_largest, min_size), value


def choose_settings(sweeps: dict) -> dict:
    """The best row of {tta: sweep_postprocessing table}; ties keep the first (no TTA, lower
    thresholds first): {"tta", "threshold", "min_size", "keep_largest" (False, True or "mass"),
    "drop_ends" (0 where the sweep tried none), "dice"}."""
    import pandas as pd

    table = pd.concat([t.assign(tta=tta) for tta, t in sweeps.items()], ignore_index=True)
    best = table.loc[table.dice.idxmax()]
    largest = best.keep_largest if best.keep_largest == "mass" else bool(best.keep_largest)
    return dict(tta=bool(best.tta), threshold=float(best.threshold), min_size=int(best.min_size),
                keep_largest=largest, drop_ends=float(best.get("drop_ends", 0.0)),
                dice=float(best.dice))  # fmt: skip


def predict_ensemble(members: list, volumes: list, tta=False, progress=True) -> dict:
    """Mean probability of several (model, Preprocess) pairs: {patient: (D, H, W)}."""
    return {
        v.patient: np.mean([su.predict_volume(m, v, p, tta=tta) for m, p in members], axis=0)
        for v in tqdm(volumes, desc=f"predicting ({len(members)} models)", disable=not progress)
    }


def load_ensemble(run_dirs: list, name: str = "last.pt", device=None) -> list[tuple]:
    """load_checkpoint(run_dir / name) for each run folder: [(model, Preprocess, state), ...]."""
    return [su.load_checkpoint(Path(d) / name, device) for d in run_dirs]


def fold_dir(run_dir: Path, k: int) -> Path:
    """Where fold k (0-based) trains: run-dir/fold-1 ... fold-K, as --fold counts."""
    return run_dir / f"fold-{k + 1}"


def models_to_score(run_dir, others=()) -> tuple[list, dict | None]:
    """What notebook 04 scores: run_dir/best.pt, averaged with the best.pt of `others`; or, for a
    cross_validate.py folder, its fold models (last.pt) with the settings chosen out of fold.
    Returns ([(model, Preprocess, state), ...], those settings or None: choose on validation)."""
    run_dir, others = Path(run_dir), [Path(d) for d in others]
    summary = run_dir / "cv_summary.json"
    if not summary.exists():
        return load_ensemble([run_dir, *others], "best.pt"), None
    if others:
        raise ValueError(
            f"{run_dir} is a cross-validation folder: score it alone (no SEG_ENSEMBLE)"
        )
    gathered = json.loads(summary.read_text())  # cross_validate.py: its folds and choices
    folders = [run_dir, *(run_dir / d for d in gathered.get("with_folders", []))]  # --with
    members = load_ensemble(
        [fold_dir(d, k) for d in folders for k in range(len(gathered["folds"]))], "last.pt"
    )
    return members, gathered["chosen_out_of_fold"]
