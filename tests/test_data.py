"""Data layer of seg_utils: synthetic set, scanning, splits, reading, datasets, bad input."""

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
    """8 synthetic patients, seed 0 (the same folder test_model.py trains on)."""
    return synthetic_set(8, 0)


@pytest.fixture(scope="module")
def records8(synth8) -> list[SliceRecord]:
    return su.scan_dataset(synth8)


@pytest.fixture(scope="module")
def volumes8(records8) -> list[su.Volume]:
    return su.load_volumes(records8, progress=False)


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
    assert synth8.name == "kaggle_3m"
    patients = sorted(p.name for p in synth8.iterdir() if p.is_dir())
    assert len(patients) == 8
    assert not list(synth8.parent.glob("kaggle_3m.*")), "staging folder left behind"
    for folder in synth8.iterdir():
        masks = sorted(folder.glob("*_mask.tif"))
        images = sorted(set(folder.glob("*.tif")) - set(masks))
        assert len(images) == len(masks) >= 20
    for vol in volumes8:
        assert vol.image.shape[1:] == (256, 256, 3) and vol.image.dtype == np.uint8
        assert vol.slices == list(range(1, len(vol.slices) + 1))
    # the files themselves: masks exactly {0, 255}, images 256x256x3 uint8
    folder = synth8 / patients[0]
    for path in sorted(folder.glob("*_mask.tif"))[:10]:
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (256, 256) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255}
    image = cv2.imread(str(folder / f"{patients[0]}_1.tif"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8


def test_synthetic_tumour_fraction_and_contiguity(volumes8):
    has_tumour = [vol.mask.reshape(len(vol.mask), -1).any(1) for vol in volumes8]
    fraction = np.concatenate(has_tumour).mean()
    assert 0.15 < fraction < 0.6, f"tumour slice fraction {fraction:.2f}"
    for vol, tumour in zip(volumes8, has_tumour):
        idx = np.flatnonzero(tumour)
        assert len(idx) > 0, f"{vol.patient} has no tumour"
        assert idx.max() - idx.min() + 1 == len(idx), f"{vol.patient}: tumour slices {idx}"
        assert set(np.unique(vol.mask).tolist()) <= {0, 1}


def test_synthetic_flair_brighter_in_tumour(volumes8):
    """The lesion must be visible in FLAIR, or nothing can learn it."""
    for vol in volumes8[:3]:
        flair = vol.image[..., su.FLAIR].astype(float)
        assert flair[vol.mask == 1].mean() > flair[vol.mask == 0].mean() + 50


def test_synthetic_seed_determinism(tmp_path):
    a = su.make_synthetic_dataset(tmp_path / "a", n_patients=1, seed=0)
    b = su.make_synthetic_dataset(tmp_path / "b", n_patients=1, seed=0)
    c = su.make_synthetic_dataset(tmp_path / "c", n_patients=1, seed=1)
    hashes = tree_hashes(a)
    assert hashes and hashes == tree_hashes(b)
    assert sorted(hashes.values()) != sorted(tree_hashes(c).values())
    images_a = [p for p in sorted(a.rglob("*.tif")) if not p.name.endswith("_mask.tif")]
    images_c = [p for p in sorted(c.rglob("*.tif")) if not p.name.endswith("_mask.tif")]
    assert cv2.imread(str(images_a[0])).tobytes() != cv2.imread(str(images_c[0])).tobytes()


def test_synthetic_refuses_to_overwrite(tmp_path):
    """An existing kaggle_3m is refused, without leaving a kaggle_3m.* staging folder behind
    (make_synthetic_dataset should check before generating, and clean up on any failure)."""
    root = tmp_path / "set"
    (root / "kaggle_3m").mkdir(parents=True)
    with pytest.raises(DataError, match=re.escape(str(root / "kaggle_3m"))):
        su.make_synthetic_dataset(root, n_patients=1)
    assert sorted(p.name for p in root.iterdir()) == ["kaggle_3m"], (
        "the refused generation left its staging folder behind"
    )


def test_synthetic_interrupted_generation_cleans_up(tmp_path, monkeypatch):
    """Ctrl-C (or an error) during generation must not leave a partial kaggle_3m.* folder."""
    calls = []

    def patient(rng, depth, size=256):
        calls.append(depth)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return np.zeros((2, 64, 64, 3), np.uint8), np.zeros((2, 64, 64), np.uint8)

    monkeypatch.setattr(seg_synthetic, "_synthetic_patient", patient)
    root = tmp_path / "set"
    with pytest.raises(KeyboardInterrupt):
        su.make_synthetic_dataset(root, n_patients=3)
    assert list(root.iterdir()) == [], "a partial staging folder was left behind"


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
    for root in (tmp_path / "data", kaggle):
        records = su.scan_dataset(root)
        assert [(r.patient, r.slice_index) for r in records] == [
            ("PA_1", 1), ("PA_1", 2), ("PA_1", 3),
            ("PB_2", 1), ("PB_2", 2), ("PB_2", 9), ("PB_2", 10), ("PB_2", 11),
        ]  # fmt: skip
        for r in records:
            assert r.image_path == kaggle / r.patient / f"{r.patient}_{r.slice_index}.tif"
            assert r.mask_path == kaggle / r.patient / f"{r.patient}_{r.slice_index}_mask.tif"


def test_scan_synthetic_records_match_folders(synth8, records8):
    assert su.scan_dataset(synth8.parent) == records8
    assert [r.patient for r in records8] == sorted(r.patient for r in records8)
    for r in records8:
        assert r.image_path.parent.name == r.patient == r.mask_path.parent.name
        assert r.mask_path.name == r.image_path.stem + "_mask.tif"
    n_files = sum(1 for _ in synth8.rglob("*.tif"))
    assert 2 * len(records8) == n_files


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
    for name, fraction in zip(("train", "val", "test"), (0.7, 0.1, 0.2)):
        assert abs(len(groups[name]) - fraction * 50) <= 1
    assert patients_of(su.split_by_patient(records, seed=0)) == groups
    assert patients_of(su.split_by_patient(list(reversed(records)), seed=0)) == groups
    assert patients_of(su.split_by_patient(records, seed=1)) != groups
    other = patients_of(su.split_by_patient(records, fractions=(0.5, 0.25, 0.25), seed=0))
    assert [len(other[k]) for k in ("train", "val", "test")] == [25, 12, 13]


@pytest.mark.parametrize("n", range(3, 12))
def test_split_small_sets_keep_every_split(n):
    """Few patients: rounding must not leave validation (or test) empty."""
    records = fake_records([f"P{i}" for i in range(n)], 1)
    groups = patients_of(su.split_by_patient(records, seed=0))
    assert all(groups.values()), groups
    assert sorted(sum(groups.values(), [])) == sorted(r.patient for r in records)


def test_split_synthetic(records8):
    split = su.split_by_patient(records8, seed=0)
    groups = patients_of(split)
    assert sum(len(g) for g in groups.values()) == 8
    assert all(groups.values()), groups  # 8 patients: every split gets at least one
    assert sum(len(v) for v in split.values()) == len(records8)


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

    from_file = su.load_split_file(lgg_dir / "split.json", records)
    assert patients_of(from_file) == expected
    groups = [set(v) for v in patients_of(from_file).values()]
    assert sum(map(len, groups)) == len(set().union(*groups)) == 110
    assert sum(len(v) for v in from_file.values()) == len(records)

    with pytest.raises(DataError, match="split.json"):
        su.load_split_file(lgg_dir / "split.json", records[: len(records) // 2])


def write_split_file(path: Path, splits: dict) -> Path:
    path.write_text(json.dumps({"seed": 0, "splits": splits}))
    return path


def test_split_file_known_answer(tmp_path):
    path = write_split_file(
        tmp_path / "split.json", {"train": ["A", "B"], "val": ["C"], "test": ["D"]}
    )
    split = su.load_split_file(path, fake_records("ABCD"))
    assert patients_of(split) == {"train": ["A", "B"], "val": ["C"], "test": ["D"]}


def test_split_file_with_a_patient_in_two_splits(tmp_path):
    path = write_split_file(
        tmp_path / "split.json", {"train": ["A", "B"], "val": ["C"], "test": ["B", "D"]}
    )
    with pytest.raises(DataError, match=re.escape(str(path)) + r".*\['B'\].*train and test"):
        su.load_split_file(path, fake_records("ABCD"))


@pytest.mark.parametrize("text", ["{not json", '{"seed": 0}', "[]", ""])
def test_split_file_unreadable(tmp_path, text):
    path = tmp_path / "split.json"
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*splits"):
        su.load_split_file(path, fake_records("ABCD"))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nowhere.json"))):
        su.load_split_file(tmp_path / "nowhere.json", fake_records("ABCD"))


# ----------------------------------------------------------------------------- reading


def test_read_slice_channel_order(tmp_path):
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
    assert (image[..., 0] == 10).all() and (image[..., 1] == 20).all()
    assert (image[..., 2] == 30).all()
    assert m.dtype == np.uint8 and set(np.unique(m).tolist()) == {0, 1}
    assert m.sum() == 16


# ----------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def dataset64(records8) -> su.SliceDataset:
    first_two = sorted({r.patient for r in records8})[:2]
    records = [r for r in records8 if r.patient in first_two]
    return su.SliceDataset.from_records(records, su.Preprocess(size=64), progress=False)


def test_slice_dataset_items(dataset64, records8):
    n_slices = sum(len(v.image) for v in dataset64.volumes)
    assert len(dataset64) == n_slices
    assert len(dataset64.volumes) == 2
    first_two = sorted({r.patient for r in records8})[:2]
    assert n_slices == sum(r.patient in first_two for r in records8)
    tumour_items = 0
    for i in range(len(dataset64)):
        image, mask = dataset64[i]
        assert image.shape == (3, 64, 64) and mask.shape == (1, 64, 64)
        assert image.dtype == torch.float32 and mask.dtype == torch.float32
        assert torch.isfinite(image).all()
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        tumour_items += bool(mask.any())
    assert 0 < tumour_items < len(dataset64)


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


def test_tumour_weights(dataset64):
    weights = su.tumour_weights(dataset64)
    assert torch.equal(weights, su.tumour_weights(dataset64, su.TrainConfig.sampling_uniform))
    assert weights.shape == (len(dataset64),)
    assert weights.sum().item() == pytest.approx(1.0)
    assert (weights > 0).all()
    start = 0
    for vol in dataset64.volumes:
        w = weights[start : start + len(vol.image)].numpy()
        start += len(vol.image)
        assert w.sum() == pytest.approx(1 / len(dataset64.volumes))
        tumour = vol.mask.reshape(len(vol.mask), -1).any(1)
        assert tumour.any() and (~tumour).any()
        assert w[tumour].min() > w[~tumour].max()
        assert np.allclose(w[~tumour], w[~tumour][0])  # empty slices share the uniform part


def test_tumour_weights_all_uniform_and_all_by_area(dataset64):
    """uniform=1: every slice of a patient equally likely; 0: tumour-free slices never drawn."""
    even, by_area = su.tumour_weights(dataset64, 1.0), su.tumour_weights(dataset64, 0.0)
    start = 0
    for vol in dataset64.volumes:
        n = len(vol.image)
        tumour = vol.mask.reshape(n, -1).any(1)
        area = vol.mask.reshape(n, -1).sum(1)
        assert np.allclose(even[start : start + n], 1 / n / len(dataset64.volumes))
        assert (by_area[start : start + n][~tumour] == 0).all()
        assert np.allclose(by_area[start : start + n], area / area.sum() / len(dataset64.volumes))
        start += n


def test_tumour_weights_known_answer():
    """Two patients, half the weight each. A's slices hold 0, 1 and 3 tumour px: with a uniform
    share of 0.25 a slice weighs 0.75 * its share of A's tumour + 0.25 / 3, so 1/12, 1/12 + 3/16
    and 1/12 + 9/16, halved. B has no tumour: its 2 slices weigh the same, 1/4 each."""

    def volume(name, areas):
        mask = np.zeros((len(areas), 4, 4), np.uint8)
        for z, area in enumerate(areas):
            mask[z].flat[:area] = 1
        return whole_image_volume(np.zeros((*mask.shape, 3), np.uint8), mask, name)

    dataset = su.SliceDataset([volume("A", [0, 1, 3]), volume("B", [0, 0])])
    expected = [1 / 24, (1 / 12 + 3 / 16) / 2, (1 / 12 + 9 / 16) / 2, 1 / 4, 1 / 4]
    np.testing.assert_allclose(su.tumour_weights(dataset, 0.25), expected)


# ----------------------------------------------------------------------------- bad input


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        su.scan_dataset(missing)


def test_empty_data_folder(tmp_path):
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        su.scan_dataset(tmp_path)


def test_patient_folders_without_images(tmp_path):
    (tmp_path / "kaggle_3m" / "P").mkdir(parents=True)
    (tmp_path / "kaggle_3m" / "P" / "P_1.png").touch()
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        su.scan_dataset(tmp_path)


def test_image_without_mask(tmp_path):
    image_path, mask_path = write_pair(tmp_path / "kaggle_3m", "P", 2)
    write_pair(tmp_path / "kaggle_3m", "P", 1)
    mask_path.unlink()
    with pytest.raises(DataError, match=re.escape(str(image_path)) + ".*no matching mask"):
        su.scan_dataset(tmp_path)


def test_mask_without_image(tmp_path):
    image_path, mask_path = write_pair(tmp_path / "kaggle_3m", "P", 1)
    image_path.unlink()
    with pytest.raises(DataError, match=re.escape(str(mask_path)) + ".*no matching image"):
        su.scan_dataset(tmp_path)


@pytest.mark.parametrize("name", ["notes.tif", "Q_1.tif", "P_1_seg.tif", "P_x.tif", "P.tif"])
def test_unexpected_tif_name(tmp_path, name):
    write_pair(tmp_path / "kaggle_3m", "P", 1)
    odd = tmp_path / "kaggle_3m" / "P" / name
    odd.touch()
    with pytest.raises(DataError, match=re.escape(str(odd))):
        su.scan_dataset(tmp_path)


def test_slice_number_written_two_ways(tmp_path):
    """P_5.tif and P_05.tif are both slice 5: pairing them by number would mix masks up."""
    folder = tmp_path / "kaggle_3m"
    image, mask = write_pair(folder, "P", 5, image=np.full((64, 64, 3), 200, np.uint8))
    image.rename(folder / "P" / "P_05.tif")
    mask.rename(folder / "P" / "P_05_mask.tif")
    write_pair(folder, "P", 5)
    with pytest.raises(DataError, match=re.escape(str(folder / "P" / "P_05.tif")) + " and "
                       + re.escape(str(folder / "P" / "P_5.tif")) + ".*both slice 5"):  # fmt: skip
        su.scan_dataset(tmp_path)


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
        ("A", ".tif", ".TIF"), ("B", ".tiff", ".TIFF"), ("C", ".TIF", ".TIF")
    ]  # fmt: skip
    assert [int(v.image.max()) for v in su.load_volumes(records, progress=False)] == [0, 10, 20]


def test_empty_patient_folder(tmp_path):
    write_pair(tmp_path / "kaggle_3m", "A", 1)
    (tmp_path / "kaggle_3m" / "B").mkdir()
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "kaggle_3m" / "B")) + " holds no"):
        su.scan_dataset(tmp_path)


