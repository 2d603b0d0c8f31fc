"""seg_predict, seg_scan, seg_export and seg_cli: a new scan in each form a user may give, the
inputs refused and why, the rules for the out folder, ONNX export and the command line.

The models are conftest's session fixtures (tiny_model, flair_model), never trained here. Known
answers: one scan given as a patient folder, a folder of PNG slices or NIfTI volumes in other
orientations gets one mask; a mask lands on the tumour and not on its mirror image. Reading and
refusing inputs is tested on seg_scan itself, without a model; the command line in-process
(seg_cli.main) but for one test that runs the installed commands.
"""

import hashlib
import json
import os
import runpy
import shutil
import stat
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import seg_checks
import seg_cli
import seg_predict
import seg_utils as su
from seg_export import export_onnx, onnx_session
from seg_predict import channel_warnings, predict
from seg_scan import read_scan, to_uint8
from seg_utils import FLAIR, CheckpointError, DataError


@pytest.fixture(scope="module")
def patient(synthetic_set):
    """The synthetic patient whose tumour lies farthest from the image centre (a wrong flip
    moves it far), as a Volume, and its folder."""
    data_dir = synthetic_set(8, 0)
    volumes = su.load_volumes(su.scan_dataset(data_dir), progress=False)

    def offset(v):
        ys, xs = np.nonzero(v.mask.any(0))
        return min(abs(ys.mean() - 127.5), abs(xs.mean() - 127.5))

    vol = max(volumes, key=offset)
    return vol, data_dir / vol.patient


@pytest.fixture(scope="module")
def patient_result(tiny_model, patient, tmp_path_factory):
    """tiny_model on the patient folder: (summary, (D, H, W) masks as read from its PNGs, the
    out folder). Copy the folder before changing it."""
    vol, folder = patient
    out = tmp_path_factory.mktemp("patient") / "out"
    summary = predict(tiny_model, folder, out, progress=False)
    return summary, read_masks(out, [f"{vol.patient}_{n}" for n in vol.slices]), out


def read_masks(folder, names) -> np.ndarray:
    """(D, H, W) <name>_mask.png of each name, as written."""
    return np.stack(
        [cv2.imread(str(folder / f"{n}_mask.png"), cv2.IMREAD_UNCHANGED) for n in names]
    )


def write_slices(vol, folder, flair_only=False, name="scan-{}", masks=False):
    """The slices as PNGs named scan-<n>.png (unpadded: 10 after 9) in the set's channel order,
    or FLAIR alone; with `masks`, <name>_mask.png beside each."""
    folder.mkdir()
    for n, image, mask in zip(vol.slices, vol.image, vol.mask):
        pixels = image[..., FLAIR] if flair_only else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(folder / f"{name.format(n)}.png"), pixels)
        if masks:
            cv2.imwrite(str(folder / f"{name.format(n)}_mask.png"), mask * 255)
    return folder


def first_slices(vol, n=3):
    """The volume's first n slices: enough for what reading a folder checks."""
    return replace(vol, slices=vol.slices[:n], image=vol.image[:n], mask=vol.mask[:n])


def grey(vol):
    """The volume with FLAIR in all three channels: a grey scan saved as RGB."""
    return replace(vol, image=vol.image[..., [FLAIR] * 3])


def no_leftovers(out) -> bool:
    """Nothing at `out` and no staging folders beside it."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


# How to lay the set's (D, H, W) = (inferior->superior, anterior->posterior, right->left) volume
# out in a file, each file axis's direction in RAS+ (x to the patient's Right, y Anterior, z
# Superior) and the voxel sizes: 1 mm in-plane (256 x 256 as the set, so no resampling: the
# mask must come back voxel for voxel) and 2.5 mm slices.
LAYOUTS = {
    "LPS": (lambda v: v.transpose(2, 1, 0), [[-1, 0, 0], [0, -1, 0], [0, 0, 1]], (1, 1, 2.5)),
    "ASR": (
        lambda v: v[:, ::-1, ::-1].transpose(1, 0, 2),
        [[0, 0, 1], [1, 0, 0], [0, 1, 0]],
        (1, 2.5, 1),
    ),
}


def write_nifti(path, array, directions=None, spacing=(1, 1, 1)):
    """A NIfTI file whose axis i points along directions[:, i] with voxel size spacing[i]."""
    affine = np.eye(4)
    directions = np.eye(3) if directions is None else directions
    affine[:3, :3] = np.asarray(directions, float) * np.asarray(spacing, float)
    affine[:3, 3] = (-90.0, 120.0, -30.0)
    nib.Nifti1Image(array, affine).to_filename(path)
    return path


def write_scan_nifti(vol, folder, layout, channels=(0, 1, 2)):
    """The volume's channels as NIfTI files t1/flair/t1c.nii.gz in `layout`; {channel: path}."""
    to_file, directions, spacing = LAYOUTS[layout]
    folder.mkdir()
    names = ("t1", "flair", "t1c")
    return {
        c: write_nifti(
            folder / f"{names[c]}.nii.gz", to_file(vol.image[..., c]), directions, spacing
        )
        for c in channels
    }


# ----------------------------------------------------------------------------- one scan, any form


