"""Helpers for the brain-tumour U-Net notebooks: data, transforms, model, losses, training,
evaluation and visualisation, in the order the notebooks introduce them.

    import seg_utils as su
    data_dir = su.resolve_data_dir()          # real LGG data if present, else a synthetic set
    records = su.scan_dataset(data_dir)       # one record per image/mask pair

Run `python -m seg_utils data` to find (or generate) the data set and print where it is.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI otherwise
import albumentations as A  # noqa: E402  (must follow the variable above)

CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")  # channel order of every image
FLAIR = 1
CHECKPOINT_FORMAT = "seg_utils.unet.v1"

# ----------------------------------------------------------------------------- data


class DataError(ValueError):
    """A data-set problem that the user can fix; the message names the file and the fix."""


def _reason(error: Exception) -> str:
    """The type and first sentence of an exception, for messages that say what went wrong."""
    text = " ".join(str(error).split()).split("WeightsUnpickler error: ")[-1]  # torch.load's gist
    return f"{type(error).__name__}: {text.split('. ')[0][:240]}"


@dataclass(frozen=True)
class SliceRecord:
    """One image/mask pair on disk."""

    patient: str
    slice_index: int
    image_path: Path
    mask_path: Path


def _smooth_noise(rng: np.random.Generator, shape: tuple, grid: tuple) -> np.ndarray:
    """Low-frequency noise in [-1, 1] of `shape` (D, H, W), upsampled from a coarse `grid`."""
    depth, height, width = shape
    coarse = rng.standard_normal(grid).astype(np.float32)
    planes = np.stack(
        [cv2.resize(c, (width, height), interpolation=cv2.INTER_CUBIC) for c in coarse]
    )
    z = np.linspace(0, grid[0] - 1, depth)
    lo = np.floor(z).astype(int)
    hi = np.minimum(lo + 1, grid[0] - 1)
    frac = (z - lo)[:, None, None].astype(np.float32)
    vol = planes[lo] * (1 - frac) + planes[hi] * frac
    return vol / (np.abs(vol).max() + 1e-6)


def _synthetic_patient(rng: np.random.Generator, depth: int, size: int = 256):
    """One MRI-like head: (D, H, W, 3) uint8 images and (D, H, W) uint8 0/255 masks."""
    z, y, x = np.meshgrid(
        np.linspace(-0.95, 0.95, depth),
        np.linspace(-1, 1, size),
        np.linspace(-1, 1, size),
        indexing="ij",
    )  # each (D, H, W)
    cy, cx = rng.uniform(-0.08, 0.08, 2)
    ry = rng.uniform(0.68, 0.86)
    rx = ry * rng.uniform(0.78, 0.9)  # heads are longer front to back
    section = np.sqrt(np.clip(1 - z**2, 1e-3, None))  # the head's cross-section shrinks at the ends
    wobble = 0.03 * _smooth_noise(rng, z.shape, (4, 6, 6))
    r = np.sqrt(((y - cy) / (ry * section)) ** 2 + ((x - cx) / (rx * section)) ** 2) + wobble
    brain = r < 0.86
    folds = _smooth_noise(rng, z.shape, (max(depth // 3, 2), 20, 20))
    white = brain & (folds > -0.05) & (r < 0.72)
    vx = 0.11 * section
    ventricles = (((np.abs(x - cx) - vx) / 0.05) ** 2 + ((y - cy + 0.05) / 0.22) ** 2 < 1) & (
        np.abs(z - 0.15) < 0.3
    )
    lz = rng.uniform(-0.35, 0.45)
    ly, lx = cy + rng.uniform(-0.35, 0.35) * ry, cx + rng.uniform(-0.4, 0.4) * rx
    rl, rlz = rng.uniform(0.1, 0.28), rng.uniform(0.2, 0.4)
    shape_noise = _smooth_noise(rng, z.shape, (6, 8, 8))
    dl = np.sqrt(((z - lz) / rlz) ** 2 + ((y - ly) / rl) ** 2 + ((x - lx) / (rl * 0.8)) ** 2)
    lesion = (dl + 0.35 * shape_noise < 1) & brain & ~ventricles
    edema = np.clip(1.4 - dl, 0, 1) * brain  # FLAIR brightening that fades around the lesion
    # tissue:        scalp  skull  csf   grey  white  ventricle lesion  (pre, FLAIR, post)
    table = np.array(
        [[0.75, 0.12, 0.15, 0.45, 0.60, 0.10, 0.35],
         [0.45, 0.08, 0.08, 0.50, 0.38, 0.05, 0.85],
         [0.70, 0.12, 0.20, 0.47, 0.58, 0.12, 0.40]],
        dtype=np.float32,
    )  # fmt: skip
    label = np.select(
        [lesion, ventricles, white, brain, r < 0.9, r < 0.96, r < 1.02],
        [6, 5, 4, 3, 2, 1, 0],
        default=-1,
    )
    bias = 1 + 0.15 * _smooth_noise(rng, z.shape, (3, 3, 3))
    texture = 0.06 * _smooth_noise(rng, z.shape, (max(depth // 2, 2), 48, 48))
    images = np.zeros((depth, size, size, 3), np.float32)
    for c in range(3):
        value = np.where(label >= 0, table[c][label], 0.0) + np.where(label >= 2, texture, 0)
        if c == FLAIR:
            value = value + 0.25 * edema * (label >= 3) * (label != 6)
        value = value * bias * rng.uniform(0.8, 1.15)
        noise = rng.normal(0, rng.uniform(0.015, 0.035), value.shape).astype(np.float32)
        images[..., c] = np.abs(value + noise)  # magnitude images have Rician-like noise
    images = np.stack([cv2.GaussianBlur(s, (3, 3), 0.7) for s in images])
    masks = (lesion * 255).astype(np.uint8)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), masks


def make_synthetic_dataset(root: str | Path, n_patients: int = 20, seed: int = 0) -> Path:
    """Write a seeded MRI-like set in the kaggle_3m layout under `root`; return its folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / "kaggle_3m"
    if target.exists():
        raise DataError(f"{target} already exists: delete it to generate a new synthetic set")
    staging = Path(tempfile.mkdtemp(prefix="kaggle_3m.", dir=root))  # atomic: rename at the end
    try:
        for i in tqdm(range(n_patients), desc="synthetic patients", leave=False):
            rng = np.random.default_rng([seed, i])
            patient = f"SYN_P{i:03d}_{seed:04d}"
            images, masks = _synthetic_patient(rng, depth=int(rng.integers(20, 36)))
            folder = staging / patient
            folder.mkdir()
            for n, (image, mask) in enumerate(zip(images, masks), start=1):
                cv2.imwrite(str(folder / f"{patient}_{n}.tif"), image[..., ::-1])  # RGB -> BGR
                cv2.imwrite(str(folder / f"{patient}_{n}_mask.tif"), mask)
        staging.rename(target)
    except BaseException:  # Ctrl-C included: leave no half-written set behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def find_kaggle_dir(root: str | Path) -> Path:
    """Return the folder holding the patient folders: `root` itself or `root/kaggle_3m`."""
    root = Path(root).expanduser()
    hint = (
        "Download the LGG MRI Segmentation set (Kaggle: mateuszbuda/lgg-mri-segmentation) and "
        "point LGG_DATA at its kaggle_3m folder, or unset LGG_DATA to use the synthetic set."
    )
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist. {hint}")
    if (root / "kaggle_3m").is_dir():
        root = root / "kaggle_3m"
    if not any(p.is_dir() for p in root.iterdir()):
        raise DataError(f"data folder {root} has no patient folders. {hint}")
    return root


