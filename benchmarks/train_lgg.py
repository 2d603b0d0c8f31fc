"""Train the project U-Net on the real LGG set outside Jupyter (same calls as notebook 03).

    LGG_DATA=/path/to/kaggle_3m python benchmarks/train_lgg.py --run-dir runs/lgg
    LGG_DATA=... python benchmarks/train_lgg.py --run-dir runs/lgg-old --recipe old
    LGG_DATA=... python benchmarks/train_lgg.py --run-dir runs/lgg-flair --channels flair

Writes best.pt, last.pt and history.json to --run-dir; --resume continues an interrupted run.
The split is seg_utils.split_by_patient(seed 0), which reproduces the benchmark's split.json.
A recipe is every training choice at once: `--recipe default` takes this checkout's defaults
(TrainConfig, Preprocess, UNet), `--recipe old` the first published default (README), so a
comparison can be re-run after the defaults change; a flag given explicitly wins over both.
cross_validate.py and time_to_dice.py train through the same function, train_run.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import time
from pathlib import Path

import torch

import seg_utils as su

_UNET = inspect.signature(su.UNet).parameters
DEFAULTS = dict(  # this checkout's defaults: what `--recipe default` trains
    size=su.Preprocess.size,
    width=_UNET["base_width"].default,
    depth=_UNET["depth"].default,
    epochs=su.TrainConfig.epochs,
    batch_size=su.TrainConfig.batch_size,
    lr=su.TrainConfig.lr,
    seed=su.TrainConfig.seed,
    patience=su.TrainConfig.patience,
    channels="all",
    crop=su.TrainConfig.train_crop,
    uniform=su.TrainConfig.sampling_uniform,
    ema=su.TrainConfig.ema_decay,
    input_dropout=su.TrainConfig.input_dropout,
    other_sites=False,
)
RECIPES = {
    "default": {},
    # the default of the first real-data results (README): whole 128 px images, width 16,
    # 40 epochs with early stopping, no moving average
    "old": dict(
        size=128,
        width=16,
        depth=4,
        epochs=40,
        batch_size=16,
        lr=3e-3,
        patience=40,
        crop=1.0,
        uniform=0.1,
        ema=0.0,
        input_dropout=0.0,
        other_sites=False,
    ),
}


def machine_line() -> str:
    """CPU, cores, torch and the precision training will use: results depend on all four."""
    cpuinfo = Path("/proc/cpuinfo")  # Linux; elsewhere the architecture is all we say
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = names[0] if names else platform.machine()
    device = su.pick_device()
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, device "
        f"{device.type}, precision {su.pick_precision(device)}"
    )


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
    parser.add_argument(
        "--patience", type=int, help="early stopping: epochs without progress (0 = never)"
    )
    parser.add_argument("--channels", help="input channels: all, flair, or e.g. 1,2")
    parser.add_argument(
        "--crop", type=float, help="train on random windows of this share of the side (1 = whole)"
    )
    parser.add_argument(
        "--uniform",
        type=float,
        help="share of each patient's slice draws spread evenly over its slices (the rest by "
        "tumour area)",
    )
    parser.add_argument(
        "--ema",
        type=float,
        help="decay of the moving average of the weights that is validated and saved (0 = none)",
    )
    parser.add_argument(
        "--input-dropout",
        type=float,
        help="chance that each input but FLAIR is replaced by FLAIR on a training slice",
    )
    parser.add_argument(
        "--other-sites",
        action="store_const",
        const=True,
        help="add the augmentations for other hospitals' scans (train_transform(other_sites))",
    )


def recipe_from_args(args: argparse.Namespace) -> dict:
    """Every training choice: explicit flags over the named recipe over this checkout's defaults."""
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    return {**DEFAULTS, **RECIPES[args.recipe], **given}


def train_run(
    train_records: list,
    val_records: list,
    run_dir,
    recipe: dict,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end=None,
) -> list[dict]:
    """Prepare the data, build the U-Net and train it with `recipe`; returns the history."""
    pre = su.Preprocess(size=recipe["size"], channels=su.parse_channels(recipe["channels"]))
    train_set = su.SliceDataset.from_records(
        train_records, pre, su.train_transform(other_sites=recipe["other_sites"]), progress
    )
    val_volumes = su.prepare_volumes(su.load_volumes(val_records, progress), pre)
    su.seed_everything(recipe["seed"])
    model = su.UNet(
        in_channels=len(pre.channels), base_width=recipe["width"], depth=recipe["depth"]
    )
    model.to(su.pick_device())  # train() trains where the model is: a GPU when there is one
    config = su.TrainConfig(
        epochs=recipe["epochs"],
        batch_size=recipe["batch_size"],
        lr=recipe["lr"],
        seed=recipe["seed"],
        patience=recipe["patience"],
        train_crop=recipe["crop"],
        sampling_uniform=recipe["uniform"],
        ema_decay=recipe["ema"],
        input_dropout=recipe["input_dropout"],
    )
    print(
        f"{su.count_parameters(model):,} parameters, {len(train_set)} training slices "
        f"({len(train_set.volumes)} volumes), {pre}, {config}",
        flush=True,
    )
    return su.train(
        model,
        train_set,
        val_volumes,
        Path(run_dir),
        config,
        resume=resume,
        on_epoch_end=on_epoch_end,
        progress=progress,
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, train on the split's training patients, print the best epoch."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/lgg")
    parser.add_argument("--resume", action="store_true")
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    print(machine_line())
    start = time.perf_counter()
    splits = su.split_by_patient(su.scan_dataset(su.resolve_data_dir()))
    recipe = recipe_from_args(args)
    history = train_run(splits["train"], splits["val"], args.run_dir, recipe, args.resume)
    best = max(history, key=lambda h: h["val_dice"])
    print(
        f"best validation Dice {best['val_dice']:.4f} at epoch {best['epoch']}; "
        f"{len(history)} epochs; wall {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
