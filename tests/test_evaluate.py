"""Evaluation and the Segmenter: metrics and post-processing on hand-made volumes with known
answers, the sweep and its choice, test-time augmentation, ensembles and model files."""

import math
import re
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import whole_image_volume
from torch import nn

import seg_draw
import seg_utils as su

CPU = torch.device("cpu")


def volume(name: str, mask: np.ndarray) -> su.Volume:
    """A Volume with a blank image around a hand-made (D, H, W) mask."""
    image = np.zeros((*mask.shape, 3), np.uint8)
    return su.Volume(name, list(range(1, len(mask) + 1)), image, mask.astype(np.uint8))


@pytest.fixture
def two_patients():
    """Patient A: a 2x10x10 tumour on slices 1-2 of 3, predicted exactly, plus a 5-px false
    positive on the empty slice 3. Patient B: a 10x10 tumour on slice 1 of 2, half of it found."""
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


# ----------------------------------------------------------------------------- metrics


def test_patient_pooled_and_per_slice_known_answers(two_patients):
    volumes, probs = two_patients
    patients, slices, masks = su.score_patients(probs, volumes, su.PostProcess())
    a, b = patients.set_index("patient").loc[["A", "B"]].itertuples()
    assert a.dice == pytest.approx(2 * 200 / (205 + 200))  # exact tumour + 5 false-positive px
    assert b.dice == pytest.approx(2 * 50 / (50 + 100))  # half of the tumour found
    assert (a.precision, a.recall) == (pytest.approx(200 / 205), 1.0)
    assert (b.precision, b.recall) == (1.0, pytest.approx(0.5))
    assert (a.iou, b.iou) == (pytest.approx(200 / 205), pytest.approx(50 / 100))
    assert masks["A"].sum() == 205 and masks["B"].sum() == 50  # the masks that were scored
    # per slice, with the empty-mask rule: a prediction on an empty slice scores 0 (A's slice
    # 3), an empty prediction on an empty slice 1 (B's slice 2)
    by_slice = slices.set_index(["patient", "slice"]).dice.to_dict()
    assert by_slice == {
        ("A", 1): 1.0,
        ("A", 2): 1.0,
        ("A", 3): 0.0,
        ("B", 1): pytest.approx(2 / 3),
        ("B", 2): 1.0,
    }

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
    assert summary["empty slices"] == 2  # A's slice 3 and B's slice 2
    assert summary["empty slices with false positives"] == 1
    assert summary["slice detection sensitivity"] == 1.0
    assert summary["slice detection specificity"] == 0.5


def test_summarise_a_set_without_tumour():
    """No tumour anywhere: nothing predicted scores 1.0 (both empty), one stray pixel scores
    0.0; the measures that need tumour are NaN, and nothing divides by zero."""
    volumes = [volume("A", np.zeros((3, 16, 16))), volume("B", np.zeros((2, 16, 16)))]
    nothing = {v.patient: np.zeros(v.mask.shape, np.float32) for v in volumes}
    post = su.PostProcess()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a division by zero would warn
        summary = su.summarise(*su.score_patients(nothing, volumes, post)[:2])
        assert summary["patient Dice mean"] == summary["pooled Dice"] == 1.0
        assert summary["pooled IoU"] == 1.0 and summary["slice detection specificity"] == 1.0
        assert summary["empty slices"] == 5 and summary["empty slices with false positives"] == 0
        for key in ("pooled recall", "pooled precision", "tumour-slice Dice mean"):
            assert np.isnan(summary[key]), key
        stray = {**nothing, "A": nothing["A"].copy()}
        stray["A"][1, 8, 8] = 0.9
        summary = su.summarise(*su.score_patients(stray, volumes, post)[:2])
    assert summary["pooled Dice"] == 0.0 and summary["patient Dice mean"] == 0.5
    assert summary["empty slices with false positives"] == 1


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
        su.score_patients(probs, volumes, su.PostProcess())
    with pytest.raises(ValueError, match="probabilities of B"):
        su.sweep_postprocessing({False: probs}, volumes, dict(tta=(False,)))


