"""Evaluation: metrics on hand-made volumes with known answers, post-processing, the sweep."""

import warnings

import numpy as np
import pytest
import torch
from conftest import whole_image_volume

import seg_utils as su


def volume(name: str, mask: np.ndarray) -> su.Volume:
    """A Volume with a blank image around a hand-made (D, H, W) mask."""
    image = np.zeros((*mask.shape, 3), np.uint8)
    return su.Volume(name, list(range(1, len(mask) + 1)), image, mask.astype(np.uint8))


@pytest.fixture
def two_patients():
    """Patient A: a 2x10x10 tumour on slices 0-1 of 3, predicted exactly, plus a 5-px false
    positive on the empty slice 2. Patient B: a 10x10 tumour on slice 0, half of it predicted."""
    a = np.zeros((3, 32, 32))
    a[0:2, 5:15, 5:15] = 1
    pred_a = a.copy()
    pred_a[2, 20, 20:25] = 1
    b = np.zeros((2, 32, 32))
    b[0, 5:15, 5:15] = 1
    pred_b = np.zeros_like(b)
    pred_b[0, 5:10, 5:15] = 1
    volumes = [volume("A", a), volume("B", b)]
    probs = {"A": pred_a * 0.9, "B": pred_b * 0.9}
    return volumes, probs


def test_patient_dice_pooled_and_per_slice_known_answers(two_patients):
    volumes, probs = two_patients
    patients, slices = su.evaluate_patients(probs, volumes, threshold=0.5)
    a, b = patients.set_index("patient").loc[["A", "B"]].itertuples()
    assert a.dice == pytest.approx(2 * 200 / (205 + 200))  # exact tumour + 5 false-positive px
    assert b.dice == pytest.approx(2 * 50 / (50 + 100))  # half of the tumour found
    assert b.precision == 1.0 and b.recall == pytest.approx(0.5)
    assert a.precision == pytest.approx(200 / 205) and a.recall == 1.0
    assert a.iou == pytest.approx(200 / 205) and b.iou == pytest.approx(50 / 100)
    summary = su.summarise(patients, slices)
    assert summary["patient Dice mean"] == pytest.approx((a.dice + b.dice) / 2)
    assert summary["patient IoU mean"] == pytest.approx((200 / 205 + 50 / 100) / 2)
    # pooled over both patients: 250 px found of 300 true, 255 predicted, union 305
    assert summary["pooled Dice"] == pytest.approx(2 * 250 / (255 + 300))
    assert summary["pooled IoU"] == pytest.approx(250 / 305)
    assert summary["pooled precision"] == pytest.approx(250 / 255)  # A's 5 false-positive px
    assert summary["pooled recall"] == pytest.approx(250 / 300)  # B's missed half
    # per-slice Dice over tumour slices only: A's two perfect slices and B's half slice
    assert summary["tumour-slice Dice mean"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert summary["pooled Dice"] != pytest.approx(summary["patient Dice mean"])
    assert summary["empty slices"] == 2  # A's slice 2 and B's slice 1
    assert summary["empty slices with false positives"] == 1
    assert summary["slice detection sensitivity"] == 1.0
    assert summary["slice detection specificity"] == 0.5


def test_slice_table_follows_the_empty_mask_rule(two_patients):
    volumes, probs = two_patients
    _, slices = su.evaluate_patients(probs, volumes, threshold=0.5)
    by_key = slices.set_index(["patient", "slice"]).dice
    assert by_key[("A", 3)] == 0.0  # prediction on an empty slice
    assert by_key[("B", 2)] == 1.0  # empty truth, empty prediction
    for row in slices.itertuples():  # the table agrees with dice_score everywhere
        vol = next(v for v in volumes if v.patient == row.patient)
        z = vol.slices.index(row.slice)
        assert row.dice == pytest.approx(su.dice_score(probs[row.patient][z] >= 0.5, vol.mask[z]))


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_threshold_outside_0_1_refused(two_patients, threshold):
    volumes, probs = two_patients
    with pytest.raises(ValueError, match=f"threshold {threshold} is not a probability"):
        su.evaluate_patients(probs, volumes, threshold)
    with pytest.raises(ValueError, match=f"threshold {threshold} is not a probability"):
        su.sweep_postprocessing(probs, volumes, thresholds=(0.5, threshold))


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1.5, -0.5, "shape"])
def test_probabilities_that_are_not_probabilities_refused(two_patients, bad):
    """NaN was scored as "nothing predicted" (specificity 1.0); logits or another patient's
    array are no better."""
    volumes, probs = two_patients
    probs = dict(probs, B=probs["B"].copy())
    if bad == "shape":
        probs["B"] = probs["B"][:, :16]
    else:
        probs["B"][1, 0, 0] = bad
    with pytest.raises(ValueError, match="probabilities of B"):
        su.evaluate_patients(probs, volumes, 0.5)
    with pytest.raises(ValueError, match="probabilities of B"):
        su.sweep_postprocessing(probs, volumes)


