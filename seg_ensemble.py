"""Cross-validation folds and fold ensembles: the protocol of benchmarks/cross_validate.py.

    python benchmarks/cross_validate.py --run-dir runs/cv5     # 5 folds, then the ensemble on test

No lesson teaches this module; its names are also su.<name> (seg_utils looks them up here on
first use): cross_validation_folds, choose_settings, predict_ensemble, load_ensemble.
"""

from __future__ import annotations

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


def choose_settings(sweeps: dict) -> dict:
    """The best row of {tta: sweep_postprocessing table}; ties keep the first (no TTA, lower
    thresholds first): {"tta", "threshold", "min_size", "keep_largest", "dice"}."""
    import pandas as pd

    table = pd.concat([t.assign(tta=tta) for tta, t in sweeps.items()], ignore_index=True)
    best = table.loc[table.dice.idxmax()]
    return dict(tta=bool(best.tta), threshold=float(best.threshold), min_size=int(best.min_size),
                keep_largest=bool(best.keep_largest), dice=float(best.dice))  # fmt: skip


def predict_ensemble(members: list, volumes: list, tta=False, progress=True) -> dict:
    """Mean probability of several (model, Preprocess) pairs: {patient: (D, H, W)}."""
    return {
        v.patient: np.mean([su.predict_volume(m, v, p, tta=tta) for m, p in members], axis=0)
        for v in tqdm(volumes, desc=f"predicting ({len(members)} models)", disable=not progress)
    }


def load_ensemble(run_dirs: list, name: str = "last.pt", device=None) -> list[tuple]:
    """load_checkpoint(run_dir / name) for each run folder: [(model, Preprocess, state), ...]."""
    return [su.load_checkpoint(Path(d) / name, device) for d in run_dirs]