def test_unreadable_patient_folder(tmp_path, monkeypatch):
    write_pair(tmp_path / "kaggle_3m", "A", 1)
    locked = tmp_path / "kaggle_3m" / "B"
    locked.mkdir()
    locked.chmod(0)  # root reads it all the same: make iterdir refuse as for any other user
    iterdir = Path.iterdir

    def refuse(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(DataError, match=re.escape(str(locked)) + ".*Permission denied"):
        su.scan_dataset(tmp_path)
    locked.chmod(0o755)


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


def test_unreadable_file(tmp_path):
    image_path, _ = write_pair(tmp_path / "kaggle_3m", "P", 1)
    image_path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataError, match=re.escape(str(image_path))):
        load_all(tmp_path)


@pytest.mark.parametrize("writer", ["opencv", "pillow"])  # IFD at the end / at the start
def test_truncated_tiff(tmp_path, writer):
    folder = tmp_path / "kaggle_3m"
    image_path, _ = write_pair(folder, "P", 1)
    write_pair(folder, "P", 2)
    rgb = np.random.default_rng(1).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    if writer == "pillow":
        Image.fromarray(rgb).save(image_path)
    else:
        cv2.imwrite(str(image_path), rgb)
    data = image_path.read_bytes()
    image_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=re.escape(str(image_path))):
        load_all(tmp_path)


