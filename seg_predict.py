"""Use a trained U-Net on a new scan: predict a tumour mask, export to ONNX, simulate site shifts.

    python -m seg_utils predict runs/unet/best.pt PATIENT_FOLDER --out results/
    python -m seg_utils predict runs/unet/best.pt SLICE_FOLDER --out results/
    python -m seg_utils predict runs/unet/best.pt flair.nii.gz --t1 t1.nii.gz --t1c t1c.nii.gz --out results/
    python -m seg_utils inputs runs/unet/best.pt        # which scans a checkpoint needs
    python -m seg_utils export runs/unet/best.pt model.onnx

From Python or a notebook: `su.predict(checkpoint, input, out_dir)` writes the same files and
returns the summary. INPUT is a patient folder of this data set (<patient>_<n>.tif, masks
optional), a folder of one patient's 2D slices (PNG/TIFF, 3-channel in seg_utils.CHANNELS order
or 1-channel FLAIR, ordered by the number in the file name) or a NIfTI FLAIR volume.
nibabel, onnx and onnxruntime are imported only inside the functions that need them.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

import seg_files
import seg_synthetic
import seg_utils as su
from seg_runs import usual_mode, write_atomically
from seg_utils import CHANNELS, FLAIR, CheckpointError, DataError

SLICE_SIZE = 256  # this data set's slices are 256 x 256: NIfTI slices are resampled to it
AXIAL = ("S", "P", "L")  # (D, H, W) axes of this set's slices, as nibabel axis codes: slices
# inferior -> superior, rows anterior -> posterior, columns patient right -> left (radiological)
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
INPUT_FLAGS = ("--t1", "INPUT", "--t1c")  # where each of CHANNELS comes from for NIfTI input
DEFAULT_SETTINGS = dict(threshold=0.5, min_size=0, keep_largest=False, tta=False, drop_ends=0.0)
CHUNK = 16  # slices per prediction step (one progress-bar tick)

# ----------------------------------------------------------------------------- channels


def parse_channels(spec: str | list) -> list[int]:
    """ "all", "flair", or comma-separated CHANNELS names / indices -> sorted channel indices."""
    aliases = {"all": [0, 1, 2], "flair": [FLAIR], "t1": [0], "t1c": [2]}
    aliases |= {name.lower(): [i] for i, name in enumerate(CHANNELS)}
    parts = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    indices = []
    for part in (p.strip().lower() for p in parts):
        if part not in aliases and not part.isdigit():
            raise ValueError(
                f"unknown channel {part!r}: use all, flair, {', '.join(CHANNELS)} or 0-2"
            )
        indices += aliases.get(part) or [int(part)]
    return su.Preprocess(channels=sorted(set(indices))).channels  # Preprocess validates them


def needed_inputs(pre: su.Preprocess) -> str:
    """The scans a model reads, e.g. 'FLAIR (INPUT)' or 'pre-contrast (--t1), FLAIR (INPUT), ...'."""
    return ", ".join(f"{CHANNELS[c]} ({INPUT_FLAGS[c]})" for c in pre.channels)


# ----------------------------------------------------------------------------- reading a scan


@dataclass
class NiftiGeometry:
    """How a NIfTI volume maps onto this set's (D, 256, 256) axial slices, and back."""

    image: object  # the nibabel FLAIR image: its affine, header and class are written back
    to_axial: np.ndarray  # nibabel orientation transform, file axes -> AXIAL
    from_axial: np.ndarray  # and back
    plane: tuple  # (H, W) of an axial slice in the file's voxels
    padded: tuple  # (H, W) after padding the shorter physical side: a square field of view
    voxel_mm: tuple  # voxel sizes along the file's axes


@dataclass
class Scan:
    """A new scan as this data set's slices, plus what is needed to write results back."""

    source: Path
    kind: str  # "patient" (this set's layout), "slices" or "nifti"
    image: np.ndarray  # (D, H, W, 3) uint8 in CHANNELS order; channels not given are zero
    present: tuple  # indices of the channels the input holds
    names: list  # one name per slice (PNG masks are <name>_mask.png)
    truth: np.ndarray | None = None  # (D, H, W) 0/1 masks of a patient folder that has them
    nifti: NiftiGeometry | None = None


def read_scan(path, t1=None, t1c=None) -> Scan:
    """Read INPUT: a patient folder, a folder of slices or a NIfTI FLAIR volume (+ --t1/--t1c)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist: give a patient folder, a folder of one patient's "
                        "slices, or a .nii/.nii.gz FLAIR volume")  # fmt: skip
    if path.name.lower().endswith((".nii", ".nii.gz")):
        return read_nifti(path, t1, t1c)
    if t1 or t1c:
        raise DataError(f"--t1/--t1c go with a NIfTI FLAIR volume as INPUT, not with {path}")
    if path.is_dir():
        return read_slice_folder(path)
    if path.suffix.lower() in IMAGE_SUFFIXES + (".jpg", ".jpeg"):
        raise DataError(f"{path} is a single 2D image, but each scan is normalised with its own "
                        "intensity percentiles, which need the whole scan: give the folder of all "
                        "its slices (or the NIfTI volume)")  # fmt: skip
    raise DataError(f"{path}: not a folder of slices nor a .nii/.nii.gz volume")


def _slice_number(path: Path) -> int:
    """The last number in a slice's file name (slice_12.png -> 12), or DataError."""
    numbers = re.findall(r"\d+", path.stem)
    if not numbers:
        raise DataError(f"{path}: no number in the file name to order the slices by: rename it")
    return int(numbers[-1])


