"""seg_utils: the code of the brain-tumour U-Net lessons, in the order the notebooks teach it.

Every notebook imports this one module, and where a lesson introduces an algorithm it shows the
source from here (`su.show_source(su.UNet)`): what a lesson displays is what runs.

    import seg_utils as su
    data_dir = su.resolve_data_dir()          # real LGG data if present, else a synthetic set
    records = su.scan_dataset(data_dir)       # one record per image/mask pair

Contents                                                               taught in notebook
    1. Data: scan_dataset, split_by_patient, load_volumes, head_mask       01_explore_data
    2. Scan to network input: Preprocess, prepare_volume, normalise,       02_preview_augmentation
       train_transform, SliceDataset, tumour_weights
    3. Model and training: UNet, bce_dice_loss, train_step, train          03_train_unet
    4. The segmenter and its evaluation: Segmenter, PostProcess,           04_evaluate
       score_patients, summarise, sweep_postprocessing
       Where the error is: error_parts                                     05_where_the_model_is_wrong

The names imported below from the lower modules (seg_files, seg_hardware, seg_runs, seg_draw,
seg_synthetic) are su.<name> too, so that a lesson needs one import. Modules above this one
(seg_viewer, seg_predict, seg_export, seg_cli) import it, never the other way round.
"""

from __future__ import annotations

import copy
import itertools
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from numbers import Integral
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from seg_draw import (
    PRED_RGB,
    TRUTH_RGB,
    LivePlot,
    draw_overlay,
    plot_history,
    plot_patient_dice,
    show_examples,
    show_source,
    zoom_around,
)
from seg_files import (
    CHANNELS,
    FLAIR,
    DataError,
    check_probabilities,
    error_gist,
    find_kaggle_dir,
    is_number,
    patient_folders,
    read_tiff,
    slice_files,
)
from seg_hardware import autocast, cpu_supports_bf16, pick_device, pick_precision, to_layout
from seg_runs import (
    CheckpointError,
    contiguous_state,
    on_disk_after_interrupt,
    read_checkpoint,
    save_run,
    start_run,
    write_checkpoint,
)
from seg_synthetic import make_synthetic_dataset

# ----------------------------------------------------------------------------- 1. Data (01)


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
        try:
            make_synthetic_dataset(synthetic, n_patients=20)
        except (DataError, OSError):  # processes started side by side (cross_validate --fold):
            if not (synthetic / "kaggle_3m").is_dir():  # the first to finish wrote the set
                raise
    return synthetic / "kaggle_3m"


@dataclass(frozen=True)
class SliceRecord:
    """One image/mask pair on disk."""

    patient: str
    slice_index: int
    image_path: Path
    mask_path: Path


def scan_dataset(root: str | Path) -> list[SliceRecord]:
    """Find every image/mask pair; records sorted by patient, then numeric slice number."""
    records = []
    for folder in patient_folders(find_kaggle_dir(root)):
        images, masks = slice_files(folder)
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


def read_slice(record: SliceRecord) -> tuple[np.ndarray, np.ndarray]:
    """Return image (H, W, 3) uint8 in file order (pre, FLAIR, post) and mask (H, W) uint8 0/1."""
    image = read_tiff(record.image_path, "image")
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{record.image_path}: expected a 3-channel image, got shape {image.shape}")
    if min(image.shape[:2]) < 32:  # the crop, resize and U-Net pooling need room
        raise DataError(
            f"{record.image_path}: {image.shape[1]}x{image.shape[0]} px is too small (at least "
            "32x32): replace it, or remove this slice and its mask"
        )
    mask = read_tiff(record.mask_path, "mask")
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
                raise DataError(
                    f"{r.image_path}: size {image.shape} differs from {recs[0].image_path} "
                    f"{pairs[0][0].shape} of the same patient"
                )
        images, masks = (np.stack(a) for a in zip(*pairs))  # (D, H, W, 3), (D, H, W)
        volumes.append(Volume(patient, [r.slice_index for r in recs], images, masks))
    return volumes