def test_patient_folder_gives_masks_dice_and_a_summary_of_the_model(
    tiny_model, patient, patient_result
):
    vol, folder = patient
    summary, masks, out = patient_result
    assert set(np.unique(masks)) == {0, 255}  # like the set's masks
    pred = masks > 0
    assert su.dice_score(pred, vol.mask) > 0.6  # on the tumour...
    assert su.dice_score(pred, vol.mask[:, ::-1]) < 0.3  # ...not on its mirror images
    assert su.dice_score(pred, vol.mask[:, :, ::-1]) < 0.3
    assert summary["dice"] == pytest.approx(su.dice_score(pred, vol.mask))
    assert summary["tumour_pixels"] == int(pred.sum())
    tumour = [f"{vol.patient}_{n}" for n, m in zip(vol.slices, pred) if m.any()]
    assert summary["tumour_slices"] == tumour and summary["tumour_slice_count"] == len(tumour)
    assert summary["slices"] == len(vol.slices) and summary["input_kind"] == "patient"
    assert summary["postprocess"] == asdict(su.PostProcess()) and summary["chosen_on"] == "defaults"
    assert summary["model"] == str(tiny_model) and summary["networks"] == 1
    assert summary["model_sha256"] == hashlib.sha256(tiny_model.read_bytes()).hexdigest()
    assert summary["trained_for_missing_inputs"] is False and summary["changed"] == []
    assert summary["measures"] == seg_checks.scan_measures(vol.image, pred)
    # the synthetic FLAIR's grey levels are unlike the LGG scans': findings, no channel warning
    assert summary["warnings"] == seg_checks.scan_findings(summary["measures"])
    assert any("FLAIR's grey levels differ" in w for w in summary["warnings"])
    assert summary["input"] == str(folder) and summary["given_inputs"] == list(su.CHANNELS)
    written = json.loads((out / "summary.json").read_text())
    assert written == summary
    assert sorted(p.name for p in out.iterdir()) == sorted(summary["outputs"])
    assert cv2.imread(str(out / "overlay.png")) is not None


def test_the_same_scan_as_slices_or_nifti_gets_the_patient_folders_mask(
    tiny_model, patient, patient_result, tmp_path
):
    vol, _ = patient
    expected = patient_result[1] > 0
    assert expected.any()
    slices = predict(
        tiny_model, write_slices(vol, tmp_path / "png"), tmp_path / "o", progress=False
    )
    np.testing.assert_array_equal(
        read_masks(tmp_path / "o", [f"scan-{n}" for n in vol.slices]) > 0, expected
    )
    assert slices["input_kind"] == "slices" and "dice" not in slices
    assert slices["warnings"] == patient_result[0]["warnings"]  # the same scan, the same findings
    for layout, (to_file, _, _) in LAYOUTS.items():  # 1 x 1 x 2.5 mm voxels
        paths = write_scan_nifti(vol, tmp_path / layout, layout)
        out = tmp_path / f"o-{layout}"
        summary = predict(tiny_model, paths[1], out, t1=paths[0], t1c=paths[2], progress=False)
        written = nib.load(out / "mask.nii.gz")
        mask = np.asanyarray(written.dataobj)
        assert mask.dtype == np.uint8 and summary["axcodes"] == layout
        np.testing.assert_allclose(written.affine, nib.load(paths[1]).affine)
        np.testing.assert_array_equal(mask, to_file(expected), err_msg=layout)
        assert summary["tumour_volume_ml"] == pytest.approx(expected.sum() * 2.5 / 1000)
        assert summary["given_inputs"] == list(su.CHANNELS) and summary["input_kind"] == "nifti"


def test_nifti_of_float_anisotropic_voxels_is_resampled_and_its_mask_lands_on_the_tumour(
    tiny_model, patient, tmp_path
):
    """RAS, 192 columns of 4/3 mm (the same 256 mm), float intensities: resampled to 256 x 256
    and back; the mask must fall on the truth, and not on its mirror images."""
    vol, _ = patient

    def to_file(v, interpolation):  # (D, 256, 256) -> RAS (192, 256, D)
        narrow = np.stack([cv2.resize(s, (192, 256), interpolation=interpolation) for s in v])
        return narrow[:, ::-1, ::-1].transpose(2, 1, 0)

    paths = []
    for c, name in enumerate(("t1", "flair", "t1c")):
        array = to_file(vol.image[..., c], cv2.INTER_AREA).astype(np.float32) * 3.7 + 11.0
        paths.append(write_nifti(tmp_path / f"{name}.nii", array, np.eye(3), (4 / 3, 1.0, 3.0)))
    predict(tiny_model, paths[1], tmp_path / "out", t1=paths[0], t1c=paths[2], progress=False)
    mask = np.asanyarray(nib.load(tmp_path / "out" / "mask.nii.gz").dataobj)
    truth = to_file(vol.mask, cv2.INTER_NEAREST)
    assert mask.shape == truth.shape == (192, 256, len(vol.mask))
    assert su.dice_score(mask, truth) > 0.6
    assert su.dice_score(mask, np.flip(truth, 0)) < 0.3
    assert su.dice_score(mask, np.flip(truth, 1)) < 0.3


