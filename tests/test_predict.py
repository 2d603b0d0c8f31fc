"""seg_predict: predict on a patient folder, a slice folder and NIfTI, bad inputs, channels,
ONNX export and the site-shift check, with tiny U-Nets trained on the synthetic set."""

import dataclasses
import json
import shutil
import stat
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import seg_predict as sp
import seg_utils as su
from seg_utils import CheckpointError, DataError

CONFIG = su.TrainConfig(epochs=3, batch_size=8, precision="fp32")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: repeatable numbers


@pytest.fixture(scope="module")
def data_dir(synthetic_set):
    return synthetic_set(8, 0)


def train_tiny(data_dir, run_dir, channels, epochs=CONFIG.epochs):
    """A width-8 depth-3 U-Net trained on the synthetic set at 64 px; returns best.pt."""
    split = su.split_by_patient(su.scan_dataset(data_dir), seed=0)
    pre = su.Preprocess(size=64, channels=channels)
    train_set = su.SliceDataset.from_records(split["train"], pre, progress=False)
    val = su.prepare_volumes(su.load_volumes(split["val"], progress=False), pre)
    su.seed_everything(0)
    model = su.UNet(in_channels=len(channels), base_width=8, depth=3)
    config = su.TrainConfig(epochs=epochs, batch_size=8, precision="fp32")
    su.train(model, train_set, val, run_dir, config, pre, progress=False)
    return run_dir / "best.pt"


@pytest.fixture(scope="module")
def checkpoint(data_dir, tmp_path_factory):
    """A 3-channel tiny U-Net."""
    return train_tiny(data_dir, tmp_path_factory.mktemp("rgb"), [0, 1, 2])


@pytest.fixture(scope="module")
def flair_checkpoint(data_dir, tmp_path_factory):
    """A FLAIR-only tiny U-Net."""
    return train_tiny(data_dir, tmp_path_factory.mktemp("flair"), [su.FLAIR])


@pytest.fixture(scope="module")
def patient(data_dir):
    """The synthetic patient whose tumour lies farthest from the image centre (so a wrong
    flip moves it far), as a Volume, with its folder."""
    volumes = su.load_volumes(su.scan_dataset(data_dir), progress=False)

    def offset(v):
        ys, xs = np.nonzero(v.mask.any(0))
        return min(abs(ys.mean() - 127.5), abs(xs.mean() - 127.5))

    vol = max(volumes, key=offset)
    return vol, data_dir / vol.patient


def direct_mask(checkpoint, vol):
    """The reference: su.predict_volume at threshold 0.5 on the Volume itself."""
    model, pre, _ = su.load_checkpoint(checkpoint)
    return (su.predict_volume(model, vol, pre) >= 0.5).astype(np.uint8)