def head_mask(image: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) -> (..., H, W) bool: pixels brighter in some channel than 10% of the
    brightest pixel. MRI background is faint noise, not 0; this rule tells the head from it."""
    brightest = np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2])  # (..., H, W)
    return brightest > 0.1 * brightest.max()


def middle_tumour_slice(mask: np.ndarray) -> int:
    """Index of the middle one of the tumour slices of a (D, H, W) mask (no tumour: the middle)."""
    tumour = np.flatnonzero(mask.any(axis=(1, 2)))
    return int(tumour[len(tumour) // 2]) if len(tumour) else len(mask) // 2


# ----------------------------------------------------------------------------- 2. Input (02)


@dataclass(frozen=True)
class Preprocess:
    """How a scan becomes network input; saved with every network."""

    size: int = 128  # side of the square slices the network sees, px
    crop_brain: bool = True  # crop each scan to its head's bounding box first (brain_box)
    channels: tuple = (0, 1, 2)  # the network's inputs: indices into CHANNELS

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(self.channels))  # a list from JSON too
        valid = set(self.channels) <= set(range(len(CHANNELS)))
        if not valid or len(set(self.channels)) != len(self.channels) or not self.channels:
            raise ValueError(f"channels: distinct indices into {CHANNELS}, not {self.channels}")


def parse_channels(spec: str) -> tuple:
    """'all', 'flair', or comma-separated CHANNELS names / indices -> sorted channel indices."""
    aliases = {"all": [0, 1, 2], "flair": [FLAIR], "t1": [0], "t1c": [2]}
    aliases |= {name.lower(): [i] for i, name in enumerate(CHANNELS)}
    indices = []
    for part in (p.strip().lower() for p in spec.split(",")):
        if part not in aliases and not part.isdigit():
            raise ValueError(
                f"unknown channel {part!r}: use all, flair, {', '.join(CHANNELS)}, 0-2"
            )
        indices += aliases.get(part) or [int(part)]
    return Preprocess(channels=sorted(set(indices))).channels  # Preprocess checks them


@dataclass
class PreparedVolume:
    """A scan cropped and resized for the network, with what is needed to undo it."""

    patient: str
    image: np.ndarray  # (D, S, S, 3) uint8
    mask: np.ndarray | None  # (D, S, S) uint8 in {0, 1}; None for a scan without truth
    box: tuple  # (y0, y1, x0, x1) square crop in original pixels; may reach past the edges
    shape: tuple  # original (H, W)
    norm: np.ndarray  # (4, 3) float32 rows lo, hi, mean, std per channel
    pre: Preprocess  # how it was prepared: its channels are what a network reads


def brain_box(image: np.ndarray, margin: float = 0.04) -> tuple:
    """Square (y0, y1, x0, x1) around the head (head_mask) of any slice, widened by margin."""
    ys, xs = np.nonzero(head_mask(image).any(axis=0))  # (H, W): head on some slice
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


def volume_norm(image: np.ndarray) -> np.ndarray:
    """Per-channel rows (lo, hi, mean, std) of one scan: its p10-p99 rescale, then a z-score."""
    norm = np.zeros((4, 3), np.float32)
    for c in range(3):
        lo, hi = np.percentile(image[..., c], [10, 99])  # the scan's own levels, not 0-255
        hi = max(hi, lo + 1.0)
        scaled = np.clip((image[..., c] - lo) / (hi - lo), 0, 1)
        norm[:, c] = lo, hi, scaled.mean(), max(scaled.std(), 1e-3)
    return norm


def normalise(image: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """Map uint8 (..., 3) to float32 network input with a scan's (4, 3) norm rows."""
    lo, hi, mean, std = norm
    scaled = np.clip((image.astype(np.float32) - lo) / (hi - lo), 0, 1)
    return ((scaled - mean) / std).astype(np.float32)


def prepare(image: np.ndarray, pre: Preprocess, mask=None, patient: str = "scan"):
    """Crop a (D, H, W, 3) uint8 scan to the brain (optional) and resize every slice to pre.size;
    the mask (D, H, W), if given, the same way. Returns a PreparedVolume."""
    if image.ndim != 4 or image.shape[3] != 3 or image.dtype != np.uint8:
        raise ValueError(f"a scan is (D, H, W, 3) uint8, not {image.shape} {image.dtype}")
    height, width = image.shape[1:3]
    box = brain_box(image) if pre.crop_brain else (0, height, 0, width)
    size = (pre.size, pre.size)
    small = np.stack(
        [cv2.resize(s, size, interpolation=cv2.INTER_AREA) for s in crop_box(image, box)]
    )
    if mask is not None:
        masks = crop_box(mask, box).astype(np.float32)
        mask = np.stack([cv2.resize(m, size, interpolation=cv2.INTER_AREA) for m in masks]) > 0.5
        mask = mask.astype(np.uint8)
    return PreparedVolume(patient, small, mask, box, (height, width), volume_norm(small), pre)


def prepare_volumes(volumes: list[Volume], pre: Preprocess) -> list[PreparedVolume]:
    """prepare() for every volume of a list, with its mask."""
    return [prepare(v.image, pre, v.mask, v.patient) for v in volumes]


def train_transform(seed: int | None = None, other_sites: bool = False):
    """Augmentations that keep anatomy plausible: flip, small scale/rotate, brightness/contrast
    (an albumentations Compose); `other_sites` adds what differs between hospitals' scanners."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else it asks PyPI for a new version
    import albumentations as A

    scale = (0.8, 1.25) if other_sites else (0.95, 1.05)  # other fields of view
    steps = [
        A.HorizontalFlip(p=0.5),  # left and right hemispheres are mirror images
        A.Affine(scale=scale, rotate=(-15, 15), translate_percent=(-0.04, 0.04), p=0.7),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
    ]
    if other_sites:
        steps += [
            A.RandomGamma(gamma_limit=(70, 150), p=0.5),  # another contrast curve
            A.RandomToneCurve(scale=0.2, per_channel=True, p=0.5),  # each input's own histogram
            A.Illumination(mode="gaussian", intensity_range=(0.05, 0.2), p=0.3),  # bias field
            A.GaussNoise(std_range=(0.01, 0.05), p=0.3),
            A.OneOf(
                [A.GaussianBlur(sigma_limit=(0.5, 1.5)), A.Downscale(scale_range=(0.5, 0.9))], p=0.3
            ),  # thicker slices, lower resolution
        ]
    return A.Compose(steps, seed=seed)


def network_input(image: np.ndarray, volume: PreparedVolume) -> np.ndarray:
    """(..., S, S, 3) uint8 slices of `volume` -> (..., C, S, S) float32, normalised, its channels."""
    x = normalise(image, volume.norm)[..., list(volume.pre.channels)]  # (..., S, S, C)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))  # (..., C, S, S)


class SliceDataset(torch.utils.data.Dataset):
    """2D slices of prepared volumes as (image (C, S, S), mask (1, S, S)) float32 tensors."""

    def __init__(self, volumes: list[PreparedVolume], transform=None):
        if not volumes:
            raise ValueError("SliceDataset: no volumes (is the training split empty?)")
        if len({v.pre for v in volumes}) != 1:
            raise ValueError("SliceDataset: prepare every volume with one Preprocess")
        self.volumes = volumes
        self.pre = volumes[0].pre  # train() saves this with the network
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
        x = torch.from_numpy(network_input(image, volume))  # (C, S, S)
        return x, torch.from_numpy(mask[None].astype(np.float32))  # (1, S, S)


def tumour_weights(dataset: SliceDataset, uniform: float = 0.3) -> torch.Tensor:
    """Sampling weight per slice: each patient equally, then slices by tumour area, with a share
    `uniform` of each patient's draws spread evenly over its slices."""
    weights = []
    for vol in dataset.volumes:
        area = vol.mask.reshape(len(vol.mask), -1).sum(1).astype(np.float64)  # (D,)
        area = area / area.sum() if area.sum() > 0 else np.full_like(area, 1 / len(area))
        per_slice = (1 - uniform) * area + uniform / len(area)
        weights.append(per_slice / len(dataset.volumes))
    return torch.from_numpy(np.concatenate(weights))


def seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own, reproducible augmentation stream."""
    info = torch.utils.data.get_worker_info()
    if info.dataset.transform is not None:
        info.dataset.transform.set_random_seed(info.seed % 2**31)


# ----------------------------------------------------------------------------- 3. Training (03)


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

    def __init__(self, in_channels=3, out_channels=1, base_width=10, depth=4):
        super().__init__()
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, base_width=base_width, depth=depth
        )
        widths = [base_width * 2**i for i in range(depth + 1)]  # 10, 20, 40, 80, 160
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
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


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch; call before building the model for repeatable runs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_step(model, optimizer, x, y, precision: str, dice_weight: float = 1.0) -> float:
    """One optimisation step on a batch x (B, C, S, S), y (B, 1, S, S); returns the loss."""
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    x = to_layout(x, precision)
    with autocast(device, precision):
        logits = model(x)
    loss = bce_dice_loss(logits, y, dice_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@dataclass
class TrainConfig:
    """Training parameters; saved in the checkpoint so a resumed run continues the same run."""

    epochs: int = 20  # length of the one-cycle schedule
    batch_size: int = 16
    lr: float = 3e-3  # one-cycle peak; Adam
    weight_decay: float = 1e-4
    dice_weight: float = 1.0  # loss = BCE + dice_weight * soft Dice
    patience: int = 0  # > 0: stop after this many epochs without a better validation Dice. Off
    # by default: one-cycle's rate falls to its lowest only at the end, where the best epochs are
    seed: int = 0
    precision: str = "auto"  # "auto", "bf16" or "fp32"
    tumour_sampling: bool = True  # sample slices by tumour area (Buda et al. 2019)
    sampling_uniform: float = 0.3  # share of each patient's draws spread evenly over its slices
    train_crop: float = 0.75  # train on random windows of this share of the side; the U-Net is
    # fully convolutional, so it still predicts whole images
    num_workers: int = 0  # DataLoader processes; 0 loads in the training process
    ema_decay: float = 0.998  # > 0: validate and save a moving average of the weights over
    # about 1 / (1 - decay) steps (update_ema); 0: the trained weights themselves
    input_dropout: float = 0.0  # chance that each input other than FLAIR is replaced by FLAIR on
    # a training slice (drop_inputs), as in scans whose other inputs are missing

    def __post_init__(self):
        if not 0 < self.train_crop <= 1:
            raise ValueError(f"train_crop is a share of the side in (0, 1], not {self.train_crop}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay is in [0, 1) (0: no average), not {self.ema_decay}")
        for name in ("sampling_uniform", "input_dropout"):  # NaN is in no range
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a share in [0, 1], not {getattr(self, name)}")


def epoch_loader(dataset: SliceDataset, config: TrainConfig, weights, epoch: int):
    """A DataLoader whose order and augmentations depend only on (seed, epoch): resumable."""
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    if weights is not None:
        sampler = torch.utils.data.WeightedRandomSampler(weights, len(dataset), generator=generator)
    else:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    if dataset.transform is not None:
        dataset.transform.set_random_seed(config.seed * 100_003 + epoch)
    return torch.utils.data.DataLoader(
        dataset,
        config.batch_size,
        sampler=sampler,
        drop_last=True,  # no 1-image batch for BatchNorm
        num_workers=config.num_workers,
        worker_init_fn=seed_worker,
        generator=generator,
    )


def crop_side(size: int, fraction: float, depth: int) -> int:
    """The training window for `size` px images: `fraction` of the side, divisible by 2**depth."""
    step = 2**depth
    return max(step, int(size * fraction) // step * step) if fraction < 1 else size


def random_crops(x: torch.Tensor, y: torch.Tensor, side: int, generator: torch.Generator):
    """A random side x side window of each image (B, C, S, S), the same one of its mask."""
    if side >= x.shape[-1]:
        return x, y
    corners = torch.randint(0, x.shape[-1] - side + 1, (len(x), 2), generator=generator).tolist()
    xs = [x[i, :, top : top + side, left : left + side] for i, (top, left) in enumerate(corners)]
    ys = [y[i, :, top : top + side, left : left + side] for i, (top, left) in enumerate(corners)]
    return torch.stack(xs), torch.stack(ys)  # (B, C, side, side), (B, 1, side, side)


def drop_inputs(x: torch.Tensor, channels: tuple, chance: float, generator) -> torch.Tensor:
    """Each input but FLAIR of each image (B, C, S, S), with `chance`, replaced by the image's
    FLAIR: what a scan whose other inputs are missing gives once FLAIR is copied into them
    (normalised FLAIR, since a copied channel is normalised like FLAIR)."""
    if chance == 0 or FLAIR not in channels:
        return x
    flair = x[:, channels.index(FLAIR)]  # (B, S, S)
    dropped = torch.rand(len(x), len(channels), generator=generator) < chance  # (B, C)
    dropped[:, channels.index(FLAIR)] = False
    return torch.where(dropped[:, :, None, None], flair[:, None], x)


def unwrapped(model: nn.Module) -> nn.Module:
    """The U-Net inside torch.compile(model)'s wrapper (keys without "_orig_mod."), or model."""
    return getattr(model, "_orig_mod", model)


