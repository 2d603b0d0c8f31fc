"""The mask viewer (seg_utils.mask_viewer / render_slice) driven from Python, no browser.

A 3-patient synthetic set and made-up probabilities (the true mask shifted, blurred and with noise
added, so the Dice depends on the threshold); widget values are changed in code and the label and
the rendered PNG are checked against what seg_utils computes directly.
"""

import time

import cv2
import numpy as np
import pytest
from viewer_label import parse

import seg_utils as su


def decode(png: bytes) -> np.ndarray:
    """PNG bytes -> RGB uint8 (H, W, 3)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "PNG does not decode"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def red_pixels(rgb: np.ndarray) -> int:
    """Pixels clearly red (prediction outline (255, 25, 25) or red tint); grey and green never are."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return int(((r - np.maximum(g, b)) > 60).sum())


def green_pixels(rgb: np.ndarray) -> int:
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return int(((g - np.maximum(r, b)) > 60).sum())


def fake_probs(volume: su.Volume, seed: int) -> np.ndarray:
    """Deterministic (D, H, W) float32 'probabilities': truth shifted 6 px, blurred, plus noise."""
    rng = np.random.default_rng(seed)
    shifted = np.roll(volume.mask.astype(np.float32), 6, axis=2)
    blurred = np.stack([cv2.GaussianBlur(m, (0, 0), 4) for m in shifted])
    noise = rng.normal(0, 0.15, blurred.shape).astype(np.float32)
    return np.clip(blurred + noise, 0, 1)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = su.make_synthetic_dataset(tmp_path_factory.mktemp("viewer"), n_patients=3, seed=0)
    return su.load_volumes(su.scan_dataset(root), progress=False)


@pytest.fixture(scope="module")
def probs(volumes):
    return {v.patient: fake_probs(v, seed=i) for i, v in enumerate(volumes)}


@pytest.fixture
def viewer(volumes, probs):
    return su.mask_viewer(volumes, probs=probs)


def select(dropdown, label: str) -> None:
    """Pick an option by its label, as a click in the browser does (it sends the index)."""
    dropdown.index = [option for option, _ in dropdown.options].index(label)


def tumour_slices(volume: su.Volume) -> np.ndarray:
    return np.flatnonzero(volume.mask.any((1, 2)))


def test_synthetic_set_suits_these_tests(volumes):
    assert len(volumes) == 3
    assert len({len(v.slices) for v in volumes}) > 1, "need patients of different depths"
    for v in volumes:
        tumour = tumour_slices(v)
        assert 0 < len(tumour) < len(v.slices), f"{v.patient}: need tumour and tumour-free slices"


def test_render_slice_returns_png(volumes):
    vol = volumes[0]
    z = tumour_slices(vol)[0]
    rgb = decode(su.render_slice(vol.image[z], vol.mask[z], vol.mask[z]))
    assert rgb.shape == (384, 384, 3)
    assert decode(su.render_slice(vol.image[z], size=128)).shape == (128, 128, 3)


def test_controls_and_css_classes(viewer):
    c = viewer.controls
    names = "patient slice jump channel truth pred opacity threshold label image"
    assert set(c) == set(names.split())
    for name, widget in c.items():
        assert f"viewer-{name}" in widget._dom_classes


def test_label_names_patient_slice_and_tumour_pixels(viewer, volumes):
    c = viewer.controls
    vol = volumes[1]
    c["patient"].value = vol.patient
    for z in (0, 5, tumour_slices(vol)[0], len(vol.slices) - 1):
        c["slice"].value = int(z)
        label = parse(c["label"].value)
        assert label["patient"] == vol.patient
        assert int(label["n"]) == vol.slices[z]
        assert (int(label["pos"]), int(label["depth"])) == (z + 1, len(vol.slices))
        assert int(label["px"]) == int(vol.mask[z].sum())


def test_image_changes_with_the_slice(viewer, volumes):
    c = viewer.controls
    c["patient"].value = volumes[0].patient
    c["slice"].value = 3
    before = c["image"].value
    c["slice"].value = 4
    assert c["image"].value != before
    c["slice"].value = 3
    assert c["image"].value == before  # same slice, same settings: same picture