def test_too_small_image(tmp_path):
    image_path, _ = write_pair(tmp_path / "kaggle_3m", "P", 1, size=16)
    with pytest.raises(DataError, match=re.escape(str(image_path)) + ": 16x16 px is too small"):
        load_all(tmp_path)


def test_one_channel_image(tmp_path):
    image_path, _ = write_pair(tmp_path / "kaggle_3m", "P", 1, image=np.zeros((64, 64), np.uint8))
    with pytest.raises(DataError, match=re.escape(str(image_path)) + ".*3-channel"):
        load_all(tmp_path)


def test_sixteen_bit_image(tmp_path):
    image = np.full((64, 64, 3), 1000, np.uint16)
    image_path, _ = write_pair(tmp_path / "kaggle_3m", "P", 1, image=image)
    with pytest.raises(DataError, match=re.escape(str(image_path)) + ".*8-bit"):
        load_all(tmp_path)


def test_mask_shape_differs(tmp_path):
    _, mask_path = write_pair(tmp_path / "kaggle_3m", "P", 1, mask=np.zeros((32, 64), np.uint8))
    with pytest.raises(DataError, match=re.escape(str(mask_path)) + ".*shape"):
        load_all(tmp_path)


def test_mask_values_not_0_255(tmp_path):
    mask = np.zeros((64, 64), np.uint8)
    mask[:8], mask[8:16] = 1, 128
    _, mask_path = write_pair(tmp_path / "kaggle_3m", "P", 1, mask=mask)
    with pytest.raises(DataError, match=re.escape(str(mask_path)) + ".*0 or 255"):
        load_all(tmp_path)