@torch.no_grad()
def update_ema(average: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """average <- d * average + (1 - d) * model, weights and BatchNorm statistics alike, where
    d = decay, or less in the first steps (`step`: steps taken, 1, 2, ...) so the random start
    fades fast."""
    d = min(decay, (1 + step) / (10 + step))  # TensorFlow's warm-up: 0.18, 0.25, ... 0.99 at 890
    new = model.state_dict()
    for name, avg in average.state_dict().items():
        if avg.is_floating_point():
            avg.lerp_(new[name], 1 - d)  # d 0.99: an average over about the last 100 steps
        else:
            avg.copy_(new[name])  # BatchNorm's count of batches


def train_one_epoch(
    model, loader, optimizer, scheduler, precision, config, epoch, average=None, progress=False
):
    """One pass over the loader on random windows (config.train_crop); the mean training loss.
    `average` (a copy of the U-Net) follows the weights step by step (config.ema_decay)."""
    model.train()  # BatchNorm normalises with each batch's statistics and updates its own
    total, seen = 0.0, 0
    side = crop_side(loader.dataset.pre.size, config.train_crop, unwrapped(model).config["depth"])
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch + 7)  # resumable
    bar = tqdm(loader, desc="batches", leave=False, disable=not progress)
    channels = loader.dataset.pre.channels
    for x, y in bar:
        x, y = random_crops(x, y, side, generator)
        x = drop_inputs(x, channels, config.input_dropout, generator)
        total += train_step(model, optimizer, x, y, precision, config.dice_weight) * len(x)
        seen += len(x)
        scheduler.step()
        if average is not None:
            update_ema(average, unwrapped(model), config.ema_decay, scheduler.last_epoch)
        bar.set_postfix(loss=f"{total / seen:.3f}")
    return total / seen


def predict_prepared(model, volume: PreparedVolume, mirror=False, precision="auto") -> np.ndarray:
    """Tumour probability (D, S, S) of a prepared volume; `mirror` predicts the left-right mirror
    image and flips the answer back. Batches of 32 slices."""
    device = next(model.parameters()).device
    precision, batch_size = pick_precision(device, precision), 32
    model.eval()  # BatchNorm uses the statistics it learned, not the batch's
    out = []
    with torch.no_grad(), autocast(device, precision):
        for start in range(0, len(volume.image), batch_size):
            x = network_input(volume.image[start : start + batch_size], volume)  # (b, C, S, S)
            x = to_layout(torch.from_numpy(x).to(device), precision)
            x = x.flip(-1) if mirror else x
            prob = torch.sigmoid(model(x).float())
            out.append((prob.flip(-1) if mirror else prob)[:, 0].cpu().numpy())
    return np.concatenate(out)


def validate(model, volumes: list[PreparedVolume], precision="auto") -> float:
    """Mean per-patient Dice at the training size, threshold 0.5 (the model-selection score),
    in the training's precision, so that a run chooses the same epoch on any CPU."""
    probs = [predict_prepared(model, v, precision=precision) for v in volumes]  # (D, S, S) each
    return float(np.mean([dice_score(p >= 0.5, v.mask) for p, v in zip(probs, volumes)]))