def _ordered_slices(folder: Path) -> list[Path]:
    """Image files of a folder (masks left out), ordered by the number in their names."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    images = [p for p in files if not p.stem.lower().endswith("_mask")]
    if len(images) < 2:
        raise DataError(f"{folder} holds {len(images)} slice image(s) (PNG/TIFF): per-scan "
                        "normalisation needs all slices of the scan, give the whole series")  # fmt: skip
    by_number = {}
    for path in sorted(images):
        other = by_number.setdefault(_slice_number(path), path)
        if other != path:
            raise DataError(f"{path} and {other} have the same slice number: remove one")
    return [by_number[n] for n in sorted(by_number)]


def _read_image(path: Path) -> np.ndarray:
    """One slice as (H, W, C), C = 1 (FLAIR) or 3 (CHANNELS order), an opaque alpha dropped, or
    DataError."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise DataError(f"{path}: cannot be read as an image (empty, corrupt or not PNG/TIFF): "
                        "replace it")  # fmt: skip
    if image.ndim == 2:
        return image[..., None]
    if image.shape[2] in (2, 4):  # grey or colour + alpha: OpenCV reads a grey + alpha PNG as 4
        # channels (and a grey + alpha TIFF as grey, its alpha unseen)
        image = _without_alpha(image, path)
    if image.shape[2] == 1:
        return image
    if image.shape[2] != 3:
        raise DataError(f"{path}: {image.shape[2]} channels; the model reads 3 ({', '.join(CHANNELS)} "
                        "stored as RGB, this set's order) or 1 (FLAIR): convert the slices")  # fmt: skip
    # OpenCV reads BGR; the set's order is RGB. A reversed axis, not cv2.cvtColor, which refuses
    # int16 and float64 images
    return np.ascontiguousarray(image[..., ::-1])


