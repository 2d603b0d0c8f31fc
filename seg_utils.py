"""seg_utils: the code of the brain-tumour U-Net lessons, in the order the notebooks teach it.

Every notebook imports this one module, and where a lesson introduces an algorithm it shows the
source from here (`su.show_source(su.UNet)`): what a lesson displays is what runs.

    import seg_utils as su
    data_dir = su.resolve_data_dir()          # real LGG data if present, else a synthetic set
    records = su.scan_dataset(data_dir)       # one record per image/mask pair

Contents                                                               taught in notebook
    1. Data: scan_dataset, split_by_patient, load_volumes, head_mask       01_explore_data
    2. Scan to network input: brain_box, crop_box, volume_norm,            02_preview_augmentation
       prepare_volume, train_transform, SliceDataset, tumour_weights
    3. Model and training: UNet, bce_dice_loss, train_step, train,         03_train_unet
       load_checkpoint
    4. Evaluation: predict_volume, uncrop, dice_from_counts, postprocess,  04_evaluate
       score_patients, summarise (sweep_postprocessing: seg_ensemble.py)
    5. The mask viewer: mask_viewer (widgets: seg_viewer.py)               05_mask_viewer
    6. Tools: show_source, `python -m seg_utils data|predict|export`       (no lesson)
Code that no lesson teaches lives in modules of its own, whose public names are also su.<name>:
seg_files.py (file names and checks, DataError), seg_synthetic.py (the synthetic MRI set),
seg_runs.py (checkpoint files, resume, run folders), seg_hardware.py (device, bf16 or fp32,
memory layout), seg_draw.py (slices, curves, plots), seg_ensemble.py (the post-processing sweep,
cross-validation folds, fold ensembles) and seg_viewer.py (the mask viewer's widgets).
"""

from __future__ import annotations

import copy
import numbers
import os
import random
import time
from dataclasses import dataclass, field
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
    overlay,
    plot_history,
    plot_patient_dice,
    render_slice,
    show_examples,
    show_source,
    zoom_around,
)

# The modules below hold what no lesson teaches; the names imported from them are su.<name> too.
from seg_files import (
    CHANNELS,
    FLAIR,
    DataError,
    check_probabilities,
    error_gist,
    find_kaggle_dir,
    is_number,
    load_split_file,
    patient_folders,
    read_tiff,
    slice_files,
)
from seg_hardware import autocast, cpu_supports_bf16, pick_device, pick_precision, to_layout
from seg_runs import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    check_split,
    on_disk_after_interrupt,
    read_checkpoint,
    save_checkpoint,
    save_run,
    start_run,
)
from seg_synthetic import make_synthetic_dataset

# ----------------------------- 1. Data: find, split, load, look at (notebook 01)


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
            make_synthetic_dataset(
                synthetic, n_patients=int(os.environ.get("SEG_SYNTH_PATIENTS", "20"))
            )
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
        raise DataError(f"{record.image_path}: {image.shape[1]}x{image.shape[0]} px is too small "
                        "(at least 32x32): replace it, or remove this slice and its mask")  # fmt: skip
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
                raise DataError(f"{r.image_path}: size {image.shape} differs from "
                                f"{recs[0].image_path} {pairs[0][0].shape} of the same patient")  # fmt: skip
        images = np.stack([p[0] for p in pairs])
        masks = np.stack([p[1] for p in pairs])
        volumes.append(Volume(patient, [r.slice_index for r in recs], images, masks))
    return volumes