def test_flair_only_slices_and_nifti_get_the_flair_models_mask_of_the_whole_scan(
    flair_model, patient, tmp_path
):
    vol, folder = patient
    whole = predict(flair_model, folder, tmp_path / "whole", progress=False)
    expected = read_masks(tmp_path / "whole", [f"{vol.patient}_{n}" for n in vol.slices]) > 0
    assert expected.any() and whole["model_inputs"] == "FLAIR (INPUT)"
    flair_slices = write_slices(vol, tmp_path / "png", flair_only=True)
    slices = predict(flair_model, flair_slices, tmp_path / "o-png", progress=False)
    np.testing.assert_array_equal(
        read_masks(tmp_path / "o-png", [f"scan-{n}" for n in vol.slices]) > 0, expected
    )
    nifti = write_scan_nifti(vol, tmp_path / "nii", "LPS", channels=[FLAIR])
    alone = predict(flair_model, nifti[FLAIR], tmp_path / "o-nii", progress=False)
    mask = np.asanyarray(nib.load(tmp_path / "o-nii" / "mask.nii.gz").dataobj)
    np.testing.assert_array_equal(mask, LAYOUTS["LPS"][0](expected))
    assert slices["given_inputs"] == alone["given_inputs"] == ["FLAIR"]
    assert slices["filled_from_flair"] == alone["filled_from_flair"] == []


def test_missing_scans_are_refused_with_the_fix_and_fill_missing_copies_flair(
    tiny_model, patient, tmp_path, capsys
):
    """A FLAIR alone for a 3-channel model: refused, naming the flags that add the other scans;
    --fill-missing flair copies FLAIR into them, which is what a grey scan saved as RGB holds, so
    both get one mask (the filled one with a finding that says so, the grey one with a warning)."""
    vol, _ = patient
    flair_slices = write_slices(vol, tmp_path / "flair", flair_only=True)
    with pytest.raises(
        DataError,
        match=r"needs pre-contrast \(--t1\), FLAIR \(INPUT\), post-contrast \(--t1c\) but .*flair gives FLAIR: add 3-channel slices.*--fill-missing flair",
    ):
        predict(tiny_model, flair_slices, tmp_path / "refused", progress=False)
    nifti = write_scan_nifti(vol, tmp_path / "nii", "LPS", channels=[FLAIR])
    with pytest.raises(
        DataError,
        match=r"add --t1 pre-contrast.nii.gz and --t1c post-contrast.nii.gz;.*--fill-missing flair",
    ):
        predict(tiny_model, nifti[FLAIR], tmp_path / "refused", progress=False)
    assert no_leftovers(tmp_path / "refused")

    filled = predict(
        tiny_model, flair_slices, tmp_path / "filled", fill_missing="flair", progress=False
    )
    assert filled["filled_from_flair"] == ["pre-contrast", "post-contrast"]
    assert filled["trained_for_missing_inputs"] is False
    said_filled = "pre-contrast, post-contrast filled in from FLAIR"
    assert [said_filled in w for w in filled["warnings"]].count(True) == 1
    assert not any("channels are identical" in w for w in filled["warnings"])
    names = [f"scan-{n}" for n in vol.slices]
    rgb = write_slices(grey(vol), tmp_path / "grey")
    argv = ["predict", str(rgb), "--checkpoint", str(tiny_model), "--out", str(tmp_path / "o-grey")]
    assert seg_cli.main(argv + ["--quiet"]) == 0
    said = capsys.readouterr()
    summary = json.loads((tmp_path / "o-grey" / "summary.json").read_text())
    assert summary["measures"] == filled["measures"]  # the same image: FLAIR in all three
    assert "channels are identical" in summary["warnings"][-1]  # after the scan's findings
    assert not any(said_filled in w for w in summary["warnings"])
    assert said.err == "".join(f"warning: {w}\n" for w in summary["warnings"])
    assert said.out.startswith(
        f"{summary['tumour_slice_count']} of {len(vol.slices)} slices with tumour, "
        f"{summary['tumour_pixels']} px; results in"
    )
    np.testing.assert_array_equal(
        read_masks(tmp_path / "o-grey", names), read_masks(tmp_path / "filled", names)
    )


def test_a_model_trained_with_inputs_dropped_fills_them_from_flair_itself(
    patient, tmp_path, capsys
):
    """input_dropout > 0 in training (FLAIR copied into the other inputs): such a model is given
    a FLAIR alone without --fill-missing, and `inputs` says so; one trained without it still
    refuses."""
    vol, _ = patient
    nifti = write_scan_nifti(vol, tmp_path / "nii", "LPS", channels=[FLAIR])
    su.seed_everything(0)
    net, pre = su.UNet(in_channels=3, base_width=4, depth=2), su.Preprocess(size=64)
    for drop in (0.5, 0.0):
        su.Segmenter([net], [pre], input_dropout=[drop]).save(tmp_path / f"drop-{drop}.pt")
    summary = predict(tmp_path / "drop-0.5.pt", nifti[FLAIR], tmp_path / "out", progress=False)
    assert summary["filled_from_flair"] == ["pre-contrast", "post-contrast"]
    assert summary["trained_for_missing_inputs"] is True
    said = "pre-contrast, post-contrast filled in from FLAIR"
    assert [said in w for w in summary["warnings"]].count(True) == 1
    with pytest.raises(DataError, match=r"add --t1 .*--fill-missing flair"):
        predict(tmp_path / "drop-0.0.pt", nifti[FLAIR], tmp_path / "refused", progress=False)
    assert no_leftovers(tmp_path / "refused")
    for drop in (0.5, 0.0):
        assert seg_cli.main(["inputs", "--checkpoint", str(tmp_path / f"drop-{drop}.pt")]) == 0
        assert ("or FLAIR alone" in capsys.readouterr().out) == (drop > 0)
    # one file of both: the network trained on every input for a whole scan, the other for this
    su.Segmenter([net, net], [pre, pre], input_dropout=[0.0, 0.5]).save(tmp_path / "both.pt")
    alone = predict(tmp_path / "both.pt", nifti[FLAIR], tmp_path / "both-flair", progress=False)
    assert (alone["networks"], alone["networks_in_file"]) == (1, 2)
    assert alone["trained_for_missing_inputs"] and alone["filled_from_flair"]
    full = write_scan_nifti(vol, tmp_path / "nii3", "LPS")
    given = dict(t1=full[0], t1c=full[2], progress=False)
    whole = predict(tmp_path / "both.pt", full[FLAIR], tmp_path / "both-all", **given)
    assert (whole["networks"], whole["trained_for_missing_inputs"]) == (1, False)


