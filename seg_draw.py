"""How the lessons draw: a slice with its masks (truth blue, prediction orange, both pale), as a
matplotlib axis or as PNG bytes for the viewer; training curves; per-patient Dice. No lesson
teaches this drawing code; every name here is also su.<name>.
"""

from __future__ import annotations

import cv2
import numpy as np

from seg_files import FLAIR


def show_source(*objects) -> None:
    """Display the source of seg_utils functions or classes, highlighted, in a notebook: a
    lesson shows the code that runs, never a copy of it."""
    import inspect

    from IPython.display import Code, display

    for obj in objects:
        display(Code(inspect.getsource(obj), language="python"))


# Okabe and Ito's blue and orange: colour-blind readers tell them apart, unlike green and red
TRUTH_RGB, PRED_RGB = (0.0, 0.45, 0.70), (0.90, 0.62, 0.0)


def overlay(image, mask=None, pred=None, channel: int | None = FLAIR, opacity: float = 0.35):
    """RGB float (H, W, 3): one channel in grey (None: all three as RGB), masks tinted on top;
    where truth and prediction overlap the tints add up to a pale yellow."""
    base = image.astype(np.float32) / np.maximum(image.reshape(-1, 3).max(0), 1.0)  # per channel
    rgb = base if channel is None else np.repeat(base[..., channel : channel + 1], 3, axis=2)
    tint = np.zeros_like(rgb)
    for m, colour in ((mask, TRUTH_RGB), (pred, PRED_RGB)):
        if m is not None:
            tint += np.asarray(m, bool)[..., None] * np.array(colour, np.float32)
    covered = tint.any(axis=2, keepdims=True)
    return np.where(covered, (1 - opacity) * rgb + opacity * np.clip(tint, 0, 1), rgb)


def draw_overlay(ax, image, mask=None, pred=None, channel=FLAIR, opacity=0.35, title=None):
    """Draw overlay() on a matplotlib axis with outlines: truth blue, prediction orange."""
    ax.imshow(overlay(image, mask, pred, channel, opacity))
    for m, colour in ((mask, TRUTH_RGB), (pred, PRED_RGB)):
        if m is not None and np.any(m):
            ax.contour(np.asarray(m, np.float32), levels=[0.5], colors=[colour], linewidths=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def render_slice(image, mask=None, pred=None, channel=FLAIR, opacity=0.35, size=384) -> bytes:
    """PNG bytes of overlay() with outlines, drawn with OpenCV (fast enough for a slider)."""
    rgb = overlay(image, mask, pred, channel, opacity)
    rgb = cv2.resize((rgb * 255).astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    for m, colour in ((mask, TRUTH_RGB), (pred, PRED_RGB)):
        if m is not None and np.any(m):
            big = cv2.resize(np.asarray(m, np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
            contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(rgb, contours, -1, tuple(int(255 * c) for c in colour), 1)
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def show_examples(volumes: list, n: int = 8, seed: int = 0, channel=None, cols=4):
    """A grid of random tumour slices (one per patient) with the truth outlined."""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    picks = rng.choice(len(volumes), min(n, len(volumes)), replace=False)
    rows = int(np.ceil(len(picks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, v in zip(axes.flat, picks):
        vol = volumes[v]
        tumour = np.flatnonzero(vol.mask.any((1, 2)))  # (D,) -> indices of its tumour slices
        z = rng.choice(tumour) if len(tumour) else len(vol.mask) // 2
        title = f"{vol.patient} slice {vol.slices[z]}"
        draw_overlay(ax, vol.image[z], vol.mask[z], channel=channel, title=title)
    fig.tight_layout()
    return fig


def plot_history(history: list[dict], axes=None):
    """Training loss and validation Dice per epoch, side by side."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    epochs = [h["epoch"] for h in history]
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-")
    axes[0].set(xlabel="epoch", ylabel="training loss (BCE + Dice)", title="loss")
    averaged = "val_dice_raw" in history[-1]  # then val_dice is the moving average's
    label = "moving average of the weights (saved)" if averaged else "the weights (saved)"
    axes[1].plot(epochs, [h["val_dice"] for h in history], "o-", color="tab:blue", label=label)
    if averaged:
        raw = [h.get("val_dice_raw") for h in history]
        axes[1].plot(epochs, raw, ".--", color="tab:orange", label="the trained weights themselves")
        axes[1].legend(fontsize=8, loc="lower right")
    axes[1].set(xlabel="epoch", ylabel="mean per-patient Dice", title="validation", ylim=(0, 1))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return axes


class LivePlot:
    """on_epoch_end callback for train(): redraws plot_history in one notebook output."""

    def __init__(self):
        self.handle = None

    def __call__(self, history: list[dict]) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display

        axes = plot_history(history)
        fig = axes[0].figure
        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)
        plt.close(fig)


def plot_patient_dice(patients, summary: dict):
    """Per-patient Dice: a box plot with every patient as a dot, and the patients as sorted bars."""
    import matplotlib.pyplot as plt

    order = patients.sort_values("dice")
    fig, (ax_box, ax_bar) = plt.subplots(1, 2, figsize=(13, 4), width_ratios=[1, 4])
    ax_box.boxplot(patients.dice, widths=0.5, showfliers=False)
    jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(patients))  # spread the dots
    ax_box.scatter(1 + jitter, patients.dice, s=18, alpha=0.7, zorder=3)
    ax_box.set(ylim=(-0.02, 1.02), ylabel="Dice per patient", xticks=[], title="distribution")
    ax_bar.bar(range(len(order)), order.dice, color="tab:blue")
    for stat, color, style in [("mean", "k", "--"), ("median", "tab:orange", ":")]:
        value = summary[f"patient Dice {stat}"]
        ax_bar.axhline(value, color=color, ls=style, lw=1.5, label=f"{stat} {value:.3f}")
    ax_bar.set_xticks(range(len(order)), order.patient, rotation=90, fontsize=7)
    ax_bar.set(ylim=(0, 1.02), ylabel="Dice", title="test patients, sorted")
    ax_bar.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def zoom_around(ax, mask: np.ndarray, most: float = 2.0) -> None:
    """Zoom an image axis in on the pixels of a (H, W) mask, at most `most` times, kept inside."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return
    height, width = mask.shape
    half = int(np.clip(0.7 * max(np.ptp(ys), np.ptp(xs)), height / most / 2, height // 2))
    cy = np.clip((ys.min() + ys.max()) // 2, half, height - half)
    cx = np.clip((xs.min() + xs.max()) // 2, half, width - half)
    ax.set(xlim=(cx - half, cx + half), ylim=(cy + half, cy - half))