_NAME = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)


def _listing(folder: Path) -> list[Path]:
    """A folder's entries, sorted; an unreadable folder or a broken link is a DataError."""
    try:
        paths = sorted(folder.iterdir())
    except OSError as e:
        raise DataError(f"{folder} cannot be read ({e.strerror}): fix its permissions") from e
    for path in paths:
        if path.is_symlink() and not path.exists():  # would be skipped or fail later, unnamed
            raise DataError(f"{path} is a broken link: point it at its target, or remove it")
    return paths


def _patient_folders(root: Path) -> list[Path]:
    """Every patient folder under root, sorted (hidden ones such as .ipynb_checkpoints are not)."""
    return [p for p in _listing(root) if p.is_dir() and not p.name.startswith(".")]


def _slice_files(folder: Path) -> tuple[dict, dict]:
    """{slice number: path} of a patient's images and of its masks (.tif/.tiff, any case)."""
    images, masks = {}, {}
    for path in [p for p in _listing(folder) if p.suffix.lower() in (".tif", ".tiff")]:
        match = _NAME.match(path.name)
        if not match or match["patient"] != folder.name:
            raise DataError(f"{path}: expected {folder.name}_<n>.tif or {folder.name}_<n>_mask.tif")
        found = masks if match["mask"] else images
        n = int(match["n"])
        if n in found:  # P_5.tif and P_05.tif: which mask goes with which image is unknown
            raise DataError(f"{found[n]} and {path} are both slice {n}: keep one, remove the other")
        found[n] = path
    if not images and not masks:
        raise DataError(
            f"{folder} holds no {folder.name}_<n>.tif images: add them, or move it away"
        )
    return images, masks


def scan_dataset(root: str | Path) -> list[SliceRecord]:
    """Find every image/mask pair; records sorted by patient, then numeric slice number."""
    records = []
    for folder in _patient_folders(find_kaggle_dir(root)):
        images, masks = _slice_files(folder)
        for n in sorted(set(images) ^ set(masks)):
            have, lack = (images[n], "mask") if n in images else (masks[n], "image")
            raise DataError(f"{have} has no matching {lack}: add it, or remove this file")
        records += [SliceRecord(folder.name, n, images[n], masks[n]) for n in sorted(images)]
    if not records:
        raise DataError(f"no <patient>_<n>.tif images found under {root}")
    return records


def split_by_patient(
    records: list[SliceRecord], fractions=(0.7, 0.1, 0.2), seed: int = 0
) -> dict[str, list[SliceRecord]]:
    """Split records into train/val/test by patient: sorted ids, seeded shuffle, then cut."""
    patients = sorted({r.patient for r in records})
    random.Random(seed).shuffle(patients)
    n_val = max(round(fractions[1] * len(patients)), 1 if len(patients) >= 3 else 0)
    n_train = min(round(fractions[0] * len(patients)), len(patients) - n_val - (n_val > 0))
    groups = {
        "train": set(patients[:n_train]),
        "val": set(patients[n_train : n_train + n_val]),
        "test": set(patients[n_train + n_val :]),
    }
    return {name: [r for r in records if r.patient in ids] for name, ids in groups.items()}