def test_postprocessing_removes_small_blobs_and_keeps_largest():
    binary = np.zeros((3, 20, 20), bool)
    binary[0:2, 2:8, 2:8] = True  # 72 voxels
    binary[2, 15:17, 15:17] = True  # 4 voxels, not touching
    assert su.postprocess(binary).sum() == 76
    assert su.postprocess(binary, min_size=10).sum() == 72
    assert su.postprocess(binary, keep_largest=True).sum() == 72
    assert su.postprocess(binary, min_size=100).sum() == 0
    assert not su.postprocess(np.zeros((2, 5, 5), bool)).any()


def test_keep_largest_by_probability_mass_keeps_the_confident_blob():
    binary = np.zeros((3, 20, 20), bool)
    binary[0:2, 2:8, 2:8] = True  # 72 voxels at p 0.55: mass 39.6
    binary[2, 12:19, 12:19] = True  # 49 voxels at p 0.95: mass 46.55, not touching
    prob = np.where(binary, 0.55, 0.0)
    prob[2, 12:19, 12:19] = 0.95
    assert su.postprocess(binary, keep_largest=True).sum() == 72  # the most voxels
    kept = su.postprocess(binary, keep_largest="mass", prob=prob)
    assert kept.sum() == 49 and kept[2, 15, 15] and not kept[0, 5, 5]
    volume = su.Volume("P", [1, 2, 3], np.zeros((3, 20, 20, 3), np.uint8),
                       (kept * 255).astype(np.uint8))  # fmt: skip
    for largest, dice in ((True, 0.0), ("mass", 1.0)):  # scoring passes the probabilities on
        table, _ = su.evaluate_patients({"P": prob}, [volume], 0.5, 0, largest)
        assert table.dice.iloc[0] == dice
    with pytest.raises(ValueError, match="pass prob="):
        su.postprocess(binary, keep_largest="mass")
    with pytest.raises(ValueError, match="not 'Mass'"):
        su.postprocess(binary, keep_largest="Mass", prob=prob)


def test_drop_ends_removes_blobs_wholly_at_either_end_of_the_stack():
    binary = np.zeros((10, 20, 20), bool)
    binary[0:2, 2:12, 2:12] = True  # slices 1-2 of 10: skull base, 200 voxels (the largest)
    binary[4:7, 5:9, 5:9] = True  # slices 5-7: 48 voxels, the tumour
    binary[9, 14:18, 14:18] = True  # slice 10: vertex, 16 voxels
    binary[1:5, 15:19, 2:4] = True  # slices 2-5: 32 voxels, reaches past the lowest 20 %
    assert su.postprocess(binary, drop_ends=0.2).sum() == 48 + 32  # both end blobs dropped
    assert su.postprocess(binary, drop_ends=0.1).sum() == 200 + 48 + 32  # only slice 10's
    assert su.postprocess(binary, keep_largest=True).sum() == 200  # the skull base wins...
    assert su.postprocess(binary, keep_largest=True, drop_ends=0.2).sum() == 48  # ...not now
    assert su.postprocess(binary, min_size=40, drop_ends=0.2).sum() == 48
    ends = np.zeros_like(binary)
    ends[[0, 9]] = binary[[0, 9]]
    assert not su.postprocess(ends, keep_largest=True, drop_ends=0.2).any()  # nothing left
    labels = np.zeros((10, 4, 4), int)
    labels[0, 0, 0], labels[3:8, 1, 1], labels[9, 2, 2] = 1, 2, 3
    assert su.blobs_at_the_ends(labels, 3, 0.1).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="drop_ends is a fraction"):
        su.postprocess(binary, drop_ends=0.5)
    prob = binary * 0.9
    volume = su.Volume("P", list(range(1, 11)), np.zeros((10, 20, 20, 3), np.uint8),
                       su.postprocess(binary, drop_ends=0.2).astype(np.uint8))  # fmt: skip
    sweep = su.sweep_postprocessing({"P": prob}, [volume], (0.5,), (0,), (False,), (0.0, 0.2))
    assert sweep.drop_ends.tolist() == [0.0, 0.2] and sweep.dice.iloc[1] == 1.0 > sweep.dice.iloc[0]