def train(
    model,
    train_set: SliceDataset,
    val_volumes: list[PreparedVolume],
    run_dir,
    config: TrainConfig | None = None,
    resume=False,
    on_epoch_end=None,
    progress=True,
) -> list[dict]:
    """Train with Adam + one-cycle; keep best.pt (validation Dice) and last.pt (resume). With
    config.ema_decay the moving average of the weights is what is validated and saved;
    on_epoch_end(history) is called after each saved epoch, and a True answer stops training."""
    config, run_dir, pre = config or TrainConfig(), Path(run_dir), train_set.pre
    if not val_volumes or any(v.pre != pre for v in val_volumes):  # they choose the best epoch
        raise ValueError("train() needs validation volumes prepared with the training Preprocess")
    device = next(model.parameters()).device
    precision = pick_precision(device, config.precision)
    to_layout(model, precision)
    net = unwrapped(model)  # torch.compile(model) trains through its wrapper; checkpoints and the
    # moving average hold the U-Net inside
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * (len(train_set) // config.batch_size)
    if steps == 0:
        raise ValueError(f"{len(train_set)} training slices < batch size {config.batch_size}")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps)
    patients = {"train": [v.patient for v in train_set.volumes]}
    patients["val"] = [v.patient for v in val_volumes]
    network = dict(config=net.config, preprocess=asdict(pre), patients=patients)
    network["input_dropout"] = config.input_dropout  # > 0: it learnt scans with inputs missing
    data = dict(network=network, train_slices=len(train_set), postprocess=asdict(PostProcess()))
    data["precision"] = precision  # a resume must compute in it too: bf16 and fp32 differ
    average = copy.deepcopy(net) if config.ema_decay else None  # validated and saved, if any
    history = start_run(run_dir, resume, net, optimizer, scheduler, config, data, average)
    sampling = (
        tumour_weights(train_set, config.sampling_uniform) if config.tumour_sampling else None
    )
    bar = dict(initial=len(history), total=config.epochs, disable=not progress)
    epochs = tqdm(range(len(history), config.epochs), f"training ({precision})", **bar)
    try:
        for epoch in epochs:
            start = time.perf_counter()
            loader = epoch_loader(train_set, config, sampling, epoch)
            args = (optimizer, scheduler, precision, config, epoch, average, progress)
            loss = train_one_epoch(model, loader, *args)
            chosen = net if average is None else average  # what is validated and saved
            val_dice = validate(chosen, val_volumes, precision)
            row = dict(epoch=epoch + 1, train_loss=loss, val_dice=val_dice)
            if average is not None:  # the trained weights' own score, to see what averaging adds
                row["val_dice_raw"] = validate(net, val_volumes, precision)
            row |= dict(lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - start)
            history.append(row)
            epochs.set_postfix(loss=f"{loss:.3f}", val_dice=f"{row['val_dice']:.3f}")
            save_run(run_dir, net, optimizer, scheduler, config, history, data, average)
            if on_epoch_end is not None and on_epoch_end(history):
                break  # the caller's rule said stop (e.g. a Dice reached): last.pt resumes the rest
            best = max(range(len(history)), key=lambda i: history[i]["val_dice"])
            if config.patience and len(history) - 1 - best >= config.patience:
                print(f"early stop: no better validation Dice since epoch {best + 1}")
                break
    except KeyboardInterrupt:
        print(on_disk_after_interrupt(run_dir))
    return history


# ----------------------------------------------------------------------------- 4. Segmenter (04)


@dataclass(frozen=True)
class PostProcess:
    """How a probability map becomes a mask; chosen on validation, saved with the networks."""

    tta: bool = False  # average in the prediction of the left-right mirror image
    threshold: float = 0.5  # probability cut-off
    min_size: int = 0  # drop 3D blobs of fewer voxels (with keep="all")
    keep: str = "all"  # "all" blobs, the "largest" (most voxels), or the one of most probability
    # "mass" (a big faint blob loses to a smaller confident one)
    drop_ends: float = 0.0  # first drop blobs lying wholly within this share of the slices at
    # either end of the stack (bright tissue at the skull base or the vertex)

    def __post_init__(self):
        checks = [
            (type(self.tta) is bool, "tta is True or False"),
            (is_number(self.threshold) and 0 <= self.threshold <= 1, "threshold is in [0, 1]"),
            (is_number(self.min_size, Integral) and self.min_size >= 0, "min_size is a count"),
            (self.keep in ("all", "largest", "mass"), 'keep is "all", "largest" or "mass"'),
            (self.keep == "all" or self.min_size == 0, 'min_size applies with keep="all" only'),
            (is_number(self.drop_ends) and 0 <= self.drop_ends < 0.5, "drop_ends is in [0, 0.5)"),
        ]
        wrong = [rule for ok, rule in checks if not ok]
        if wrong:
            raise ValueError(f"PostProcess{tuple(asdict(self).values())}: {'; '.join(wrong)}")

    def apply(self, prob: np.ndarray) -> np.ndarray:
        """(D, H, W) probabilities -> (D, H, W) bool mask: the threshold, then the blob rule on
        3D connected components (blobs that touch across slices are one)."""
        from scipy import ndimage

        binary = prob >= self.threshold
        if self.min_size == 0 and self.keep == "all" and self.drop_ends == 0:
            return binary
        labels, n = ndimage.label(binary)
        weights = prob.ravel() if self.keep == "mass" else None
        sizes = np.bincount(labels.ravel(), weights, minlength=n + 1)[1:]  # per blob 1..n
        keep = self.blobs_to_keep(sizes, blobs_at_the_ends(labels, n, self.drop_ends))
        return np.concatenate([[False], keep])[labels]

    def blobs_to_keep(self, sizes: np.ndarray, at_ends: np.ndarray) -> np.ndarray:
        """The blob rule on each blob's size (voxels, or probability mass for keep="mass"):
        those at the stack's ends go, then the small ones or all but the largest. (n,) bool."""
        sizes = np.where(at_ends, -1.0, sizes)  # never kept
        if self.keep != "all":  # ties keep every largest blob; none left: keep none
            return (sizes == sizes.max(initial=-1.0)) & (sizes >= 0)
        return sizes >= self.min_size


def blobs_at_the_ends(labels: np.ndarray, n: int, fraction: float, boxes=None) -> np.ndarray:
    """Per blob 1..n of ndimage.label: does it lie wholly within the first or last `fraction` of
    the slices? (n,) bool; all False for fraction 0. `boxes`: ndimage.find_objects(labels)."""
    from scipy import ndimage

    if fraction <= 0 or n == 0:
        return np.zeros(n, bool)
    depth = len(labels)  # (D, H, W)
    boxes = ndimage.find_objects(labels) if boxes is None else boxes
    ends = [z.stop <= fraction * depth or z.start >= (1 - fraction) * depth for z, *_ in boxes]
    return np.array(ends, dtype=bool)