def test_sweep_refuses_a_threshold_that_is_not_a_probability(two_patients):
    volumes, probs = two_patients
    with pytest.raises(ValueError, match="threshold 1.5 is not a probability"):
        su.sweep_postprocessing({False: probs}, volumes, dict(tta=(False,), threshold=(0.5, 1.5)))


def test_bootstrap_interval_known_answers():
    values = np.random.default_rng(1).uniform(0.4, 1.0, 22)
    lo, hi = su.bootstrap_ci(values)
    assert lo < values.mean() < hi
    assert su.bootstrap_ci(values) == (lo, hi)  # seeded
    assert su.bootstrap_ci([0.8] * 5) == pytest.approx((0.8, 0.8))
    # resampled means of [0, 1] are 0, 0.5, 1 with chances 1/4, 1/2, 1/4, so the central 60 %
    # reach from 0 to 1 and the central 40 % is 0.5 alone (2000 draws: safe margins)
    assert su.bootstrap_ci([0.0, 1.0], level=0.6) == (0.0, 1.0)
    assert su.bootstrap_ci([0.0, 1.0], level=0.4) == (0.5, 0.5)


def test_overlay_colours_truth_prediction_and_their_overlap():
    image = np.full((4, 4, 3), 100, np.uint8)
    truth = np.zeros((4, 4), bool)
    pred = np.zeros((4, 4), bool)
    truth[0, :2] = True
    pred[0, 1:3] = True
    rgb = seg_draw.overlay(image, truth, pred, opacity=1.0)
    assert tuple(rgb[0, 0]) == pytest.approx(su.TRUTH_RGB)
    assert tuple(rgb[0, 2]) == pytest.approx(su.PRED_RGB)
    both = np.clip(np.add(su.TRUTH_RGB, su.PRED_RGB), 0, 1)  # the tints add up: pale yellow
    assert tuple(rgb[0, 1]) == pytest.approx(tuple(both))
    assert tuple(rgb[3, 3]) == pytest.approx((1.0, 1.0, 1.0))  # untouched grey, scaled per channel


# ----------------------------------------------------------------------------- PostProcess


@pytest.mark.parametrize(
    "fields, rule",
    [
        (dict(tta="yes"), "tta is True or False"),
        (dict(threshold=1.5), "threshold is in [0, 1]"),
        (dict(threshold=float("nan")), "threshold is in [0, 1]"),
        (dict(min_size=-1), "min_size is a count"),
        (dict(min_size=2.5), "min_size is a count"),
        (dict(keep="Mass"), 'keep is "all", "largest" or "mass"'),
        (dict(keep="largest", min_size=10), 'min_size applies with keep="all" only'),
        (dict(drop_ends=0.5), "drop_ends is in [0, 0.5)"),
    ],
)
def test_postprocess_refuses_each_invalid_field(fields, rule):
    with pytest.raises(ValueError, match=re.escape(rule)):
        su.PostProcess(**fields)


def test_postprocess_accepts_numpy_numbers():
    """A sweep table's cells are NumPy numbers."""
    post = su.PostProcess(threshold=np.float64(0.4), min_size=np.int64(100))
    assert post.threshold == 0.4 and post.min_size == 100


def test_postprocess_removes_small_blobs_and_keeps_the_largest():
    prob = np.zeros((3, 20, 20))
    prob[0:2, 2:8, 2:8] = 0.9  # 72 voxels
    prob[2, 15:17, 15:17] = 0.9  # 4 voxels, not touching
    assert su.PostProcess().apply(prob).sum() == 76
    assert su.PostProcess(threshold=0.9).apply(prob).sum() == 76  # the threshold itself counts
    assert su.PostProcess(threshold=0.95).apply(prob).sum() == 0
    assert su.PostProcess(min_size=10).apply(prob).sum() == 72
    assert su.PostProcess(min_size=100).apply(prob).sum() == 0
    assert su.PostProcess(keep="largest").apply(prob).sum() == 72
    tie = np.zeros((3, 20, 20))
    tie[0, :2, :4] = tie[2, -2:, -4:] = 0.9  # two blobs of 8 voxels: a tie keeps both
    assert su.PostProcess(keep="largest").apply(tie).sum() == 16
    assert not su.PostProcess(keep="largest").apply(np.zeros((2, 5, 5))).any()