def test_sweep_gives_the_dice_evaluate_patients_gives_for_every_setting():
    rng = np.random.default_rng(3)
    volumes, probs = [], {}
    for i in range(3):  # blobs of every kind: big, small, at the ends, touching across slices
        mask = np.zeros((10, 24, 24), np.uint8)
        mask[3:7, 4:12, 4:12] = 1
        prob = np.clip(mask * 0.6 + rng.uniform(0, 0.35, mask.shape), 0, 1)
        prob[0:2, 16:22, 16:22] += 0.5 - 0.1 * i  # a skull-base blob
        prob[9, 2:5, 18:21] = 0.97  # a small confident vertex blob
        volumes.append(su.Volume(f"P{i}", list(range(1, 11)), np.zeros((10, 24, 24, 3), np.uint8),
                                 mask))  # fmt: skip
        probs[f"P{i}"] = np.clip(prob, 0, 1).astype(np.float32)
    largest, ends = (False, True, "mass"), (0.0, 0.1, 0.2)
    sweep = su.sweep_postprocessing(probs, volumes, (0.4, 0.5, 0.7), (0, 20, 40), largest, ends)
    assert len(sweep) == 3 * 3 * (3 + 2)
    for row in sweep.itertuples():
        table, _ = su.evaluate_patients(probs, volumes, row.threshold, row.min_size,
                                        row.keep_largest, row.drop_ends)  # fmt: skip
        assert row.dice == pytest.approx(table.dice.mean(), abs=1e-12)
    assert sweep.dice.nunique() > 5  # the settings differ here, so the comparison means something
    first = sweep.iloc[:5][["threshold", "drop_ends", "keep_largest", "min_size"]].values.tolist()
    assert first == [[0.4, 0.0, False, 0], [0.4, 0.0, False, 20], [0.4, 0.0, False, 40],
                     [0.4, 0.0, True, 0], [0.4, 0.0, "mass", 0]]  # fmt: skip


def test_post_processing_changes_the_score(two_patients):
    volumes, probs = two_patients
    plain, _ = su.evaluate_patients(probs, volumes, 0.5)
    cleaned, _ = su.evaluate_patients(probs, volumes, 0.5, min_size=10)
    assert cleaned.set_index("patient").dice["A"] == 1.0 > plain.set_index("patient").dice["A"]


def test_bootstrap_interval_contains_the_mean():
    values = np.random.default_rng(1).uniform(0.4, 1.0, 22)
    lo, hi = su.bootstrap_ci(values)
    assert lo < values.mean() < hi
    assert su.bootstrap_ci(values) == (lo, hi)  # seeded
    assert su.bootstrap_ci([0.8] * 5) == pytest.approx((0.8, 0.8))
    # known answer: resampled means of [0, 1] are 0, 0.5, 1 with chances 1/4, 1/2, 1/4, so the
    # central 60 % reach from 0 to 1 and the central 40 % is 0.5 alone (2000 draws: safe margins)
    assert su.bootstrap_ci([0.0, 1.0], level=0.6) == (0.0, 1.0)
    assert su.bootstrap_ci([0.0, 1.0], level=0.4) == (0.5, 0.5)


def test_choice_made_on_one_split_is_applied_unchanged_to_the_other():
    """Validation has a false-positive speck that a min_size removes; the sweep picks that
    setting, and the test split is scored with exactly those values."""
    rng = np.random.default_rng(0)

    def patient(name, speck):
        mask = np.zeros((4, 32, 32))
        mask[1:3, 8:20, 8:20] = 1
        prob = np.clip(mask * 0.8 + rng.uniform(0, 0.1, mask.shape), 0, 1)
        if speck:
            prob[0, 28:30, 28:30] = 0.95
        return volume(name, mask), prob

    val = [patient("V1", True), patient("V2", True)]
    test = [patient("T1", False), patient("T2", True)]
    sweep = su.sweep_postprocessing({v.patient: p for v, p in val}, [v for v, _ in val],
                                    thresholds=(0.5, 0.9), min_sizes=(0, 10))  # fmt: skip
    best = sweep.loc[sweep.dice.idxmax()]
    assert (best.threshold, best.min_size) == (0.5, 10) or bool(best.keep_largest)
    assert best.dice == 1.0
    chosen = dict(threshold=float(best.threshold), min_size=int(best.min_size),
                  keep_largest=bool(best.keep_largest))  # fmt: skip
    test_probs = {v.patient: p for v, p in test}
    patients, _ = su.evaluate_patients(test_probs, [v for v, _ in test], **chosen)
    direct = [
        su.dice_score(
            su.postprocess(p >= chosen["threshold"], chosen["min_size"], chosen["keep_largest"]),
            v.mask,
        )  # fmt: skip
        for v, p in test
    ]
    assert patients.dice.tolist() == pytest.approx(direct)