def no_leftovers(out):
    """Nothing at `out` and no staging folders beside it."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


# ----------------------------------------------------------------------------- patient / slices


def test_patient_folder_masks_dice_and_summary(checkpoint, patient, tmp_path):
    vol, folder = patient
    summary = su.predict(checkpoint, folder, tmp_path / "out", progress=False)
    expected = direct_mask(checkpoint, vol)
    pngs = [tmp_path / "out" / f"{vol.patient}_{n}_mask.png" for n in vol.slices]
    masks = np.stack([cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in pngs])
    assert set(np.unique(masks)) <= {0, 255} and masks.any()
    np.testing.assert_array_equal(masks > 0, expected.astype(bool))
    assert summary["input_kind"] == "patient"
    assert summary["dice"] == pytest.approx(su.dice_score(expected, vol.mask))
    assert summary["tumour_pixels"] == int(expected.sum())
    assert summary["tumour_slice_count"] == int(expected.any((1, 2)).sum())
    assert summary["settings"] == sp.DEFAULT_SETTINGS
    assert "defaults" in summary["settings_source"]
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written == summary and cv2.imread(str(tmp_path / "out" / "overlay.png")) is not None


def test_drop_ends_can_be_given_to_predict_and_on_the_command_line(checkpoint, patient, tmp_path):
    vol, folder = patient
    summary = su.predict(checkpoint, folder, tmp_path / "out", drop_ends=0.3, progress=False)
    assert summary["settings"]["drop_ends"] == 0.3
    assert "overridden by the caller: drop_ends" in summary["settings_source"]
    args = sp._parser().parse_args(["predict", "m.pt", "scan", "--out", "o", "--drop-ends", "0.2"])
    assert args.drop_ends == 0.2


def write_slices(vol, folder, flair_only=False, name="scan-{}", masks=False):
    """Slices as PNGs named scan-<n>.png (unpadded: 10 after 9), in the set's channel order;
    with `masks`, <name>_mask.png beside each."""
    folder.mkdir()
    for n, image, mask in zip(vol.slices, vol.image, vol.mask):
        pixels = image[..., su.FLAIR] if flair_only else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(folder / f"{name.format(n)}.png"), pixels)
        if masks:
            cv2.imwrite(str(folder / f"{name.format(n)}_mask.png"), mask * 255)
    return folder


def test_slice_folder_three_channel_png_matches_the_patient_folder(checkpoint, patient, tmp_path):
    vol, _ = patient
    folder = write_slices(vol, tmp_path / "slices")
    summary = su.predict(checkpoint, folder, tmp_path / "out", progress=False)
    masks = np.stack(
        [cv2.imread(str(tmp_path / "out" / f"scan-{n}_mask.png"), 0) for n in vol.slices]
    )
    np.testing.assert_array_equal(masks > 0, direct_mask(checkpoint, vol).astype(bool))
    assert summary["input_kind"] == "slices" and "dice" not in summary


def test_grey_slices_saved_as_rgb_are_predicted_with_a_warning(checkpoint, patient, tmp_path):
    vol, _ = patient
    grey = dataclasses.replace(vol, image=vol.image[..., [su.FLAIR] * 3])
    folder = write_slices(grey, tmp_path / "grey")  # FLAIR in all three channels
    summary = su.predict(checkpoint, folder, tmp_path / "out", progress=False)
    assert len(summary["warnings"]) == 1 and "channels are identical" in summary["warnings"][0]
    right = su.predict(
        checkpoint, write_slices(vol, tmp_path / "rgb"), tmp_path / "o2", progress=False
    )
    assert right["warnings"] == []


def test_flair_only_slices_with_a_flair_checkpoint(flair_checkpoint, patient, tmp_path):
    vol, _ = patient
    folder = write_slices(vol, tmp_path / "slices", flair_only=True)
    summary = su.predict(flair_checkpoint, folder, tmp_path / "out", progress=False)
    assert summary["given_inputs"] == ["FLAIR"] and summary["model_inputs"] == "FLAIR (INPUT)"
    masks = np.stack(
        [cv2.imread(str(tmp_path / "out" / f"scan-{n}_mask.png"), 0) for n in vol.slices]
    )
    np.testing.assert_array_equal(masks > 0, direct_mask(flair_checkpoint, vol).astype(bool))


# ----------------------------------------------------------------------------- NIfTI

# Hand-written layouts of the set's (D, H, W) = (inferior->superior, anterior->posterior,
# right->left) volume: how to lay it out in the file, and each file axis's world direction in
# RAS+ (x to the patient's left->Right, y posterior->Anterior, z inferior->Superior) and voxel
# sizes: 1 mm in-plane, 2.5 mm slices.
LAYOUTS = {
    "LPS": (lambda v: v.transpose(2, 1, 0), [[-1, 0, 0], [0, -1, 0], [0, 0, 1]], (1, 1, 2.5)),
    "ASR": (
        lambda v: v[:, ::-1, ::-1].transpose(1, 0, 2),
        [[0, 0, 1], [1, 0, 0], [0, 1, 0]],
        (1, 2.5, 1),
    ),
}


def write_nifti(path, array, directions, spacing):
    """A NIfTI file whose axis i points along directions[:, i] with voxel size spacing[i]."""
    nib = pytest.importorskip("nibabel")
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(directions, float) * np.asarray(spacing, float)
    affine[:3, 3] = (-90.0, 120.0, -30.0)
    nib.Nifti1Image(array, affine).to_filename(path)
    return affine


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_nifti_round_trip_matches_the_slice_prediction(checkpoint, patient, tmp_path, layout):
    nib = pytest.importorskip("nibabel")
    vol, _ = patient
    to_file, directions, spacing = LAYOUTS[layout]
    paths = {c: tmp_path / f"{name}.nii.gz" for c, name in enumerate(("t1", "flair", "t1c"))}
    for c, path in paths.items():
        affine = write_nifti(path, to_file(vol.image[..., c]), directions, spacing)
    assert "".join(nib.aff2axcodes(affine)) == layout
    summary = su.predict(checkpoint, paths[1], tmp_path / "out", t1=paths[0], t1c=paths[2],
                         progress=False)  # fmt: skip
    out = nib.load(tmp_path / "out" / "mask.nii.gz")
    mask = np.asanyarray(out.dataobj)
    assert mask.shape == to_file(vol.mask).shape and mask.dtype == np.uint8
    np.testing.assert_allclose(out.affine, affine)
    expected = to_file(direct_mask(checkpoint, vol))
    assert expected.any() and not np.array_equal(expected, np.flip(expected, 0))
    np.testing.assert_array_equal(mask, expected)
    assert summary["tumour_volume_ml"] == pytest.approx(expected.sum() * 2.5 / 1000)
    assert summary["axcodes"] == layout


def test_nifti_float_anisotropic_matrix_lands_on_the_tumour(checkpoint, patient, tmp_path):
    """RAS file, 192 columns of 4/3 mm (the same 256 mm), float intensities: resampled to
    256 x 256 and back; the mask must fall on the truth, and a flipped mask must not."""
    nib = pytest.importorskip("nibabel")
    vol, _ = patient

    def to_file(v, interpolation):  # (D, 256, 256) -> RAS (192, 256, D)
        narrow = np.stack([cv2.resize(s, (192, 256), interpolation=interpolation) for s in v])
        return narrow[:, ::-1, ::-1].transpose(2, 1, 0)

    paths = {}
    for c, name in enumerate(("t1", "flair", "t1c")):
        array = to_file(vol.image[..., c], cv2.INTER_AREA).astype(np.float32) * 3.7 + 11.0
        paths[c] = tmp_path / f"{name}.nii"
        write_nifti(paths[c], array, np.eye(3), (4 / 3, 1.0, 3.0))
    su.predict(checkpoint, paths[1], tmp_path / "out", t1=paths[0], t1c=paths[2], progress=False)
    mask = np.asanyarray(nib.load(tmp_path / "out" / "mask.nii.gz").dataobj)
    truth = to_file(vol.mask, cv2.INTER_NEAREST)
    assert mask.shape == truth.shape == (192, 256, len(vol.mask))
    assert su.dice_score(truth, np.flip(truth, 0)) < 0.3  # a wrong flip would fail below
    assert su.dice_score(mask, truth) > 0.6
    assert (
        su.dice_score(mask, np.flip(truth, 0)) < 0.3
        and su.dice_score(mask, np.flip(truth, 1)) < 0.3
    )


def test_flair_only_nifti_with_flair_and_three_channel_checkpoints(
    checkpoint, flair_checkpoint, patient, tmp_path
):
    vol, _ = patient
    flair = tmp_path / "flair.nii.gz"
    to_file, directions, spacing = LAYOUTS["LPS"]
    write_nifti(flair, to_file(vol.image[..., su.FLAIR]), directions, spacing)
    summary = su.predict(flair_checkpoint, flair, tmp_path / "flair-only", progress=False)
    assert (
        summary["given_inputs"] == ["FLAIR"] and (tmp_path / "flair-only" / "mask.nii.gz").is_file()
    )
    with pytest.raises(
        DataError, match=r"--t1 pre-contrast.nii.gz and --t1c .*--fill-missing flair"
    ):
        su.predict(checkpoint, flair, tmp_path / "refused", progress=False)
    assert no_leftovers(tmp_path / "refused")
    filled = su.predict(
        checkpoint, flair, tmp_path / "filled", fill_missing="flair", progress=False
    )
    assert filled["filled_from_flair"] == ["pre-contrast", "post-contrast"]


# ----------------------------------------------------------------------------- bad input


def test_single_2d_image_is_refused(checkpoint, patient, tmp_path):
    one = tmp_path / "one"
    cv2.imwrite(str(one.with_suffix(".png")), patient[0].image[10])
    with pytest.raises(DataError, match=r"one.png is a single 2D image.*whole scan"):
        su.predict(checkpoint, one.with_suffix(".png"), tmp_path / "out", progress=False)
    one.mkdir()
    cv2.imwrite(str(one / "slice_1.png"), patient[0].image[10])
    with pytest.raises(DataError, match=r"holds 1 slice image.*all slices"):
        su.predict(checkpoint, one, tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path / "out")


def test_slices_of_different_sizes_are_refused(checkpoint, patient, tmp_path):
    folder = write_slices(patient[0], tmp_path / "slices")
    cv2.imwrite(str(folder / "scan-3.png"), np.zeros((200, 256, 3), np.uint8))
    with pytest.raises(DataError, match=r"scan-3.png: \(200, 256, 3\).*must match"):
        su.predict(checkpoint, folder, tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path / "out")


def test_nifti_volumes_of_different_shapes_are_refused(checkpoint, patient, tmp_path):
    to_file, directions, _ = LAYOUTS["LPS"]
    flair, t1 = tmp_path / "flair.nii.gz", tmp_path / "t1.nii.gz"
    write_nifti(flair, to_file(patient[0].image[..., 1]), directions, (1, 1, 1))
    write_nifti(t1, to_file(patient[0].image[2:, :, :, 0]), directions, (1, 1, 1))
    with pytest.raises(DataError, match=r"t1.nii.gz: shape .* differ from the FLAIR .*resample"):
        su.predict(checkpoint, flair, tmp_path / "out", t1=t1, t1c=flair, progress=False)
    assert no_leftovers(tmp_path / "out")


def write_with_alpha(vol, folder, alpha, grey=False):
    """Slices as PNGs with an alpha channel: RGBA, or with `grey` grey + alpha (FLAIR)."""
    from PIL import Image  # OpenCV cannot write grey + alpha

    folder.mkdir()
    for n, image in zip(vol.slices, vol.image):
        colour = image[..., su.FLAIR : su.FLAIR + 1] if grey else image  # (H, W, 1 or 3) RGB
        pixels = np.dstack([colour, np.broadcast_to(alpha, colour.shape[:2])]).astype(np.uint8)
        Image.fromarray(pixels, "LA" if grey else "RGBA").save(folder / f"scan-{n}.png")
    return folder


def test_opaque_alpha_is_dropped_and_transparency_refused(checkpoint, patient, tmp_path):
    vol, _ = patient
    rgba = su.predict(checkpoint, write_with_alpha(vol, tmp_path / "rgba", 255), tmp_path / "o1",
                      progress=False)  # fmt: skip
    rgb = su.predict(
        checkpoint, write_slices(vol, tmp_path / "rgb"), tmp_path / "o2", progress=False
    )
    assert rgba["warnings"] == [] and rgba["tumour_pixels"] == rgb["tumour_pixels"] > 0
    grey = su.predict(checkpoint, write_with_alpha(vol, tmp_path / "la", 255, grey=True),
                      tmp_path / "o3", progress=False)  # fmt: skip
    assert "channels are identical" in grey["warnings"][0]  # read like grey saved as RGB
    see_through = np.full(vol.image.shape[1:3], 255, np.uint8)
    see_through[0, 0] = 0
    with pytest.raises(
        DataError,
        match=r"scan-1.png: 4 channels, the last not an opaque alpha.*without transparency",
    ):
        su.predict(checkpoint, write_with_alpha(vol, tmp_path / "t", see_through), tmp_path / "o4",
                   progress=False)  # fmt: skip
    assert no_leftovers(tmp_path / "o4")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32, np.float64])
def test_slices_of_any_depth_are_read_in_the_sets_channel_order(tmp_path, dtype):
    """OpenCV reads B, G, R(, A); the set's order is R, G, B, whatever the sample type (cvtColor
    refused int16 and float64 TIFFs with a raw cv2.error)."""
    bgr = np.stack([np.full((4, 4), v, dtype) for v in (10, 20, 30)], -1)  # (H, W, 3) B, G, R
    opaque = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    for name, pixels in (
        ("rgb.tif", bgr),
        ("rgba.tif", np.dstack([bgr, np.full((4, 4), opaque, dtype)])),
    ):
        assert cv2.imwrite(str(tmp_path / name), pixels)
        assert sp._read_image(tmp_path / name)[0, 0].tolist() == [30, 20, 10], name


def test_nifti_with_trailing_axes_of_one_is_read_as_3d(flair_checkpoint, patient, tmp_path):
    flair = patient[0].image[..., su.FLAIR].transpose(2, 1, 0).astype(np.float32)  # (x, y, z)
    paths = [tmp_path / f"{n}.nii.gz" for n in ("x", "x1", "x11", "x2")]
    for path, array in zip(paths, (flair, flair[..., None], flair[..., None, None],
                                   np.stack([flair, flair], -1))):  # fmt: skip
        write_nifti(path, array, np.eye(3), (1, 1, 1))
    read = [sp.read_scan(p).image for p in paths[:3]]
    np.testing.assert_array_equal(read[1], read[0])  # the same slices, not merely a 3D array
    np.testing.assert_array_equal(read[2], read[0])
    # a FLAIR-only model: the tiny 3-channel one finds no tumour on FLAIR copies, and 0 == 0 == 0
    # would prove nothing
    masks = [su.predict(flair_checkpoint, p, tmp_path / p.name[:-7], progress=False)["tumour_voxels"]
             for p in paths[:3]]  # fmt: skip
    assert masks[0] == masks[1] == masks[2] > 0
    with pytest.raises(
        DataError, match=r"x2.nii.gz: shape \(.*, 2\) holds several volumes.*one 3D volume"
    ):
        su.predict(flair_checkpoint, paths[3], tmp_path / "o", progress=False)


def test_channel_counts_the_model_cannot_use_are_refused(checkpoint, patient, tmp_path):
    grey = write_slices(patient[0], tmp_path / "grey", flair_only=True)
    with pytest.raises(DataError, match=r"needs pre-contrast .* gives FLAIR: add 3-channel slices"):
        su.predict(checkpoint, grey, tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path / "out")


def test_unreadable_and_empty_files_are_refused(checkpoint, patient, tmp_path):
    folder = write_slices(patient[0], tmp_path / "slices")
    (folder / "scan-2.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"scan-2.png: cannot be read as an image"):
        su.predict(checkpoint, folder, tmp_path / "out", progress=False)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.nii.gz: missing or empty file"):
        su.predict(checkpoint, empty, tmp_path / "out", progress=False)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match=r"broken.nii.gz: cannot be read as NIfTI"):
        su.predict(checkpoint, broken, tmp_path / "out", progress=False)
    zeros = tmp_path / "zeros.nii.gz"
    write_nifti(zeros, np.zeros((64, 64, 8), np.float32), np.eye(3), (1, 1, 1))
    with pytest.raises(DataError, match=r"zeros.nii.gz: the scan holds no signal"):
        su.predict(checkpoint, zeros, tmp_path / "out", fill_missing="flair", progress=False)
    assert no_leftovers(tmp_path / "out")


def test_grey_levels_survive_fill_values_infinities_and_odd_types(tmp_path):
    """A -32768 fill outside the field of view, or one -inf voxel, once squeezed the tissue into
    a few grey levels (an empty mask, silently); constant and RGB volumes are refused."""
    rng = np.random.default_rng(0)
    clean = rng.uniform(0, 1000, (8, 64, 64)).astype(np.int16)  # (D, H, W) a scan's levels
    expected = sp.to_uint8(clean, tmp_path)
    padded = clean.copy()
    padded[:, :, :8] = -32768  # 12 % of the voxels
    np.testing.assert_array_equal(sp.to_uint8(padded, tmp_path)[:, :, 8:], expected[:, :, 8:])
    assert (sp.to_uint8(padded, tmp_path)[:, :, :8] == 0).all()  # the fill is background
    spiked = clean.astype(np.float32)
    spiked[0, 0, 0], spiked[0, 0, 1] = -np.inf, np.nan
    got = sp.to_uint8(spiked, tmp_path)
    np.testing.assert_array_equal(got.ravel()[2:], expected.ravel()[2:])
    shifted = rng.normal(0, 1, (8, 32, 32)).astype(np.float32)  # a z-scored scan: lo below 0
    shifted[:, :, :4] = np.nan
    assert (sp.to_uint8(shifted, tmp_path)[:, :, :4] == 0).all()  # background, not mid-grey
    with pytest.raises(DataError, match=r"holds no signal"):
        sp.to_uint8(np.full((4, 8, 8), 7.0), tmp_path / "constant.nii")
    rgb = np.zeros((4, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    with pytest.raises(DataError, match=r"rgb.nii: voxels of type .* not grey levels"):
        sp.to_uint8(rgb, tmp_path / "rgb.nii")


def test_nifti_named_against_its_compression_says_how_to_rename(checkpoint, tmp_path):
    plain = tmp_path / "scan.nii.gz"  # not gzip-compressed inside
    write_nifti(tmp_path / "scan.nii", np.ones((16, 16, 4), np.float32), np.eye(3), (1, 1, 1))
    (tmp_path / "scan.nii").rename(plain)
    with pytest.raises(
        DataError, match=r"scan.nii.gz: the file is not gzip-compressed.*rename it scan.nii$"
    ):
        su.predict(checkpoint, plain, tmp_path / "out", progress=False)


def test_masks_are_found_for_slice_names_with_brackets(checkpoint, patient, tmp_path):
    folder = write_slices(patient[0], tmp_path / "slices", name="scan[{}]", masks=True)
    summary = su.predict(checkpoint, folder, tmp_path / "out", progress=False)
    assert "dice" in summary  # the glob once read [1] as a character class and found no mask


def test_nonsense_settings_are_refused_before_any_work(checkpoint, patient, tmp_path, monkeypatch):
    monkeypatch.setattr(sp, "read_scan", lambda *a: pytest.fail("read the scan first"))
    for given, named in [(dict(threshold=-1), "threshold"), (dict(threshold=float("nan")), "threshold"),
                         (dict(drop_ends=2), "drop_ends"), (dict(drop_ends=-0.5), "drop_ends"),
                         (dict(min_size=-5), "min_size")]:  # fmt: skip
        with pytest.raises(DataError, match=named):
            su.predict(checkpoint, patient[1], tmp_path / "out", progress=False, **given)
    assert sp.main(["predict", str(checkpoint), str(patient[1]), "--out", str(tmp_path / "o"),
                    "--threshold", "1.5"]) == 2  # fmt: skip


def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"best.pt is empty or cut short: copy it again"):
        su.load_checkpoint(tmp_path / "best.pt")
    for name, content in [("model.onnx", b"\x08\x09onnx bytes"), ("notes.txt", b"hello")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(
            CheckpointError, match=rf"{name} is not a PyTorch checkpoint.*best.pt"
        ) as e:
            su.load_checkpoint(tmp_path / name)
        assert "weights_only=False" not in str(e.value)  # no advice to unpickle unsafely


def test_interrupted_swap_keeps_the_earlier_results(checkpoint, patient, tmp_path, monkeypatch):
    """Ctrl-C between moving the old results aside and moving the new ones in once left neither."""
    out = tmp_path / "out"
    su.predict(checkpoint, patient[1], out, progress=False)
    before = (out / "summary.json").read_text()
    rename = type(out).rename

    def interrupted(self, target):
        if self.name.startswith(".out.") and not self.name.startswith(".out.old."):
            raise KeyboardInterrupt  # the staging folder's move into place
        return rename(self, target)

    monkeypatch.setattr(type(out), "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        su.predict(checkpoint, patient[1], out, tta=True, overwrite=True, progress=False)
    assert (out / "summary.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_out_folder_must_be_writable(checkpoint, patient, tmp_path, monkeypatch):
    monkeypatch.setattr(sp.os, "access", lambda path, mode: False)  # a read-only mount, say
    with pytest.raises(DataError, match=r"cannot write in .*choose an --out"):
        su.predict(checkpoint, patient[1], tmp_path / "out", progress=False)


def test_existing_results_are_kept_unless_overwrite(checkpoint, patient, tmp_path):
    out = tmp_path / "out"
    su.predict(checkpoint, patient[1], out, tta=False, progress=False)
    before = (out / "summary.json").read_text()
    with pytest.raises(DataError, match=r"out already exists with results.*--overwrite"):
        su.predict(checkpoint, patient[1], out, tta=True, progress=False)
    assert (out / "summary.json").read_text() == before
    su.predict(checkpoint, patient[1], out, tta=True, overwrite=True, progress=False)
    assert json.loads((out / "summary.json").read_text())["settings"]["tta"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left beside it
    (tmp_path / "made").mkdir()  # the mode mkdir gives here, not mkdtemp's private 0700
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE((tmp_path / "made").stat().st_mode)
    (tmp_path / "made").rmdir()


def test_overwrite_replaces_earlier_results_only(checkpoint, patient, tmp_path):
    """--overwrite once replaced any --out folder whole: the user's files and the input in it."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    with pytest.raises(DataError, match=r"mine holds files predict did not write \(thesis.txt\)"):
        su.predict(checkpoint, patient[1], mine, overwrite=True, progress=False)
    assert (mine / "thesis.txt").read_text() == "years of work"
    results = tmp_path / "results"
    su.predict(checkpoint, patient[1], results, progress=False)
    (results / "notes.txt").write_text("mine")  # added by the user: the folder is theirs now
    with pytest.raises(DataError, match=r"notes.txt"):
        su.predict(checkpoint, patient[1], results, overwrite=True, progress=False)
    assert (results / "notes.txt").exists() and (results / "summary.json").exists()
    (results / "notes.txt").unlink()
    (results / ".DS_Store").write_bytes(b"")  # a file browser looked at the results
    su.predict(checkpoint, patient[1], results, overwrite=True, progress=False)
    a_file = tmp_path / "report.txt"
    a_file.write_text("data")
    with pytest.raises(DataError, match=r"report.txt is a file"):
        su.predict(checkpoint, patient[1], a_file, overwrite=True, progress=False)
    assert a_file.read_text() == "data"