def test_slices_of_one_patient_with_different_sizes(tmp_path):
    """One odd-sized slice must give a DataError naming the file, not a bare NumPy error."""
    write_pair(tmp_path / "kaggle_3m", "P", 1, size=64)
    odd, _ = write_pair(tmp_path / "kaggle_3m", "P", 2, size=96)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "kaggle_3m" / "P"))):
        load_all(tmp_path)  # load_volumes' np.stack raises a bare ValueError naming no file


def test_resolve_data_dir_bad_env_value():
    with pytest.raises(DataError, match="/nonexistent"):
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


def test_resolve_data_dir_prefers_real_data(tmp_path):
    write_pair(tmp_path / "kaggle_3m", "P", 1)
    assert su.resolve_data_dir(env_value="", data_root=tmp_path) == tmp_path / "kaggle_3m"
    assert su.resolve_data_dir(env_value=str(tmp_path)) == tmp_path / "kaggle_3m"


# ----------------------------------------------------------------------------- real data


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
    spec = json.loads((lgg_dir / "split.json").read_text())
    assert any(patient in ids for ids in spec["splits"].values())


# ----------------------------------------------------------------------------- preparation, known answers


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
    rng = np.random.default_rng(0)
    prob = rng.random((3, 64, 64)).astype(np.float32)
    cropped = su.crop_box(prob, box)  # (3, 40 or 60, ...) at the box's own size: no resizing
    back = su.uncrop(cropped, box, (64, 64))
    y0, y1, x0, x1 = box
    inside = np.zeros((64, 64), bool)
    inside[max(y0, 0) : y1, max(x0, 0) : x1] = True
    np.testing.assert_allclose(back[:, inside], prob[:, inside], atol=1e-6)
    assert (back[:, ~inside] == 0).all()


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