def test_keep_mass_keeps_the_confident_blob_over_the_big_faint_one():
    prob = np.zeros((3, 20, 20))
    prob[0:2, 2:8, 2:8] = 0.55  # 72 voxels: mass 39.6
    prob[2, 12:19, 12:19] = 0.95  # 49 voxels: mass 46.55, not touching
    assert su.PostProcess(keep="largest").apply(prob).sum() == 72  # the most voxels
    kept = su.PostProcess(keep="mass").apply(prob)
    assert kept.sum() == 49 and kept[2, 15, 15] and not kept[0, 5, 5]


def test_drop_ends_removes_blobs_wholly_at_either_end_of_the_stack():
    prob = np.zeros((10, 20, 20))
    prob[0:2, 2:12, 2:12] = 0.9  # slices 1-2 of 10: skull base, 200 voxels (the largest)
    prob[4:7, 5:9, 5:9] = 0.9  # slices 5-7: 48 voxels, the tumour
    prob[9, 14:18, 14:18] = 0.9  # slice 10: vertex, 16 voxels
    prob[1:5, 15:19, 2:4] = 0.9  # slices 2-5: 32 voxels, reaches past the lowest 20 %
    assert su.PostProcess(drop_ends=0.2).apply(prob).sum() == 48 + 32  # both end blobs go
    assert su.PostProcess(drop_ends=0.1).apply(prob).sum() == 200 + 48 + 32  # slice 10's only
    assert su.PostProcess(keep="largest").apply(prob).sum() == 200  # the skull base wins...
    assert su.PostProcess(keep="largest", drop_ends=0.2).apply(prob).sum() == 48  # ...not now
    assert su.PostProcess(min_size=40, drop_ends=0.2).apply(prob).sum() == 48
    ends = np.zeros_like(prob)
    ends[[0, 9]] = prob[[0, 9]]
    assert not su.PostProcess(keep="largest", drop_ends=0.2).apply(ends).any()  # none left
    labels = np.zeros((10, 4, 4), int)
    labels[0, 0, 0], labels[3:8, 1, 1], labels[9, 2, 2] = 1, 2, 3
    assert su.blobs_at_the_ends(labels, 3, 0.1).tolist() == [True, False, True]


# ----------------------------------------------------------------------------- sweep and choice


def test_sweep_gives_the_dice_score_patients_gives_for_every_setting():
    """The sweep counts blobs once per threshold instead of scoring each setting: every row
    must still be the mean patient Dice that score_patients gives for that PostProcess."""
    rng = np.random.default_rng(3)
    volumes, probs = [], {False: {}, True: {}}
    for i in range(3):  # blobs of every kind: big, small, at the ends, touching across slices
        mask = np.zeros((10, 24, 24), np.uint8)
        mask[3:7, 4:12, 4:12] = 1
        prob = mask * 0.6 + rng.uniform(0, 0.35, mask.shape)
        prob[0:2, 16:22, 16:22] += 0.5 - 0.1 * i  # a skull-base blob
        prob[9, 2:5, 18:21] = 0.97  # a small confident vertex blob
        volumes.append(volume(f"P{i}", mask))
        probs[False][f"P{i}"] = np.clip(prob, 0, 1).astype(np.float32)
        probs[True][f"P{i}"] = np.clip(prob[:, :, ::-1] * 0.5 + prob * 0.5, 0, 1)
    grid = dict(threshold=(0.4, 0.5, 0.7), min_size=(0, 20, 40))
    sweep = su.sweep_postprocessing(probs, volumes, grid)
    assert len(sweep) == 2 * 3 * 3 * (3 + 2)  # tta, threshold, drop_ends, keep (+ min_size)
    for row in sweep.itertuples(index=False):
        post = su.PostProcess(row.tta, row.threshold, row.min_size, row.keep, row.drop_ends)
        patients = su.score_patients(probs[row.tta], volumes, post)[0]
        assert row.dice == pytest.approx(patients.dice.mean(), abs=1e-12), post
    assert sweep.dice.nunique() > 5  # the settings differ here, so the comparison means something
    # the order choose_postprocess breaks ties by: no TTA, low thresholds, fewer rules first
    first = sweep.iloc[:6, :5].values.tolist()
    assert first == [
        [False, 0.4, 0, "all", 0.0],
        [False, 0.4, 20, "all", 0.0],
        [False, 0.4, 40, "all", 0.0],
        [False, 0.4, 0, "largest", 0.0],
        [False, 0.4, 0, "mass", 0.0],
        [False, 0.4, 0, "all", 0.1],
    ]


