"""Data layer of seg_utils: the synthetic set, scanning, splits, reading, bad input (each error
naming the file and the fix), preparation geometry and the slice data set."""

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import pytest
import torch
from conftest import whole_image_volume
from PIL import Image

import seg_synthetic
import seg_utils as su
from seg_utils import DataError, SliceRecord


@pytest.fixture(scope="module")
def synth8(synthetic_set) -> Path:
    """8 synthetic patients, seed 0 (the set the session's tiny models train on)."""
    return synthetic_set(8, 0)


@pytest.fixture(scope="module")
def volumes8(synth8) -> list[su.Volume]:
    return su.load_volumes(su.scan_dataset(synth8), progress=False)


def fake_records(patients, slices_per_patient=2) -> list[SliceRecord]:
    """Records with dummy paths: enough for the split functions, which never read files."""
    return [
        SliceRecord(p, n, Path(f"{p}_{n}.tif"), Path(f"{p}_{n}_mask.tif"))
        for p in sorted(patients)
        for n in range(1, slices_per_patient + 1)
    ]


def patients_of(split: dict) -> dict[str, list[str]]:
    return {name: sorted({r.patient for r in recs}) for name, recs in split.items()}


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def write_pair(folder: Path, patient: str, n: int, image=None, mask=None, size=64) -> tuple:
    """Write <patient>_<n>.tif (BGR on disk, as OpenCV writes) and its 0/255 mask."""
    folder = folder / patient
    folder.mkdir(parents=True, exist_ok=True)
    if image is None:
        image = np.full((size, size, 3), 80, np.uint8)
    if mask is None:
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[size // 4 : size // 2, size // 4 : size // 2] = 255
    image_path, mask_path = folder / f"{patient}_{n}.tif", folder / f"{patient}_{n}_mask.tif"
    assert cv2.imwrite(str(image_path), image)
    assert cv2.imwrite(str(mask_path), mask)
    return image_path, mask_path


def load_all(root: Path) -> list[su.Volume]:
    return su.load_volumes(su.scan_dataset(root), progress=False)


# ----------------------------------------------------------------------------- synthetic set


def test_synthetic_layout_and_pixels(synth8, volumes8):
    assert sorted(p.name for p in synth8.parent.iterdir()) == ["kaggle_3m"]  # no staging left
    patients = sorted(p.name for p in synth8.iterdir())
    assert len(patients) == 8 and all((synth8 / p).is_dir() for p in patients)
    assert su.scan_dataset(synth8.parent) == su.scan_dataset(synth8)
    for vol in volumes8:
        assert vol.image.shape[1:] == (256, 256, 3) and vol.image.dtype == np.uint8
        assert vol.slices == list(range(1, len(vol.slices) + 1)) and len(vol.slices) >= 20
        files = sorted(p.name for p in (synth8 / vol.patient).iterdir())
        assert len(files) == 2 * len(vol.slices)  # an image and a mask per slice, nothing else
    # the mask files themselves hold exactly 0 and 255
    for path in sorted((synth8 / patients[0]).glob("*_mask.tif"))[:10]:
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (256, 256) and set(np.unique(mask).tolist()) <= {0, 255}


def test_synthetic_tumours_are_contiguous_and_bright_in_flair(volumes8):
    has_tumour = [vol.mask.reshape(len(vol.mask), -1).any(1) for vol in volumes8]
    fraction = np.concatenate(has_tumour).mean()
    assert 0.15 < fraction < 0.6, f"tumour slice fraction {fraction:.2f}"
    for vol, tumour in zip(volumes8, has_tumour):
        idx = np.flatnonzero(tumour)
        assert len(idx) > 0, f"{vol.patient} has no tumour"
        assert idx.max() - idx.min() + 1 == len(idx), f"{vol.patient}: tumour slices {idx}"
        flair = vol.image[..., su.FLAIR].astype(float)  # visible in FLAIR, or nothing learns it
        assert flair[vol.mask == 1].mean() > flair[vol.mask == 0].mean() + 50, vol.patient


def test_synthetic_set_is_seeded(synth8, tmp_path):
    """Patient i depends on (seed, i) alone: one patient made on its own is the same bytes as
    patient 0 of the session's 8-patient set; another seed makes other scans."""
    (alone,) = su.make_synthetic_dataset(tmp_path / "a", n_patients=1, seed=0).iterdir()
    assert tree_hashes(alone) == tree_hashes(synth8 / alone.name)
    (other,) = su.make_synthetic_dataset(tmp_path / "b", n_patients=1, seed=1).iterdir()
    first = other / f"{other.name}_1.tif"
    assert (
        cv2.imread(str(first)).tobytes() != cv2.imread(str(alone / f"{alone.name}_1.tif")).tobytes()
    )


def test_synthetic_refuses_to_overwrite(tmp_path):
    """An existing kaggle_3m is refused before any work, leaving no kaggle_3m.* staging folder."""
    root = tmp_path / "set"
    (root / "kaggle_3m").mkdir(parents=True)
    with pytest.raises(DataError, match=re.escape(str(root / "kaggle_3m"))):
        su.make_synthetic_dataset(root, n_patients=1)
    assert sorted(p.name for p in root.iterdir()) == ["kaggle_3m"]


def test_synthetic_interrupted_generation_cleans_up(tmp_path, monkeypatch):
    """Ctrl-C while the second patient is made, the first one written: no partial set is left."""
    root = tmp_path / "set"
    smooth_noise = seg_synthetic.smooth_noise

    def interrupted(*args):
        if any(root.rglob("*_mask.tif")):
            raise KeyboardInterrupt
        return smooth_noise(*args)

    monkeypatch.setattr(seg_synthetic, "smooth_noise", interrupted)
    with pytest.raises(KeyboardInterrupt):
        su.make_synthetic_dataset(root, n_patients=3)
    assert list(root.iterdir()) == []


# ----------------------------------------------------------------------------- scanning


def test_scan_numeric_order_patient_order_and_either_folder(tmp_path):
    kaggle = tmp_path / "data" / "kaggle_3m"
    for patient, numbers in (("PB_2", [10, 2, 9, 1, 11]), ("PA_1", [3, 1, 2])):
        folder = kaggle / patient
        folder.mkdir(parents=True)
        for n in numbers:  # scan_dataset only looks at names
            (folder / f"{patient}_{n}.tif").touch()
            (folder / f"{patient}_{n}_mask.tif").touch()
    (kaggle / "data.csv").write_text("not a folder\n")
    (kaggle / ".ipynb_checkpoints").mkdir()  # hidden folders are no patients
    for root in (tmp_path / "data", kaggle):
        records = su.scan_dataset(root)
        assert [(r.patient, r.slice_index) for r in records] == [
            ("PA_1", 1),
            ("PA_1", 2),
            ("PA_1", 3),
            ("PB_2", 1),
            ("PB_2", 2),
            ("PB_2", 9),
            ("PB_2", 10),
            ("PB_2", 11),
        ]
        for r in records:
            assert r.image_path == kaggle / r.patient / f"{r.patient}_{r.slice_index}.tif"
            assert r.mask_path == kaggle / r.patient / f"{r.patient}_{r.slice_index}_mask.tif"


def test_tiff_and_upper_case_extensions(tmp_path):
    """A patient is not dropped (and the split not reshuffled) for writing .tiff or .TIF."""
    folder = tmp_path / "kaggle_3m"
    for value, (patient, suffix) in enumerate([("A", ".tif"), ("B", ".tiff"), ("C", ".TIF")]):
        image, mask = write_pair(
            folder, patient, 1, image=np.full((64, 64, 3), 10 * value, np.uint8)
        )
        image.rename(image.with_suffix(suffix))
        mask.rename(mask.with_suffix(suffix.upper()))
    records = su.scan_dataset(tmp_path)
    assert [(r.patient, r.image_path.suffix, r.mask_path.suffix) for r in records] == [
        ("A", ".tif", ".TIF"),
        ("B", ".tiff", ".TIFF"),
        ("C", ".TIF", ".TIF"),
    ]
    assert [int(v.image.max()) for v in su.load_volumes(records, progress=False)] == [0, 10, 20]


# ----------------------------------------------------------------------------- splits


def test_split_by_patient_properties():
    patients = [f"P{i:02d}" for i in range(50)]
    records = fake_records(patients, 3)
    split = su.split_by_patient(records, seed=0)
    assert list(split) == ["train", "val", "test"]
    groups = patients_of(split)
    assert not set(groups["train"]) & set(groups["val"])
    assert not set(groups["train"]) & set(groups["test"])
    assert not set(groups["val"]) & set(groups["test"])
    all_split = [r for recs in split.values() for r in recs]
    assert sorted(all_split, key=records.index) == records  # each record exactly once
    assert [len(groups[k]) for k in ("train", "val", "test")] == [35, 5, 10]
    assert patients_of(su.split_by_patient(list(reversed(records)), seed=0)) == groups
    assert patients_of(su.split_by_patient(records, seed=1)) != groups
    other = patients_of(su.split_by_patient(records, fractions=(0.5, 0.25, 0.25), seed=0))
    assert [len(other[k]) for k in ("train", "val", "test")] == [25, 12, 13]


def test_split_of_a_few_patients_keeps_every_split():
    """Rounding must not leave validation (or test) empty."""
    for n in range(3, 12):
        records = fake_records([f"P{i}" for i in range(n)], 1)
        groups = patients_of(su.split_by_patient(records, seed=0))
        assert all(groups.values()), groups
        assert sorted(sum(groups.values(), [])) == sorted(r.patient for r in records)


def test_split_reproduces_split_json(lgg_dir):
    spec = json.loads((lgg_dir / "split.json").read_text())
    expected = {name: sorted(ids) for name, ids in spec["splits"].items()}
    names = sorted(set().union(*expected.values()))
    assert len(names) == 110
    assert [len(expected[k]) for k in ("train", "val", "test")] == [77, 11, 22]
    records = fake_records(names)
    fractions = tuple(spec["fractions"][k] for k in ("train", "val", "test"))
    assert patients_of(su.split_by_patient(records, fractions, seed=spec["seed"])) == expected
    assert patients_of(su.split_by_patient(records, seed=0)) == expected


# ----------------------------------------------------------------------------- reading


def test_read_slice_channel_order(tmp_path):
    """Files hold BGR (as OpenCV writes them); read_slice gives the channels in CHANNELS order."""
    folder = tmp_path / "kaggle_3m" / "P"
    folder.mkdir(parents=True)
    rgb = np.zeros((48, 40, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 20, 30
    Image.fromarray(rgb, "RGB").save(folder / "P_1.tif")
    mask = np.zeros((48, 40), np.uint8)
    mask[5:9, 5:9] = 255
    Image.fromarray(mask, "L").save(folder / "P_1_mask.tif")
    (record,) = su.scan_dataset(tmp_path)
    image, m = su.read_slice(record)
    assert image.shape == (48, 40, 3) and image.dtype == np.uint8
    assert [int(image[..., c].max()) for c in range(3)] == [10, 20, 30]
    assert [int(image[..., c].min()) for c in range(3)] == [10, 20, 30]
    assert m.dtype == np.uint8 and set(np.unique(m).tolist()) == {0, 1} and m.sum() == 16


def extract_first_patient(archive: Path, dest: Path) -> str:
    """Unpack only the first patient folder of one archive, as unpack_lgg.py would."""
    patient = None
    with tarfile.open(archive, "r:xz") as tar:
        for member in tar:  # an xz stream reads front to back: stop as soon as we are past it
            name = PurePosixPath(member.name)
            if not member.isfile() or len(name.parts) != 3 or name.parts[0] != "kaggle_3m":
                continue
            if patient is None:
                patient = name.parts[1]
            elif name.parts[1] != patient:
                break
            data = tar.extractfile(member).read()
            out = dest / name
            out.parent.mkdir(parents=True, exist_ok=True)
            if name.suffix == ".webp":
                Image.open(io.BytesIO(data)).convert("RGB").save(out.with_suffix(".tif"))
            elif name.suffix == ".png":
                Image.open(io.BytesIO(data)).convert("L").save(out.with_suffix(".tif"))
    assert patient is not None, f"no patient folder in {archive}"
    return patient


def test_real_patient_loads(lgg_dir, tmp_path):
    patient = extract_first_patient(lgg_dir / "lgg_kaggle_3m_webp.part1.tar.xz", tmp_path)
    records = su.scan_dataset(tmp_path)
    assert {r.patient for r in records} == {patient}
    (vol,) = su.load_volumes(records, progress=False)
    assert vol.patient == patient
    assert vol.image.shape[1:] == (256, 256, 3) and vol.image.dtype == np.uint8
    assert vol.mask.shape == vol.image.shape[:3]
    assert set(np.unique(vol.mask).tolist()) == {0, 1}
    assert vol.slices == list(range(1, len(vol.slices) + 1))
    assert 20 <= len(vol.slices) <= 88


def test_resolve_data_dir_prefers_real_data(tmp_path):
    write_pair(tmp_path / "kaggle_3m", "P", 1)
    assert su.resolve_data_dir(env_value="", data_root=tmp_path) == tmp_path / "kaggle_3m"
    assert su.resolve_data_dir(env_value=str(tmp_path)) == tmp_path / "kaggle_3m"


def test_resolve_data_dir_bad_env_value():
    with pytest.raises(DataError, match="/nonexistent.*LGG_DATA"):
        su.resolve_data_dir(env_value="/nonexistent")


def test_resolve_data_dir_uses_the_set_a_process_beside_it_made_first(tmp_path, monkeypatch):
    def made_meanwhile(root, n_patients):  # another process renamed its set into place first
        (root / "kaggle_3m").mkdir(parents=True)
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(su, "make_synthetic_dataset", made_meanwhile)
    found = su.resolve_data_dir(env_value="", data_root=tmp_path)
    assert found == tmp_path / "synthetic" / "kaggle_3m"

    def failed(root, n_patients):  # a real failure (disk full, say) still says so
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(su, "make_synthetic_dataset", failed)
    with pytest.raises(OSError, match="No space"):
        su.resolve_data_dir(env_value="", data_root=tmp_path / "other")


# ----------------------------------------------------------------------------- bad input


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape(str(missing)) + " does not exist"):
        su.scan_dataset(missing)


def test_data_folder_without_patient_folders(tmp_path):
    (tmp_path / "notes.txt").write_text("no patients here")
    with pytest.raises(DataError, match=re.escape(str(tmp_path)) + " has no patient folders"):
        su.scan_dataset(tmp_path)


def test_patient_folder_without_images(tmp_path):
    write_pair(tmp_path / "kaggle_3m", "A", 1)
    (tmp_path / "kaggle_3m" / "B").mkdir()
    (tmp_path / "kaggle_3m" / "B" / "B_1.png").touch()  # not a .tif: not a slice
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "kaggle_3m" / "B")) + " holds no"):
        su.scan_dataset(tmp_path)