def _without_alpha(image: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, C) without its last channel, an alpha that must be opaque everywhere, or DataError."""
    opaque = np.iinfo(image.dtype).max if image.dtype.kind in "ui" else 1.0  # float TIFF: 1
    if (image[..., -1] != opaque).any():  # see-through pixels: what lies behind them?
        raise DataError(f"{path}: {image.shape[2]} channels, the last not an opaque alpha (it has "
                        "transparent pixels, or holds a scan); the model reads 3 channels (" +
                        ", ".join(CHANNELS) + " stored as RGB) or 1 (FLAIR): save the slices "
                        "without transparency or convert them")  # fmt: skip
    return image[..., :-1]


def _stack(paths: list[Path], arrays: list[np.ndarray]) -> np.ndarray:
    """Stack slices (H, W, C) into (D, H, W, C), or DataError naming the odd one out."""
    for path, array in zip(paths, arrays):
        if array.shape != arrays[0].shape or array.dtype != arrays[0].dtype:
            raise DataError(f"{path}: {array.shape} {array.dtype} differs from {paths[0]} "
                            f"{arrays[0].shape} {arrays[0].dtype}: one scan's slices must match")  # fmt: skip
    return np.stack(arrays)


def grey_range(v: np.ndarray) -> tuple[float, float]:
    """(lo, hi) of a scan's finite voxels to map to 0 and 255: hi its 99.9th percentile (hot
    voxels lie above), lo 0 or, where it goes below 0, its 0.1th percentile, once a fill value
    (the minimum, on at least 0.1 % of the voxels: -32768 outside the field of view) is set aside."""
    if v.size and v.min() < 0 and np.count_nonzero(v == v.min()) >= 0.001 * v.size:
        v = v[v != v.min()]  # the fill value becomes background (below lo: 0)
    if v.size == 0:  # nothing finite, or nothing but the fill value
        return 0.0, 0.0
    return min(float(np.percentile(v, 0.1)), 0.0), float(np.percentile(v, 99.9))


def to_uint8(volume: np.ndarray, source: Path) -> np.ndarray:
    """Any dtype and scale -> uint8 like this set's images: uint8 stays, else grey_range -> 0..255
    (NaN and infinity become 0, background)."""
    if volume.dtype == np.uint8:
        values = volume
    elif not np.issubdtype(volume.dtype, np.number) or np.iscomplexobj(volume):
        raise DataError(f"{source}: voxels of type {volume.dtype} are not grey levels (colour or "
                        "complex data?): save the scan as one grey volume")  # fmt: skip
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            v = volume.astype(np.float32)  # (..., ) any shape; float64 beyond float32 -> inf
        finite = np.isfinite(v)
        lo, hi = grey_range(v[finite])
        v[~finite] = lo  # NaN and infinity: background
        values = np.clip((v - lo) / max(hi - lo, 1e-6) * 255, 0, 255).round().astype(np.uint8)
    if values.min() == values.max():
        raise DataError(f"{source}: the scan holds no signal (all voxels the same): check the file")
    return values


def _read_masks(images: list[Path]) -> np.ndarray | None:
    """(D, H, W) 0/1 truth from <name>_mask.<ext> beside every slice, None if there are none."""
    masks = [next(iter(p.parent.glob(f"{glob.escape(p.stem)}_mask.*")), None) for p in images]
    if not any(masks):
        return None
    if not all(masks):
        missing = images[masks.index(None)]
        raise DataError(f"{missing} has no {missing.stem}_mask file while other slices do: add it, "
                        "or move the masks away to predict without Dice")  # fmt: skip
    arrays = [_read_image(m) for m in masks]
    return (_stack(masks, arrays)[..., 0] > 0).astype(np.uint8)  # (D, H, W)


def read_slice_folder(folder: Path) -> Scan:
    """A patient folder of this set (<patient>_<n>.tif, masks optional) or a folder of slices."""
    paths = _ordered_slices(folder)
    image = _stack(paths, [_read_image(p) for p in paths])  # (D, H, W, C)
    image = to_uint8(image, folder)
    truth = _read_masks(paths)
    if truth is not None and truth.shape != image.shape[:3]:
        raise DataError(
            f"{folder}: masks {truth.shape[1:]} differ from the slices {image.shape[1:3]}"
        )
    full = np.zeros((*image.shape[:3], 3), np.uint8)  # (D, H, W, 3)
    present = (0, 1, 2) if image.shape[3] == 3 else (FLAIR,)
    full[..., list(present)] = image
    kind = "patient" if all(seg_files._NAME.match(p.name) for p in paths) else "slices"
    return Scan(folder, kind, full, present, [p.stem for p in paths], truth)


def _nibabel():
    """nibabel, imported on first use; ImportError saying how to install it."""
    try:
        import nibabel
    except ImportError as e:
        raise ImportError("NIfTI input needs nibabel: pip install -r requirements.txt") from e
    return nibabel


def _load_nifti(path: Path):
    """(nibabel image, 3D voxel array) of a NIfTI file, or DataError naming the file."""
    nib = _nibabel()
    if not path.is_file() or path.stat().st_size == 0:
        raise DataError(f"{path}: missing or empty file: give the NIfTI volume")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped != path.name.lower().endswith(".gz"):  # nibabel goes by the name
        right = f"{path.name}.gz" if gzipped else path.name[: -len(".gz")]
        raise DataError(f"{path}: the file is {'' if gzipped else 'not '}gzip-compressed, its name "
                        f"says otherwise: rename it {right}")  # fmt: skip
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)  # stored dtype, or float where the file scales
    except Exception as e:  # nibabel raises many kinds: ImageFileError, EOFError, zlib.error...
        raise DataError(f"{path}: cannot be read as NIfTI ({type(e).__name__}): replace it") from e
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]  # one volume stored as 4D or 5D: (x, y, z, 1) or (x, y, z, 1, 1)
    if data.ndim > 3:
        raise DataError(f"{path}: shape {shape} holds several volumes or a vector per voxel; give "
                        "one 3D volume (e.g. nibabel's image.slicer[..., 0], or fslroi)")  # fmt: skip
    if data.ndim != 3 or min(data.shape) < 2:
        raise DataError(f"{path}: shape {shape} is not one 3D scan; give one 3D volume (a "
                        "single 2D slice cannot be normalised like a whole scan)")  # fmt: skip
    return image, data


def nifti_geometry(image, shape: tuple) -> NiftiGeometry:
    """The reorientation to AXIAL and the square padding for a NIfTI image of 3D `shape`."""
    orient = _nibabel().orientations
    ornt, axial = orient.io_orientation(image.affine), orient.axcodes2ornt(AXIAL)
    to_axial = orient.ornt_transform(ornt, axial)
    voxel = tuple(float(v) for v in np.sqrt((image.affine[:3, :3] ** 2).sum(0)))
    size, spacing = [0, 0, 0], [0.0, 0.0, 0.0]  # in AXIAL order
    for axis, (target, _) in enumerate(to_axial.astype(int)):  # file axis -> AXIAL axis
        size[target], spacing[target] = shape[axis], voxel[axis]
    side = max(size[1] * spacing[1], size[2] * spacing[2])  # mm: a square field of view
    padded = tuple(max(n, round(side / s)) for n, s in zip(size[1:], spacing[1:]))
    return NiftiGeometry(image, to_axial, orient.ornt_transform(axial, ornt), tuple(size[1:]),
                         padded, voxel)  # fmt: skip


def _padding(geometry: NiftiGeometry) -> list:
    """((top, bottom), (left, right)) zero padding from the slice plane to the square one."""
    return [((p - n) // 2, p - n - (p - n) // 2) for n, p in zip(geometry.plane, geometry.padded)]


def to_axial_slices(volume: np.ndarray, geometry: NiftiGeometry) -> np.ndarray:
    """File-layout uint8 volume -> (D, 256, 256) slices oriented like this set's."""
    axial = _nibabel().orientations.apply_orientation(volume, geometry.to_axial)  # (D, h, w)
    axial = np.pad(axial, [(0, 0), *_padding(geometry)])  # (D, H', W') square in mm
    if axial.shape[1:] == (SLICE_SIZE, SLICE_SIZE):
        return np.ascontiguousarray(axial)
    size = (SLICE_SIZE, SLICE_SIZE)
    return np.stack([cv2.resize(s, size, interpolation=cv2.INTER_AREA) for s in axial])