def head_mask(image: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) -> (..., H, W) bool: pixels brighter in some channel than 10% of the
    brightest pixel. MRI background is faint noise, not 0; this rule tells the head from it."""
    brightest = image.max(axis=-1)
    return brightest > 0.1 * brightest.max()


def middle_tumour_slice(mask: np.ndarray) -> int:
    """Index of the middle one of the tumour slices of a (D, H, W) mask (no tumour: the middle)."""
    tumour = np.flatnonzero(mask.any(axis=(1, 2)))
    return int(tumour[len(tumour) // 2]) if len(tumour) else len(mask) // 2


# ----------------------------- 2. From scan to network input (notebook 02)


@dataclass
class Preprocess:
    """How a volume becomes network input; saved in every checkpoint."""

    size: int = 128  # training size: 128 px matched 192 px in Dice at half the time
    crop_brain: bool = True  # crop each volume to its head's bounding box first (brain_box)
    channels: list = field(default_factory=lambda: [0, 1, 2])  # network input: CHANNELS indices

    def __post_init__(self):
        valid = len(set(self.channels)) == len(self.channels) > 0
        if not valid or not set(self.channels) <= set(range(len(CHANNELS))):
            raise ValueError(f"channels: distinct indices into {CHANNELS}, not {self.channels}")

    @classmethod
    def from_saved(cls, saved: dict) -> Preprocess:
        """A checkpoint's Preprocess; older ones also name the per-scan normalisation, the only
        one now (a retired "global" one is refused), and lack channels (all three)."""
        saved = dict(saved)
        if saved.pop("normalisation", "volume") != "volume":
            raise ValueError("global normalisation is no longer supported")
        saved.pop("mean", None), saved.pop("std", None)
        return cls(**saved)


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
    """Map uint8 (..., 3) to float32 network input with a volume's (4, 3) norm rows."""
    lo, hi, mean, std = norm
    return ((np.clip((image.astype(np.float32) - lo) / (hi - lo), 0, 1) - mean) / std).astype(
        np.float32
    )


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
    return PreparedVolume(volume.patient, image, mask, box, (height, width), volume_norm(image),
                          tuple(pre.channels))  # fmt: skip


def prepare_volumes(volumes: list[Volume], pre: Preprocess) -> list[PreparedVolume]:
    """prepare_volume for every volume of a list."""
    return [prepare_volume(v, pre) for v in volumes]