def test_image_without_mask(tmp_path):
    image_path, mask_path = write_pair(tmp_path / "kaggle_3m", "P", 2)
    write_pair(tmp_path / "kaggle_3m", "P", 1)
    mask_path.unlink()
    with pytest.raises(DataError, match=re.escape(str(image_path)) + " has no matching mask"):
        su.scan_dataset(tmp_path)


def test_mask_without_image(tmp_path):
    image_path, mask_path = write_pair(tmp_path / "kaggle_3m", "P", 1)
    image_path.unlink()
    with pytest.raises(DataError, match=re.escape(str(mask_path)) + " has no matching image"):
        su.scan_dataset(tmp_path)


@pytest.mark.parametrize("name", ["notes.tif", "Q_1.tif", "P_1_seg.tif", "P_x.tif", "P.tif"])
def test_unexpected_tif_name(tmp_path, name):
    write_pair(tmp_path / "kaggle_3m", "P", 1)
    odd = tmp_path / "kaggle_3m" / "P" / name
    odd.touch()
    with pytest.raises(DataError, match=re.escape(f"{odd}: expected P_<n>.tif or P_<n>_mask.tif")):
        su.scan_dataset(tmp_path)


def test_slice_number_written_two_ways(tmp_path):
    """P_5.tif and P_05.tif are both slice 5: pairing them by number would mix masks up."""
    folder = tmp_path / "kaggle_3m" / "P"
    image, mask = write_pair(folder.parent, "P", 5)
    image.rename(folder / "P_05.tif")
    mask.rename(folder / "P_05_mask.tif")
    write_pair(folder.parent, "P", 5)
    message = f"{folder / 'P_05.tif'} and {folder / 'P_5.tif'} are both slice 5"
    with pytest.raises(DataError, match=re.escape(message)):
        su.scan_dataset(tmp_path)