def test_a_skull_stripped_thin_slab_is_named_in_the_summary_and_on_stderr(
    flair_model, patient, patient_result, tmp_path, capsys
):
    """The patient's first 12 FLAIR slices with every voxel outside the head exactly 0, as
    skull-stripping leaves a scan, in ASR layout: its slices (2.5 mm) lie along the file's
    second axis."""
    vol, _ = patient
    flair = vol.image[:12, ..., FLAIR]
    stripped = np.where(flair > 0.1 * flair.max(), flair, 0)  # head_mask's rule
    to_file, directions, spacing = LAYOUTS["ASR"]
    scan = write_nifti(tmp_path / "flair.nii.gz", to_file(stripped), directions, spacing)
    out = tmp_path / "out"
    argv = ["predict", scan, "--checkpoint", flair_model, "--out", out, "--quiet"]
    assert seg_cli.main([str(a) for a in argv]) == 0
    said = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["measures"]["slices"] == 12
    assert summary["measures"]["background_zero"] >= seg_checks.STRIPPED
    assert patient_result[0]["measures"]["background_zero"] < 0.01  # the set's scans: noise
    low, high = seg_checks.TRAINING["slices"]
    found = "\n".join(summary["warnings"])  # one finding a line
    assert "looks skull-stripped: " in found and "exactly 0" in found
    assert f"12 slices of 2.5 mm, the training scans had {low}-{high}" in found
    assert said.err == "".join(f"warning: {w}\n" for w in summary["warnings"])