def load_split_file(path: str | Path, records: list[SliceRecord]) -> dict[str, list[SliceRecord]]:
    """Split records by a JSON file {"splits": {"train": [ids], "val": [...], "test": [...]}}."""
    try:
        splits = {
            name: set(ids) for name, ids in json.loads(Path(path).read_text())["splits"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a split file ({_reason(e)}): it must hold "
                        '{"splits": {"train": [ids], "val": [ids], "test": [ids]}}') from e  # fmt: skip
    names = list(splits)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            both = sorted(splits[first] & splits[second])
            if both:
                raise DataError(f"{path} puts {both[:3]}... in both {first} and {second}: "
                                "each patient belongs to one split only")  # fmt: skip
    missing = sorted(set().union(*splits.values()) - {r.patient for r in records})
    if missing:
        raise DataError(f"{path} names patients with no data: {missing[:3]}... check LGG_DATA")
    return {name: [r for r in records if r.patient in ids] for name, ids in splits.items()}


def resolve_data_dir(env_value: str | None = None, data_root: str | Path | None = None) -> Path:
    """Real data from LGG_DATA or data/kaggle_3m if present, else the synthetic set (made once)."""
    env_value = os.environ.get("LGG_DATA", "") if env_value is None else env_value
    if env_value:
        return find_kaggle_dir(env_value)
    data_root = Path(data_root) if data_root else Path(__file__).resolve().parent / "data"
    if (data_root / "kaggle_3m").is_dir():
        return find_kaggle_dir(data_root)
    synthetic = data_root / "synthetic"
    if not (synthetic / "kaggle_3m").is_dir():
        print(f"No real data found: generating the synthetic set in {synthetic}")
        make_synthetic_dataset(
            synthetic, n_patients=int(os.environ.get("SEG_SYNTH_PATIENTS", "20"))
        )
    return synthetic / "kaggle_3m"


def _read(path: Path, what: str) -> np.ndarray:
    """Read a TIFF unchanged, or raise DataError naming the file."""
    if not path.is_file():
        raise DataError(f"{path}: {what} file is missing")
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None or array.size == 0:
        raise DataError(f"{path}: cannot be read as an image (corrupt or truncated?): replace it")
    if array.dtype != np.uint8:
        raise DataError(f"{path}: expected 8-bit pixels, found {array.dtype}")
    return array


def read_slice(record: SliceRecord) -> tuple[np.ndarray, np.ndarray]:
    """Return image (H, W, 3) uint8 in file order (pre, FLAIR, post) and mask (H, W) uint8 0/1."""
    image = _read(record.image_path, "image")
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{record.image_path}: expected a 3-channel image, got shape {image.shape}")
    if min(image.shape[:2]) < 32:  # the crop, resize and U-Net pooling need room
        raise DataError(f"{record.image_path}: {image.shape[1]}x{image.shape[0]} px is too small "
                        "(at least 32x32): replace it, or remove this slice and its mask")  # fmt: skip
    mask = _read(record.mask_path, "mask")
    if mask.shape != image.shape[:2]:
        raise DataError(f"{record.mask_path}: mask shape {mask.shape} != image {image.shape[:2]}")
    values = np.unique(mask)
    if not set(values.tolist()) <= {0, 255}:
        raise DataError(f"{record.mask_path}: mask values must be 0 or 255, found {values[:5]}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB), (mask > 0).astype(np.uint8)


@dataclass
class Volume:
    """All slices of one patient at the original resolution."""

    patient: str
    slices: list[int]
    image: np.ndarray  # (D, H, W, 3) uint8
    mask: np.ndarray  # (D, H, W) uint8 in {0, 1}


def load_volumes(records: list[SliceRecord], progress: bool = True) -> list[Volume]:
    """Read every patient's slices into memory, one Volume per patient, in record order."""
    by_patient: dict[str, list[SliceRecord]] = {}
    for r in records:
        by_patient.setdefault(r.patient, []).append(r)
    volumes = []
    for patient, recs in tqdm(by_patient.items(), desc="loading", disable=not progress):
        recs = sorted(recs, key=lambda r: r.slice_index)
        pairs = [read_slice(r) for r in recs]
        for r, (image, _) in zip(recs, pairs):
            if image.shape != pairs[0][0].shape:
                raise DataError(f"{r.image_path}: size {image.shape} differs from "
                                f"{recs[0].image_path} {pairs[0][0].shape} of the same patient")  # fmt: skip
        images = np.stack([p[0] for p in pairs])
        masks = np.stack([p[1] for p in pairs])
        volumes.append(Volume(patient, [r.slice_index for r in recs], images, masks))
    return volumes


# ----------------------------------------------------------------------------- transforms


@dataclass
class Preprocess:
    """How a volume becomes network input; saved in every checkpoint."""

    size: int = 128  # training size: 128 px matched 192 px in Dice at half the time
    crop_brain: bool = True  # crop each volume to its brain's bounding box first
    normalisation: str = "volume"  # "volume": each scan's own p10-p99 + z-score; "global"
    mean: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # "global" only: train split
    std: list = field(default_factory=lambda: [1.0, 1.0, 1.0])
    channels: list = field(default_factory=lambda: [0, 1, 2])  # network input: CHANNELS indices

    def __post_init__(self):
        valid = len(set(self.channels)) == len(self.channels) > 0
        if not valid or not set(self.channels) <= set(range(len(CHANNELS))):
            raise ValueError(f"channels: distinct indices into {CHANNELS}, not {self.channels}")


@dataclass
class PreparedVolume:
    """A volume cropped and resized for the network, with what is needed to undo it."""

    patient: str
    image: np.ndarray  # (D, S, S, 3) uint8
    mask: np.ndarray  # (D, S, S) uint8 in {0, 1}
    box: tuple  # (y0, y1, x0, x1) square crop in original pixels; may reach past the edges
    shape: tuple  # original (H, W)
    norm: np.ndarray  # (4, 3) float32 rows lo, hi, mean, std per channel
    channels: tuple = (0, 1, 2)  # which of the 3 channels the network gets (Preprocess.channels)


def brain_box(image: np.ndarray, margin: float = 0.04) -> tuple:
    """Square (y0, y1, x0, x1) around pixels above 10% of the volume's max, over all slices."""
    projection = image.max(axis=(0, 3)).astype(np.float32)  # (H, W)
    ys, xs = np.nonzero(projection > 0.1 * projection.max())
    if len(ys) == 0:
        return (0, image.shape[1], 0, image.shape[2])
    side = int(max(ys.max() - ys.min(), xs.max() - xs.min()) * (1 + 2 * margin)) + 1
    cy, cx = (ys.min() + ys.max() + 1) // 2, (xs.min() + xs.max() + 1) // 2
    return (cy - side // 2, cy - side // 2 + side, cx - side // 2, cx - side // 2 + side)


def crop_box(array: np.ndarray, box: tuple) -> np.ndarray:
    """Crop (D, H, W, ...) to box, padding with zeros where the box leaves the image."""
    y0, y1, x0, x1 = box
    height, width = array.shape[1:3]
    pad = [(0, 0), (max(0, -y0), max(0, y1 - height)), (max(0, -x0), max(0, x1 - width))]
    padded = np.pad(array, pad + [(0, 0)] * (array.ndim - 3))
    return padded[:, y0 + pad[1][0] : y1 + pad[1][0], x0 + pad[2][0] : x1 + pad[2][0]]


def volume_norm(image: np.ndarray, pre: Preprocess) -> np.ndarray:
    """Per-channel (lo, hi, mean, std): p10-p99 rescale + z-score of this volume, or global."""
    if pre.normalisation == "global":
        return np.array([[0, 0, 0], [255, 255, 255], pre.mean, pre.std], np.float32)
    norm = np.zeros((4, 3), np.float32)
    for c in range(3):
        lo, hi = np.percentile(image[..., c], [10, 99])
        hi = max(hi, lo + 1.0)
        scaled = np.clip((image[..., c] - lo) / (hi - lo), 0, 1)
        norm[:, c] = lo, hi, scaled.mean(), max(scaled.std(), 1e-3)
    return norm


def normalise(image: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Map uint8 (..., 3) to float32 network input with a volume's (4, 3) norm rows."""
    lo, hi, mean, std = norm
    return ((np.clip((image.astype(np.float32) - lo) / (hi - lo), 0, 1) - mean) / std).astype(
        np.float32
    )


def global_stats(volumes: list[PreparedVolume]) -> tuple[list, list]:
    """Per-channel mean and std of x/255 over the given (training!) volumes."""
    pixels = np.concatenate([v.image.reshape(-1, 3) for v in volumes]).astype(np.float32) / 255
    return pixels.mean(0).tolist(), pixels.std(0).tolist()


def prepare_volume(volume: Volume, pre: Preprocess) -> PreparedVolume:
    """Crop a volume to the brain (optional) and resize every slice to pre.size."""
    height, width = volume.image.shape[1:3]
    box = brain_box(volume.image) if pre.crop_brain else (0, height, 0, width)
    image, mask = crop_box(volume.image, box), crop_box(volume.mask, box)
    size = (pre.size, pre.size)
    image = np.stack([cv2.resize(s, size, interpolation=cv2.INTER_AREA) for s in image])
    mask = np.stack(
        [cv2.resize(m.astype(np.float32), size, interpolation=cv2.INTER_AREA) > 0.5 for m in mask]
    ).astype(np.uint8)
    return PreparedVolume(volume.patient, image, mask, box, (height, width),
                          volume_norm(image, pre), tuple(pre.channels))  # fmt: skip


def prepare_volumes(volumes: list[Volume], pre: Preprocess) -> list[PreparedVolume]:
    """prepare_volume for a list; for "global" normalisation fit pre.mean/std on these first."""
    prepared = [prepare_volume(v, pre) for v in volumes]
    if pre.normalisation == "global" and pre.mean == [0.0, 0.0, 0.0]:
        pre.mean, pre.std = global_stats(prepared)  # call this on the train split first
        for p in prepared:
            p.norm = volume_norm(p.image, pre)
    return prepared


def train_transform(seed: int | None = None) -> A.Compose:
    """Augmentations that keep anatomy plausible: flip, small scale/rotate, brightness/contrast."""
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),  # left and right hemispheres are mirror images
            A.Affine(scale=(0.95, 1.05), rotate=(-15, 15), translate_percent=(-0.04, 0.04), p=0.7),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ],
        seed=seed,
    )


class SliceDataset(torch.utils.data.Dataset):
    """2D slices of prepared volumes as (image (C, S, S), mask (1, S, S)) float32 tensors."""

    def __init__(self, volumes: list[PreparedVolume], transform: A.Compose | None = None):
        self.volumes = volumes
        self.transform = transform
        self.index = [(v, z) for v, vol in enumerate(volumes) for z in range(len(vol.image))]

    @classmethod
    def from_records(cls, records, pre: Preprocess, transform=None, progress=True):
        """Load, crop, resize and normalise the records' volumes, then index their slices."""
        return cls(prepare_volumes(load_volumes(records, progress), pre), transform)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        v, z = self.index[i]
        volume = self.volumes[v]
        image, mask = volume.image[z], volume.mask[z]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        image = normalise(image, volume.norm)[..., list(volume.channels)]  # (S, S, C)
        image = image.transpose(2, 0, 1)  # (C, S, S)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(
            mask[None].astype(np.float32)
        )