def train_transform(seed: int | None = None):
    """Augmentations that keep anatomy plausible: flip, small scale/rotate, brightness/contrast
    (an albumentations Compose)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else it asks PyPI for a new version
    import albumentations as A

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

    def __init__(self, volumes: list[PreparedVolume], transform=None):
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


def tumour_weights(dataset: SliceDataset, uniform: float | None = None) -> torch.Tensor:
    """Sampling weight per slice: each patient equally, then slices by tumour area + uniform
    (a share; None: training's default, TrainConfig.sampling_uniform)."""
    uniform = TrainConfig.sampling_uniform if uniform is None else uniform
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


# ----------------------------- 3. The U-Net, its loss and its training (notebook 03)


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
    """One optimisation step on a batch x (B, 3, S, S), y (B, 1, S, S); returns the loss."""
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

    epochs: int = 20  # one-cycle schedule length. LGG, width 10 with ema 0.998: the old recipe's
    # best validation Dice 4.7x and 3.7x sooner (two seeds), test 0.819 and 0.826; 5-fold
    # cross-validation 0.835 and 0.837 out of fold (two seeds; README)
    batch_size: int = 16
    lr: float = 3e-3  # one-cycle peak; Adam
    weight_decay: float = 1e-4
    dice_weight: float = 1.0  # loss = BCE + dice_weight * soft Dice
    patience: int = 40  # stop after this many epochs without a better validation Dice; one-cycle
    # peaks late (LGG: patience 15 stopped at epoch 32 with best val 0.769; all 40 epochs: 0.773)
    seed: int = 0
    precision: str = "auto"  # "auto", "bf16" or "fp32"
    tumour_sampling: bool = True  # sample slices by tumour area (Buda et al.)
    sampling_uniform: float = 0.3  # share of each patient's draws spread evenly over its slices
    # (tumour_weights): more tumour-free slices, the skull base's among them. LGG 5-fold CV, out of
    # fold: 0.825 at 0.3, 0.822 at 0.1 (the default before 2026-11-26): chosen by that, a tie
    train_crop: float = 0.75  # train on random windows of this share of the side: 96 px of 128,
    # 56 % of the work per image (a fully convolutional U-Net still predicts whole images). LGG
    # test Dice (width 16), two seeds: 0.839 and 0.836 for 24 such epochs, 0.841 and 0.840 for 40 on
    # whole images (1.0, `--recipe old`) at 3x the work; 20 such epochs: 0.788 and 0.826
    num_workers: int = 0  # 2 cores: 0 workers 57 img/s, 1-2 workers 53-54 (bench_loader.py, width
    # 16, bf16); width 10, fp32 on an AVX2 CPU: 22.0, 22.7, 21.6 img/s, a tie
    ema_decay: float = 0.998  # > 0: validate and save a moving average of the weights (update_ema;
    # 0 = off): 0.998 averages ~500 steps, ~3 epochs, so a short schedule's last epochs are smooth
    # (LGG, 12 epochs with 0.99: fast but levelled off at 0.775; 0.998 kept climbing to 0.78-0.80)

    def __post_init__(self):
        if not 0 < self.train_crop <= 1:
            raise ValueError(f"train_crop is a share of the side in (0, 1], not {self.train_crop}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay is in [0, 1) (0: no average), not {self.ema_decay}")
        if not 0 <= self.sampling_uniform <= 1:
            raise ValueError(f"sampling_uniform is a share in [0, 1], not {self.sampling_uniform}")


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


def unwrapped(model: nn.Module) -> nn.Module:
    """The U-Net inside torch.compile(model)'s wrapper (keys without "_orig_mod."), or model."""
    return getattr(model, "_orig_mod", model)


@torch.no_grad()
def update_ema(average: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """average <- d * average + (1 - d) * model, weights and BatchNorm statistics alike, where
    d = decay, or less in the first steps (`step`: steps taken, 1, 2, ...) so the random start
    fades fast."""
    d = min(decay, (1 + step) / (10 + step))  # TensorFlow's warm-up: 0.18, 0.25, ... 0.99 at 890
    for avg, new in zip(average.state_dict().values(), model.state_dict().values()):
        if avg.is_floating_point():
            avg.lerp_(new, 1 - d)  # d 0.99: an average over about the last 100 steps
        else:
            avg.copy_(new)  # BatchNorm's count of batches


def _train_one_epoch(model, loader, optimizer, scheduler, precision, config, epoch, progress,
                     average=None):  # fmt: skip
    """One pass over the loader (on random windows, config.train_crop); the mean training loss.
    `average` (a copy of the model) follows the weights step by step (config.ema_decay)."""
    model.train()
    total, seen = 0.0, 0
    side = crop_side(loader.dataset.volumes[0].image.shape[1], config.train_crop,
                     model.config["depth"])  # fmt: skip
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch + 7)  # resumable
    bar = tqdm(loader, desc="batches", leave=False, disable=not progress)
    for x, y in bar:
        x, y = random_crops(x, y, side, generator)
        total += train_step(model, optimizer, x, y, precision, config.dice_weight) * len(x)
        seen += len(x)
        scheduler.step()
        if average is not None:
            steps = scheduler.last_epoch  # optimisation steps so far
            update_ema(average, unwrapped(model), config.ema_decay, steps)
        bar.set_postfix(loss=f"{total / seen:.3f}")
    return total / seen


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
            x = to_layout(x, precision)
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


def train(model, train_set: SliceDataset, val_volumes: list[PreparedVolume], run_dir,
          config: TrainConfig | None = None, pre: Preprocess | None = None, resume=False,
          on_epoch_end=None, progress=True) -> list[dict]:  # fmt: skip
    """Train with Adam + one-cycle; keep best.pt (validation Dice) and last.pt (resume). With
    config.ema_decay the moving average of the weights is what is validated and saved;
    on_epoch_end(history) is called after each saved epoch, and a True answer stops training."""
    config, pre, run_dir = config or TrainConfig(), pre or Preprocess(), Path(run_dir)
    if not val_volumes:
        raise ValueError("train() needs at least one validation volume to choose the best epoch")
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
    data = dict(  # what trained: check_split and a resume compare against it
        patients=dict(train=[v.patient for v in train_set.volumes],
                      val=[v.patient for v in val_volumes]),
        train_slices=len(train_set),
    )  # fmt: skip
    average = copy.deepcopy(net) if config.ema_decay else None  # validated and saved, if any
    history = start_run(run_dir, resume, net, optimizer, scheduler, config, pre, data, average)
    weights = tumour_weights(train_set, config.sampling_uniform) if config.tumour_sampling else None
    epochs = tqdm(range(len(history), config.epochs), desc=f"training ({precision})",
                  initial=len(history), total=config.epochs, disable=not progress)  # fmt: skip
    try:
        for epoch in epochs:
            start = time.perf_counter()
            loader = _epoch_loader(train_set, config, weights, epoch)
            loss = _train_one_epoch(model, loader, optimizer, scheduler, precision, config, epoch,
                                    progress, average)  # fmt: skip
            val_dice = validate(model if average is None else average, val_volumes, precision)
            history.append(dict(epoch=epoch + 1, train_loss=loss, val_dice=val_dice,
                                lr=scheduler.get_last_lr()[0], seconds=time.perf_counter() - start))  # fmt: skip
            epochs.set_postfix(loss=f"{loss:.3f}", val_dice=f"{val_dice:.3f}")
            save_run(run_dir, net, optimizer, scheduler, config, pre, history, precision, data,
                     average)  # fmt: skip
            if on_epoch_end is not None and on_epoch_end(history):
                break  # the caller's rule said stop (e.g. a Dice reached): last.pt resumes the rest
            best = max(range(len(history)), key=lambda i: history[i]["val_dice"])
            if len(history) - 1 - best >= config.patience:
                print(f"early stop: no better validation Dice since epoch {best + 1}")
                break
    except KeyboardInterrupt:
        print(on_disk_after_interrupt(run_dir))
    return history


def load_checkpoint(path: str | Path, device: torch.device | None = None):
    """Rebuild the model from a checkpoint; return (model in eval mode, Preprocess, state)."""
    state = read_checkpoint(path)
    try:
        model = UNet(**state["model_config"])
        model.load_state_dict(state["model_state"])
        pre = Preprocess.from_saved(state["preprocess"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not fit this seg_utils ({error_gist(e)}): load it with "
                              "the version that wrote it, or train again") from e  # fmt: skip
    device = device or pick_device()
    to_layout(model, pick_precision(device)).to(device).eval()
    return model, pre, state


# ----------------------------- 4. Evaluation (notebook 04)


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
        raise ValueError(f"dice_score: prediction {pred.shape} and truth {target.shape} differ "
                         "in shape: compare masks of the same shape (squeeze a channel axis)")  # fmt: skip
    return float(dice_from_counts((pred & target).sum(), pred.sum(), target.sum()))


def blobs_at_the_ends(labels: np.ndarray, n: int, fraction: float) -> np.ndarray:
    """Per blob 1..n of ndimage.label: does it lie wholly within the first or last `fraction` of
    the slices (the skull base, the vertex)? (n,) bool; all False for fraction 0."""
    from scipy import ndimage

    if fraction <= 0 or n == 0:  # nothing to look for: skip find_objects' pass over the volume
        return np.zeros(n, bool)
    depth = len(labels)  # (D, H, W)
    spans = [(box[0].start, box[0].stop) for box in ndimage.find_objects(labels)]
    return np.array([stop <= fraction * depth or start >= (1 - fraction) * depth
                     for start, stop in spans], dtype=bool)  # fmt: skip


def check_blob_rule(min_size, keep_largest, drop_ends) -> None:
    """ValueError unless (min_size, keep_largest, drop_ends) is a rule postprocess knows."""
    if not is_number(min_size, numbers.Integral) or min_size < 0:
        raise ValueError(f"min_size is a whole number of voxels, 0 or more, not {min_size!r}")
    if keep_largest not in (False, True, "mass"):
        raise ValueError(f'keep_largest is False, True (most voxels) or "mass" (the largest sum of '
                         f"probabilities), not {keep_largest!r}")  # fmt: skip
    if not is_number(drop_ends) or not 0 <= drop_ends < 0.5:  # NaN fails too
        raise ValueError(f"drop_ends is a fraction of the slices at each end, in [0, 0.5), not "
                         f"{drop_ends!r}")  # fmt: skip


def postprocess(binary: np.ndarray, min_size: int = 0, keep_largest: bool | str = False,
                prob: np.ndarray | None = None, drop_ends: float = 0.0) -> np.ndarray:  # fmt: skip
    """Drop 3D connected components under min_size voxels, or keep only the largest one: the most
    voxels, or with keep_largest="mass" the largest sum of `prob` (a big faint blob loses).
    drop_ends > 0 first drops the blobs lying wholly within that fraction of the slices at either
    end of the stack (bright tissue at the skull base or the vertex), so they cannot be largest."""
    from scipy import ndimage

    check_blob_rule(min_size, keep_largest, drop_ends)
    if min_size <= 0 and not keep_largest and drop_ends <= 0:
        return binary.astype(bool)
    if keep_largest == "mass" and prob is None:
        raise ValueError('keep_largest="mass" weighs blobs by probability: pass prob=')
    labels, n = ndimage.label(binary)  # 3D: blobs that touch across slices are one
    if n == 0:
        return binary.astype(bool)
    weights = prob.ravel() if keep_largest == "mass" else None
    sizes = np.bincount(labels.ravel(), weights)[1:]  # voxels, or probability mass, per blob
    keep = blobs_to_keep(sizes, blobs_at_the_ends(labels, n, drop_ends), min_size, keep_largest)
    return np.concatenate([[False], keep])[labels]


def blobs_to_keep(
    sizes: np.ndarray, at_ends: np.ndarray, min_size: int, keep_largest
) -> np.ndarray:
    """The post-processing rule, per blob: the blobs at the stack's ends go first, then those
    under min_size, or all but the largest `sizes` (voxels or probability mass). (n_blobs,) bool."""
    sizes = np.where(at_ends, -1.0, sizes)  # never kept
    if keep_largest:  # ties keep every largest blob; none left (all at the ends): keep none
        return (sizes == sizes.max(initial=-1.0)) & (sizes >= 0)
    return sizes >= max(min_size, 0)


def score_patients(probs: dict, volumes: list[Volume], threshold=0.5, min_size=0,
                   keep_largest=False, drop_ends=0.0):  # fmt: skip
    """Threshold, post-process and score each patient once, at the original resolution: tidy
    tables (pandas) of one row per patient and one per slice, and the scored masks
    {patient: (D, H, W) bool}, so that figures show exactly what was measured."""
    import pandas as pd

    patients, slices, masks = [], [], {}
    for vol in volumes:
        prob = probs[vol.patient]  # (D, H, W)
        check_probabilities(prob, vol, threshold)
        pred = postprocess(prob >= threshold, min_size, keep_largest, prob, drop_ends)
        masks[vol.patient] = pred
        truth = vol.mask.astype(bool)
        inter = (pred & truth).sum((1, 2))  # (D,) pixel counts per slice
        p, t = pred.sum((1, 2)), truth.sum((1, 2))
        for z, n in enumerate(vol.slices):
            slices.append(dict(patient=vol.patient, slice=n, truth_px=int(t[z]), pred_px=int(p[z]),
                               inter_px=int(inter[z]), dice=float(dice_from_counts(inter[z], p[z], t[z]))))  # fmt: skip
        i, ps, ts = int(inter.sum()), int(p.sum()), int(t.sum())
        dice = float(dice_from_counts(i, ps, ts))
        patients.append(dict(
            patient=vol.patient, slices=len(vol.slices), tumour_slices=int((t > 0).sum()),
            truth_px=ts, pred_px=ps, inter_px=i, dice=dice, iou=dice / (2 - dice),  # IoU from Dice
            precision=i / ps if ps else float(ts == 0), recall=i / ts if ts else float(ps == 0),
        ))  # fmt: skip
    return pd.DataFrame(patients), pd.DataFrame(slices), masks


def evaluate_patients(probs: dict, volumes: list[Volume], threshold=0.5, min_size=0,
                      keep_largest=False, drop_ends=0.0):  # fmt: skip
    """score_patients without the masks: (one row per patient, one row per slice)."""
    return score_patients(probs, volumes, threshold, min_size, keep_largest, drop_ends)[:2]


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


# ----------------------------- 6. Tools: show_source (seg_draw), command line (no lesson)

# Using the model on a new scan (seg_predict.py), the sweep and ensembles (seg_ensemble.py) and
# the mask viewer (seg_viewer.py) are su.<name> too, looked up on first use: `import seg_utils`
# stays light, with no import circle.
_LAZY = dict.fromkeys(("predict", "export_onnx", "read_scan", "parse_channels", "needed_inputs",
                       "site_shift_scores", "site_shift_table", "SHIFTS"), "seg_predict")  # fmt: skip
_LAZY["mask_viewer"] = "seg_viewer"
_LAZY |= dict.fromkeys(("cross_validation_folds", "choose_settings", "predict_ensemble",
                        "load_ensemble", "models_to_score", "sweep_postprocessing"),
                       "seg_ensemble")  # fmt: skip


def __dir__() -> list[str]:
    """dir(su) and tab completion list the lazy names too."""
    return sorted([*globals(), *_LAZY])


def __getattr__(name: str):
    """Module attribute fallback for the names of seg_predict, seg_ensemble, seg_viewer (PEP 562)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'seg_utils' has no attribute {name!r}")


if __name__ == "__main__":  # python -m seg_utils data|predict|export|inputs: seg_predict.main
    import sys

    import seg_predict

    sys.exit(seg_predict.main(sys.argv[1:]))
