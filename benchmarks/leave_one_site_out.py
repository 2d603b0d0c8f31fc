"""Leave one site out: how a recipe does on an institution it never saw, beside unseen patients of
the institutions it trained on, with every input and with inputs missing.

    LGG_DATA=/path/to/kaggle_3m python benchmarks/leave_one_site_out.py --run-dir runs/loso
    LGG_DATA=... python benchmarks/leave_one_site_out.py --run-dir runs/loso --site HT  # one site

The LGG patients come from five TCGA institutions, coded in their ids (TCGA_<site>_<case>_...).
Only the training + validation patients of the fixed split take part; the test patients stay out.
For each held-out site S (--sites, default the four large ones: DU, HT, CS, FG), the patients of
the other sites are split by patient, seeded, into a training part and a held-out fifth; the
recipe (train_lgg.py's flags) trains on the training part into run-dir/<S>/ and its last epoch
(no early stopping, nothing chosen on what it scores) is scored per patient on
- "new site": every patient of S, and
- "seen sites": the held-out fifth of the other sites,
with threshold 0.5 and no blob rule, once with every input and once for each condition of
MISSING, where the missing scans are replaced by FLAIR (what `unet-seg predict --fill-missing
flair` does). A finished site is skipped, a half-trained one resumed; --site trains one site only
(run sites side by side, each with its share of OMP_NUM_THREADS), then a run without --site
gathers run-dir/loso_summary.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from train_lgg import add_recipe_arguments, machine_line, recipe_from_args, train_run

import seg_utils as su
from seg_runs import write_json

LARGE_SITES = ("DU", "HT", "CS", "FG")  # EZ has one patient: it always trains
MISSING = {  # condition -> the CHANNELS indices replaced by FLAIR
    "every input": (),
    "no pre-contrast": (0,),
    "no post-contrast": (2,),
    "FLAIR only": (0, 2),
}


def site(patient: str) -> str:
    """The institution code of a patient id: TCGA_CS_4941_19960909 -> CS."""
    return patient.split("_")[1]


def site_split(patients: list, held_out: str, seed: int = 0) -> dict:
    """{"train", "seen", "new"}: patient ids of the other sites (training part and a held-out
    fifth, seeded) and of the held-out site."""
    others = sorted(p for p in set(patients) if site(p) != held_out)
    random.Random(seed).shuffle(others)
    n_seen = max(1, len(others) // 5)
    new = sorted(p for p in set(patients) if site(p) == held_out)
    return dict(train=sorted(others[n_seen:]), seen=sorted(others[:n_seen]), new=new)


def train_site(held_out: str, pool: list, run_dir: Path, recipe: dict) -> Path:
    """Train (or resume, or skip when finished) the model that never saw `held_out`."""
    groups = site_split([r.patient for r in pool], held_out, recipe["seed"])
    if not groups["new"]:
        raise SystemExit(f"no patient of site {held_out!r} among the training + validation ones")
    where = run_dir / held_out
    last = where / "last.pt"
    done = last.exists() and su.read_checkpoint(last)["epoch"] >= recipe["epochs"]
    if not done:
        train = [r for r in pool if r.patient in set(groups["train"])]
        seen = [r for r in pool if r.patient in set(groups["seen"])]
        train_run(train, seen, where, recipe, resume=last.exists(), progress=False)
    return last


def with_missing(model: su.Segmenter, image: np.ndarray, missing: tuple):
    """(the networks predict uses, the (D, H, W, 3) image) for a scan without the `missing`
    channels: replaced by FLAIR, as predict does."""
    image = image.copy()
    image[..., list(missing)] = image[..., [su.FLAIR]]
    return model.for_inputs(tuple(c for c in range(3) if c not in missing)), image


def dice_by_condition(model: su.Segmenter, volumes: list) -> dict:
    """{condition: {patient: Dice}} with the missing scans replaced by FLAIR."""
    scores = {}
    for condition, missing in MISSING.items():
        scores[condition] = {}
        for volume in volumes:
            segmenter, image = with_missing(model, volume.image, missing)
            mask = segmenter.mask(image)
            scores[condition][volume.patient] = su.dice_score(mask, volume.mask)
    return scores


def score_site(held_out: str, pool: list, run_dir: Path, seed: int) -> dict:
    """{"new site": {condition: {patient: Dice}}, "seen sites": ...} for one held-out site."""
    groups = site_split([r.patient for r in pool], held_out, seed)
    segmenter = su.load_segmenter(run_dir / held_out / "last.pt")
    segmenter.post = su.PostProcess()  # threshold 0.5, no blob rule: nothing chosen
    out = {}
    for name, key in (("new site", "new"), ("seen sites", "seen")):
        records = [r for r in pool if r.patient in set(groups[key])]
        su.check_split(segmenter, {"val": records})  # it never trained on them
        out[name] = dice_by_condition(segmenter, su.load_volumes(records, progress=False))
    return out


def table(sites: dict) -> str:
    """Mean per-patient Dice over every held-out patient, per condition: new site, seen sites."""
    lines = [f"{'inputs':<18} {'new site':>9} {'seen sites':>11}  (per-patient Dice, mean)"]
    for condition in MISSING:
        means = []
        for name in ("new site", "seen sites"):
            values = [d for s in sites.values() for d in s[name][condition].values()]
            means.append(np.mean(values))
        lines.append(f"{condition:<18} {means[0]:>9.3f} {means[1]:>11.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/loso")
    parser.add_argument("--sites", default=",".join(LARGE_SITES), help="sites to hold out")
    parser.add_argument("--site", help="train this held-out site only, then stop")
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    if args.site is not None and args.site not in sites:
        raise SystemExit(f"--site {args.site}: choose one of --sites {', '.join(sites)}")
    recipe = recipe_from_args(args)
    recipe["patience"] = 0  # the last epoch: nothing is chosen on the patients it scores
    run_dir = Path(args.run_dir)
    print(machine_line())
    splits = su.split_by_patient(su.scan_dataset(su.resolve_data_dir()))
    pool = splits["train"] + splits["val"]
    plan = run_dir / "plan.json"  # the recipe is fixed at the first run
    if plan.exists() and json.loads(plan.read_text()) != dict(recipe=recipe):
        raise SystemExit(f"{plan} holds another recipe: use its flags, or a new --run-dir")
    write_json(plan, dict(recipe=recipe))
    for held_out in [args.site] if args.site else sites:
        print(f"site {held_out}: {train_site(held_out, pool, run_dir, recipe)}", flush=True)
    if args.site:
        return
    scored = {s: score_site(s, pool, run_dir, recipe["seed"]) for s in sites}
    write_json(run_dir / "loso_summary.json", dict(recipe=recipe, sites=scored))
    print(table(scored))
    print(f"wrote {run_dir / 'loso_summary.json'}")


if __name__ == "__main__":
    main()