def tumour_weights(dataset: SliceDataset, uniform: float = 0.1) -> torch.Tensor:
    """Sampling weight per slice: each patient equally, then slices by tumour area + uniform."""
    weights = []
    for vol in dataset.volumes:
        area = vol.mask.reshape(len(vol.mask), -1).sum(1).astype(np.float64)  # (D,)
        area = area / area.sum() if area.sum() > 0 else np.full_like(area, 1 / len(area))
        per_slice = (1 - uniform) * area + uniform / len(area)
        weights.append(per_slice / len(dataset.volumes))
    return torch.from_numpy(np.concatenate(weights))


def _seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own, reproducible augmentation stream."""
    info = torch.utils.data.get_worker_info()
    if info.dataset.transform is not None:
        info.dataset.transform.set_random_seed(info.seed % 2**31)


# ----------------------------------------------------------------------------- model


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by BatchNorm and ReLU; keeps H and W."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015): an encoder that halves H, W `depth` times, a decoder
    that doubles them back, and skip connections that hand fine detail across."""

    def __init__(self, in_channels=3, out_channels=1, base_width=16, depth=4):
        super().__init__()
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, base_width=base_width, depth=depth
        )
        widths = [base_width * 2**i for i in range(depth + 1)]  # 16, 32, 64, 128, 256
        self.encoders = nn.ModuleList(
            [ConvBlock(in_channels, widths[0])]
            + [ConvBlock(widths[i - 1], widths[i]) for i in range(1, depth)]
        )
        self.bottleneck = ConvBlock(widths[depth - 1], widths[depth])
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in reversed(range(depth))
        )
        self.decoders = nn.ModuleList(
            ConvBlock(2 * widths[i], widths[i]) for i in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W)
        step = 2 ** self.config["depth"]
        if x.shape[-2] % step or x.shape[-1] % step:
            raise ValueError(f"input {tuple(x.shape[-2:])} must be divisible by {step} (2**depth)")
        skips = []
        for encoder in self.encoders:
            x = encoder(x)  # (B, w_i, H/2^i, W/2^i)
            skips.append(x)
            x = F.max_pool2d(x, 2)  # (B, w_i, H/2^(i+1), W/2^(i+1))
        x = self.bottleneck(x)  # (B, 16w, H/16, W/16) at depth 4
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = up(x)  # (B, w_i, H/2^i, W/2^i): back up one level
            x = decoder(torch.cat([skip, x], dim=1))  # skip brings the encoder's detail
        return self.head(x)  # (B, 1, H, W) logits


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- losses and metrics


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the whole batch (one pool, so empty slices do not dominate)."""
    prob = torch.sigmoid(logits.float())
    intersection = (prob * target).sum()
    return 1 - (2 * intersection + smooth) / (prob.sum() + target.sum() + smooth)


def bce_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0
) -> torch.Tensor:
    """BCE on logits (stable log-sum-exp form) + dice_weight * soft Dice loss."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target)
    return bce + dice_weight * soft_dice_loss(logits, target)


def dice_score(pred, target) -> float:
    """Hard Dice 2|P∩T| / (|P|+|T|) of binary masks (arrays or tensors, the same shape).

    Empty-mask rule, used everywhere in this project: both empty -> 1.0 (nothing to find,
    nothing found); a prediction on an empty mask, or an empty prediction on a tumour -> 0.0.
    Any non-zero value counts as foreground: threshold probabilities first.
    """
    pred = np.asarray(pred.detach().cpu() if torch.is_tensor(pred) else pred).astype(bool)
    target = np.asarray(target.detach().cpu() if torch.is_tensor(target) else target).astype(bool)
    if pred.shape != target.shape:  # NumPy would broadcast them and count pixels twice
        raise ValueError(f"dice_score: prediction {pred.shape} and truth {target.shape} differ "
                         "in shape: compare masks of the same shape (squeeze a channel axis)")  # fmt: skip
    total = pred.sum() + target.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, target).sum() / total)


# ----------------------------------------------------------------------------- training


def pick_device() -> torch.device:
    """CUDA if present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_supports_bf16() -> bool:
    """True if the CPU has native bf16 instructions (AVX512-BF16 or AMX); else bf16 is slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(device: torch.device, requested: str = "auto") -> str:
    """ "bf16" where the hardware runs it natively (measured 2-3x faster on such CPUs), else "fp32"."""
    if requested not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', not {requested!r}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """Autocast context for the chosen precision (a no-op for fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass
class TrainConfig:
    """Training parameters; saved in the checkpoint so a resumed run continues the same run."""

    epochs: int = 40  # one-cycle schedule length; the reference recipe peaked near 40
    batch_size: int = 16
    lr: float = 3e-3  # one-cycle peak; Adam
    weight_decay: float = 1e-4
    dice_weight: float = 1.0  # loss = BCE + dice_weight * soft Dice
    patience: int = 40  # stop after this many epochs without a better validation Dice; one-cycle
    # peaks late (LGG: patience 15 stopped at epoch 32 with best val 0.769; all 40 epochs: 0.773)
    seed: int = 0
    precision: str = "auto"  # "auto", "bf16" or "fp32"
    tumour_sampling: bool = True  # sample slices by tumour area (Buda et al.)
    num_workers: int = 0  # 2 cores: 0 workers 57 img/s, 1-2 workers 53-54 (bench_loader.py)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit this code or this run."""


def _plain(value):
    """value with NumPy scalars and arrays as Python numbers and lists (tensors stay): a
    np.float64 in a config would make the checkpoint unreadable to torch.load(weights_only)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if type(value) in (list, tuple):  # not namedtuples: weights_only refuses them anyway
        return type(value)(map(_plain, value))
    return value.tolist() if isinstance(value, (np.generic, np.ndarray)) else value


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write atomically (a temporary file in the same folder, then os.replace), plain types only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(_plain(state), f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint dict (weights_only) or raise CheckpointError saying why and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: run notebook 03 (training) first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, objects weights_only refuses
        raise CheckpointError(f"{path} could not be read ({_reason(e)}). Keep it: copy it again "
                              "if the copy is incomplete; if you trust a file holding objects that "
                              "safe loading refuses, torch.load(path, weights_only=False) reads "
                              "it") from e  # fmt: skip
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was not written by seg_utils.train ({CHECKPOINT_FORMAT})")
    return state


def load_checkpoint(path: str | Path, device: torch.device | None = None):
    """Rebuild the model from a checkpoint; return (model in eval mode, Preprocess, state)."""
    state = read_checkpoint(path)
    try:
        model = UNet(**state["model_config"])
        model.load_state_dict(state["model_state"])
        pre = Preprocess(**state["preprocess"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not fit this seg_utils ({_reason(e)}): load it with "
                              "the version that wrote it, or train again") from e  # fmt: skip
    device = device or pick_device()
    if pick_precision(device) == "bf16":
        model.to(memory_format=torch.channels_last)  # the fast bf16 inference path
    model.to(device).eval()
    return model, pre, state


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch; call before building the model for repeatable runs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def predict_prepared(model, volume: PreparedVolume, precision="auto", tta=False, batch_size=32):
    """Tumour probability (D, S, S) for a prepared volume; `tta` averages in the mirror image."""
    device = next(model.parameters()).device
    precision = pick_precision(device, precision)
    model.eval()
    out = []
    with torch.no_grad(), autocast(device, precision):
        for start in range(0, len(volume.image), batch_size):
            x = normalise(volume.image[start : start + batch_size], volume.norm)  # (b, S, S, 3)
            x = x[..., list(volume.channels)]  # (b, S, S, C): the model's inputs, a copy
            x = torch.from_numpy(x).permute(0, 3, 1, 2).to(device)  # (b, C, S, S) view of NHWC
            if precision == "bf16":
                x = x.contiguous(memory_format=torch.channels_last)
            prob = torch.sigmoid(model(x).float())
            if tta:
                prob = (prob + torch.sigmoid(model(x.flip(-1)).float()).flip(-1)) / 2
            out.append(prob[:, 0].cpu().numpy())
    return np.concatenate(out)


def validate(model, volumes: list[PreparedVolume], precision="auto") -> float:
    """Mean per-patient Dice at the training size, threshold 0.5 (the model-selection score)."""
    return float(
        np.mean([dice_score(predict_prepared(model, v, precision) >= 0.5, v.mask) for v in volumes])
    )


def train_step(model, optimizer, x, y, precision: str, dice_weight: float = 1.0) -> float:
    """One optimisation step on a batch x (B, 3, S, S), y (B, 1, S, S); returns the loss."""
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    if precision == "bf16":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, precision):
        logits = model(x)
    loss = bce_dice_loss(logits, y, dice_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def _train_one_epoch(model, loader, optimizer, scheduler, precision, dice_weight, progress):
    """One pass over the loader; returns the mean training loss."""
    model.train()
    total, seen = 0.0, 0
    bar = tqdm(loader, desc="batches", leave=False, disable=not progress)
    for x, y in bar:
        total += train_step(model, optimizer, x, y, precision, dice_weight) * len(x)
        seen += len(x)
        scheduler.step()
        bar.set_postfix(loss=f"{total / seen:.3f}")
    return total / seen


def _epoch_loader(dataset: SliceDataset, config: TrainConfig, weights, epoch: int):
    """A DataLoader whose order and augmentations depend only on (seed, epoch): resumable."""
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    if weights is not None:
        sampler = torch.utils.data.WeightedRandomSampler(weights, len(dataset), generator=generator)
    else:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    if dataset.transform is not None:
        dataset.transform.set_random_seed(config.seed * 100_003 + epoch)
    return torch.utils.data.DataLoader(
        dataset, config.batch_size, sampler=sampler, drop_last=True,  # no 1-image BatchNorm
        num_workers=config.num_workers, worker_init_fn=_seed_worker, generator=generator,
    )  # fmt: skip


def train(model, train_set: SliceDataset, val_volumes: list[PreparedVolume], run_dir,
          config: TrainConfig | None = None, pre: Preprocess | None = None, resume=False,
          on_epoch_end=None, progress=True) -> list[dict]:  # fmt: skip
    """Train with Adam + one-cycle; keep best.pt (validation Dice) and last.pt (resume)."""
    config, pre, run_dir = config or TrainConfig(), pre or Preprocess(), Path(run_dir)
    if not val_volumes:
        raise ValueError("train() needs at least one validation volume to choose the best epoch")
    device = next(model.parameters()).device
    precision = pick_precision(device, config.precision)
    if precision == "bf16":
        model.to(memory_format=torch.channels_last)  # oneDNN's fast bf16 path wants NHWC
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * (len(train_set) // config.batch_size)
    if steps == 0:
        raise ValueError(f"{len(train_set)} training slices < batch size {config.batch_size}")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps)
    data = dict(  # what trained: check_split and a resume compare against it
        patients=dict(train=[v.patient for v in train_set.volumes],
                      val=[v.patient for v in val_volumes]),
        train_slices=len(train_set),
    )  # fmt: skip
    _remove_partial_writes(run_dir)
    if resume and (run_dir / "last.pt").exists():
        history = _resume(run_dir / "last.pt", model, optimizer, scheduler, config, pre, data)
    else:
        if resume:
            print(f"nothing to resume: {run_dir / 'last.pt'} does not exist; starting a new run")
        history = []
        _keep_previous_run(run_dir)
    weights = tumour_weights(train_set) if config.tumour_sampling else None
    epochs = tqdm(range(len(history), config.epochs), desc=f"training ({precision})",
                  initial=len(history), total=config.epochs, disable=not progress)  # fmt: skip
    try:
        for epoch in epochs:
            start = time.perf_counter()
            loader = _epoch_loader(train_set, config, weights, epoch)
            loss = _train_one_epoch(model, loader, optimizer, scheduler, precision,
                                    config.dice_weight, progress)  # fmt: skip
            val_dice = validate(model, val_volumes, precision)
            history.append(dict(epoch=epoch + 1, train_loss=loss, val_dice=val_dice,
                                lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - start))  # fmt: skip
            epochs.set_postfix(loss=f"{loss:.3f}", val_dice=f"{val_dice:.3f}")
            _save_run(run_dir, model, optimizer, scheduler, config, pre, history, precision, data)
            if on_epoch_end is not None:
                on_epoch_end(history)
            best = max(range(len(history)), key=lambda i: history[i]["val_dice"])
            if len(history) - 1 - best >= config.patience:
                print(f"early stop: no better validation Dice since epoch {best + 1}")
                break
    except KeyboardInterrupt:
        print(_on_disk_after_interrupt(run_dir))
    return history


def _on_disk_after_interrupt(run_dir: Path) -> str:
    """What last.pt holds, read back: Ctrl-C may have cut the newest epoch's write short."""
    last = run_dir / "last.pt"
    if not last.exists():
        return f"Interrupted before the first epoch was saved: {run_dir} holds no last.pt."
    epoch = read_checkpoint(last)["epoch"]
    return f"Interrupted. {last} holds epoch {epoch}: call train(..., resume=True) to continue."