def from_axial_slices(mask: np.ndarray, geometry: NiftiGeometry) -> np.ndarray:
    """Undo to_axial_slices for a (D, 256, 256) 0/1 mask: uint8 0/1 in the file's voxel grid."""
    height, width = geometry.padded
    big = np.stack([cv2.resize(m.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
                    for m in mask]) >= 0.5  # fmt: skip
    (top, _), (left, _) = _padding(geometry)
    plane = big[:, top : top + geometry.plane[0], left : left + geometry.plane[1]]
    return _nibabel().orientations.apply_orientation(plane, geometry.from_axial).astype(np.uint8)


def read_nifti(flair: Path, t1=None, t1c=None) -> Scan:
    """NIfTI FLAIR (+ pre/post-contrast on the same grid) as axial slices of this set's look."""
    paths = {c: Path(p) for c, p in ((0, t1), (FLAIR, flair), (2, t1c)) if p}
    loaded = {c: _load_nifti(p) for c, p in paths.items()}  # {channel: (image, data)}
    reference, ref_data = loaded[FLAIR]
    for c, (image, data) in loaded.items():
        if data.shape != ref_data.shape or not np.allclose(
            image.affine, reference.affine, atol=1e-3
        ):
            raise DataError(f"{paths[c]}: shape {data.shape} / affine differ from the FLAIR volume "
                            f"{flair} {ref_data.shape}: resample it onto the FLAIR's grid first")  # fmt: skip
    geometry = nifti_geometry(reference, ref_data.shape)
    slices = {
        c: to_axial_slices(to_uint8(data, paths[c]), geometry) for c, (_, data) in loaded.items()
    }
    volume = np.zeros((*slices[FLAIR].shape, 3), np.uint8)  # (D, 256, 256, 3)
    for c, channel in slices.items():
        volume[..., c] = channel
    names = [f"axial_{z + 1}" for z in range(len(volume))]
    return Scan(flair, "nifti", volume, tuple(sorted(paths)), names, nifti=geometry)


# ----------------------------------------------------------------------------- predicting


def _saved_setting(name: str, value):
    """A setting as test_metrics.json holds it, in its type, or TypeError (a damaged file)."""
    default = DEFAULT_SETTINGS[name]
    if name == "keep_largest" and value == "mass":
        return value
    if isinstance(default, bool):
        right = isinstance(value, bool)
    else:  # a whole number where the setting is one (min_size)
        right = seg_files.is_number(value) and (type(default) is float or float(value).is_integer())
    if not right:  # "false" would read as True, "high" would not read at all
        raise TypeError(f"{name} is {value!r}")
    return type(default)(value)


def check_settings(settings: dict) -> None:
    """DataError unless threshold and blob rule are ones predict can apply (before any work)."""
    try:
        seg_files.check_threshold(settings["threshold"])
        su.check_blob_rule(settings["min_size"], settings["keep_largest"], settings["drop_ends"])
    except ValueError as e:
        raise DataError(f"{e} (the flag, or test_metrics.json beside the checkpoint)") from e


def run_settings(checkpoint: Path, **overrides) -> tuple[dict, str]:
    """Threshold, min_size, keep_largest, drop_ends and tta that notebook 04 chose on validation
    (its test_metrics.json beside the checkpoint), else the defaults; then the overrides given."""
    metrics = checkpoint.parent / "test_metrics.json"
    settings = dict(DEFAULT_SETTINGS)
    source = f"defaults (threshold 0.5, no post-processing): no {metrics} from notebook 04"
    if metrics.is_file():
        try:
            record = json.loads(metrics.read_text())
            chosen, evaluated = record["chosen_on_validation"], Path(record["checkpoint"]).name
            saved = {k: _saved_setting(k, chosen[k]) for k in DEFAULT_SETTINGS if k in chosen}
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{metrics} is damaged ({seg_files.error_gist(e)}): delete it "
                                  "or run notebook 04 again") from e  # fmt: skip
        if evaluated == checkpoint.name:
            settings |= saved
            source = f"{metrics}: chosen on validation by notebook 04"
        else:
            source = f"defaults (threshold 0.5, no post-processing): {metrics} is for {evaluated}"
    given = {k: v for k, v in overrides.items() if v is not None}
    if given:
        source += f"; overridden by the caller: {', '.join(given)}"
    return settings | given, source


def model_image(scan: Scan, pre: su.Preprocess, checkpoint: Path, fill_missing=None):
    """The scan's (D, H, W, 3) image with every channel the model reads, and those filled in."""
    missing = [c for c in pre.channels if c not in scan.present]
    if not missing:
        return scan.image, []
    if fill_missing == "flair" and FLAIR in scan.present:
        image = scan.image.copy()
        image[..., missing] = image[..., [FLAIR]]  # as in 6 of the LGG set's 110 patients
        return image, [CHANNELS[c] for c in missing]
    given = ", ".join(CHANNELS[c] for c in scan.present)
    if scan.kind == "nifti":
        add = " and ".join(f"{INPUT_FLAGS[c]} {CHANNELS[c]}.nii.gz" for c in missing)
    else:
        add = "3-channel slices (pre-contrast, FLAIR, post-contrast as RGB)"
    raise DataError(f"{checkpoint} needs {needed_inputs(pre)} but {scan.source} gives {given}: "
                    f"add {add}; or pass --fill-missing flair (copies FLAIR into the missing "
                    "channels: expect worse masks); or use a FLAIR-only checkpoint")  # fmt: skip


def channel_warnings(scan: Scan, pre: su.Preprocess) -> list[str]:
    """A note where the channels the model reads are all identical, as in a grey scan saved as
    RGB: the model then works from FLAIR alone (the LGG set holds FLAIR copies in place of both
    other scans for 6 of its 110 patients)."""
    read = list(pre.channels)
    image = scan.image[..., read]  # (D, H, W, C)
    if len(read) < 2 or any(c not in scan.present for c in read) or (image != image[..., :1]).any():
        return []
    names = ", ".join(CHANNELS[c] for c in read)
    return [f"{scan.source}: its {names} channels are identical (a grey scan saved as RGB?): the "
            "model then works from FLAIR alone, as it did for the 6 of the LGG set's 110 patients "
            "whose other scans are missing; give the other scans if you have them"]  # fmt: skip