def test_unreadable_patient_folder(tmp_path, monkeypatch):
    write_pair(tmp_path / "kaggle_3m", "A", 1)
    locked = tmp_path / "kaggle_3m" / "B"
    locked.mkdir()
    iterdir = Path.iterdir

    def refuse(self):  # chmod 0 does not stop root: refuse as the file system would
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(DataError, match=re.escape(str(locked)) + ".*Permission denied"):
        su.scan_dataset(tmp_path)


@pytest.mark.parametrize("what", ["patient folder", "slice file"])
def test_dangling_symlink(tmp_path, what):
    write_pair(tmp_path / "kaggle_3m", "A", 1)
    if what == "patient folder":
        link = tmp_path / "kaggle_3m" / "B"
    else:
        link = tmp_path / "kaggle_3m" / "A" / "A_2.tif"
        write_pair(tmp_path / "kaggle_3m", "A", 2)[0].unlink()
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(DataError, match=re.escape(str(link)) + " is a broken link"):
        su.scan_dataset(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated opencv", "truncated pillow"])
def test_unreadable_or_truncated_image(tmp_path, damage):
    """OpenCV writes a TIFF's directory at the end, Pillow at the start: cut either short."""
    folder = tmp_path / "kaggle_3m"
    image_path, _ = write_pair(folder, "P", 1)
    write_pair(folder, "P", 2)
    rgb = np.random.default_rng(1).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    if damage == "garbage":
        image_path.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        if damage == "truncated pillow":
            Image.fromarray(rgb).save(image_path)
        else:
            cv2.imwrite(str(image_path), rgb)
        data = image_path.read_bytes()
        image_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=re.escape(str(image_path)) + ".*replace it"):
        load_all(tmp_path)


