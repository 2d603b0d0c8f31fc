"""Train and release the project's model (models/lgg_unet.pt, card: models/MODEL_CARD.md).

    LGG_DATA=/path/to/kaggle_3m python benchmarks/release_model.py --loso runs/loso-drop \\
        --run-dir runs/release --input-dropout 0.5 --dev DEV_DIR

1. The PostProcess is chosen out of fold: on the leave-one-site-out predictions (--loso, a
   finished leave_one_site_out.py folder of the same recipe; every site model predicts the
   patients of the site it never saw) over the grid seg_utils.SWEEP.
2. The recipe (train_lgg.py's flags) trains on all 88 training and validation patients; the 11
   validation patients are among them, so their Dice during training only shows progress, and
   the model is the last epoch.
3. --with MODEL adds the networks of another model file, for the scans they fit better
   (Segmenter.for_inputs: a network trained with inputs dropped serves scans with inputs missing).
4. The 22 test patients score it once, with every input and with inputs missing (replaced by
   FLAIR), and so do the development-set cases of --dev (external_dev.py), each condition with
   the networks predict would use.
5. The model file (--out, weights stored as float16: half the size; an existing file is replaced
   only with --overwrite), its SHA-256 in models/SHA256SUMS and every figure in
   run-dir/release.json, for the card.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from external_dev import read_case, score_model
from leave_one_site_out import MISSING, site_split, with_missing
from train_lgg import add_recipe_arguments, machine_line, recipe_from_args, train_run

import seg_utils as su
from seg_predict import RELEASED_MODEL
from seg_runs import write_json


def choose_out_of_fold(loso: Path, pool: list) -> tuple[su.PostProcess, float]:
    """The PostProcess that scores best on the site models' predictions of their unseen sites."""
    probs, volumes = {False: {}, True: {}}, []
    for site_dir in sorted(p for p in loso.iterdir() if (p / "last.pt").exists()):
        segmenter = su.load_segmenter(site_dir / "last.pt")
        new = set(site_split([r.patient for r in pool], site_dir.name)["new"])
        for volume in su.load_volumes([r for r in pool if r.patient in new], progress=False):
            both = segmenter.probabilities_with_and_without_tta(volume.image)
            for tta in (False, True):
                probs[tta][volume.patient] = both[tta]
            volumes.append(volume)
    return su.choose_postprocess(su.sweep_postprocessing(probs, volumes))


def test_dice(model: su.Segmenter, volumes: list) -> dict:
    """{condition: (mean per-patient Dice, 95% interval low, high)} with inputs missing."""
    out = {}
    for condition, missing in MISSING.items():
        probs = {}
        for volume in volumes:
            segmenter, image = with_missing(model, volume.image, missing)
            probs[volume.patient] = segmenter.probabilities(image)
        patients, _, _ = su.score_patients(probs, volumes, segmenter.post)
        out[condition] = (patients.dice.mean(), *su.bootstrap_ci(patients.dice))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loso", type=Path, required=True, help="leave_one_site_out.py folder")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/release"))
    parser.add_argument("--out", type=Path, default=RELEASED_MODEL)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--dev", type=Path, help="development set: <case>/{flair,t1,t1c,truth}.nii")
    parser.add_argument("--with", dest="others", type=Path, action="append", default=[])
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    recipe = recipe_from_args(args)
    chosen_with = json.loads((args.loso / "plan.json").read_text())["recipe"]
    if {**chosen_with, "seed": recipe["seed"]} != recipe:
        raise SystemExit(f"{args.loso} trained another recipe ({chosen_with}): give its flags")
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"{args.out} exists: pass --overwrite to replace it")
    print(machine_line())
    splits = su.split_by_patient(su.scan_dataset(su.resolve_data_dir()))
    pool = splits["train"] + splits["val"]
    post, oof = choose_out_of_fold(args.loso, pool)
    print(f"chosen on the leave-one-site-out predictions: {post} (Dice {oof:.3f})", flush=True)
    train_run(pool, splits["val"], args.run_dir, recipe, resume=True, progress=False)
    segmenter = su.load_segmenter(args.run_dir / "last.pt", *args.others)
    segmenter.post, segmenter.chosen_on = post, "leave one site out"
    for net in segmenter.nets:
        net.half()  # float16 on disk; load_state_dict copies it into float32 networks
    segmenter.save(args.out)
    segmenter = su.load_segmenter(args.out)  # scored as saved
    sha = hashlib.sha256(args.out.read_bytes()).hexdigest()
    (args.out.parent / "SHA256SUMS").write_text(f"{sha}  {args.out.name}\n")
    report = dict(recipe=recipe, postprocess=asdict(post), out_of_fold_dice=oof, sha256=sha)
    report["test"] = test_dice(segmenter, su.load_volumes(splits["test"], progress=False))
    if args.dev:
        folders = sorted(p for p in args.dev.iterdir() if (p / "truth.nii").exists())
        cases = {p.name: read_case(p) for p in folders}
        report["dev"] = score_model(args.out, cases, own_post=True)
    write_json(args.run_dir / "release.json", report)
    for name in ("test", "dev"):
        for condition, value in report.get(name, {}).items():
            mean = value[0] if name == "test" else np.mean(list(value.values()))
            print(f"{name:<5} {condition:<18} {mean:.3f} {value[1:] if name == 'test' else ''}")
    print(f"wrote {args.out} (sha256 {sha}, {args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