def uncrop(prob: np.ndarray, box: tuple, shape: tuple) -> np.ndarray:
    """Undo prepare(): (D, S, S) at training size -> (D, H, W) in original pixels."""
    y0, y1, x0, x1 = box
    height, width = shape
    out = np.zeros((len(prob), height, width), np.float32)
    ys, xs = slice(max(y0, 0), min(y1, height)), slice(max(x0, 0), min(x1, width))
    for d, p in enumerate(prob):
        big = cv2.resize(p, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        out[d, ys, xs] = big[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return out


@dataclass
class Segmenter:
    """Trained U-Nets (one, or several as an ensemble), how a scan is prepared for each, and how
    their mean probability becomes a mask: what evaluates, predicts and is saved as one file."""

    nets: list  # UNet modules
    pres: list  # the Preprocess of each net
    post: PostProcess = field(default_factory=PostProcess)
    chosen_on: str = "defaults"  # where post was chosen: "defaults", "validation", "out of fold"
    patients: list = field(default_factory=list)  # per net {"train": ids, "val": ids}
    input_dropout: list = field(default_factory=list)  # per net TrainConfig.input_dropout

    def __post_init__(self):
        self.patients = self.patients or [dict(train=[], val=[]) for _ in self.nets]
        self.input_dropout = self.input_dropout or [0.0] * len(self.nets)
        if not len(self.nets) == len(self.pres) == len(self.patients) == len(self.input_dropout):
            raise ValueError("Segmenter: one Preprocess, patients and input_dropout per network")

    @property
    def fills_missing(self) -> bool:
        """True when some network trained on scans whose missing inputs were filled by FLAIR."""
        return any(d > 0 for d in self.input_dropout)

    def for_inputs(self, given: tuple) -> Segmenter:
        """The networks for a scan with the CHANNELS `given`: those trained on every input,
        where the scan has all they read; else those trained with inputs dropped (they take
        FLAIR in place of the rest); else all."""
        whole = [
            d == 0 and set(p.channels) <= set(given) for p, d in zip(self.pres, self.input_dropout)
        ]
        pick = whole if any(whole) else [d > 0 for d in self.input_dropout]
        pick = pick if any(pick) else [True] * len(self.nets)
        chosen = [i for i, p in enumerate(pick) if p]
        lists = [
            [x[i] for i in chosen]
            for x in (self.nets, self.pres, self.patients, self.input_dropout)
        ]
        return Segmenter(lists[0], lists[1], self.post, self.chosen_on, lists[2], lists[3])

    @property
    def channels(self) -> tuple:
        """The CHANNELS indices some network reads: the scans a user must give."""
        return tuple(sorted({c for pre in self.pres for c in pre.channels}))

    def member_probabilities(self, image: np.ndarray, tta=None, progress=False) -> list:
        """Each network's (D, H, W) float32 tumour probability of a (D, H, W, 3) uint8 scan, at
        the scan's resolution; with tta (default: post.tta) averaged with the mirror image's."""
        tta = self.post.tta if tta is None else tta
        return [(p + m) / 2 if tta else p for p, m in self._views(image, tta, progress)]

    def probabilities(self, image: np.ndarray, tta=None, progress=False) -> np.ndarray:
        """(D, H, W) float32 tumour probability: the mean over the networks."""
        return np.mean(self.member_probabilities(image, tta, progress), axis=0)

    def probabilities_with_and_without_tta(self, image: np.ndarray) -> dict:
        """{False: probabilities without TTA, True: with}, from one preparation of the scan."""
        plain, mirror = (np.mean(v, axis=0) for v in zip(*self._views(image, True)))
        return {False: plain, True: (plain + mirror) / 2}

    def mask(self, image: np.ndarray, progress=False) -> np.ndarray:
        """(D, H, W) bool tumour mask of a (D, H, W, 3) uint8 scan: probabilities, then post."""
        return self.post.apply(self.probabilities(image, progress=progress))

    def _views(self, image: np.ndarray, mirrored: bool, progress=False) -> list:
        """(plain, mirrored or None) probabilities per network at the scan's resolution; the
        scan is prepared once for every image size among the networks."""
        prepared, views = {}, []
        for net, pre in tqdm(list(zip(self.nets, self.pres)), "predicting", disable=not progress):
            key = (pre.size, pre.crop_brain)
            if key not in prepared:
                prepared[key] = prepare(image, replace(pre, channels=(0, 1, 2)))
            volume = replace(prepared[key], pre=pre)  # its own channels
            flips = (False, True) if mirrored else (False,)
            back = [
                uncrop(predict_prepared(net, volume, m), volume.box, volume.shape) for m in flips
            ]
            views.append((back[0], back[1] if mirrored else None))
        return views

    def predict_volumes(self, volumes: list[Volume], tta=None, progress=True) -> dict:
        """{patient: (D, H, W) probabilities} for every volume."""
        bar = tqdm(volumes, desc=f"predicting ({len(self.nets)} nets)", disable=not progress)
        return {v.patient: self.probabilities(v.image, tta) for v in bar}

    def save(self, path) -> None:
        """Write the networks (configuration, weights, Preprocess, patients) and the PostProcess
        as one file, atomically."""
        networks, post = [], asdict(self.post)
        for net, pre, who, drop in zip(self.nets, self.pres, self.patients, self.input_dropout):
            saved = dict(config=net.config, state=contiguous_state(net), preprocess=asdict(pre))
            networks.append(saved | dict(patients=who, input_dropout=drop))
        write_checkpoint(path, dict(networks=networks, postprocess=post, chosen_on=self.chosen_on))


def load_segmenter(*paths, device: torch.device | None = None) -> Segmenter:
    """A Segmenter from a checkpoint of train() or a file of Segmenter.save(), in eval mode on
    `device`; several paths: one ensemble of all their networks, with the default PostProcess
    (choose the ensemble's own with sweep_postprocessing)."""
    device = device or pick_device()
    nets, pres, who, drops, posts = [], [], [], [], []
    for path in paths:
        state = read_checkpoint(path)
        try:
            if not state["networks"]:
                raise ValueError("it holds no network")
            for saved in state["networks"]:
                nets.append(UNet(**saved["config"]))
                nets[-1].load_state_dict(saved["state"])
                pres.append(Preprocess(**saved["preprocess"]))
                who.append(saved["patients"])
                drops.append(saved.get("input_dropout", 0.0))  # absent: trained before it existed
            posts.append((PostProcess(**state["postprocess"]), state["chosen_on"]))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{path} does not fit this seg_utils ({error_gist(e)}): train it again"
            ) from e
    for net in nets:
        to_layout(net, pick_precision(device)).to(device).eval()
    post, chosen_on = posts[0] if len(posts) == 1 else (PostProcess(), "defaults")
    return Segmenter(nets, pres, post, chosen_on, who, drops)


def save_choice(path, post: PostProcess, chosen_on: str) -> None:
    """Write the chosen PostProcess into a model file (its weights and the rest unchanged)."""
    state = read_checkpoint(path)
    write_checkpoint(path, state | dict(postprocess=asdict(post), chosen_on=chosen_on))


def check_split(segmenter: Segmenter, splits: dict) -> None:
    """DataError if a validation or test patient of `splits` trained a network, or a test
    patient chose its epoch (validation): a different split, or other data."""
    now = {name: {r.patient for r in splits.get(name, [])} for name in ("val", "test")}
    for used in segmenter.patients:
        trained, chose = set(used["train"]), set(used["val"])
        leaked = (now["val"] | now["test"]) & trained | now["test"] & chose
        if leaked:
            raise DataError(
                f"{len(leaked)} evaluation patients ({', '.join(sorted(leaked)[:3])}, ...) trained "
                "or chose this model: score it on the data and split it was trained with "
                "(LGG_DATA, the split of notebook 03, or a cross-validation's folds.json)"
            )


def dice_from_counts(inter, pred, truth):
    """Dice 2|P∩T| / (|P|+|T|) from pixel counts (numbers or arrays), with the empty-mask rule
    used everywhere in this project: both empty -> 1.0 (nothing to find, nothing found); a
    prediction on an empty mask, or an empty prediction on a tumour -> 0.0."""
    total = np.asarray(pred + truth)
    return np.where(total == 0, 1.0, 2 * np.asarray(inter) / np.maximum(total, 1))


def dice_score(pred, target) -> float:
    """Hard Dice of two binary masks (arrays or tensors, the same shape), by dice_from_counts.
    Any non-zero value counts as foreground: threshold probabilities first."""
    pred = np.asarray(pred.detach().cpu() if torch.is_tensor(pred) else pred).astype(bool)
    target = np.asarray(target.detach().cpu() if torch.is_tensor(target) else target).astype(bool)
    if pred.shape != target.shape:  # NumPy would broadcast them and count pixels twice
        raise ValueError(
            f"dice_score: prediction {pred.shape} and truth {target.shape} differ in shape: "
            "compare masks of the same shape (squeeze a channel axis)"
        )
    return float(dice_from_counts((pred & target).sum(), pred.sum(), target.sum()))


def score_patients(probs: dict, volumes: list[Volume], post: PostProcess):
    """Apply `post` to each patient's probabilities and score the mask at the original
    resolution: tidy tables (pandas) of one row per patient and one per slice, and the scored
    masks {patient: (D, H, W) bool}, so that figures show exactly what was measured."""
    import pandas as pd

    patients, slices, masks = [], [], {}
    for vol in volumes:
        prob = probs[vol.patient]  # (D, H, W)
        check_probabilities(prob, vol, post.threshold)
        pred = masks[vol.patient] = post.apply(prob)
        truth = vol.mask.astype(bool)
        inter = (pred & truth).sum((1, 2))  # (D,) pixel counts per slice
        p, t = pred.sum((1, 2)), truth.sum((1, 2))
        dice = dice_from_counts(inter, p, t)  # (D,)
        for z, n in enumerate(vol.slices):
            row = dict(truth_px=int(t[z]), pred_px=int(p[z]), inter_px=int(inter[z]))
            slices.append(dict(patient=vol.patient, slice=n, **row, dice=float(dice[z])))
        i, ps, ts = int(inter.sum()), int(p.sum()), int(t.sum())
        d = float(dice_from_counts(i, ps, ts))
        row = dict(patient=vol.patient, slices=len(vol.slices), tumour_slices=int((t > 0).sum()))
        row |= dict(truth_px=ts, pred_px=ps, inter_px=i, dice=d, iou=d / (2 - d))  # IoU from Dice
        row |= dict(
            precision=i / ps if ps else float(ts == 0), recall=i / ts if ts else float(ps == 0)
        )
        patients.append(row)
    return pd.DataFrame(patients), pd.DataFrame(slices), masks


def error_parts(slices):
    """Where each patient's error is: its 1 - Dice, (false + missed voxels) / (|P| + |T|), split
    into four parts that add up to it (one row per patient, pandas), from score_patients' slices."""
    import pandas as pd

    false, missed = slices.pred_px - slices.inter_px, slices.truth_px - slices.inter_px
    tumour, found = slices.truth_px > 0, slices.pred_px > 0
    parts = {
        "false marks on tumour slices": false.where(tumour, 0),
        "tumour missed where some is found": missed.where(tumour & found, 0),
        "tumour slices missed": missed.where(tumour & ~found, 0),
        "marks on tumour-free slices": false.where(~tumour, 0),
    }
    by_patient = pd.DataFrame(parts).groupby(slices.patient, sort=False).sum()
    total = (slices.pred_px + slices.truth_px).groupby(slices.patient, sort=False).sum()
    return by_patient.div(total.clip(lower=1), axis=0)  # both empty: Dice 1, no error


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
    pooled = float(dice_from_counts(i, p, t))
    metrics = {
        "patient Dice mean": patients.dice.mean(),
        "patient Dice median": patients.dice.median(),
        "patient Dice 95% CI low": lo,
        "patient Dice 95% CI high": hi,
        "patient IoU mean": patients.iou.mean(),
        "pooled Dice": pooled,
        "pooled IoU": pooled / (2 - pooled),  # IoU = Dice / (2 - Dice), empty rule included
        "pooled precision": i / p if p else float("nan"),
        "pooled recall": i / t if t else float("nan"),
        "tumour-slice Dice mean": tumour.dice.mean(),  # NaN where no slice has tumour
        "empty slices": len(empty),
        "empty slices with false positives": int((empty.pred_px > 0).sum()),
        "slice detection sensitivity": (tumour.pred_px > 0).mean(),
        "slice detection specificity": (empty.pred_px == 0).mean(),
    }
    return {k: int(v) if k.startswith("empty") else float(v) for k, v in metrics.items()}


SWEEP = dict(  # the post-processing choices tried on validation (or out of fold)
    tta=(False, True),
    threshold=(0.3, 0.4, 0.5, 0.6, 0.7),
    min_size=(0, 100, 500, 1000),  # with keep="all"
    keep=("all", "largest", "mass"),
    drop_ends=(0.0, 0.1, 0.2),
)


def sweep_postprocessing(probs: dict, volumes: list[Volume], grid: dict | None = None):
    """Mean per-patient Dice of every PostProcess in `grid` (default SWEEP): probs is
    {tta: {patient: (D, H, W)}}. Blobs are found once per patient and threshold; each setting
    keeps some of them by PostProcess.blobs_to_keep, so every Dice is the one score_patients gives."""
    import pandas as pd

    grid = {**SWEEP, **(grid or {})}
    dice: dict = {}
    for tta, threshold, vol in itertools.product(grid["tta"], grid["threshold"], volumes):
        prob = probs[tta][vol.patient]
        check_probabilities(prob, vol, threshold)
        blobs = _blob_counts(prob, vol.mask, threshold, grid["drop_ends"])
        for post in _settings(grid, tta, threshold):
            sizes = blobs["mass"] if post.keep == "mass" else blobs["voxels"]
            keep = post.blobs_to_keep(sizes, blobs["at_ends"][post.drop_ends])
            hits, voxels = blobs["hits"][keep].sum(), blobs["voxels"][keep].sum()
            dice.setdefault(post, []).append(float(dice_from_counts(hits, voxels, blobs["truth"])))
    return pd.DataFrame([asdict(p) | dict(dice=float(np.mean(d))) for p, d in dice.items()])


def _settings(grid: dict, tta: bool, threshold: float):
    """Every PostProcess of the grid at one tta and threshold (min_size with keep="all" only)."""
    for drop_ends, keep in itertools.product(grid["drop_ends"], grid["keep"]):
        for min_size in grid["min_size"] if keep == "all" else (0,):
            yield PostProcess(tta, threshold, min_size, keep, drop_ends)


def _blob_counts(prob: np.ndarray, mask: np.ndarray, threshold: float, ends) -> dict:
    """Per 3D blob of prob >= threshold: its voxels, probability mass, voxels on the truth
    (hits) and, for each drop_ends, whether it lies at the stack's ends; the truth's size."""
    from scipy import ndimage

    labels, n = ndimage.label(prob >= threshold)
    inside = np.flatnonzero(labels)  # the foreground voxels: the only ones in a blob
    flat = labels.ravel()[inside]

    def per_blob(values=None):  # (n,) sums over each blob 1..n of values (D, H, W)
        weights = None if values is None else values.ravel()[inside]
        return np.bincount(flat, weights, minlength=n + 1)[1:]

    boxes = ndimage.find_objects(labels)  # once for every drop_ends
    at_ends = {e: blobs_at_the_ends(labels, n, e, boxes) for e in ends}
    hits = per_blob(mask.astype(np.float64))
    counts = dict(voxels=per_blob(), mass=per_blob(prob), hits=hits, at_ends=at_ends)
    return counts | dict(truth=int(mask.sum()))


def choose_postprocess(sweep) -> tuple[PostProcess, float]:
    """The best row of a sweep_postprocessing table and its Dice; ties keep the first row (no
    TTA, lower thresholds, fewer rules first)."""
    best = sweep.loc[sweep.dice.idxmax()]
    kinds = {f.name: type(getattr(PostProcess(), f.name)) for f in fields(PostProcess)}
    post = PostProcess(**{name: kind(best[name]) for name, kind in kinds.items()})  # e.g. bool
    return post, float(best.dice)


if __name__ == "__main__":  # the command line of earlier versions
    import sys

    print(
        "the command line moved: run `unet-seg predict|export|inputs|data ...` (or "
        "`python -m seg_cli ...`); `unet-seg --help` lists the commands",
        file=sys.stderr,
    )
    sys.exit(2)
