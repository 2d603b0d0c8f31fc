"""seg_viewer: the mask viewer of notebook 05 (also a Voila app, `make viewer`).

Widgets, not a lesson: notebook 05 calls `mask_viewer` and says what it shows; the work it
displays is seg_utils' own (Segmenter.probabilities, PostProcess.apply, dice_score) and
seg_draw.render_slice. Tests drive it from Python (tests/test_viewer.py) and in a browser
(tests/test_browser.py).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

import seg_utils as su
from seg_draw import render_slice


def mask_viewer(volumes: list[su.Volume], segmenter: su.Segmenter | None = None, probs=None):
    """ipywidgets viewer: patient, slice, channel, truth/prediction, opacity and threshold.
    Predictions come from `probs` ({patient: (D, H, W)}) or from the segmenter, computed once
    per patient, then made masks by the segmenter's PostProcess at the slider's threshold. The
    returned VBox has `.controls` (its widgets) for tests."""
    import ipywidgets as W

    post = segmenter.post if segmenter is not None else su.PostProcess()
    by_name = {v.patient: v for v in volumes}
    cache, masks = dict(probs or {}), {}  # probabilities per patient, masks per threshold
    has_pred = probs is not None or segmenter is not None
    channels = [(n, i) for i, n in enumerate(su.CHANNELS)] + [("all three", -1)]
    steps = dict(min=min(0.05, post.threshold), max=max(0.95, post.threshold), step=0.05)  # a
    # model file's threshold may lie anywhere in [0, 1]
    c = {
        "patient": W.Dropdown(options=list(by_name), description="patient"),
        "slice": W.IntSlider(0, 0, 1, description="slice", readout=False),  # the label names it
        "jump": W.Button(description="next tumour slice", icon="forward"),
        "channel": W.Dropdown(options=channels, value=su.FLAIR, description="channel"),
        "truth": W.Checkbox(True, description="truth (blue)", indent=False),
        "pred": W.Checkbox(has_pred, description="prediction (orange)", indent=False),
        "opacity": W.FloatSlider(0.35, min=0.0, max=1.0, step=0.05, description="opacity"),
        "threshold": W.FloatSlider(post.threshold, description="threshold", **steps),
        "label": W.Label(),
        "image": W.Image(format="png", width=384, height=384),
    }
    for name, widget in c.items():
        widget.add_class(f"viewer-{name}")

    c["pred"].disabled = c["threshold"].disabled = not has_pred

    def probabilities(vol: su.Volume):
        if vol.patient not in cache and segmenter is not None:
            cache[vol.patient] = segmenter.probabilities(vol.image)
        return cache.get(vol.patient)

    def prediction(vol: su.Volume, threshold: float):
        prob = probabilities(vol) if has_pred else None
        if prob is not None and (vol.patient, threshold) not in masks:
            masks[vol.patient, threshold] = replace(post, threshold=threshold).apply(prob)
        return masks.get((vol.patient, threshold))

    def redraw(*_):
        vol, z = by_name[c["patient"].value], c["slice"].value
        pred = prediction(vol, c["threshold"].value)
        show_pred = pred is not None and c["pred"].value
        truth = vol.mask[z] if c["truth"].value else None
        channel = None if c["channel"].value < 0 else c["channel"].value
        shown = pred[z] if show_pred else None
        c["image"].value = render_slice(vol.image[z], truth, shown, channel, c["opacity"].value)
        text = f"{vol.patient} slice {vol.slices[z]} ({z + 1}/{len(vol.slices)})"
        text += f", tumour px {int(vol.mask[z].sum())}"
        if pred is not None:
            text += f" | Dice slice {su.dice_score(pred[z], vol.mask[z]):.3f}, patient "
            text += f"{su.dice_score(pred, vol.mask):.3f} @ threshold {c['threshold'].value:.2f}"
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
    rows = [c["patient"], W.HBox([c["slice"], c["jump"]]), c["channel"]]
    rows += [W.HBox([c["truth"], c["pred"]]), c["opacity"], c["threshold"]]
    controls = W.VBox(rows)
    box = W.VBox([W.HBox([controls, c["image"]]), c["label"]])
    box.controls = c
    return box