def mask_with_values(*values) -> np.ndarray:
    mask = np.zeros((64, 64), np.uint8)
    for row, value in enumerate(values):
        mask[row] = value
    return mask


@pytest.mark.parametrize(
    "pair, file, message",
    [
        pytest.param(
            dict(image=np.zeros((64, 64), np.uint8)),
            "image",
            "expected a 3-channel image",
            id="one channel",
        ),
        pytest.param(
            dict(image=np.full((64, 64, 3), 1000, np.uint16)),
            "image",
            "expected 8-bit pixels, found uint16",
            id="16-bit",
        ),
        pytest.param(dict(size=16), "image", "16x16 px is too small", id="too small"),
        pytest.param(
            dict(mask=np.zeros((32, 64), np.uint8)),
            "mask",
            "mask shape (32, 64) != image (64, 64)",
            id="mask shape",
        ),
        pytest.param(
            dict(mask=mask_with_values(1, 128)),
            "mask",
            "mask values must be 0 or 255",
            id="mask values",
        ),
    ],
)
def test_bad_slice_file_named(tmp_path, pair, file, message):
    image_path, mask_path = write_pair(tmp_path / "kaggle_3m", "P", 1, **pair)
    path = image_path if file == "image" else mask_path
    with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
        load_all(tmp_path)


