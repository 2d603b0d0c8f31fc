"""The mask viewer (seg_viewer.mask_viewer) driven from Python, no browser.

Three patients of conftest's synthetic set and made-up probabilities (the true mask shifted,
blurred and with noise added, so that the Dice depends on the threshold); widget values are
changed in code and the label and the rendered PNG checked against known answers.
"""

import time

import cv2
import numpy as np
import pytest
from scipy import ndimage
from viewer_label import parse

import seg_utils as su
from seg_viewer import mask_viewer


def decode(png: bytes) -> np.ndarray:
    """PNG bytes -> RGB uint8 (H, W, 3)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "PNG does not decode"
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def orange_pixels(rgb: np.ndarray) -> int:
    """Pixels clearly orange (prediction outline or tint: su.PRED_RGB); grey and blue never are."""
    r, b = (rgb[..., i].astype(int) for i in (0, 2))
    return int(((r - b) > 60).sum())


def blue_pixels(rgb: np.ndarray) -> int:
    """Pixels clearly blue (truth outline or tint: su.TRUTH_RGB); grey and orange never are."""
    r, b = (rgb[..., i].astype(int) for i in (0, 2))
    return int(((b - r) > 40).sum())


def fake_probs(volume: su.Volume, seed: int) -> np.ndarray:
    """Deterministic (D, H, W) float32 'probabilities': truth shifted 6 px, blurred, plus noise."""
    rng = np.random.default_rng(seed)
    shifted = np.roll(volume.mask.astype(np.float32), 6, axis=2)
    blurred = np.stack([cv2.GaussianBlur(m, (0, 0), 4) for m in shifted])
    noise = rng.normal(0, 0.15, blurred.shape).astype(np.float32)
    return np.clip(blurred + noise, 0, 1)


def tumour_slices(volume: su.Volume) -> np.ndarray:
    return np.flatnonzero(volume.mask.any((1, 2)))


@pytest.fixture(scope="module")
def volumes(synthetic_set):
    """Three patients of the session's synthetic set, of different depths, each with tumour and
    tumour-free slices (what these tests need)."""
    records = su.scan_dataset(synthetic_set(8, 0))
    first = sorted({r.patient for r in records})[:3]
    volumes = su.load_volumes([r for r in records if r.patient in first], progress=False)
    assert len({len(v.slices) for v in volumes}) == 3, "need patients of different depths"
    for v in volumes:
        assert 0 < len(tumour_slices(v)) < len(v.slices), f"{v.patient}: tumour and none needed"
    return volumes


@pytest.fixture(scope="module")
def probs(volumes):
    return {v.patient: fake_probs(v, seed=i) for i, v in enumerate(volumes)}


@pytest.fixture
def viewer(volumes, probs):
    return mask_viewer(volumes, probs=probs)


def select(dropdown, label: str) -> None:
    """Pick an option by its label, as a click in the browser does (it sends the index)."""
    dropdown.index = [option for option, _ in dropdown.options].index(label)


def untrained_segmenter(post=None) -> su.Segmenter:
    """A tiny untrained U-Net as a Segmenter: quick to run, its probabilities its own."""
    su.seed_everything(0)
    net = su.UNet(base_width=4, depth=2).eval()
    return su.Segmenter([net], [su.Preprocess(size=32)], post or su.PostProcess())


def test_controls_carry_the_css_classes_the_browser_test_finds(viewer):
    c = viewer.controls
    names = "patient slice jump channel truth pred opacity threshold label image"
    assert set(c) == set(names.split())
    for name, widget in c.items():
        assert f"viewer-{name}" in widget._dom_classes
    assert decode(c["image"].value).shape == (384, 384, 3)


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


def test_dice_in_the_label_is_dice_score_at_the_sliders_threshold(viewer, volumes, probs):
    c = viewer.controls
    vol = volumes[2]
    c["patient"].value = vol.patient
    z = int(tumour_slices(vol)[len(tumour_slices(vol)) // 2])
    c["slice"].value = z
    seen = {}
    for threshold in (0.3, 0.7):
        c["threshold"].value = threshold
        pred = probs[vol.patient] >= c["threshold"].value
        label = parse(c["label"].value)
        assert label["threshold"] == f"{threshold:.2f}"
        assert label["dice_slice"] == f"{su.dice_score(pred[z], vol.mask[z]):.3f}"
        assert label["dice_patient"] == f"{su.dice_score(pred, vol.mask):.3f}"
        seen[threshold] = (label["dice_slice"], label["dice_patient"])
    assert seen[0.3] != seen[0.7], "made-up probabilities should make the Dice depend on threshold"


def test_next_tumour_slice_button_steps_through_the_tumour_and_wraps(viewer, volumes):
    c = viewer.controls
    vol = volumes[0]
    c["patient"].value = vol.patient
    tumour = tumour_slices(vol)
    c["slice"].value = 0
    for want in tumour:
        c["jump"].click()
        assert c["slice"].value == want
    c["jump"].click()  # past the last tumour slice: round to the first
    assert c["slice"].value == int(tumour[0])


def test_switching_patient_opens_it_on_a_tumour_slice(viewer, volumes):
    c = viewer.controls
    for vol in [*volumes, volumes[0]]:
        c["patient"].value = vol.patient
        assert c["slice"].max == len(vol.slices) - 1
        assert c["slice"].value == su.middle_tumour_slice(vol.mask)
        assert parse(c["label"].value)["patient"] == vol.patient
    # the deepest patient at its last slice, then a shallower one: the value must fit again
    deep = max(volumes, key=lambda v: len(v.slices))
    shallow = min(volumes, key=lambda v: len(v.slices))
    c["patient"].value = deep.patient
    c["slice"].value = len(deep.slices) - 1
    c["patient"].value = shallow.patient
    assert c["slice"].value == su.middle_tumour_slice(shallow.mask)
    assert int(parse(c["label"].value)["depth"]) == len(shallow.slices)


def test_prediction_toggle_removes_the_prediction_colour(viewer, volumes, probs):
    c = viewer.controls
    vol = volumes[0]
    c["patient"].value = vol.patient
    c["threshold"].value = 0.5
    c["slice"].value = int(np.argmax((probs[vol.patient] >= 0.5).sum((1, 2))))  # most predicted
    shown = decode(c["image"].value)
    assert orange_pixels(shown) > 50 and blue_pixels(shown) > 50
    c["pred"].value = False
    hidden = decode(c["image"].value)
    assert orange_pixels(hidden) == 0
    assert blue_pixels(hidden) > 50, "the truth stays"
    c["truth"].value = False
    assert blue_pixels(decode(c["image"].value)) == 0
    c["pred"].value = True
    assert orange_pixels(decode(c["image"].value)) > 50


def test_channel_all_three_shows_colour_and_stays_selected(viewer, volumes):
    c = viewer.controls
    c["patient"].value = volumes[0].patient
    c["truth"].value = c["pred"].value = False  # no tints: only the MRI itself
    grey = decode(c["image"].value)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    select(c["channel"], "all three")  # the three channels as RGB
    assert c["channel"].label == "all three"
    colour = decode(c["image"].value)
    assert (np.abs(colour[..., 0].astype(int) - colour[..., 1]) > 10).mean() > 0.01
    images = set()
    for channel in (0, 1, 2):
        c["channel"].value = channel
        images.add(c["image"].value)
    assert len(images) == 3


def test_viewer_without_predictions_shows_no_dice_and_no_prediction(volumes):
    c = mask_viewer(volumes).controls
    assert c["pred"].disabled and not c["pred"].value and c["threshold"].disabled
    assert parse(c["label"].value)["dice_slice"] is None
    assert orange_pixels(decode(c["image"].value)) == 0


def test_model_predictions_are_computed_once_per_patient(volumes, monkeypatch, record_property):
    segmenter = untrained_segmenter()
    calls = []
    real = segmenter.probabilities

    def counting(image, *args, **kwargs):
        calls.append(next(v.patient for v in volumes if v.image is image))
        return real(image, *args, **kwargs)

    monkeypatch.setattr(segmenter, "probabilities", counting)
    c = mask_viewer(volumes, segmenter).controls
    assert calls == [volumes[0].patient], "the first patient is predicted when the viewer opens"
    timings = []
    for z in range(10):
        start = time.perf_counter()
        c["slice"].value = z
        timings.append(time.perf_counter() - start)
    for t in (0.3, 0.55, 0.8):
        c["threshold"].value = t
    c["opacity"].value = 0.6
    select(c["channel"], "all three")
    c["jump"].click()
    assert calls == [volumes[0].patient], "no prediction on slider moves"
    for vol in [volumes[1], volumes[2], volumes[0], volumes[1]]:
        c["patient"].value = vol.patient
    assert calls == [v.patient for v in volumes], "each patient predicted once, then cached"

    c["threshold"].value = segmenter.post.threshold  # the label shows the segmenter's mask
    vol, z = volumes[1], c["slice"].value
    pred = segmenter.mask(vol.image)
    assert pred.any() and not pred.all(), "an untrained net that marks some pixels"
    assert parse(c["label"].value)["dice_patient"] == f"{su.dice_score(pred, vol.mask):.3f}"
    assert parse(c["label"].value)["dice_slice"] == f"{su.dice_score(pred[z], vol.mask[z]):.3f}"
    # recorded, not asserted (it depends on the machine): the time for one slider update
    record_property("slice_update_median_s", round(float(np.median(timings)), 4))
    record_property("slice_update_max_s", round(max(timings), 4))


def test_threshold_slider_starts_at_the_segmenters_and_its_blob_rule_applies(volumes):
    """The truth (one 3D blob) at 0.9, plus a smaller false blob on tumour-free slices: keep
    "largest" drops the false blob, so the patient's Dice is exactly 1 at any threshold below
    0.9; keeping all blobs it is below 1."""
    vol = volumes[0]
    assert ndimage.label(vol.mask)[1] == 1 and not vol.mask[:3].any()
    prob = vol.mask * np.float32(0.9)
    prob[:3, 10:20, 10:20] = 0.9  # 300 voxels, fewer than the tumour's
    post = su.PostProcess(threshold=0.3, keep="largest")
    c = mask_viewer(volumes, untrained_segmenter(post), {vol.patient: prob}).controls
    assert c["threshold"].value == 0.3
    for threshold in (0.3, 0.6):
        c["threshold"].value = threshold
        label = parse(c["label"].value)
        assert label["threshold"] == f"{threshold:.2f}" and label["dice_patient"] == "1.000"
    every_blob = mask_viewer(volumes, probs={vol.patient: prob}).controls
    assert float(parse(every_blob["label"].value)["dice_patient"]) < 1


def test_threshold_slider_reaches_any_threshold_a_model_file_holds(volumes):
    """A PostProcess threshold may be anywhere in [0, 1]; a slider that clamps it would show
    and apply another threshold than predict does with the same file."""
    vol = volumes[0]
    nothing = {vol.patient: np.zeros(vol.mask.shape, np.float32)}
    for threshold in (0.02, 0.97):
        segmenter = untrained_segmenter(su.PostProcess(threshold=threshold))
        c = mask_viewer(volumes, segmenter, nothing).controls
        assert c["threshold"].value == threshold
        assert parse(c["label"].value)["threshold"] == f"{threshold:.2f}"
