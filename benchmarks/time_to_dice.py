"""Time to Dice: validation Dice against wall-clock seconds for training recipes run one after the
other on this machine, so that their ratio is measured side by side.

    LGG_DATA=/path/to/kaggle_3m python benchmarks/time_to_dice.py --run-dir runs/ttd old default
    LGG_DATA=... python benchmarks/time_to_dice.py old default:size=96,epochs=20 --figure ttd.png
    LGG_DATA=... python benchmarks/time_to_dice.py old default --target 0.78

Each positional argument is a recipe of train_lgg.py (`old`, `default`), optionally with changes
(`default:size=96,epochs=20`). Each recipe trains on the split's training patients into
run-dir/<recipe>/ (a run there is resumed, or reused when finished, and the epochs an earlier
call trained are counted in the output: their seconds come from that call, so resume only on the
same machine under the same load), with train()'s validation Dice after every epoch (training
size, threshold 0.5, the model-selection score). The seconds of an epoch include its validation,
as a user waits for it. --target gives the Dice to reach instead: each recipe then stops,
resumable, at the first epoch that reaches it, since later epochs cannot change its time to it.
Printed: each recipe's curve, the first recipe's best validation Dice as the target (or
--target), the time every recipe took to reach it and the speed-up over the first recipe, and
this machine's measured peak (the best of five 3x3 convolutions, 16 x 64 x 128 x 128), since
machines of one name differ.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from train_lgg import DEFAULTS, RECIPES, machine_line, train_run

import seg_utils as su


def parse_recipe(text: str) -> tuple[str, dict]:
    """ "default:size=96,epochs=20" -> (that text, every training choice of that recipe)."""
    name, _, changes = text.partition(":")
    if name not in RECIPES:
        raise SystemExit(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    recipe = {**DEFAULTS, **RECIPES[name]}
    for change in filter(None, changes.split(",")):
        key, _, value = change.partition("=")
        if key not in DEFAULTS:
            raise SystemExit(f"{text}: {key!r} is not one of {', '.join(DEFAULTS)}")
        recipe[key] = type(DEFAULTS[key])(value)
    return text, recipe


def peak_gflops(dtype: torch.dtype, repeats: int = 5) -> float:
    """This machine's best GFLOP/s on a 3x3 convolution, 16 x 64 x 128 x 128, channels_last."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, 128, 128, generator=gen).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, generator=gen).to(dtype)
    best = float("inf")
    with torch.no_grad():
        F.conv2d(x, w, padding=1)  # oneDNN builds its kernel on the first call
        for _ in range(repeats):
            start = time.perf_counter()
            F.conv2d(x, w, padding=1)
            best = min(best, time.perf_counter() - start)
    return 2 * 16 * 128 * 128 * 64 * 64 * 9 / best / 1e9


def curve(history: list[dict]) -> list[tuple[float, float]]:
    """(cumulative seconds, validation Dice) after each epoch."""
    seconds = torch.tensor([h["seconds"] for h in history]).cumsum(0).tolist()
    return list(zip(seconds, [h["val_dice"] for h in history]))


def seconds_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """Wall-clock seconds until validation Dice first reached target; None if it never did."""
    return next((s for s, d in points if d >= target), None)


def summary_line(name: str, points: list, target: float, base: float | None) -> str:
    """One recipe's best Dice, total seconds and time to target, with its speed-up over the
    reference's `base` seconds (none where either never reached the target)."""
    reached = seconds_to_reach(points, target)
    best = max(d for _, d in points)
    faster = f", {base / reached:.2f}x faster" if base and reached else ""
    when = f"{reached:.0f} s{faster}" if reached else "never"
    return f"{name}: best {best:.4f} after {points[-1][0]:.0f} s in all; target reached: {when}"


def stop_at(target: float):
    """An on_epoch_end hook for train(): stop (resumable) once validation Dice reaches target."""
    return lambda history: history[-1]["val_dice"] >= target


def run_recipe(
    name: str, recipe: dict, splits: dict, run_dir: Path, target: float | None = None
) -> tuple[list, int]:
    """The recipe's history (trained now, resumed, or a finished run reused) and how many of its
    epochs an earlier call trained: their seconds come from that call. With a target, training
    stops once it is reached (and an earlier call's run that reached it is reused as it is). A
    run folder holding another recipe is refused (train()'s resume check)."""
    where = run_dir / name.replace(":", "_").replace(",", "_").replace("=", "-")
    history_file = where / "history.json"
    earlier = json.loads(history_file.read_text()) if (where / "last.pt").exists() else []
    if target is not None and seconds_to_reach(curve(earlier), target) is not None:
        return earlier, len(earlier)
    stop = None if target is None else stop_at(target)
    history = train_run(
        splits["train"],
        splits["val"],
        where,
        recipe,
        resume=bool(earlier),
        progress=False,
        on_epoch_end=stop,
    )
    if stop and len(history) < recipe["epochs"] and history[-1]["val_dice"] >= target:
        print(f"{name}: reached {target} at epoch {len(history)}, stopped there (resumable)")
    return history, len(earlier)


def plot(curves: dict, target: float, path: str) -> None:
    """Validation Dice against minutes, one line per recipe, the target dashed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in curves.items():
        ax.plot([s / 60 for s, _ in points], [d for _, d in points], "o-", ms=3, label=name)
    ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:.3f}")
    ax.set(
        xlabel="training wall-clock, minutes",
        ylabel="validation Dice (per patient)",
        title="time to Dice",
        ylim=(0, 1),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="+", help="recipes, the first is the reference")
    parser.add_argument("--run-dir", default="runs/time_to_dice")
    parser.add_argument("--figure", help="also save the curves as this PNG")
    parser.add_argument(
        "--target",
        type=float,
        help="validation Dice to reach (default: the first recipe's best); each recipe stops "
        "once it reaches it",
    )
    args = parser.parse_args()
    recipes = dict(map(parse_recipe, args.recipes))
    print(machine_line())
    bf16 = f"{peak_gflops(torch.bfloat16):.0f}" if su.cpu_supports_bf16() else "no native bf16"
    print(f"peak 3x3 conv GFLOP/s: fp32 {peak_gflops(torch.float32):.0f}, bf16 {bf16}", flush=True)
    splits = su.split_by_patient(su.scan_dataset(su.resolve_data_dir()))
    curves = {}
    for name, recipe in recipes.items():
        history, earlier = run_recipe(name, recipe, splits, Path(args.run_dir), args.target)
        curves[name] = curve(history)
        print(
            f"{name} ({earlier} of {len(history)} epochs from an earlier call): "
            + ", ".join(f"{s:.0f}s {d:.3f}" for s, d in curves[name]),
            flush=True,
        )
    reference = next(iter(curves))
    target = args.target if args.target is not None else max(d for _, d in curves[reference])
    base = seconds_to_reach(curves[reference], target)
    given = "given" if args.target is not None else f"{reference}'s best validation Dice"
    print(f"\ntarget: {given} {target:.4f}")
    for name, points in curves.items():
        print(summary_line(name, points, target, base))
    if args.figure:
        plot(curves, target, args.figure)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