def test_slices_of_one_patient_with_different_sizes(tmp_path):
    """One odd-sized slice must give a DataError naming the file, not a bare NumPy error."""
    write_pair(tmp_path / "kaggle_3m", "P", 1, size=64)
    odd, _ = write_pair(tmp_path / "kaggle_3m", "P", 2, size=96)
    with pytest.raises(DataError, match=re.escape(str(odd)) + ".*differs"):
        load_all(tmp_path)


# ----------------------------------------------------------------------------- preparation


def test_brain_box_known_answer():
    """A 40 x 20 bright block (rows 20-59, columns 30-49) over faint noise: with no margin the
    box is the 40 x 40 square centred on the block."""
    image = np.full((2, 100, 100, 3), 5, np.uint8)  # faint background, under 10% of the maximum
    image[1, 20:60, 30:50] = 200
    assert su.brain_box(image, margin=0) == (20, 60, 20, 60)
    y0, y1, x0, x1 = su.brain_box(image)  # the default margin widens the square on every side
    assert y0 < 20 and y1 > 60 and x0 < 20 and x1 > 60 and y1 - y0 == x1 - x0


def test_crop_box_pads_outside_the_image():
    array = np.arange(1, 101, dtype=np.float32).reshape(1, 10, 10)
    out = su.crop_box(array, (-2, 8, 5, 15))  # 2 rows above the image, 5 columns to its right
    assert out.shape == (1, 10, 10)
    assert (out[0, :2] == 0).all() and (out[0, :, 5:] == 0).all()
    np.testing.assert_array_equal(out[0, 2:, :5], array[0, :8, 5:])