def test_choose_postprocess_picks_the_best_row_and_breaks_ties_towards_the_first():
    table = pd.DataFrame(
        [
            dict(tta=False, threshold=0.3, min_size=0, keep="all", drop_ends=0.0, dice=0.70),
            dict(tta=False, threshold=0.5, min_size=100, keep="all", drop_ends=0.0, dice=0.80),
            dict(tta=False, threshold=0.5, min_size=0, keep="mass", drop_ends=0.1, dice=0.80),
            dict(tta=True, threshold=0.5, min_size=100, keep="all", drop_ends=0.0, dice=0.80),
        ]
    )
    post, dice = su.choose_postprocess(table)
    assert (post, dice) == (su.PostProcess(False, 0.5, 100, "all", 0.0), 0.80)


# ----------------------------------------------------------------------------- Segmenter


def constant_net(p: float, in_channels: int = 3) -> nn.Module:
    """A 1x1 convolution that answers probability p at every pixel, whatever the image."""
    net = nn.Conv2d(in_channels, 1, 1)
    nn.init.zeros_(net.weight)
    nn.init.constant_(net.bias, math.log(p / (1 - p)))
    return net


def lopsided_net(seed: int) -> nn.Module:
    """A 1x3 convolution with random weights: its answer is not mirror-symmetric."""
    torch.manual_seed(seed)
    return nn.Conv2d(3, 1, (1, 3), padding=(0, 1))