def predict_mask(model, pre: su.Preprocess, image: np.ndarray, settings: dict, progress=True):
    """0/1 tumour mask (D, H, W) of a (D, H, W, 3) uint8 scan: probabilities, threshold,
    post-processing; a progress bar ticks every CHUNK slices."""
    volume = su.Volume(
        "scan", list(range(1, len(image) + 1)), image, np.zeros(image.shape[:3], np.uint8)
    )
    prepared = su.prepare_volume(volume, pre)  # crop, resize, per-scan norm over ALL slices
    probs = []
    for start in tqdm(range(0, len(image), CHUNK), desc="predicting", disable=not progress):
        chunk = replace(prepared, image=prepared.image[start : start + CHUNK])
        probs.append(su.predict_prepared(model, chunk, tta=settings["tta"]))  # (c, S, S)
    prob = su.uncrop(np.concatenate(probs), prepared.box, prepared.shape)  # (D, H, W)
    binary = su.postprocess(prob >= settings["threshold"], settings["min_size"],
                            settings["keep_largest"], prob, settings["drop_ends"])  # fmt: skip
    return binary.astype(np.uint8)


# ----------------------------------------------------------------------------- writing results


def montage(image: np.ndarray, pred: np.ndarray, names: list, truth=None, cols=6, tiles=36):
    """BGR uint8 grid of the slices with tumour (predicted or true), FLAIR grey, outlines:
    prediction red, truth green; at most `tiles` slices, evenly spread."""
    found = pred.any((1, 2)) | (truth.any((1, 2)) if truth is not None else False)
    picks = np.flatnonzero(found)
    if len(picks) > tiles:
        picks = picks[np.linspace(0, len(picks) - 1, tiles).round().astype(int)]
    if not len(picks):
        picks = [len(image) // 2]  # nothing found: show the middle slice, say so
    panels = []
    for z in picks:
        png = su.render_slice(image[z], None if truth is None else truth[z], pred[z], size=256)
        panel = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)  # (256, 256, 3)
        label = names[z] if found[z] else f"{names[z]}: no tumour found"
        cv2.putText(panel, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 255, 255), 1)
        panels.append(panel)
    panels += [np.zeros_like(panels[0])] * (-len(panels) % min(cols, len(panels)))
    width = min(cols, len(panels))
    return np.vstack([np.hstack(panels[i : i + width]) for i in range(0, len(panels), width)])


def write_results(folder: Path, scan: Scan, image: np.ndarray, pred: np.ndarray) -> list[str]:
    """The mask(s) in the input's own geometry and overlay.png; returns the file names."""
    if scan.nifti is not None:
        nib, source = _nibabel(), scan.nifti.image
        header = source.header.copy()
        header.set_data_dtype(np.uint8)
        mask = type(source)(from_axial_slices(pred, scan.nifti), source.affine, header)
        mask.header.set_slope_inter(1, 0)  # voxel values are the mask, unscaled
        nib.save(mask, folder / "mask.nii.gz")
        written = ["mask.nii.gz"]
    else:
        written = [f"{name}_mask.png" for name in scan.names]
        for name, m in zip(written, pred):
            cv2.imwrite(str(folder / name), m.astype(np.uint8) * 255)  # 0/255 like the set's masks
    cv2.imwrite(str(folder / "overlay.png"), montage(image, pred, scan.names, scan.truth))
    return written + ["overlay.png", "summary.json"]


def _not_results(out: Path) -> list[str]:
    """The names in folder `out` that no earlier predict wrote there (its summary.json lists
    what it wrote)."""
    try:
        listed = set(json.loads((out / "summary.json").read_text())["outputs"]) | {"summary.json"}
    except (OSError, ValueError, KeyError, TypeError):  # no summary, or not predict's
        listed = set()
    system = {".DS_Store", "Thumbs.db", "desktop.ini"}  # a file browser's, not the user's
    names = [p.name for p in out.iterdir() if p.name not in system and not p.name.startswith("._")]
    return sorted(name for name in names if name not in listed)


def check_out_folder(out: Path, overwrite: bool, keep=()) -> None:
    """DataError unless predict may write folder `out`: new or empty, or with `overwrite` one
    holding an earlier predict's results and nothing else; never a file, a folder holding one
    of `keep` (the input, the checkpoint) or the current folder; somewhere writable."""
    where = out.resolve()
    named = [(Path.cwd(), "the current folder")] + [(Path(k), str(k)) for k in keep if k]
    for path, name in named:
        if where == path.resolve() or where in path.resolve().parents:
            raise DataError(f"--out {out} holds {name}: give the results a folder of their own")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DataError(f"--out {out} is a file or a link, not a folder: choose another --out")
    if out.exists() and any(out.iterdir()):
        others = _not_results(out)
        if others:
            raise DataError(f"--out {out} holds files predict did not write ({', '.join(others[:3])}"
                            f"{', ...' if len(others) > 3 else ''}): choose another --out "
                            "(--overwrite replaces earlier results only)")  # fmt: skip
        if not overwrite:
            raise DataError(f"{out} already exists with results in it: choose another --out, or "
                            "pass --overwrite (overwrite=True) to replace it")  # fmt: skip
    parent = next(p for p in where.parents if p.exists())  # where out (and its staging) go
    if not os.access(parent, os.W_OK):
        raise DataError(f"cannot write in {parent}: choose an --out where you can create files")