@pytest.mark.parametrize("box", [(20, 60, 20, 60), (-10, 50, 30, 90)], ids=["inside", "past edges"])
def test_crop_then_uncrop_is_the_identity_inside_the_box(box):
    prob = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    cropped = su.crop_box(prob, box)  # at the box's own size: no resizing
    back = su.uncrop(cropped, box, (64, 64))
    y0, y1, x0, x1 = box
    inside = np.zeros((64, 64), bool)
    inside[max(y0, 0) : y1, max(x0, 0) : x1] = True
    np.testing.assert_allclose(back[:, inside], prob[:, inside], atol=1e-6)
    assert (back[:, ~inside] == 0).all()


def test_prepare_then_uncrop_puts_the_mask_back_on_the_original_pixels(volumes8):
    vol = volumes8[0]
    prepared = su.prepare(vol.image, su.Preprocess(size=64), vol.mask, vol.patient)
    assert prepared.image.shape == (len(vol.image), 64, 64, 3)
    assert prepared.box != (0, 256, 0, 256)  # cropped to the head
    back = su.uncrop(prepared.mask.astype(np.float32), prepared.box, prepared.shape) >= 0.5
    assert su.dice_score(back, vol.mask) > 0.9  # only resampling blur is lost


def test_prepare_refuses_what_is_not_a_scan():
    with pytest.raises(ValueError, match=r"\(D, H, W, 3\) uint8, not \(2, 32, 32\) uint8"):
        su.prepare(np.zeros((2, 32, 32), np.uint8), su.Preprocess(size=32))


