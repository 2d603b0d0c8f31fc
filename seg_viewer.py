"""How the lessons draw a slice (truth green, prediction red, both yellow) and the interactive
mask viewer of notebook 05 (ipywidgets; `make viewer` serves it with Voila). No lesson teaches
this drawing code; `su.overlay`, `su.draw_overlay`, `su.render_slice` and `su.mask_viewer` are
the same functions.
"""

from __future__ import annotations

import cv2
import numpy as np

from seg_files import CHANNELS, FLAIR

TRUTH_RGB, PRED_RGB = (0.0, 0.9, 0.0), (1.0, 0.1, 0.1)  # green truth, red prediction


def overlay(image, mask=None, pred=None, channel: int | None = FLAIR, opacity: float = 0.35):
    """RGB float (H, W, 3): one channel in grey (None: all three as RGB), masks tinted on top;
    where truth and prediction overlap the tints mix to yellow."""
    base = image.astype(np.float32) / np.maximum(image.reshape(-1, 3).max(0), 1.0)  # per channel
    rgb = base if channel is None else np.repeat(base[..., channel : channel + 1], 3, axis=2)
    tint = np.zeros_like(rgb)
    for m, colour in ((mask, TRUTH_RGB), (pred, PRED_RGB)):
        if m is not None:
            tint += np.asarray(m, bool)[..., None] * np.array(colour, np.float32)
    covered = tint.any(axis=2, keepdims=True)
    return np.where(covered, (1 - opacity) * rgb + opacity * np.clip(tint, 0, 1), rgb)


def draw_overlay(ax, image, mask=None, pred=None, channel=FLAIR, opacity=0.35, title=None):
    """Draw overlay() on a matplotlib axis with outlines: truth green, prediction red."""
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


def mask_viewer(volumes: list, probs: dict | None = None, model=None, pre=None,
                threshold: float = 0.5, min_size: int = 0, keep_largest: bool = False,
                tta: bool = False):  # fmt: skip
    """ipywidgets viewer: patient, slice, channel, truth/prediction, opacity and threshold.
    Predictions come from `probs` ({patient: (D, H, W)}) or from `model` + `pre` (with `tta`),
    computed once per patient, then thresholded and post-processed (su.postprocess with
    `min_size`, `keep_largest`). The returned VBox has `.controls` (its widgets) for tests."""
    import ipywidgets as W

    import seg_utils as su  # late: seg_utils imports this module

    if model is not None and pre is None:
        raise ValueError("mask_viewer(model=...) needs pre= too: take both from load_checkpoint")
    by_name = {v.patient: v for v in volumes}
    cache, masks = dict(probs or {}), {}  # probabilities per patient, masks per threshold
    has_pred = probs is not None or model is not None
    c = {
        "patient": W.Dropdown(options=list(by_name), description="patient"),
        "slice": W.IntSlider(0, 0, 1, description="slice", readout=False),  # the label names it
        "jump": W.Button(description="next tumour slice", icon="forward"),
        "channel": W.Dropdown(
            options=[(n, i) for i, n in enumerate(CHANNELS)] + [("all three", -1)],
            value=FLAIR,
            description="channel",
        ),  # fmt: skip
        "truth": W.Checkbox(True, description="truth (green)", indent=False),
        "pred": W.Checkbox(
            has_pred, description="prediction (red)", disabled=not has_pred, indent=False
        ),
        "opacity": W.FloatSlider(0.35, min=0.0, max=1.0, step=0.05, description="opacity"),
        "threshold": W.FloatSlider(
            threshold, min=0.05, max=0.95, step=0.05, description="threshold", disabled=not has_pred
        ),  # fmt: skip
        "label": W.Label(),
        "image": W.Image(format="png", width=384, height=384),
    }
    for name, widget in c.items():
        widget.add_class(f"viewer-{name}")

    def probabilities(vol: su.Volume):
        if vol.patient not in cache and model is not None:
            cache[vol.patient] = su.predict_volume(model, vol, pre, tta=tta)
        return cache.get(vol.patient)

    def prediction(vol: su.Volume, threshold: float):
        prob = probabilities(vol) if has_pred else None
        if prob is not None and (vol.patient, threshold) not in masks:
            masks[vol.patient, threshold] = su.postprocess(
                prob >= threshold, min_size, keep_largest
            )
        return masks.get((vol.patient, threshold))

    def redraw(*_):
        vol, z = by_name[c["patient"].value], c["slice"].value
        pred = prediction(vol, c["threshold"].value)
        show_pred = pred is not None and c["pred"].value
        c["image"].value = render_slice(vol.image[z], vol.mask[z] if c["truth"].value else None,
                                        pred[z] if show_pred else None,
                                        None if c["channel"].value < 0 else c["channel"].value,
                                        c["opacity"].value)  # fmt: skip
        text = f"{vol.patient} slice {vol.slices[z]} ({z + 1}/{len(vol.slices)}), tumour px {int(vol.mask[z].sum())}"
        if pred is not None:
            text += (f" | Dice slice {su.dice_score(pred[z], vol.mask[z]):.3f}, patient "
                     f"{su.dice_score(pred, vol.mask):.3f} @ threshold {c['threshold'].value:.2f}")  # fmt: skip
        c["label"].value = text

    def new_patient(*_):
        vol = by_name[c["patient"].value]
        c["slice"].unobserve(redraw, "value")  # one redraw below, not one per change
        try:
            c["slice"].max = len(vol.slices) - 1  # may clamp the old value
            c["slice"].value = su.middle_tumour_slice(vol.mask)
        finally:
            c["slice"].observe(redraw, "value")
        redraw()

    def next_tumour(*_):
        tumour = np.flatnonzero(by_name[c["patient"].value].mask.any((1, 2)))
        later = tumour[tumour > c["slice"].value]
        if len(tumour):
            c["slice"].value = int(later[0] if len(later) else tumour[0])

    c["patient"].observe(new_patient, "value")
    c["jump"].on_click(next_tumour)
    for name in ("slice", "channel", "truth", "pred", "opacity", "threshold"):
        c[name].observe(redraw, "value")
    new_patient()
    controls = W.VBox([c["patient"], W.HBox([c["slice"], c["jump"]]), c["channel"],
                       W.HBox([c["truth"], c["pred"]]), c["opacity"], c["threshold"]])  # fmt: skip
    box = W.VBox([W.HBox([controls, c["image"]]), c["label"]])
    box.controls = c
    return box
