"""Train the project U-Net on the real LGG set outside Jupyter (same calls as notebook 03).

    LGG_DATA=/path/to/kaggle_3m python benchmarks/train_lgg.py --run-dir runs/lgg
    LGG_DATA=... python benchmarks/train_lgg.py --run-dir runs/lgg-old --recipe old
    LGG_DATA=... python benchmarks/train_lgg.py --run-dir runs/lgg-flair --channels flair

Writes best.pt, last.pt and history.json to --run-dir; --resume continues an interrupted run.
The split is seg_utils.split_by_patient(seed 0), which reproduces the benchmark's split.json.
A recipe is every training choice at once: `--recipe default` takes this checkout's defaults
(TrainConfig, Preprocess, UNet), `--recipe old` the first published default (README, 2026-11-25),
so a comparison can be re-run after the defaults change; a flag given explicitly wins over both.
cross_validate.py and time_to_dice.py train through the same functions.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import time
from pathlib import Path

import torch

import seg_predict as sp
import seg_utils as su

_UNET = inspect.signature(su.UNet).parameters
DEFAULTS = dict(  # this checkout's defaults: what `--recipe default` trains
    size=su.Preprocess.size, width=_UNET["base_width"].default, depth=_UNET["depth"].default,
    epochs=su.TrainConfig.epochs, batch_size=su.TrainConfig.batch_size, lr=su.TrainConfig.lr,
    seed=su.TrainConfig.seed, patience=su.TrainConfig.patience, channels="all",
    crop=su.TrainConfig.train_crop, uniform=su.TrainConfig.sampling_uniform, strip=0.0, site=0.0,
    ema=su.TrainConfig.ema_decay,
)  # fmt: skip
RECIPES = {
    "default": {},
    # the default of the first real-data results (README): 128 px, width 16, depth 4, 40 epochs
    "old": dict(size=128, width=16, depth=4, epochs=40, batch_size=16, lr=3e-3, patience=40,
                crop=1.0, uniform=0.1, strip=0.0, site=0.0, ema=0.0),
}  # fmt: skip
TWINS = {"strip": sp.skull_strip, "site": sp.random_site_shift}  # recipe key -> twin's shift


def machine_line() -> str:
    """CPU, cores, torch and the precision training will use: results depend on all four."""
    cpuinfo = Path("/proc/cpuinfo")  # Linux; elsewhere the architecture is all we say
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = names[0] if names else platform.machine()
    device = su.pick_device()
    return (f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, device "
            f"{device.type}, precision {su.pick_precision(device)}")  # fmt: skip


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose a recipe; each one left out comes from --recipe."""
    parser.add_argument("--recipe", choices=RECIPES, default="default")
    parser.add_argument("--size", type=int, help="training image size, px")
    parser.add_argument("--width", type=int, help="U-Net channels at the first level")
    parser.add_argument("--depth", type=int, help="U-Net levels (times H, W are halved)")
    parser.add_argument("--epochs", type=int, help="length of the one-cycle schedule")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="one-cycle peak learning rate")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--patience", type=int, help="early stopping, epochs without progress")
    parser.add_argument("--channels", help="input channels: all, flair, or e.g. 1,2")
    parser.add_argument("--crop", type=float, help="train on random windows of this fraction "
                        "of the side (1 = whole images)")  # fmt: skip
    parser.add_argument("--uniform", type=float, help="share of each patient's slice draws spread "
                        "evenly over its slices (the rest by tumour area)")  # fmt: skip
    parser.add_argument("--strip", type=float, help="share of training volumes that also appear "
                        "skull-stripped (seg_predict.WithTwins; 0 = none)")  # fmt: skip
    parser.add_argument("--site", type=float, help="share of training volumes that also appear as "
                        "another site might deliver them (seg_predict.random_site_shift)")  # fmt: skip
    parser.add_argument("--ema", type=float, help="decay of the moving average of the weights that "
                        "is validated and saved (0 = none)")  # fmt: skip


def recipe_from_args(args: argparse.Namespace) -> dict:
    """Every training choice: explicit flags over the named recipe over this checkout's defaults."""
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    return {**DEFAULTS, **RECIPES[args.recipe], **given}


def train_run(train_records, val_records, run_dir, recipe: dict, resume=False, progress=True,
              on_epoch_end=None):  # fmt: skip
    """Prepare the data, build the U-Net and train it with `recipe`; returns the history."""
    pre = su.Preprocess(size=recipe["size"], channels=su.parse_channels(recipe["channels"]))
    twins = [(k, shift) for k, shift in TWINS.items() if recipe[k] > 0]
    if len(twins) > 1:  # said before any scan is read
        raise SystemExit("--strip and --site are two kinds of twins: give one of them")
    volumes = su.load_volumes(train_records, progress)
    if twins:  # a site-shift augmentation (issue 13): shifted twins beside the volumes
        key, shift = twins[0]
        train_set = sp.WithTwins(volumes, pre, recipe[key], recipe["seed"], su.train_transform(),
                                 shift)  # fmt: skip
    else:
        train_set = su.SliceDataset(su.prepare_volumes(volumes, pre), su.train_transform())
    val_volumes = su.prepare_volumes(su.load_volumes(val_records, progress), pre)
    su.seed_everything(recipe["seed"])
    model = su.UNet(
        in_channels=len(pre.channels), base_width=recipe["width"], depth=recipe["depth"]
    ).to(su.pick_device())  # train() computes where the model is: a GPU when there is one
    config = su.TrainConfig(epochs=recipe["epochs"], batch_size=recipe["batch_size"],
                            lr=recipe["lr"], seed=recipe["seed"], patience=recipe["patience"],
                            train_crop=recipe["crop"], sampling_uniform=recipe["uniform"],
                            ema_decay=recipe["ema"])  # fmt: skip
    print(f"{su.count_parameters(model):,} parameters, {len(train_set)} training slices "
          f"({len(train_set.volumes)} volumes), {pre}, {config}", flush=True)  # fmt: skip
    return su.train(model, train_set, val_volumes, Path(run_dir), config, pre, resume=resume,
                    on_epoch_end=on_epoch_end, progress=progress)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/lgg")
    parser.add_argument("--resume", action="store_true")
    add_recipe_arguments(parser)
    args = parser.parse_args()
    print(machine_line())
    start = time.perf_counter()
    splits = su.split_by_patient(su.scan_dataset(su.resolve_data_dir()))
    history = train_run(splits["train"], splits["val"], args.run_dir, recipe_from_args(args),
                        resume=args.resume)  # fmt: skip
    best = max(history, key=lambda h: h["val_dice"])
    print(f"best validation Dice {best['val_dice']:.4f} at epoch {best['epoch']}; "
          f"{len(history)} epochs; wall {time.perf_counter() - start:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