def _save_run(run_dir, model, optimizer, scheduler, config, pre, history, precision, data) -> None:
    """Write last.pt, best.pt when validation Dice improved, and history.json (all atomic)."""
    state = dict(
        **data,  # patients {"train": [...], "val": [...]} and train_slices: see train()
        format=CHECKPOINT_FORMAT, model_config=model.config,
        model_state={k: v.contiguous() for k, v in model.state_dict().items()},
        optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
        epoch=len(history), history=history, train_config=asdict(config),
        preprocess=asdict(pre), precision=precision, torch_rng=torch.get_rng_state(),
    )  # fmt: skip
    if history[-1]["val_dice"] >= max(h["val_dice"] for h in history):
        save_checkpoint(state, run_dir / "best.pt")
    save_checkpoint(state, run_dir / "last.pt")
    tmp = run_dir / "history.json.tmp"
    tmp.write_text(json.dumps(history, indent=1))
    os.replace(tmp, run_dir / "history.json")


def _remove_partial_writes(run_dir: Path) -> None:
    """Delete temporary files that a killed save_checkpoint or _save_run left behind."""
    for pattern in ("*.pt.*.tmp", "history.json.tmp"):
        for path in run_dir.glob(pattern):
            path.unlink()


def _new_folder(path: Path) -> Path:
    """Create the folder path, or path-2, path-3, ... if taken: never reuse one."""
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")


def _keep_previous_run(run_dir: Path) -> None:
    """Move all an earlier run left in run_dir (checkpoints, history, test_metrics.json, ...)
    to a new run_dir/previous-<time last written>/: a fresh start deletes or mixes up nothing."""
    earlier = [p for p in sorted(run_dir.glob("*")) if not p.name.startswith("previous")]
    if not earlier:
        return
    written = max(p.lstat().st_mtime for p in earlier)
    target = _new_folder(run_dir / time.strftime("previous-%Y%m%d-%H%M%S", time.localtime(written)))
    for path in earlier:
        os.replace(path, target / path.name)
    print(f"moved the earlier run in {run_dir} to {target} (resume=True continues a run instead)")


def _check_same_data(path: Path, state: dict, data: dict) -> None:
    """Raise CheckpointError if a resume would train on other patients or slices than last.pt:
    the one-cycle schedule and the record of who trained (check_split) would both go wrong."""
    if "patients" not in state:  # written before patients were recorded: nothing to compare
        return
    changes = []
    for name in ("train", "val"):
        then, now = set(state["patients"][name]), set(data["patients"][name])
        if then != now:
            changes.append(f"{name} patients added {sorted(now - then)[:3]}, "
                           f"removed {sorted(then - now)[:3]}")  # fmt: skip
    if state.get("train_slices", data["train_slices"]) != data["train_slices"]:
        changes.append(f"{data['train_slices']} training slices, not {state['train_slices']}")
    if changes:
        raise CheckpointError(f"{path} trained on other data ({'; '.join(changes)}): resume with "
                              "the LGG_DATA and SEG_SPLIT_SEED it used, or start a new run")  # fmt: skip


def _resume(path: Path, model, optimizer, scheduler, config: TrainConfig, pre, data) -> list[dict]:
    """Restore model, optimiser, schedule and RNG from last.pt; return its history."""
    state = read_checkpoint(path)
    saved_pre = asdict(Preprocess(**state["preprocess"]))  # fills fields added since (channels)
    if state["model_config"] != model.config or saved_pre != asdict(pre):
        raise CheckpointError(f"{path} holds a model {state['model_config']} with preprocessing "
                              f"{state['preprocess']}: build the same, or use a new run folder")  # fmt: skip
    # only the stopping rule may change on resume: compare with the new patience filled in
    if dict(state["train_config"], patience=config.patience) != asdict(config):
        raise CheckpointError(f"{path} was trained with {state['train_config']}, not {asdict(config)}: "
                              "use the same parameters, or a new run folder")  # fmt: skip
    _check_same_data(path, state, data)
    model.load_state_dict(state["model_state"])
    optimizer.load_state_dict(state["optimizer_state"])
    scheduler.load_state_dict(state["scheduler_state"])
    torch.set_rng_state(state["torch_rng"])
    print(f"resuming {path} after epoch {state['epoch']}")
    return state["history"]


# ----------------------------------------------------------------------------- evaluation


def check_split(state: dict, splits: dict) -> None:
    """Raise DataError if a validation or test patient was among the checkpoint's training
    patients, or a test patient among its validation patients (a different split or data)."""
    used = state.get("patients")
    if used is None:  # checkpoints written before patients were recorded
        return
    now = {name: {r.patient for r in splits[name]} for name in ("val", "test")}
    leaked = sorted(
        ((now["val"] | now["test"]) & set(used["train"])) | (now["test"] & set(used["val"]))
    )
    if leaked:
        raise DataError(f"{len(leaked)} evaluation patients ({', '.join(leaked[:3])}, ...) were used to "
                        "train or choose this checkpoint: use the LGG_DATA and SEG_SPLIT_SEED of notebook 03")  # fmt: skip