def _swap_in(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`; earlier results at `out` go only once the new ones are there,
    and come back if the rename fails."""
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    old = trash / "old"
    try:
        if out.exists():
            out.rename(old)
        staging.rename(out)
    except BaseException:  # Ctrl-C between the renames too
        if old.exists() and not out.exists():
            old.rename(out)  # the earlier results back where they were
        if not old.exists():
            trash.rmdir()  # else the earlier results stay in it, named in the traceback
        raise
    shutil.rmtree(trash)


@contextmanager
def staged_folder(out: Path, overwrite: bool = False, keep=()):
    """Yield an empty folder beside `out` that replaces `out` at the end, or goes on error."""
    check_out_folder(out, overwrite, keep)
    staging = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        os.chmod(staging, usual_mode(0o777))  # mkdtemp makes 0700
        yield staging
        _swap_in(staging, out)
    except OSError as e:  # a full disk, a read-only mount, a path that cannot be a folder
        raise DataError(f"writing the results to {out} failed ({e}): check that path, its "
                        "permissions and the free space, or choose another --out") from e  # fmt: skip
    finally:  # Ctrl-C included: nothing half-written stays
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def summarise_prediction(scan: Scan, pred: np.ndarray) -> dict:
    """Slices with tumour, its size (mL for NIfTI, pixels otherwise) and Dice if masks exist."""
    tumour = [scan.names[z] for z in np.flatnonzero(pred.any((1, 2)))]
    out = dict(slices=len(pred), tumour_slices=tumour, tumour_slice_count=len(tumour))
    if scan.nifti is not None:
        voxels = int(from_axial_slices(pred, scan.nifti).sum())  # counted in the file's grid
        out |= dict(tumour_voxels=voxels, voxel_mm=list(scan.nifti.voxel_mm),
                    tumour_volume_ml=voxels * float(np.prod(scan.nifti.voxel_mm)) / 1000,
                    axcodes="".join(_nibabel().aff2axcodes(scan.nifti.image.affine)))  # fmt: skip
    else:
        out["tumour_pixels"] = int(pred.sum())
    if scan.truth is not None:
        out["dice"] = su.dice_score(pred, scan.truth)
    return out


def predict(checkpoint, source, out_dir, t1=None, t1c=None, threshold=None, min_size=None,
            keep_largest=None, tta=None, fill_missing=None, overwrite=False, progress=True,
            drop_ends=None) -> dict:  # fmt: skip
    """Segment a new scan `source` (patient folder, slice folder or NIfTI FLAIR): write its
    mask(s), overlay.png and summary.json to out_dir (atomically); return the summary.
    Settings come from notebook 04's choice unless given here."""
    checkpoint, out_dir = Path(checkpoint), Path(os.path.abspath(out_dir))  # "new/.." as its parent
    keep = (checkpoint, source, t1, t1c)  # never inside out_dir, which gets replaced
    check_out_folder(out_dir, overwrite, keep)  # before any work: fail fast
    model, pre, _ = su.load_checkpoint(checkpoint)
    settings, origin = run_settings(checkpoint, threshold=threshold, min_size=min_size,
                                    keep_largest=keep_largest, tta=tta, drop_ends=drop_ends)  # fmt: skip
    check_settings(settings)
    scan = read_scan(source, t1, t1c)
    image, filled = model_image(scan, pre, checkpoint, fill_missing)
    pred = predict_mask(model, pre, image, settings, progress)
    summary = dict(input=str(source), t1=t1 and str(t1), t1c=t1c and str(t1c), input_kind=scan.kind,
                   checkpoint=str(checkpoint), model_inputs=needed_inputs(pre),
                   given_inputs=[CHANNELS[c] for c in scan.present], filled_from_flair=filled,
                   settings=settings, settings_source=origin,
                   warnings=[] if filled else channel_warnings(scan, pre),
                   preprocess=asdict(pre), **summarise_prediction(scan, pred))  # fmt: skip
    with staged_folder(out_dir, overwrite, keep) as folder:
        summary["outputs"] = write_results(folder, scan, image, pred)
        (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# ----------------------------------------------------------------------------- ONNX export


@contextmanager
def _quiet_export():
    """Hide torch.onnx's chatter (torchvision ops it skips, deprecations) for one export."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def export_onnx(checkpoint, out_path, overwrite: bool = False) -> Path:
    """Write the checkpoint's U-Net as ONNX (fp32, dynamic batch): input "image" (B, C, S, S)
    normalised as predict_prepared does, output "logits" (B, 1, S, S); written atomically, over
    an existing file only with `overwrite`, never over the checkpoint."""
    out_path = Path(out_path)
    if out_path.resolve() == Path(checkpoint).resolve():
        raise DataError(f"{out_path} is the checkpoint itself: name the ONNX file, e.g. model.onnx")
    if out_path.is_dir():
        raise DataError(f"{out_path} is a folder: name the file, e.g. {out_path / 'model.onnx'}")
    if out_path.exists() and not overwrite:
        raise DataError(f"{out_path} already exists: choose another name, or pass --overwrite "
                        "(overwrite=True) to replace it")  # fmt: skip
    model, pre, _ = su.load_checkpoint(checkpoint, torch.device("cpu"))
    model = model.float().to(memory_format=torch.contiguous_format)
    example = torch.zeros(2, len(pre.channels), pre.size, pre.size)  # batch 2: not specialised
    try:
        with _quiet_export():
            program = torch.onnx.export(model, (example,), input_names=["image"], output_names=["logits"],
                                        dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)  # fmt: skip
    except ImportError as e:
        raise ImportError(
            "ONNX export needs onnx and onnxscript: pip install -r requirements.txt"
        ) from e
    program.model.metadata_props["seg_utils.preprocess"] = json.dumps(asdict(pre))
    model_bytes = program.model_proto.SerializeToString()  # weights inside: no external data file
    try:
        write_atomically(out_path, lambda f: f.write(model_bytes))  # own tmp file per export
    except OSError as e:  # a read-only folder, a full disk
        raise DataError(f"writing {out_path} failed ({e}): check that path, its permissions and "
                        "the free space") from e  # fmt: skip
    return out_path


def onnx_session(path):
    """An onnxruntime CPU session for an exported model."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("running ONNX needs onnxruntime: pip install -r requirements.txt") from e
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- site shifts


def _with(volume: su.Volume, image: np.ndarray, mask: np.ndarray | None = None) -> su.Volume:
    """A copy of `volume` with a new (D, H, W, 3) image (float: clipped to uint8) and mask."""
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    mask = volume.mask if mask is None else mask.astype(np.uint8)
    return su.Volume(volume.patient, list(range(1, len(image) + 1)), image, mask)


def skull_strip(volume: su.Volume, rng=None) -> su.Volume:
    """Zero everything outside a brain mask: the head (>10% of max) eroded by 6% of the slice
    width per slice, i.e. without scalp and skull, then dilated by 1%."""
    from scipy import ndimage

    width = volume.image.shape[2]
    head = volume.image.max(3) > 0.1 * volume.image.max()  # (D, H, W)
    brain = np.zeros_like(head)
    for z, h in enumerate(head):
        inside = ndimage.distance_transform_edt(ndimage.binary_fill_holes(h))
        brain[z] = inside > 0.06 * width
    brain = ndimage.binary_dilation(brain, iterations=max(1, int(0.01 * width)))
    return _with(volume, volume.image * brain[..., None])


def _resample_z(volume: su.Volume, depth: int) -> su.Volume:
    """Linear interpolation along z to `depth` slices (image and mask, mask >= 0.5)."""
    z = np.linspace(0, len(volume.image) - 1, depth)
    lo = np.floor(z).astype(int)
    hi = np.minimum(lo + 1, len(volume.image) - 1)
    w = (z - lo).astype(np.float32)[:, None, None]  # (depth, 1, 1) weight of the upper slice
    image = volume.image[lo] * (1 - w[..., None]) + volume.image[hi] * w[..., None]
    mask = volume.mask[lo] * (1 - w) + volume.mask[hi] * w
    return _with(volume, image, mask >= 0.5)


def _zoom(volume: su.Volume, factor: float) -> su.Volume:
    """factor < 1: pad and downscale (a smaller head in the frame); > 1: crop the centre and
    upscale (a larger one); the frame keeps its size."""
    _, height, width = volume.mask.shape
    side = round(height / factor)
    pad = max(0, (side - height) // 2)
    image = np.pad(volume.image, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    mask = np.pad(volume.mask, [(0, 0), (pad, pad), (pad, pad)]).astype(np.float32)
    crop = max(0, (image.shape[1] - side) // 2)
    window = (slice(None), slice(crop, crop + side), slice(crop, crop + side))
    size = (width, height)
    image = np.stack([cv2.resize(s, size, interpolation=cv2.INTER_AREA) for s in image[window]])
    mask = np.stack([cv2.resize(m, size, interpolation=cv2.INTER_LINEAR) for m in mask[window]])
    return _with(volume, image, mask >= 0.5)


def _rician(volume: su.Volume, rng, level: float) -> su.Volume:
    """Magnitude of complex Gaussian noise, sigma = level x the 99th percentile per channel."""
    x = volume.image.astype(np.float32)
    sigma = level * np.percentile(x, 99, axis=(0, 1, 2))  # (3,)
    real, imag = (rng.normal(0, 1, x.shape).astype(np.float32) * sigma for _ in range(2))
    return _with(volume, np.sqrt((x + real) ** 2 + imag**2))


def _bias(volume: su.Volume, rng, strength: float) -> su.Volume:
    """Multiply by a smooth field 1 +- strength (coarse 3x3x3 noise, upsampled)."""
    field = 1 + strength * seg_synthetic._smooth_noise(
        rng, volume.mask.shape, (3, 3, 3)
    )  # (D, H, W)
    return _with(volume, volume.image * field[..., None])


def _gamma(volume: su.Volume, gamma: float) -> su.Volume:
    """A contrast change: (x / 255) ** gamma per voxel."""
    return _with(volume, 255 * (volume.image / 255.0) ** gamma)


SHIFTS = {  # name -> function(volume, rng) -> shifted volume; rng seeded per patient and shift
    "skull stripped": skull_strip,
    "intensity x0.6": lambda v, rng: _with(v, v.image * 0.6),
    "gamma 0.7 (brighter mid-tones)": lambda v, rng: _gamma(v, 0.7),
    "gamma 1.5 (darker mid-tones)": lambda v, rng: _gamma(v, 1.5),
    "bias field +-30%": lambda v, rng: _bias(v, rng, 0.3),
    "Rician noise 5%": lambda v, rng: _rician(v, rng, 0.05),
    "thinner slices (2x in z)": lambda v, rng: _resample_z(v, 2 * len(v.image) - 1),
    "zoom out 0.75 (smaller head)": lambda v, rng: _zoom(v, 0.75),
    "zoom in 1.25 (larger head)": lambda v, rng: _zoom(v, 1.25),
}


def site_shift_scores(model, pre, volumes, settings=None, shifts=None, seed=0, progress=True):
    """pandas DataFrame of per-patient Dice: one row per patient, columns clean + each shift."""
    import pandas as pd

    settings = DEFAULT_SETTINGS | (settings or {})
    rows = []
    for i, volume in enumerate(tqdm(volumes, desc="site shifts", disable=not progress)):
        row = {"patient": volume.patient, "clean": _shift_dice(model, pre, volume, settings)}
        for name in shifts or SHIFTS:
            rng = np.random.default_rng([seed, i, zlib.crc32(name.encode())])  # order-free
            row[name] = _shift_dice(model, pre, SHIFTS[name](volume, rng), settings)
        rows.append(row)
    return pd.DataFrame(rows).set_index("patient")


def _shift_dice(model, pre, volume: su.Volume, settings: dict) -> float:
    """Patient Dice with the run's TTA, threshold and post-processing (as notebook 04 scores)."""
    prob = su.predict_volume(model, volume, pre, tta=settings["tta"])
    patients, _, _ = su.score_patients({volume.patient: prob}, [volume], settings["threshold"],
                                       settings["min_size"], settings["keep_largest"],
                                       settings["drop_ends"])  # fmt: skip
    return float(patients.dice.iloc[0])


def site_shift_table(scores):
    """Mean per-patient Dice per condition and its difference to clean."""
    import pandas as pd

    mean = scores.mean()
    return pd.DataFrame({"patient Dice mean": mean, "change vs clean": mean - mean["clean"]})


def random_site_shift(volume: su.Volume, rng) -> su.Volume:
    """The volume as another site might deliver it: skull stripping, a zoom, a gamma, a bias field
    and Rician noise, each by chance and of random strength (the families of SHIFTS, other values)."""
    if rng.random() < 0.3:  # physical changes first, as in the scanner and the site's pipeline
        volume = skull_strip(volume)
    if rng.random() < 0.3:
        volume = _zoom(volume, float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))))
    if rng.random() < 0.5:
        volume = _gamma(volume, float(np.exp(rng.uniform(np.log(0.6), np.log(1.7)))))
    if rng.random() < 0.5:
        volume = _bias(volume, rng, rng.uniform(0.1, 0.4))
    if rng.random() < 0.5:  # noise last: it is added to the image the coil measured
        volume = _rician(volume, rng, rng.uniform(0.01, 0.08))
    return volume


class WithTwins(su.SliceDataset):
    """Training slices plus shifted twins (shift(volume, rng): skull_strip, random_site_shift) of
    a seeded share of the volumes: an augmentation for scans from other sites. An epoch draws as
    many slices as the originals have (len), by tumour_weights over all of them (train's default
    tumour_sampling; a plain random sampler would draw originals only), so an epoch costs what it
    costs without twins."""

    def __init__(self, volumes: list[su.Volume], pre, share: float, seed: int = 0, transform=None,
                 shift=skull_strip):  # fmt: skip
        if not 0 <= share <= 1:
            raise ValueError(f"the share of volumes with a twin is in [0, 1], not {share}")
        order = np.random.default_rng(seed).permutation(len(volumes))
        picked = sorted(order[: round(share * len(volumes))])
        twins = [shift(volumes[i], np.random.default_rng([seed, int(i)])) for i in picked]
        super().__init__(su.prepare_volumes(volumes + twins, pre), transform)
        self.originals = sum(len(v.image) for v in volumes)  # slices an epoch draws

    def __len__(self) -> int:
        return self.originals


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    """The command line of `python -m seg_utils`: data, predict, export, inputs."""
    parser = argparse.ArgumentParser(
        prog="python -m seg_utils", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="segment a new scan")
    p.add_argument("checkpoint", type=Path, help="best.pt from notebook 03 / train_lgg.py")
    p.add_argument("input", type=Path, help="patient folder, folder of slices, or NIfTI FLAIR")
    p.add_argument("--out", type=Path, required=True, help="folder for the results (new or empty)")
    p.add_argument("--t1", type=Path, help="NIfTI pre-contrast volume on the FLAIR's grid")
    p.add_argument("--t1c", type=Path, help="NIfTI post-contrast volume on the FLAIR's grid")
    p.add_argument("--threshold", type=float, help="probability cut-off (default: notebook 04's)")
    p.add_argument("--min-size", type=int, help="drop 3D blobs under this many voxels")
    p.add_argument(
        "--keep-largest", action=argparse.BooleanOptionalAction, help="largest blob only"
    )
    p.add_argument("--drop-ends", type=float, help="drop blobs lying wholly within this fraction "
                   "of the slices at either end (skull base, vertex), e.g. 0.2")  # fmt: skip
    p.add_argument(
        "--tta", action=argparse.BooleanOptionalAction, help="flip test-time augmentation"
    )
    p.add_argument("--fill-missing", choices=["flair"], help="copy FLAIR into missing channels")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    e = sub.add_parser("export", help="write the model as ONNX (dynamic batch)")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("onnx", type=Path, help="output file, e.g. model.onnx")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    i = sub.add_parser("inputs", help="say which scans a checkpoint needs")
    i.add_argument("checkpoint", type=Path)
    sub.add_parser("data", help="find (or generate) the data set and print where it is")
    return parser


def main(argv=None) -> int:
    """Run one command; errors the user can fix print one line and return 2."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "data":
            found = su.resolve_data_dir()
            print(f"data: {found} ({len(su.scan_dataset(found))} slices)")
        elif args.command == "predict":
            summary = predict(args.checkpoint, args.input, args.out, args.t1, args.t1c,
                              args.threshold, args.min_size, args.keep_largest, args.tta,
                              args.fill_missing, args.overwrite, not args.quiet,
                              args.drop_ends)  # fmt: skip
            for warning in summary["warnings"]:
                print(f"warning: {warning}", file=sys.stderr)
            size = summary.get("tumour_volume_ml")
            print(f"{summary['tumour_slice_count']} of {summary['slices']} slices with tumour"
                  + (f", {size:.2f} mL" if size is not None else f", {summary['tumour_pixels']} px")
                  + (f", Dice {summary['dice']:.3f}" if "dice" in summary else "")
                  + f"; results in {args.out}/")  # fmt: skip
        elif args.command == "export":
            print(f"wrote {export_onnx(args.checkpoint, args.onnx, args.overwrite)}")
        else:
            print(
                f"{args.checkpoint} needs: {needed_inputs(su.load_checkpoint(args.checkpoint)[1])}"
            )
    except (DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