def test_dice_in_label_matches_dice_score(viewer, volumes, probs):
    c = viewer.controls
    vol = volumes[2]
    c["patient"].value = vol.patient
    z = int(tumour_slices(vol)[len(tumour_slices(vol)) // 2])
    c["slice"].value = z
    seen = {}
    for threshold in (0.3, 0.7):
        c["threshold"].value = threshold
        t = c["threshold"].value
        pred = probs[vol.patient] >= t
        label = parse(c["label"].value)
        assert label["threshold"] == f"{threshold:.2f}"
        assert label["dice_slice"] == f"{su.dice_score(pred[z], vol.mask[z]):.3f}"
        assert label["dice_patient"] == f"{su.dice_score(pred, vol.mask):.3f}"
        seen[threshold] = (label["dice_slice"], label["dice_patient"])
    assert seen[0.3] != seen[0.7], "made-up probabilities should make the Dice depend on threshold"


def test_next_tumour_slice_button(viewer, volumes):
    c = viewer.controls
    vol = volumes[0]
    c["patient"].value = vol.patient
    tumour = tumour_slices(vol)
    c["slice"].value = 0
    expected = [int(t) for t in tumour if t > 0]
    for want in expected:
        c["jump"].click()
        assert c["slice"].value == want
        assert int(parse(c["label"].value)["px"]) > 0
    c["jump"].click()  # past the last tumour slice: wraps round to the first
    assert c["slice"].value == int(tumour[0])


def test_switching_patient_resets_slider(viewer, volumes):
    c = viewer.controls
    for vol in [*volumes, volumes[0]]:
        c["patient"].value = vol.patient
        assert c["slice"].max == len(vol.slices) - 1
        assert 0 <= c["slice"].value <= c["slice"].max
        assert vol.mask[c["slice"].value].any(), "a new patient opens on a tumour slice"
        assert parse(c["label"].value)["patient"] == vol.patient
    # the deepest patient at its last slice, then a shallower one: the value must fit again
    deep = max(volumes, key=lambda v: len(v.slices))
    shallow = min(volumes, key=lambda v: len(v.slices))
    c["patient"].value = deep.patient
    c["slice"].value = len(deep.slices) - 1
    c["patient"].value = shallow.patient
    assert c["slice"].max == len(shallow.slices) - 1
    assert c["slice"].value <= c["slice"].max
    assert int(parse(c["label"].value)["depth"]) == len(shallow.slices)


def test_prediction_toggle_removes_red(viewer, volumes, probs):
    c = viewer.controls
    vol = volumes[0]
    c["patient"].value = vol.patient
    c["threshold"].value = 0.5
    z = int(np.argmax((probs[vol.patient] >= 0.5).sum((1, 2))))  # the slice with most prediction
    c["slice"].value = z
    shown = decode(c["image"].value)
    assert red_pixels(shown) > 50 and green_pixels(shown) > 50
    c["pred"].value = False
    hidden = decode(c["image"].value)
    assert red_pixels(hidden) == 0
    assert green_pixels(hidden) > 50, "the truth stays"
    c["truth"].value = False
    assert green_pixels(decode(c["image"].value)) == 0
    c["pred"].value = True
    assert red_pixels(decode(c["image"].value)) > 50


def test_channel_all_three(viewer, volumes):
    c = viewer.controls
    c["patient"].value = volumes[0].patient
    c["truth"].value = c["pred"].value = False  # no tints: only the MRI itself
    grey = decode(c["image"].value)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    select(c["channel"], "all three")  # the three channels as RGB
    colour = decode(c["image"].value)
    assert (np.abs(colour[..., 0].astype(int) - colour[..., 1]) > 10).mean() > 0.01
    parse(c["label"].value)  # the label still reads right
    images = set()
    for channel in (0, 1, 2):
        c["channel"].value = channel
        images.add(c["image"].value)
    assert len(images) == 3


def test_channel_all_three_stays_selected_in_the_dropdown(viewer):
    dropdown = viewer.controls["channel"]
    select(dropdown, "all three")
    assert dropdown.label == "all three"


def test_viewer_without_predictions(volumes):
    viewer = su.mask_viewer(volumes)
    c = viewer.controls
    assert c["pred"].disabled and not c["pred"].value and c["threshold"].disabled
    label = parse(c["label"].value)
    assert label["dice_slice"] is None  # no Dice without predictions
    assert red_pixels(decode(c["image"].value)) == 0


def test_model_predictions_once_per_patient(volumes, monkeypatch, record_property):
    calls = []
    real = su.predict_volume

    def counting(model, volume, pre, *args, **kwargs):
        calls.append(volume.patient)
        return real(model, volume, pre, *args, **kwargs)

    monkeypatch.setattr(su, "predict_volume", counting)
    su.seed_everything(0)
    model, pre = su.UNet(base_width=4, depth=2).eval(), su.Preprocess(size=32)
    viewer = su.mask_viewer(volumes, model=model, pre=pre)
    c = viewer.controls
    assert calls == [volumes[0].patient], "the first patient is predicted when the viewer opens"
    assert parse(c["label"].value)["dice_patient"] is not None

    timings = []
    for z in range(c["slice"].max + 1):
        start = time.perf_counter()
        c["slice"].value = z
        timings.append(time.perf_counter() - start)
    for t in (0.3, 0.55, 0.8):
        c["threshold"].value = t
    c["opacity"].value = 0.6
    select(c["channel"], "all three")
    c["jump"].click()
    assert calls == [volumes[0].patient], "no prediction on slider moves"

    c["patient"].value = volumes[1].patient
    c["patient"].value = volumes[2].patient
    c["patient"].value = volumes[0].patient
    c["patient"].value = volumes[1].patient
    assert calls == [v.patient for v in volumes], "each patient predicted once, then cached"

    # the label's Dice uses the model's probabilities
    vol, z = volumes[1], c["slice"].value
    pred = real(model, vol, pre) >= c["threshold"].value
    assert parse(c["label"].value)["dice_patient"] == f"{su.dice_score(pred, vol.mask):.3f}"
    assert parse(c["label"].value)["dice_slice"] == f"{su.dice_score(pred[z], vol.mask[z]):.3f}"

    # recorded, not asserted (machine-dependent): the time for one slider update
    median, worst = float(np.median(timings)), max(timings)
    record_property("slice_update_median_s", round(median, 4))
    record_property("slice_update_max_s", round(worst, 4))
    print(f"\nslice update: median {median * 1000:.1f} ms, max {worst * 1000:.1f} ms")


def test_the_viewer_is_su_mask_viewer_and_listed_by_dir():
    """It lives in seg_viewer.py, looked up through seg_utils on first use; dir(su) lists it (and
    the other lazy names), so tab completion in a notebook finds it."""
    import seg_viewer

    assert su.mask_viewer is seg_viewer.mask_viewer
    assert {"mask_viewer", "predict", "choose_settings", "train"} <= set(dir(su))