def uncrop(prob: np.ndarray, box: tuple, shape: tuple) -> np.ndarray:
    """Undo prepare_volume: (D, S, S) at training size -> (D, H, W) in original pixels."""
    y0, y1, x0, x1 = box
    height, width = shape
    out = np.zeros((len(prob), height, width), np.float32)
    ys, xs = slice(max(y0, 0), min(y1, height)), slice(max(x0, 0), min(x1, width))
    for d, p in enumerate(prob):
        big = cv2.resize(p, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        out[d, ys, xs] = big[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return out


def predict_volume(model, volume: Volume, pre: Preprocess, precision="auto", tta=False):
    """Tumour probability (D, H, W) for one patient at the original resolution."""
    prepared = prepare_volume(volume, pre)
    return uncrop(predict_prepared(model, prepared, precision, tta), prepared.box, prepared.shape)


def predict_volumes(model, volumes: list[Volume], pre: Preprocess, tta=False, progress=True):
    """predict_volume for every patient: {patient: (D, H, W) probabilities}."""
    return {
        v.patient: predict_volume(model, v, pre, tta=tta)
        for v in tqdm(volumes, desc="predicting", disable=not progress)
    }


def predict_ensemble(members: list, volumes: list[Volume], tta=False, progress=True) -> dict:
    """Mean probability of several (model, Preprocess) pairs: {patient: (D, H, W)}."""
    return {
        v.patient: np.mean([predict_volume(m, v, p, tta=tta) for m, p in members], axis=0)
        for v in tqdm(volumes, desc=f"predicting ({len(members)} models)", disable=not progress)
    }


def load_ensemble(run_dirs: list, name: str = "last.pt", device=None) -> list[tuple]:
    """load_checkpoint(run_dir / name) for each run folder: [(model, Preprocess, state), ...]."""
    return [load_checkpoint(Path(d) / name, device) for d in run_dirs]


def postprocess(binary: np.ndarray, min_size: int = 0, keep_largest: bool = False) -> np.ndarray:
    """Drop 3D connected components under min_size voxels, or keep only the largest one."""
    from scipy import ndimage

    labels, n = ndimage.label(binary)
    if n == 0 or (min_size <= 0 and not keep_largest):
        return binary.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    keep = sizes == sizes.max() if keep_largest else sizes >= min_size
    return np.concatenate([[False], keep])[labels]


def _dice(inter, pred, truth):
    """Dice from pixel counts with the empty-mask rule of dice_score (works on arrays)."""
    total = pred + truth
    return np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1))


def _check_probabilities(prob: np.ndarray, volume: Volume, threshold: float) -> None:
    """Raise ValueError unless threshold and every probability of a patient lie in [0, 1]."""
    if not 0 <= threshold <= 1:  # NaN fails too
        raise ValueError(f"threshold {threshold} is not a probability: choose one in [0, 1]")
    if prob.shape != volume.mask.shape:
        raise ValueError(f"probabilities of {volume.patient} have shape {prob.shape}, its mask "
                         f"{volume.mask.shape}: predict this volume with su.predict_volume")  # fmt: skip
    if not (np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1):
        raise ValueError(f"probabilities of {volume.patient} hold NaN, infinity or values outside "
                         "[0, 1]: pass sigmoid outputs (su.predict_volumes), not logits")  # fmt: skip


def evaluate_patients(probs: dict, volumes: list[Volume], threshold=0.5, min_size=0,
                      keep_largest=False):  # fmt: skip
    """Tidy tables (pandas): one row per patient, one row per slice, original resolution."""
    import pandas as pd

    patients, slices = [], []
    for vol in volumes:
        _check_probabilities(probs[vol.patient], vol, threshold)
        pred = postprocess(probs[vol.patient] >= threshold, min_size, keep_largest)
        truth = vol.mask.astype(bool)
        inter = (pred & truth).sum((1, 2))  # (D,) pixel counts per slice
        p, t = pred.sum((1, 2)), truth.sum((1, 2))
        for z, n in enumerate(vol.slices):
            slices.append(dict(patient=vol.patient, slice=n, truth_px=int(t[z]), pred_px=int(p[z]),
                               inter_px=int(inter[z]), dice=float(_dice(inter[z], p[z], t[z]))))  # fmt: skip
        i, ps, ts = int(inter.sum()), int(p.sum()), int(t.sum())
        patients.append(dict(
            patient=vol.patient, slices=len(vol.slices), tumour_slices=int((t > 0).sum()),
            truth_px=ts, pred_px=ps, inter_px=i, dice=float(_dice(i, ps, ts)),
            iou=i / (ps + ts - i) if ps + ts - i else 1.0,
            precision=i / ps if ps else float(ts == 0), recall=i / ts if ts else float(ps == 0),
        ))  # fmt: skip
    return pd.DataFrame(patients), pd.DataFrame(slices)