def test_out_folder_may_not_hold_the_input_or_the_checkpoint(
    checkpoint, patient, tmp_path, monkeypatch
):
    scan = tmp_path / "scan"
    shutil.copytree(patient[1], scan)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(checkpoint, run / "best.pt")
    for out, held in [(scan, "scan"), (tmp_path, "best.pt"), (run, "best.pt")]:
        with pytest.raises(DataError, match=rf"holds .*{held}.*a folder of their own"):
            su.predict(run / "best.pt", scan, out, overwrite=True, progress=False)
    monkeypatch.chdir(scan.parent / "run")
    with pytest.raises(DataError, match=r"holds the current folder"):
        su.predict(checkpoint, scan, ".", overwrite=True, progress=False)
    assert len(list(scan.iterdir())) == len(list(patient[1].iterdir()))
    assert (run / "best.pt").read_bytes() == checkpoint.read_bytes()


# ----------------------------------------------------------------------------- settings


def test_settings_come_from_notebook_04_and_flags_override(checkpoint, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(checkpoint.read_bytes())
    chosen = dict(tta=True, threshold=0.7, min_size=200, keep_largest=False, drop_ends=0.2)
    record = dict(checkpoint="../runs/unet/best.pt", chosen_on_validation=chosen)
    (run / "test_metrics.json").write_text(json.dumps(record))
    settings, source = sp.run_settings(run / "best.pt")
    assert settings == chosen and "chosen on validation" in source
    settings, source = sp.run_settings(run / "best.pt", threshold=0.3, tta=None)
    assert (
        settings == chosen | {"threshold": 0.3} and "overridden by the caller: threshold" in source
    )
    record["chosen_on_validation"] = chosen | {"keep_largest": "mass"}  # stays "mass", not True
    (run / "test_metrics.json").write_text(json.dumps(record))
    assert sp.run_settings(run / "best.pt")[0]["keep_largest"] == "mass"
    del record["chosen_on_validation"]["drop_ends"]  # a record from before drop_ends: none
    (run / "test_metrics.json").write_text(json.dumps(record))
    assert sp.run_settings(run / "best.pt")[0]["drop_ends"] == 0.0
    settings, source = sp.run_settings(run / "last.pt")  # notebook 04 scored best.pt, not this
    assert settings == sp.DEFAULT_SETTINGS and "is for best.pt" in source
    (run / "test_metrics.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"test_metrics.json is damaged"):
        sp.run_settings(run / "best.pt")
    for wrong in [dict(keep_largest="false"), dict(threshold="high"), dict(threshold=None),
                  dict(tta=1), dict(min_size=True), dict(min_size=1000.7)]:  # fmt: skip
        record["chosen_on_validation"] = chosen | wrong  # "false" once read as True
        (run / "test_metrics.json").write_text(json.dumps(record))
        with pytest.raises(CheckpointError, match=r"test_metrics.json is damaged"):
            sp.run_settings(run / "best.pt")


# ----------------------------------------------------------------------------- channels


def test_parse_channels_and_preprocess_validation():
    assert sp.parse_channels("flair") == [1]
    assert sp.parse_channels("all") == sp.parse_channels("2,0,1") == [0, 1, 2]
    assert sp.parse_channels("FLAIR,post-contrast") == [1, 2]
    with pytest.raises(ValueError, match="unknown channel 't2'"):
        sp.parse_channels("t2")
    for bad in ([], [0, 0], [3]):
        with pytest.raises(ValueError, match="channels"):
            su.Preprocess(channels=bad)


def test_flair_only_model_trains_a_step_and_its_checkpoint_keeps_channels(flair_checkpoint):
    model, pre, state = su.load_checkpoint(flair_checkpoint)
    assert pre.channels == [su.FLAIR] and state["preprocess"]["channels"] == [su.FLAIR]
    assert model.config["in_channels"] == 1 and sp.needed_inputs(pre) == "FLAIR (INPUT)"
    x, y = torch.randn(2, 1, 64, 64), torch.zeros(2, 1, 64, 64)
    before = model.head.weight.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = su.train_step(model.train(), optimizer, x, y, "fp32")
    assert np.isfinite(loss) and not torch.equal(before, model.head.weight)


def test_old_checkpoints_without_channels_load_as_all_three(checkpoint, tmp_path):
    state = su.read_checkpoint(checkpoint)
    del state["preprocess"]["channels"]
    su.save_checkpoint(state, tmp_path / "old.pt")
    model, pre, _ = su.load_checkpoint(tmp_path / "old.pt")
    assert pre.channels == [0, 1, 2] and model.config["in_channels"] == 3


def test_inputs_command_through_python_m_seg_utils(flair_checkpoint, tmp_path):
    done = subprocess.run([sys.executable, "-m", "seg_utils", "inputs", str(flair_checkpoint)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "needs: FLAIR (INPUT)" in done.stdout
    assert (
        sp.main(["predict", str(flair_checkpoint), str(tmp_path), "--out", str(tmp_path / "o")])
        == 2
    )


# ----------------------------------------------------------------------------- export


def test_onnx_export_matches_pytorch(checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    path = su.export_onnx(checkpoint, tmp_path / "model.onnx")
    session = sp.onnx_session(path)
    model, pre, _ = su.load_checkpoint(checkpoint, torch.device("cpu"))
    for batch in (1, 5):  # dynamic batch size
        x = torch.randn(
            batch, 3, pre.size, pre.size, generator=torch.Generator().manual_seed(batch)
        )
        (logits,) = session.run(["logits"], {"image": x.numpy()})
        with torch.no_grad():
            expected = torch.sigmoid(model.float()(x)).numpy()
        assert logits.shape == (batch, 1, pre.size, pre.size)
        assert np.abs(1 / (1 + np.exp(-logits)) - expected).max() < 1e-3
    meta = session.get_modelmeta().custom_metadata_map  # {key: value} strings
    assert json.loads(meta["seg_utils.preprocess"])["channels"] == [0, 1, 2]
    assert not list(tmp_path.glob(".*tmp")) and not list(tmp_path.glob("*.tmp"))


def test_onnx_export_never_replaces_a_file_unasked_nor_the_checkpoint(checkpoint, tmp_path):
    pytest.importorskip("onnxscript")
    copy = tmp_path / "ck.pt"
    shutil.copy(checkpoint, copy)
    with pytest.raises(DataError, match=r"ck.pt is the checkpoint itself"):
        su.export_onnx(copy, copy, overwrite=True)
    assert copy.read_bytes() == checkpoint.read_bytes()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(DataError, match=r"notes.txt already exists.*--overwrite"):
        su.export_onnx(copy, notes)
    assert notes.read_text() == "mine"
    with pytest.raises(DataError, match=r"is a folder: name the file"):
        su.export_onnx(copy, tmp_path)
    assert sp.main(["export", str(copy), str(notes)]) == 2
    assert sp.main(["export", str(copy), str(notes), "--overwrite"]) == 0
    assert notes.read_bytes()[:2] != b"mi"


# ----------------------------------------------------------------------------- site shifts


def test_site_shifts_are_deterministic_and_change_the_scans(checkpoint, patient):
    vol, _ = patient
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    for name, shift in sp.SHIFTS.items():
        out = shift(vol, rng())
        assert out.image.dtype == np.uint8 and out.image.shape[1:] == vol.image.shape[1:], name
        assert out.mask.shape == out.image.shape[:3], name
        assert not np.array_equal(out.image, vol.image), name
        np.testing.assert_array_equal(out.image, shift(vol, rng()).image, err_msg=name)
    assert len(sp.SHIFTS["thinner slices (2x in z)"](vol, rng()).image) == 2 * len(vol.image) - 1
    stripped = sp.skull_strip(vol)
    assert stripped.image[:, 0, 128].max() == 0 and (stripped.mask == vol.mask).all()
    model, pre, _ = su.load_checkpoint(checkpoint)
    names = ["intensity x0.6", "Rician noise 5%"]
    scores = su.site_shift_scores(model, pre, [vol], shifts=names, progress=False)
    assert list(scores.columns) == ["clean", *names]
    assert scores.loc[vol.patient, "clean"] == pytest.approx(
        su.dice_score(direct_mask(checkpoint, vol), vol.mask)
    )
    again = su.site_shift_scores(model, pre, [vol], shifts=names[::-1], progress=False)
    assert again.loc[vol.patient, names[1]] == scores.loc[vol.patient, names[1]]  # order-free seed
    table = su.site_shift_table(scores)
    assert table.loc["clean", "change vs clean"] == 0.0


def test_site_shift_table_known_answer():
    """Clean Dice 0.8 and 0.6, shifted 0.5 and 0.5: means 0.7 and 0.5, a change of -0.2 (a drop
    is negative). `clean minus clean` alone is 0 whatever the sign or the mean."""
    scores = pd.DataFrame({"clean": [0.8, 0.6], "gamma 0.7": [0.5, 0.5]}, index=["P1", "P2"])
    table = su.site_shift_table(scores)
    assert table.loc["gamma 0.7"].tolist() == pytest.approx([0.5, -0.2])
    assert table.loc["clean"].tolist() == pytest.approx([0.7, 0.0])


def test_random_site_shifts_draw_each_family_in_its_range_and_are_seeded(patient, monkeypatch):
    """Over 40 draws every family happens sometimes but not always, with strengths inside the
    documented ranges, stripping and zoom before the intensity changes and the noise last."""
    vol, _ = patient
    calls = []

    def recorder(name, fn):
        def record(volume, *args):
            calls[-1].append((name, *[a for a in args if isinstance(a, float)]))
            return fn(volume, *args)

        return record

    for name in ("skull_strip", "_zoom", "_gamma", "_bias", "_rician"):
        monkeypatch.setattr(sp, name, recorder(name, getattr(sp, name)))
    for seed in range(40):
        calls.append([])
        out = sp.random_site_shift(vol, np.random.default_rng(seed))
        assert out.image.dtype == np.uint8 and out.image.shape == vol.image.shape
    order = ["skull_strip", "_zoom", "_gamma", "_bias", "_rician"]
    for draw in calls:
        names = [c[0] for c in draw]
        assert names == sorted(names, key=order.index)
    counts = {name: sum(name in [c[0] for c in d] for d in calls) for name in order}
    assert all(0 < n < 40 for n in counts.values()), counts
    ranges = {
        "_zoom": (0.8, 1.25),
        "_gamma": (0.6, 1.7),
        "_bias": (0.1, 0.4),
        "_rician": (0.01, 0.08),
    }
    for name, (lo, hi) in ranges.items():
        values = [c[1] for d in calls for c in d if c[0] == name]
        assert lo <= min(values) and max(values) <= hi, name
    monkeypatch.undo()
    again = [sp.random_site_shift(vol, np.random.default_rng(3)).image for _ in range(2)]
    np.testing.assert_array_equal(*again)


def test_stripped_twins_join_the_draws_without_lengthening_an_epoch(data_dir):
    """share 0.5 of 4 volumes: 2 stripped twins of the same patients, a third of the sampling
    weight (each volume weighs the same), and an epoch still draws the originals' slice count."""
    volumes = su.load_volumes(su.scan_dataset(data_dir), progress=False)[:4]
    pre = su.Preprocess(size=32)
    twins = sp.WithTwins(volumes, pre, share=0.5, seed=0)
    originals = sum(len(v.image) for v in volumes)
    assert len(twins.volumes) == 6 and len(twins) == originals
    assert len(twins.index) == originals + sum(len(v.image) for v in twins.volumes[4:])
    assert {v.patient for v in twins.volumes[4:]} <= {v.patient for v in volumes}
    for twin in twins.volumes[4:]:  # scalp and skull are gone: fewer pixels above 0
        plain = next(v for v in twins.volumes[:4] if v.patient == twin.patient)
        assert (twin.image > 0).mean() < (plain.image > 0).mean()
    weights = su.tumour_weights(twins)
    assert float(weights.sum()) == pytest.approx(1.0)
    assert float(weights[originals:].sum()) == pytest.approx(2 / 6)
    config = su.TrainConfig(batch_size=4)
    drawn = [i for _ in range(3) for i in su._epoch_loader(twins, config, weights, 0).sampler]
    assert len(drawn) == 3 * originals and max(drawn) >= originals  # twins are drawn
    assert [v.patient for v in sp.WithTwins(volumes, pre, 0.5, 0).volumes] == [
        v.patient for v in twins.volumes
    ]  # seeded
    assert len(sp.WithTwins(volumes, pre, share=0.0).volumes) == 4
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        sp.WithTwins(volumes, pre, share=1.5)
    site = sp.WithTwins(volumes, pre, share=0.5, seed=0, shift=sp.random_site_shift)
    assert [v.patient for v in site.volumes] == [v.patient for v in twins.volumes]  # same picks
    assert not np.array_equal(site.volumes[4].image, twins.volumes[4].image)  # another shift