def test_uncrop_inverts_prepare_volume_geometry(synthetic_set):
    records = su.scan_dataset(synthetic_set(8, 0))
    vol = su.load_volumes([r for r in records if r.patient == records[0].patient], False)[0]
    prepared = su.prepare_volume(vol, su.Preprocess(size=64))
    back = su.uncrop(prepared.mask.astype(np.float32), prepared.box, prepared.shape) >= 0.5
    assert back.shape == vol.mask.shape
    assert su.dice_score(back, vol.mask) > 0.9  # only resampling blur is lost


def test_overlay_colours_truth_green_prediction_red_overlap_yellow():
    image = np.full((4, 4, 3), 100, np.uint8)
    truth = np.zeros((4, 4), bool)
    pred = np.zeros((4, 4), bool)
    truth[0, :2] = True
    pred[0, 1:3] = True
    rgb = su.overlay(image, truth, pred, opacity=1.0)
    assert tuple(rgb[0, 0]) == pytest.approx(su.TRUTH_RGB)
    assert tuple(rgb[0, 2]) == pytest.approx(su.PRED_RGB)
    r, g, _ = rgb[0, 1]
    assert r > 0.9 and g > 0.85  # both tints: yellow
    assert tuple(rgb[3, 3]) == pytest.approx((1.0, 1.0, 1.0))  # untouched grey, scaled per channel


# ----------------------------------------------------------------------------- TTA, empty sets


def test_tta_flips_the_mirrored_prediction_back():
    """A pixel-wise model (1x1 convolution) gives the same answer with and without TTA only if
    the mirrored prediction is flipped back; any model with TTA is mirror-symmetric."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    image[:, :, :8] = 0  # left and right differ
    torch.manual_seed(0)
    pixelwise = torch.nn.Conv2d(3, 1, 1).eval()
    volume = whole_image_volume(image)
    plain = su.predict_prepared(pixelwise, volume, "fp32", tta=False)
    np.testing.assert_allclose(su.predict_prepared(pixelwise, volume, "fp32", tta=True), plain,
                               atol=1e-6)  # fmt: skip
    model = su.UNet(base_width=4, depth=2).eval()
    tta = su.predict_prepared(model, volume, "fp32", tta=True)
    mirrored = su.predict_prepared(
        model, whole_image_volume(image[:, :, ::-1].copy()), "fp32", tta=True
    )
    np.testing.assert_allclose(mirrored, tta[:, :, ::-1], atol=1e-5)


def test_summarise_a_set_without_tumour():
    """No tumour anywhere: nothing predicted scores 1.0 (both empty), one stray pixel scores
    0.0; the measures that need tumour are NaN, and nothing divides by zero."""
    volumes = [volume("A", np.zeros((3, 16, 16))), volume("B", np.zeros((2, 16, 16)))]
    nothing = {v.patient: np.zeros(v.mask.shape, np.float32) for v in volumes}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a division by zero would warn
        summary = su.summarise(*su.evaluate_patients(nothing, volumes))
        assert summary["patient Dice mean"] == summary["pooled Dice"] == 1.0
        assert summary["pooled IoU"] == 1.0 and summary["slice detection specificity"] == 1.0
        assert summary["empty slices"] == 5 and summary["empty slices with false positives"] == 0
        for key in ("pooled recall", "pooled precision", "tumour-slice Dice mean"):
            assert np.isnan(summary[key]), key
        stray = {**nothing, "A": nothing["A"].copy()}
        stray["A"][1, 8, 8] = 0.9
        summary = su.summarise(*su.evaluate_patients(stray, volumes))
    assert summary["pooled Dice"] == 0.0 and summary["patient Dice mean"] == 0.5
    assert summary["empty slices with false positives"] == 1