def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple:
    """Percentile bootstrap interval of the mean (resampling patients)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(1)
    return tuple(np.quantile(means, [(1 - level) / 2, (1 + level) / 2]).tolist())


def summarise(patients, slices) -> dict:
    """Every headline metric, each with one rule (see the docstrings of the tables above)."""
    i, p, t = (patients[c].sum() for c in ("inter_px", "pred_px", "truth_px"))
    tumour, empty = slices[slices.truth_px > 0], slices[slices.truth_px == 0]
    lo, hi = bootstrap_ci(patients.dice)
    metrics = {
        "patient Dice mean": patients.dice.mean(),
        "patient Dice median": patients.dice.median(),
        "patient Dice 95% CI low": lo,
        "patient Dice 95% CI high": hi,
        "patient IoU mean": patients.iou.mean(),
        "pooled Dice": 2 * i / (p + t),
        "pooled IoU": i / (p + t - i),
        "pooled precision": i / p if p else float("nan"),
        "pooled recall": i / t,
        "tumour-slice Dice mean": tumour.dice.mean(),
        "empty slices": len(empty),
        "empty slices with false positives": int((empty.pred_px > 0).sum()),
        "slice detection sensitivity": (tumour.pred_px > 0).mean(),
        "slice detection specificity": (empty.pred_px == 0).mean(),
    }
    return {k: int(v) if k.startswith("empty") else float(v) for k, v in metrics.items()}


def sweep_postprocessing(probs: dict, volumes: list[Volume], thresholds=(0.3, 0.4, 0.5, 0.6, 0.7),
                         min_sizes=(0, 50, 200, 500), largest=(False, True)):  # fmt: skip
    """Mean per-patient Dice for every threshold / min_size / keep_largest (run on validation)."""
    import pandas as pd

    rows = []
    for threshold in thresholds:
        for keep_largest in largest:
            for min_size in min_sizes if not keep_largest else (0,):
                table, _ = evaluate_patients(probs, volumes, threshold, min_size, keep_largest)
                rows.append(dict(threshold=threshold, min_size=min_size,
                                 keep_largest=keep_largest, dice=table.dice.mean()))  # fmt: skip
    return pd.DataFrame(rows)


def choose_settings(sweeps: dict) -> dict:
    """The best row of {tta: sweep_postprocessing table}; ties keep the first (no TTA, lower
    thresholds first): {"tta", "threshold", "min_size", "keep_largest", "dice"}."""
    import pandas as pd

    table = pd.concat([t.assign(tta=tta) for tta, t in sweeps.items()], ignore_index=True)
    best = table.loc[table.dice.idxmax()]
    return dict(tta=bool(best.tta), threshold=float(best.threshold), min_size=int(best.min_size),
                keep_largest=bool(best.keep_largest), dice=float(best.dice))  # fmt: skip


def cross_validation_folds(patients, k: int = 5, seed: int = 0) -> list[list[str]]:
    """k disjoint folds of patient ids: sorted, seeded shuffle, dealt out in turn (sizes differ
    by at most one), so every patient is validated exactly once."""
    ids = sorted(set(patients))
    if not 2 <= k <= len(ids):
        raise ValueError(f"{k} folds need 2 <= k <= the number of patients ({len(ids)})")
    random.Random(seed).shuffle(ids)
    return [sorted(ids[i::k]) for i in range(k)]


# ----------------------------------------------------------------------------- visualisation

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


def show_examples(volumes: list[Volume], n: int = 8, seed: int = 0, channel=None, cols=4):
    """A grid of random tumour slices (one per patient) with the truth outlined."""
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    picks = rng.choice(len(volumes), min(n, len(volumes)), replace=False)
    rows = int(np.ceil(len(picks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, v in zip(axes.flat, picks):
        vol = volumes[v]
        z = (
            rng.choice(np.flatnonzero(vol.mask.any((1, 2))))
            if vol.mask.any()
            else len(vol.mask) // 2
        )
        draw_overlay(ax, vol.image[z], vol.mask[z], channel=channel,
                     title=f"{vol.patient} slice {vol.slices[z]}")  # fmt: skip
    fig.tight_layout()
    return fig


def plot_history(history: list[dict], axes=None):
    """Training loss and validation Dice per epoch, side by side."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    epochs = [h["epoch"] for h in history]
    axes[0].plot(epochs, [h["train_loss"] for h in history], "o-")
    axes[0].set(xlabel="epoch", ylabel="training loss (BCE + Dice)", title="loss")
    axes[1].plot(epochs, [h["val_dice"] for h in history], "o-", color="tab:green")
    axes[1].set(
        xlabel="epoch", ylabel="mean per-patient Dice", title="validation Dice", ylim=(0, 1)
    )
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return axes


class LivePlot:
    """on_epoch_end callback for train(): redraws plot_history in one notebook output."""

    def __init__(self):
        self.handle = None

    def __call__(self, history: list[dict]) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display

        axes = plot_history(history)
        fig = axes[0].figure
        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)
        plt.close(fig)


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


def mask_viewer(volumes: list[Volume], probs: dict | None = None, model=None, pre=None,
                threshold: float = 0.5):  # fmt: skip
    """ipywidgets viewer: patient, slice, channel, truth/prediction, opacity and threshold.
    Predictions come from `probs` ({patient: (D, H, W)}) or from `model` + `pre`, computed
    once per patient. The returned VBox has `.controls` (a dict of its widgets) for tests."""
    import ipywidgets as W

    if model is not None and pre is None:
        raise ValueError("mask_viewer(model=...) needs pre= too: take both from load_checkpoint")
    by_name = {v.patient: v for v in volumes}
    cache = dict(probs or {})
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

    def probabilities(vol: Volume):
        if vol.patient not in cache and model is not None:
            cache[vol.patient] = predict_volume(model, vol, pre)
        return cache.get(vol.patient)

    def redraw(*_):
        vol, z = by_name[c["patient"].value], c["slice"].value
        prob = probabilities(vol) if has_pred else None
        pred = None if prob is None else prob >= c["threshold"].value
        show_pred = pred is not None and c["pred"].value
        c["image"].value = render_slice(vol.image[z], vol.mask[z] if c["truth"].value else None,
                                        pred[z] if show_pred else None,
                                        None if c["channel"].value < 0 else c["channel"].value,
                                        c["opacity"].value)  # fmt: skip
        text = f"{vol.patient} slice {vol.slices[z]} ({z + 1}/{len(vol.slices)}), tumour px {int(vol.mask[z].sum())}"
        if pred is not None:
            text += (f" | Dice slice {dice_score(pred[z], vol.mask[z]):.3f}, patient "
                     f"{dice_score(pred, vol.mask):.3f} @ threshold {c['threshold'].value:.2f}")  # fmt: skip
        c["label"].value = text

    def new_patient(*_):
        vol = by_name[c["patient"].value]
        tumour = np.flatnonzero(vol.mask.any((1, 2)))
        c["slice"].unobserve(redraw, "value")  # one redraw below, not one per change
        try:
            c["slice"].max = len(vol.slices) - 1  # may clamp the old value
            c["slice"].value = int(tumour[len(tumour) // 2]) if len(tumour) else 0
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


# ----------------------------------------------------------------------------- new scans

# Using the model on a new scan lives in seg_predict.py; these names are also seg_utils' own
# (looked up on first use, so `import seg_utils` stays light and the import is not circular).
_PREDICT_NAMES = ("predict", "export_onnx", "read_scan", "parse_channels", "needed_inputs",
                  "site_shift_scores", "site_shift_table", "SHIFTS")  # fmt: skip


def __getattr__(name: str):
    """Module attribute fallback: the names of seg_predict (PEP 562)."""
    if name in _PREDICT_NAMES:
        import seg_predict

        return getattr(seg_predict, name)
    raise AttributeError(f"module 'seg_utils' has no attribute {name!r}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] in (["predict"], ["export"], ["inputs"]):
        import seg_predict

        sys.exit(seg_predict.main(sys.argv[1:]))
    if sys.argv[1:] != ["data"]:
        sys.exit("usage: python -m seg_utils data   (find or generate the data set, print where)\n"
                 "       python -m seg_utils predict|export|inputs ...   (see --help of each)")  # fmt: skip
    found = resolve_data_dir()
    print(f"data: {found} ({len(scan_dataset(found))} slices)")