def test_an_ensemble_file_predicts_and_export_refuses_it(
    tiny_model, patient, patient_result, tmp_path
):
    """Two copies of one network: their mean is that network's probability, so the mask is
    too. Files joined into an ensemble keep none of their own PostProcess (the first marks
    nothing at threshold 1.0): the ensemble starts from the defaults."""
    vol, folder = patient
    chosen, ensemble = tmp_path / "chosen.pt", tmp_path / "ensemble.pt"
    shutil.copy(tiny_model, chosen)
    su.save_choice(chosen, su.PostProcess(threshold=1.0), "validation")
    su.load_segmenter(chosen, tiny_model).save(ensemble)
    summary = predict(ensemble, folder, tmp_path / "out", progress=False)
    assert summary["networks"] == 2 and len(summary["preprocess"]) == 2
    assert summary["postprocess"] == asdict(su.PostProcess()) and summary["chosen_on"] == "defaults"
    names = [f"{vol.patient}_{n}" for n in vol.slices]
    np.testing.assert_array_equal(read_masks(tmp_path / "out", names), patient_result[1])
    with pytest.raises(DataError, match=r"ensemble.pt holds 2 networks: export one network's file"):
        export_onnx(ensemble, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


# ----------------------------------------------------------------------------- the PostProcess


def test_the_model_files_postprocess_is_applied_and_changes_override_it(
    tiny_model, patient, patient_result, tmp_path
):
    vol, folder = patient
    model = tmp_path / "chosen.pt"
    shutil.copy(tiny_model, model)
    su.save_choice(model, su.PostProcess(threshold=1.0), "validation")
    chosen = predict(model, folder, tmp_path / "chosen", progress=False)
    assert chosen["tumour_pixels"] == 0, "the tiny U-Net never reaches 1.0: nothing is marked"
    assert chosen["postprocess"]["threshold"] == 1.0 and chosen["chosen_on"] == "validation"
    assert chosen["changed"] == []
    back = predict(model, folder, tmp_path / "back", changes={"threshold": 0.5}, progress=False)
    assert back["changed"] == ["threshold"] and back["chosen_on"] == "validation"
    assert back["postprocess"] == asdict(su.PostProcess())
    names = [f"{vol.patient}_{n}" for n in vol.slices]
    np.testing.assert_array_equal(read_masks(tmp_path / "back", names), patient_result[1])


def test_nonsense_postprocess_changes_are_refused_before_any_work(
    tiny_model, patient, tmp_path, monkeypatch, capsys
):
    """Including a min_size that keep="largest" would ignore: a setting never applied is never
    recorded as used."""
    monkeypatch.setattr(seg_predict, "read_scan", lambda *a: pytest.fail("read the scan first"))
    folder, out = patient[1], tmp_path / "out"
    largest = tmp_path / "largest.pt"
    shutil.copy(tiny_model, largest)
    su.save_choice(largest, su.PostProcess(keep="largest"), "validation")
    for model, changes, named in [
        (tiny_model, dict(threshold=-1), "threshold"),
        (tiny_model, dict(threshold=float("nan")), "threshold"),
        (tiny_model, dict(threshold="high"), "threshold"),
        (tiny_model, dict(drop_ends=0.5), "drop_ends"),
        (tiny_model, dict(min_size=-5), "min_size"),
        (tiny_model, dict(min_size=2.5), "min_size"),
        (tiny_model, dict(keep="biggest"), "keep"),
        (tiny_model, dict(tta=1), "tta"),
        (tiny_model, dict(min_size=100, keep="largest"), 'min_size applies with keep="all"'),
        (largest, dict(min_size=100), 'min_size applies with keep="all"'),
        (tiny_model, dict(thresold=0.4), "thresold"),
    ]:
        with pytest.raises(DataError, match=named):
            predict(model, folder, out, changes=changes, progress=False)
    argv = ["predict", str(folder), "--checkpoint", str(tiny_model), "--out", str(out)]
    for flags in (["--threshold", "1.5"], ["--min-size", "100", "--keep", "largest"]):
        assert seg_cli.main(argv + flags) == 2
        said = capsys.readouterr()
        assert said.err.startswith("error: ") and said.err.count("\n") == 1 and said.out == ""
    assert no_leftovers(out)


def test_command_line_flags_become_the_postprocess_changes(tiny_model, patient, tmp_path, capsys):
    folder, out = patient[1], tmp_path / "out"
    argv = ["predict", str(folder), "--checkpoint", str(tiny_model), "--out", str(out), "--quiet"]
    flags = ["--keep", "largest", "--drop-ends", "0.2", "--threshold", "0.4", "--tta"]
    assert seg_cli.main(argv + flags) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["postprocess"] == asdict(
        su.PostProcess(tta=True, threshold=0.4, keep="largest", drop_ends=0.2)
    )
    assert summary["changed"] == ["drop_ends", "keep", "threshold", "tta"]
    assert (
        capsys.readouterr().out.rstrip().endswith(f"Dice {summary['dice']:.3f}; results in {out}/")
    )


# ----------------------------------------------------------------------------- reading inputs


def test_inputs_that_are_no_whole_scan_are_refused(patient, tmp_path):
    vol, folder = patient
    cv2.imwrite(str(tmp_path / "one.png"), vol.image[10])
    with pytest.raises(DataError, match=r"one.png is a single 2D image.*whole scan"):
        read_scan(tmp_path / "one.png")
    (tmp_path / "one").mkdir()
    cv2.imwrite(str(tmp_path / "one" / "slice_1.png"), vol.image[10])
    with pytest.raises(DataError, match=r"one holds 1 slice image.*all slices"):
        read_scan(tmp_path / "one")
    with pytest.raises(DataError, match=r"nothing does not exist: give a patient folder"):
        read_scan(tmp_path / "nothing")
    (tmp_path / "scan.mha").write_bytes(b"ObjectType = Image")  # DICOM: test_bad_input.py
    with pytest.raises(DataError, match=r"scan.mha: not a folder of slices nor a .nii"):
        read_scan(tmp_path / "scan.mha")
    with pytest.raises(DataError, match=r"--t1/--t1c go with a NIfTI FLAIR volume"):
        read_scan(folder, t1=tmp_path / "t1.nii.gz")


def test_slices_of_different_sizes_are_refused_naming_the_odd_one(patient, tmp_path):
    folder = write_slices(first_slices(patient[0]), tmp_path / "slices")
    cv2.imwrite(str(folder / "scan-3.png"), np.zeros((200, 256, 3), np.uint8))
    with pytest.raises(DataError, match=r"scan-3.png: \(200, 256, 3\).*must match"):
        read_scan(folder)


def test_nifti_volumes_of_different_shapes_are_refused(patient, tmp_path):
    vol = patient[0]
    flair = write_nifti(tmp_path / "flair.nii.gz", vol.image[..., FLAIR].T)
    t1 = write_nifti(tmp_path / "t1.nii.gz", vol.image[2:, ..., 0].T)
    with pytest.raises(DataError, match=r"t1.nii.gz: shape .* differ from the FLAIR .*resample"):
        read_scan(flair, t1=t1)


def test_nifti_with_trailing_axes_of_one_is_read_as_its_3d_volume(patient, tmp_path):
    flair = patient[0].image[:8, ::4, ::4, FLAIR].T.astype(np.float32)  # (x, y, z) 64 x 64 x 8
    plain = read_scan(write_nifti(tmp_path / "x.nii.gz", flair)).image
    for name, array in [("x1", flair[..., None]), ("x11", flair[..., None, None])]:
        np.testing.assert_array_equal(
            read_scan(write_nifti(tmp_path / f"{name}.nii.gz", array)).image, plain
        )
    two = write_nifti(tmp_path / "x2.nii.gz", np.stack([flair, flair], -1))
    with pytest.raises(DataError, match=r"x2.nii.gz: shape \(.*, 2\) holds several volumes"):
        read_scan(two)


def write_with_alpha(vol, folder, alpha, grey=False):
    """Slices as PNGs with an alpha channel: RGBA, or with `grey` grey + alpha (FLAIR)."""
    folder.mkdir()
    for n, image in zip(vol.slices, vol.image):
        colour = image[..., FLAIR : FLAIR + 1] if grey else image  # (H, W, 1 or 3) RGB
        pixels = np.dstack([colour, np.broadcast_to(alpha, colour.shape[:2])]).astype(np.uint8)
        # OpenCV cannot write grey + alpha
        Image.fromarray(pixels, "LA" if grey else "RGBA").save(folder / f"scan-{n}.png")
    return folder


def test_an_opaque_alpha_is_dropped_and_transparency_refused(patient, tmp_path):
    vol = first_slices(patient[0])
    rgb = read_scan(write_slices(vol, tmp_path / "rgb")).image
    np.testing.assert_array_equal(
        read_scan(write_with_alpha(vol, tmp_path / "rgba", 255)).image, rgb
    )
    grey_alpha = read_scan(write_with_alpha(vol, tmp_path / "la", 255, grey=True))
    np.testing.assert_array_equal(grey_alpha.image, grey(vol).image)  # read as grey saved as RGB
    assert "channels are identical" in channel_warnings(grey_alpha, (0, 1, 2))[0]
    see_through = np.full(vol.image.shape[1:3], 255, np.uint8)
    see_through[0, 0] = 0
    with pytest.raises(
        DataError,
        match=r"scan-1.png: 4 channels, the last not an opaque alpha.*without transparency",
    ):
        read_scan(write_with_alpha(vol, tmp_path / "t", see_through))


def test_slices_of_any_sample_type_are_read_in_the_sets_channel_order(tmp_path):
    """OpenCV reads B, G, R(, A); the set's order is R, G, B whatever the sample type (cv2's
    colour conversion refuses int16 and float64)."""
    for dtype in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
        bgr = np.stack([np.full((4, 4), v, dtype) for v in (10, 20, 30)], -1)  # B, G, R
        opaque = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
        alpha = np.full((4, 4, 1), opaque, dtype)
        for kind, extra in [("rgb", []), ("rgba", [alpha])]:
            folder = tmp_path / f"{kind}-{np.dtype(dtype).name}"
            folder.mkdir()
            for n in (1, 2):  # a scan of two slices, the second twice as bright
                assert cv2.imwrite(str(folder / f"s{n}.tif"), np.dstack([bgr * n, *extra]))
            red, green, blue = read_scan(folder).image[
                0, 0, 0
            ]  # R 30 the brightest, B 10 the least
            assert red > green > blue, folder.name


def test_unreadable_and_empty_files_are_refused_naming_them(patient, tmp_path):
    folder = write_slices(first_slices(patient[0]), tmp_path / "slices")
    (folder / "scan-2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"scan-2.png: cannot be read as an image"):
        read_scan(folder)
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.nii.gz: missing or empty file"):
        read_scan(tmp_path / "empty.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match=r"broken.nii.gz: cannot be read as NIfTI"):
        read_scan(tmp_path / "broken.nii.gz")
    zeros = write_nifti(tmp_path / "zeros.nii.gz", np.zeros((64, 64, 8), np.float32))
    with pytest.raises(DataError, match=r"zeros.nii.gz: the scan holds no signal"):
        read_scan(zeros)
    flat = write_nifti(tmp_path / "flat.nii.gz", np.ones((64, 64, 1), np.float32))
    with pytest.raises(DataError, match=r"flat.nii.gz: shape \(64, 64, 1\) is not one 3D scan"):
        read_scan(flat)


def test_nifti_named_against_its_compression_says_how_to_rename(tmp_path):
    write_nifti(tmp_path / "scan.nii", np.ones((16, 16, 4), np.float32))
    (tmp_path / "scan.nii").rename(tmp_path / "scan.nii.gz")  # not gzip-compressed inside
    with pytest.raises(
        DataError, match=r"scan.nii.gz: the file is not gzip-compressed.*rename it scan.nii$"
    ):
        read_scan(tmp_path / "scan.nii.gz")


def test_masks_are_found_for_slice_names_with_brackets(patient, tmp_path):
    """The glob once read [1] as a character class and found no mask."""
    vol = first_slices(patient[0])
    scan = read_scan(write_slices(vol, tmp_path / "slices", name="scan[{}]", masks=True))
    np.testing.assert_array_equal(scan.truth, vol.mask)
    assert scan.kind == "slices" and scan.names == [f"scan[{n}]" for n in vol.slices]


def test_grey_levels_survive_fill_values_infinities_and_odd_types(tmp_path):
    """A -32768 fill outside the field of view, or one -inf voxel, once squeezed the tissue into
    a few grey levels (an empty mask, silently); constant and RGB volumes are refused."""
    rng = np.random.default_rng(0)
    clean = rng.uniform(0, 1000, (8, 64, 64)).astype(np.int16)  # (D, H, W) a scan's levels
    expected = to_uint8(clean, tmp_path)
    padded = clean.copy()
    padded[:, :, :8] = -32768  # 12 % of the voxels
    np.testing.assert_array_equal(to_uint8(padded, tmp_path)[:, :, 8:], expected[:, :, 8:])
    assert (to_uint8(padded, tmp_path)[:, :, :8] == 0).all()  # the fill is background
    spiked = clean.astype(np.float32)
    spiked[0, 0, 0], spiked[0, 0, 1] = -np.inf, np.nan
    np.testing.assert_array_equal(to_uint8(spiked, tmp_path).ravel()[2:], expected.ravel()[2:])
    shifted = rng.normal(0, 1, (8, 32, 32)).astype(np.float32)  # a z-scored scan: lo below 0
    shifted[:, :, :4] = np.nan
    assert (to_uint8(shifted, tmp_path)[:, :, :4] == 0).all()  # background, not mid-grey
    with pytest.raises(DataError, match=r"holds no signal"):
        to_uint8(np.full((4, 8, 8), 7.0), tmp_path / "constant.nii")
    rgb = np.zeros((4, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    with pytest.raises(DataError, match=r"rgb.nii: voxels of type .* not grey levels"):
        to_uint8(rgb, tmp_path / "rgb.nii")


def test_a_file_that_is_no_model_file_is_named_as_such(tiny_model, tmp_path, capsys):
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"best.pt is empty or cut short: copy it again"):
        su.load_segmenter(tmp_path / "best.pt")
    for name, content in [("model.onnx", b"\x08\x09onnx bytes"), ("notes.txt", b"hello")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(
            CheckpointError, match=rf"{name} is not a PyTorch checkpoint.*best.pt"
        ) as e:
            su.load_segmenter(tmp_path / name)
        assert "weights_only=False" not in str(e.value)  # no advice to unpickle unsafely
    torch.save(dict(format="seg_utils.unet.v1"), tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"old.pt has the retired format .*train it again"):
        su.load_segmenter(tmp_path / "old.pt")
    assert seg_cli.main(["inputs", "--checkpoint", str(tmp_path / "notes.txt")]) == 2
    said = capsys.readouterr().err
    assert said.startswith("error: ") and "notes.txt is not a PyTorch checkpoint" in said


# ----------------------------------------------------------------------------- the out folder


def test_existing_results_are_kept_unless_overwrite(tiny_model, patient, patient_result, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(patient_result[2], out)
    before = (out / "summary.json").read_text()
    with pytest.raises(DataError, match=r"out already exists with results.*--overwrite"):
        predict(tiny_model, patient[1], out, changes={"tta": True}, progress=False)
    assert (out / "summary.json").read_text() == before
    (out / ".DS_Store").write_bytes(b"")  # a file browser looked at the results: not the user's
    predict(tiny_model, patient[1], out, changes={"tta": True}, overwrite=True, progress=False)
    assert json.loads((out / "summary.json").read_text())["postprocess"]["tta"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left beside it
    (tmp_path / "made").mkdir()  # the mode mkdir gives here, not mkdtemp's private 0700
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE((tmp_path / "made").stat().st_mode)


def test_overwrite_replaces_earlier_results_only(tiny_model, patient, patient_result, tmp_path):
    """--overwrite once replaced any --out folder whole: the user's files and the input in it."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(DataError, match=r"mine holds files predict did not write \(thesis.txt\)"):
        predict(tiny_model, patient[1], mine, overwrite=True, progress=False)
    assert (mine / "thesis.txt").read_text() == "years of work"
    results = tmp_path / "results"
    shutil.copytree(patient_result[2], results)
    (results / "notes.txt").write_text("mine")  # added by the user: the folder is theirs now
    with pytest.raises(DataError, match=r"notes.txt"):
        predict(tiny_model, patient[1], results, overwrite=True, progress=False)
    assert (results / "notes.txt").exists() and (results / "summary.json").exists()
    a_file = tmp_path / "report.txt"
    a_file.write_text("data")
    with pytest.raises(DataError, match=r"report.txt is a file"):
        predict(tiny_model, patient[1], a_file, overwrite=True, progress=False)
    assert a_file.read_text() == "data"


def test_out_folder_may_not_hold_the_input_the_model_or_the_current_folder(
    tiny_model, patient, tmp_path, monkeypatch
):
    scan = tmp_path / "scan"
    shutil.copytree(patient[1], scan)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_model, run / "best.pt")
    for out, held in [(scan, "scan"), (tmp_path, "best.pt"), (run, "best.pt")]:
        with pytest.raises(DataError, match=rf"holds .*{held}.*a folder of their own"):
            predict(run / "best.pt", scan, out, overwrite=True, progress=False)
    monkeypatch.chdir(run)
    with pytest.raises(DataError, match=r"holds the current folder"):
        predict(tiny_model, scan, ".", overwrite=True, progress=False)
    assert sorted(p.name for p in scan.iterdir()) == sorted(p.name for p in patient[1].iterdir())
    assert (run / "best.pt").read_bytes() == tiny_model.read_bytes()


def test_out_folder_must_be_writable(tiny_model, patient, tmp_path, monkeypatch):
    monkeypatch.setattr(
        os, "access", lambda path, mode: False
    )  # a read-only mount (root may write anywhere)
    with pytest.raises(DataError, match=r"cannot write in .*choose an --out"):
        predict(tiny_model, patient[1], tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path / "out")


def test_an_interrupted_swap_keeps_the_earlier_results(
    tiny_model, patient, patient_result, tmp_path, monkeypatch
):
    """Ctrl-C between moving the old results aside and moving the new ones in once left neither."""
    out = tmp_path / "out"
    shutil.copytree(patient_result[2], out)
    before = (out / "summary.json").read_text()
    rename = type(out).rename

    def interrupted(self, target):
        if self.name.startswith(".out.unet-seg-writing-"):
            raise KeyboardInterrupt  # the staging folder's move into place
        return rename(self, target)

    monkeypatch.setattr(type(out), "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict(tiny_model, patient[1], out, changes={"tta": True}, overwrite=True, progress=False)
    assert (out / "summary.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- ONNX export


def test_onnx_export_replaces_a_file_when_asked_and_matches_pytorch(tiny_model, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    out.write_text("mine")
    argv = ["export", str(out), "--checkpoint", str(tiny_model)]
    assert seg_cli.main(argv) == 2
    assert "model.onnx already exists" in capsys.readouterr().err and out.read_text() == "mine"
    assert seg_cli.main(argv + ["--overwrite"]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    session = onnx_session(out)
    segmenter = su.load_segmenter(tiny_model, device=torch.device("cpu"))
    net, pre = segmenter.nets[0].float(), segmenter.pres[0]
    for batch in (1, 5):  # a dynamic batch size
        x = torch.randn(
            batch, 3, pre.size, pre.size, generator=torch.Generator().manual_seed(batch)
        )
        (logits,) = session.run(["logits"], {"image": x.numpy()})
        with torch.no_grad():
            expected = torch.sigmoid(net(x)).numpy()
        assert logits.shape == (batch, 1, pre.size, pre.size)
        assert np.abs(1 / (1 + np.exp(-logits)) - expected).max() < 1e-3
    meta = session.get_modelmeta().custom_metadata_map  # {key: value} strings
    assert json.loads(meta["seg_utils.preprocess"]) == json.loads(json.dumps(asdict(pre)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary file left


def test_onnx_export_never_replaces_the_model_file_nor_a_folder(tiny_model, tmp_path):
    model = tmp_path / "best.pt"
    shutil.copy(tiny_model, model)
    with pytest.raises(DataError, match=r"best.pt is the model file itself"):
        export_onnx(model, model, overwrite=True)
    with pytest.raises(DataError, match=r"is a folder: name the file"):
        export_onnx(model, tmp_path, overwrite=True)
    assert model.read_bytes() == tiny_model.read_bytes()


# ----------------------------------------------------------------------------- the commands


def test_the_installed_commands_answer_and_exit_2_with_one_line_on_errors(flair_model, tmp_path):
    """The console script and `python -m seg_cli` as a user runs them, side by side (each
    process spends most of its time importing torch)."""
    missing, out = tmp_path / "missing", tmp_path / "o"
    commands = {
        "inputs": [Path(sys.executable).parent / "unet-seg", "inputs", "--checkpoint", flair_model],
        "error": [sys.executable, "-m", "seg_cli", "predict", missing, "--checkpoint", flair_model]
        + ["--out", out],
    }
    running = {
        k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k, c in commands.items()
    }
    done = {k: (p.wait(timeout=120), *p.communicate()) for k, p in running.items()}
    assert done["inputs"][:2] == (0, f"{flair_model} needs: FLAIR (INPUT)\n")
    status, said, err = done["error"]
    assert (status, said) == (2, "") and err.startswith(f"error: {missing} does not exist")
    assert err.count("\n") == 1 and no_leftovers(out)


def test_without_checkpoint_the_commands_use_the_released_model_and_name_it_when_missing(
    patient, tmp_path, monkeypatch, capsys
):
    """A copy of the project without models/lgg_unet.pt: each command names the file in one
    line, and writes nothing."""
    released = tmp_path / "models" / "lgg_unet.pt"
    monkeypatch.setattr(seg_predict, "RELEASED_MODEL", released)
    monkeypatch.setattr(seg_cli, "RELEASED_MODEL", released)  # imported by name
    out, onnx = tmp_path / "out", tmp_path / "model.onnx"
    for argv in [["predict", patient[1], "--out", out], ["export", onnx], ["inputs"]]:
        assert seg_cli.main([str(a) for a in argv]) == 2, argv
        said = capsys.readouterr()
        assert said.out == "" and said.err.count("\n") == 1, said.err
        assert said.err.startswith(f"error: {released} does not exist"), said.err
    assert list(tmp_path.iterdir()) == []  # no out folder, no ONNX file


def test_python_m_seg_utils_says_where_the_commands_went(monkeypatch, capsys):
    """The command line of earlier versions; run as `python -m` runs it, without a process."""
    monkeypatch.setattr(sys, "argv", ["seg_utils", "predict", "best.pt", "scan", "--out", "o"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("seg_utils", run_name="__main__")
    said = capsys.readouterr()
    assert e.value.code == 2 and said.out == ""
    assert "unet-seg predict" in said.err and "python -m seg_cli" in said.err


def test_data_command_says_where_the_data_set_is(synthetic_set, monkeypatch, capsys):
    data_dir = synthetic_set(8, 0)
    monkeypatch.setenv("LGG_DATA", str(data_dir))
    assert seg_cli.main(["data"]) == 0
    count = len(su.scan_dataset(data_dir))
    assert capsys.readouterr().out == f"data: {data_dir} ({count} slices)\n"


def test_the_released_model_is_the_listed_file_and_segments_a_fixed_synthetic_scan_as_recorded(
    synthetic_set, tmp_path
):
    """models/lgg_unet.pt matches models/SHA256SUMS, loads with weights_only (read_checkpoint)
    and, used by default, gives synthetic patient SYN_P005 (every input: the network trained on
    every input, one of the file's two) the mask recorded at its release: 17,810 voxels, Dice
    0.912 (bf16 and fp32 CPUs may differ by a few voxels)."""
    listed = (seg_predict.RELEASED_MODEL.parent / "SHA256SUMS").read_text().split()
    digest = hashlib.sha256(seg_predict.RELEASED_MODEL.read_bytes()).hexdigest()
    assert listed == [digest, seg_predict.RELEASED_MODEL.name]
    folder = synthetic_set(8, 0) / "SYN_P005_0000"
    summary = predict(None, folder, tmp_path / "out", progress=False)
    assert summary["model_sha256"] == digest
    assert (summary["networks"], summary["networks_in_file"]) == (1, 2)
    assert not summary["trained_for_missing_inputs"]
    assert summary["tumour_pixels"] == pytest.approx(17810, rel=0.02)
    assert summary["dice"] == pytest.approx(0.912, abs=0.01)