def random_scan(seed: int = 0, depth: int = 2, size: int = 32) -> np.ndarray:
    """(D, S, S, 3) uint8 noise whose left and right halves differ."""
    image = np.random.default_rng(seed).integers(0, 255, (depth, size, size, 3), dtype=np.uint8)
    image[:, :, : size // 4] //= 4
    return image


WHOLE = su.Preprocess(size=32, crop_brain=False)


def tiny_unet(seed: int) -> su.UNet:
    torch.manual_seed(seed)
    return su.UNet(base_width=4, depth=2)


def test_mirror_prediction_is_flipped_back():
    """predict_prepared(mirror=True) predicts the mirror image and flips the answer back: a
    pixel-wise network answers as without it, and a lopsided one as on the mirrored scan."""
    image = random_scan()
    plain, mirrored = whole_image_volume(image), whole_image_volume(image[:, :, ::-1].copy())
    pixelwise = nn.Conv2d(3, 1, 1)
    np.testing.assert_allclose(
        su.predict_prepared(pixelwise, plain, mirror=True),
        su.predict_prepared(pixelwise, plain),
        atol=1e-2,  # bf16 where the CPU has it; unflipped answers differ by up to 1
    )
    lopsided = lopsided_net(0)
    np.testing.assert_allclose(
        su.predict_prepared(lopsided, plain, mirror=True),
        su.predict_prepared(lopsided, mirrored)[:, :, ::-1],
        atol=1e-2,
    )


def test_tta_probabilities_are_the_mean_of_plain_and_mirrored_and_symmetric():
    segmenter = su.Segmenter([lopsided_net(0), tiny_unet(1)], [WHOLE, WHOLE])
    image = random_scan(depth=3)
    both = segmenter.probabilities_with_and_without_tta(image)
    np.testing.assert_allclose(both[False], segmenter.probabilities(image, tta=False), atol=1e-6)
    np.testing.assert_allclose(both[True], segmenter.probabilities(image, tta=True), atol=1e-6)
    assert np.abs(both[True] - both[False]).max() > 0.05  # the mirror image changed something
    # with TTA a network sees the scan both ways round: the mirrored scan's answer mirrored
    mirrored = segmenter.probabilities(image[:, :, ::-1].copy(), tta=True)
    np.testing.assert_allclose(mirrored[:, :, ::-1], both[True], atol=1e-2)


def test_ensemble_probabilities_are_the_mean_of_its_members():
    """Members prepared differently (another size, a brain crop, FLAIR only) each answer at the
    scan's own resolution; the ensemble answers their mean."""
    pres = [WHOLE, su.Preprocess(size=16, crop_brain=True, channels=(su.FLAIR,))]
    segmenter = su.Segmenter([constant_net(0.2), constant_net(0.6, in_channels=1)], pres)
    image = np.full((2, 40, 40, 3), 100, np.uint8)  # all head: the brain box covers the scan
    members = segmenter.member_probabilities(image)
    assert [m.shape for m in members] == [(2, 40, 40)] * 2
    np.testing.assert_allclose(members[0], 0.2, atol=2e-3)  # bf16 rounds the logit
    np.testing.assert_allclose(members[1], 0.6, atol=2e-3)
    np.testing.assert_allclose(segmenter.probabilities(image), 0.4, atol=2e-3)
    assert segmenter.channels == (0, 1, 2)


def test_segmenter_file_round_trip_keeps_postprocess_chosen_on_patients_and_input_dropout(
    tmp_path,
):
    post = su.PostProcess(tta=True, threshold=0.3, keep="largest", drop_ends=0.1)
    patients = [dict(train=["A", "B"], val=["C"])]
    pre = su.Preprocess(size=32, crop_brain=False, channels=(su.FLAIR,))
    net = su.UNet(in_channels=1, base_width=4, depth=2)
    su.Segmenter([net], [pre], post, "validation", patients, [0.3]).save(tmp_path / "model.pt")
    loaded = su.load_segmenter(tmp_path / "model.pt", device=CPU)
    assert (loaded.post, loaded.chosen_on, loaded.pres, loaded.patients) == (
        post,
        "validation",
        [pre],
        patients,
    )
    assert loaded.input_dropout == [0.3] and loaded.fills_missing
    (copy,) = loaded.nets
    assert not copy.training and copy.config == net.config
    for key, value in net.state_dict().items():
        assert torch.equal(copy.state_dict()[key], value), key


def test_for_inputs_picks_the_networks_that_fit_the_inputs_given():
    """Networks trained on every input serve scans that have all they read; networks trained
    with inputs dropped serve the rest; where none fits, all (predict then refuses the scan)."""
    flair = replace(WHOLE, channels=(su.FLAIR,))
    nets = [tiny_unet(0), tiny_unet(1), tiny_unet(2)]
    segmenter = su.Segmenter(nets, [WHOLE, WHOLE, flair], input_dropout=[0.0, 0.5, 0.0])
    picked = {given: segmenter.for_inputs(given) for given in [(0, 1, 2), (1, 2), (1,)]}
    assert picked[(0, 1, 2)].nets == [nets[0], nets[2]]  # each reads only what is given
    assert picked[(1, 2)].nets == picked[(1,)].nets == [nets[2]]  # the FLAIR-only network
    both = su.Segmenter(nets[:2], [WHOLE, WHOLE], su.PostProcess(tta=True), "x", [], [0.0, 0.5])
    assert both.for_inputs((0, 1, 2)).nets == [nets[0]]
    assert both.for_inputs((1, 2)).nets == both.for_inputs((1,)).nets == [nets[1]]
    only = both.for_inputs((1,))
    assert (only.post, only.chosen_on, only.input_dropout, only.fills_missing) == (
        su.PostProcess(tta=True),
        "x",
        [0.5],
        True,
    )
    plain = su.Segmenter(nets[:1], [WHOLE])
    assert plain.for_inputs((1,)).nets == nets[:1] and not plain.fills_missing


def test_several_files_load_as_one_ensemble(tmp_path):
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    first = su.PostProcess(threshold=0.4)
    who = [dict(train=["A"], val=["B"])]
    su.Segmenter([tiny_unet(0)], [WHOLE], first, "validation", who, [0.5]).save(paths[0])
    su.Segmenter([tiny_unet(1), tiny_unet(2)], [WHOLE, WHOLE]).save(paths[1])
    ensemble = su.load_segmenter(*paths, device=CPU)
    assert len(ensemble.nets) == len(ensemble.pres) == len(ensemble.patients) == 3
    assert ensemble.patients[0] == dict(train=["A"], val=["B"])
    assert ensemble.input_dropout == [0.5, 0.0, 0.0] and ensemble.fills_missing
    image = random_scan()
    alone = [su.load_segmenter(p, device=CPU).probabilities(image) for p in paths]
    np.testing.assert_allclose(
        ensemble.probabilities(image), (alone[0] + 2 * alone[1]) / 3, atol=1e-6
    )
    # each file's PostProcess was chosen for its own networks, not for the ensemble
    assert (ensemble.post, ensemble.chosen_on) == (su.PostProcess(), "defaults")


def same(a, b) -> bool:
    """Equal nested dicts/lists of tensors and plain values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    return a == b


def test_save_choice_writes_only_the_postprocess_into_a_checkpoint(tiny_model, tmp_path):
    path = tmp_path / "best.pt"
    path.write_bytes(tiny_model.read_bytes())
    post = su.PostProcess(tta=True, threshold=0.6, min_size=100)
    su.save_choice(path, post, "validation")
    before, after = su.read_checkpoint(tiny_model), su.read_checkpoint(path)
    assert after["postprocess"] != before["postprocess"]
    assert same(
        {k: v for k, v in after.items() if k not in ("postprocess", "chosen_on")},
        {k: v for k, v in before.items() if k not in ("postprocess", "chosen_on")},
    )
    loaded = su.load_segmenter(path, device=CPU)
    assert (loaded.post, loaded.chosen_on) == (post, "validation")


@pytest.mark.parametrize("source, target", [("train", "val"), ("train", "test"), ("val", "test")])
def test_check_split_refuses_a_leaky_split_naming_the_patient(source, target):
    """A patient who trained the model (train) or chose its epoch (val) may not be scored on
    validation (train only) or test."""
    segmenter = su.Segmenter([tiny_unet(0)], [WHOLE], patients=[dict(train=["A", "B"], val=["C"])])

    def records(*patients):
        return [su.SliceRecord(p, 1, None, None) for p in patients]

    splits = dict(train=records("A", "B"), val=records("C"), test=records("D"))
    su.check_split(segmenter, splits)  # the split it was trained with
    leaked = {"train": "B", "val": "C"}[source]
    splits[target] = splits[target] + records(leaked)
    with pytest.raises(
        su.DataError, match=rf"1 evaluation patients \({leaked}, .*trained or chose"
    ):
        su.check_split(segmenter, splits)


def test_error_parts_known_answer_adds_up_to_one_minus_dice():
    """Slice 1: 3 marked, 2 of them on its 2 tumour px; slice 2: 4 tumour px, none found;
    slice 3: tumour-free, 1 px marked. |P| + |T| = 4 + 6; 1 - Dice = 0.6."""
    volume = su.Volume(
        "P", [1, 2, 3], np.zeros((3, 4, 4, 3), np.uint8), np.zeros((3, 4, 4), np.uint8)
    )
    volume.mask[0, 0, :2] = volume.mask[1, 1, :] = 1
    prob = np.zeros((3, 4, 4), np.float32)
    prob[0, 0, :3] = prob[2, 3, 0] = 1
    patients, slices, _ = su.score_patients({"P": prob}, [volume], su.PostProcess())
    parts = su.error_parts(slices).loc["P"]
    assert parts.tolist() == pytest.approx([0.1, 0.0, 0.4, 0.1])
    assert parts.sum() == pytest.approx(1 - patients.dice[0])