def test_per_scan_normalisation_known_answer():
    """Values 0..99 per channel: p10 = 9.9 and p99 = 98.01 (linear percentiles); the normalised
    scan has mean 0 and standard deviation 1 per channel, and twice as bright a scan gives
    the same network input: the point of normalising each scan on its own."""
    image = np.repeat(np.arange(100, dtype=np.uint8).reshape(1, 10, 10, 1), 3, axis=3)
    norm = su.volume_norm(image)
    np.testing.assert_allclose(norm[:2], [[9.9] * 3, [98.01] * 3], rtol=1e-6)
    x = su.normalise(image, norm)
    np.testing.assert_allclose(x.mean((0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(x.std((0, 1, 2)), 1, atol=1e-4)
    brighter = image * 2
    np.testing.assert_allclose(su.normalise(brighter, su.volume_norm(brighter)), x, atol=1e-5)


# ----------------------------------------------------------------------------- slice data set


def test_slice_dataset_items(volumes8):
    pre = su.Preprocess(size=64, channels=(su.FLAIR, 2))
    volumes = su.prepare_volumes(volumes8[:2], pre)
    dataset = su.SliceDataset(volumes)
    assert dataset.pre == pre
    assert len(dataset) == len(volumes8[0].image) + len(volumes8[1].image)
    tumour_items = 0
    for i in range(len(dataset)):
        image, mask = dataset[i]
        assert image.shape == (2, 64, 64) and mask.shape == (1, 64, 64)
        assert image.dtype == torch.float32 and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        tumour_items += bool(mask.any())
    assert 0 < tumour_items < len(dataset)
    # item i is slice i of the first volume, the channels its Preprocess names, normalised
    z = len(volumes[0].image) // 2
    expected = su.normalise(volumes[0].image[z], volumes[0].norm)[..., [su.FLAIR, 2]]
    np.testing.assert_allclose(dataset[z][0].numpy(), np.moveaxis(expected, -1, 0))


def test_slice_dataset_refuses_volumes_prepared_two_ways():
    image = np.zeros((2, 32, 32, 3), np.uint8)
    one = whole_image_volume(image)
    other = whole_image_volume(image)
    other.pre = su.Preprocess(size=32, crop_brain=False, channels=(su.FLAIR,))
    with pytest.raises(ValueError, match="one Preprocess"):
        su.SliceDataset([one, other])


def test_train_transform_keeps_mask_binary_and_aligned():
    """FLAIR is bright exactly inside the mask: after augmentation the two must still match."""
    size, depth = 96, 4
    yy, xx = np.mgrid[:size, :size]
    blob = ((yy - 38) / 18) ** 2 + ((xx - 30) / 13) ** 2 < 1  # off-centre: flips move it
    rng = np.random.default_rng(0)
    image = rng.integers(20, 60, (depth, size, size, 3)).astype(np.uint8)
    image[..., su.FLAIR] = np.where(blob, 255, 40)
    mask = np.repeat(blob[None], depth, 0).astype(np.uint8)
    volume = whole_image_volume(image, mask)
    norm = volume.norm
    dataset = su.SliceDataset([volume], su.train_transform(seed=0))
    threshold = (0.5 - norm[2, su.FLAIR]) / norm[3, su.FLAIR]  # half-way, in normalised units
    changed = 0
    for draw in range(40):
        x, y = dataset[draw % depth]
        assert set(y.unique().tolist()) <= {0.0, 1.0}
        truth, bright = y[0].bool(), x[su.FLAIR] > threshold
        iou = (truth & bright).sum().item() / (truth | bright).sum().item()
        assert iou > 0.9, f"draw {draw}: IoU {iou:.3f} between mask and bright FLAIR"
        changed += not torch.equal(truth, torch.from_numpy(blob))
    assert changed >= 10, "the transform hardly ever moved anything"


def test_tumour_weights_known_answer():
    """Two patients, half the weight each. A's slices hold 0, 1 and 3 tumour px: with a uniform
    share u a slice weighs (1 - u) * its share of A's tumour + u / 3. B has no tumour: its 2
    slices weigh the same whatever u."""

    def volume(name, areas):
        mask = np.zeros((len(areas), 4, 4), np.uint8)
        for z, area in enumerate(areas):
            mask[z].flat[:area] = 1
        return whole_image_volume(np.zeros((*mask.shape, 3), np.uint8), mask, name)

    dataset = su.SliceDataset([volume("A", [0, 1, 3]), volume("B", [0, 0])])
    quarter = [1 / 24, (1 / 12 + 3 / 16) / 2, (1 / 12 + 9 / 16) / 2, 1 / 4, 1 / 4]
    np.testing.assert_allclose(su.tumour_weights(dataset, 0.25), quarter)
    np.testing.assert_allclose(su.tumour_weights(dataset, 1.0), [1 / 6] * 3 + [1 / 4] * 2)
    np.testing.assert_allclose(su.tumour_weights(dataset, 0.0), [0, 1 / 8, 3 / 8, 1 / 4, 1 / 4])


@pytest.mark.parametrize(
    "spec, channels",
    [("all", (0, 1, 2)), ("flair", (su.FLAIR,)), ("FLAIR, t1c", (1, 2)), ("2,0", (0, 2))],
)
def test_parse_channels_known_answers(spec, channels):
    assert su.parse_channels(spec) == channels
    assert su.Preprocess(channels=list(channels)).channels == channels  # a list from JSON too


@pytest.mark.parametrize("spec", ["t2", "flair,5", ""])
def test_channels_the_model_cannot_read_are_refused(spec):
    with pytest.raises(ValueError, match="channel"):
        su.parse_channels(spec)


def test_preprocess_refuses_repeated_channels():
    with pytest.raises(ValueError, match="distinct indices"):
        su.Preprocess(channels=(1, 1))
