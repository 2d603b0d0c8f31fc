"""Reading a new scan as this data set's slices: a patient folder of the set, a folder of one
patient's 2D slices, or a NIfTI volume (FLAIR, with pre- and post-contrast on the same grid), and
the NIfTI geometry both ways, so that a mask goes back onto the file's own voxel grid.

    scan = read_scan("flair.nii.gz", t1="t1.nii.gz", t1c="t1c.nii.gz")
    scan.image        # (D, 256, 256, 3) uint8 in CHANNELS order; channels not given are zero

seg_predict.predict reads its INPUT with read_scan; notebook 06 shows the conversion.
"""

from __future__ import annotations

import contextlib
import glob
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np

from seg_files import CHANNELS, FLAIR, SLICE_NAME, DataError, check_path, read_image

SLICE_SIZE = 256  # this data set's slices are 256 x 256: NIfTI slices are resampled to it
AXIAL = ("S", "P", "L")  # (D, H, W) axes of this set's slices, as nibabel axis codes: slices
# inferior -> superior, rows anterior -> posterior, columns patient right -> left (radiological)
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
MAX_VOXELS = 2**31  # of a NIfTI scan resampled to square slices: 2 GiB a uint8 copy
WHOLE_SCAN = "give a patient folder, a folder of a scan's slices or a .nii/.nii.gz FLAIR volume"


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
    path = check_path(path, "INPUT", WHOLE_SCAN)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        return read_nifti(path, t1, t1c)
    if t1 or t1c:
        raise DataError(f"--t1/--t1c go with a NIfTI FLAIR volume as INPUT, not with {path}")
    if path.is_dir():
        return read_slice_folder(path)
    _refuse_dicom([path])
    if path.suffix.lower() in IMAGE_SUFFIXES + (".jpg", ".jpeg"):
        raise DataError(
            f"{path} is a single 2D image, but each scan is normalised with its own "
            "intensity percentiles, which need the whole scan: give the folder of all "
            "its slices (or the NIfTI volume)"
        )
    raise DataError(f"{path}: not a folder of slices nor a .nii/.nii.gz volume")


def _refuse_dicom(files: list[Path]) -> None:
    """DataError if one of the files is DICOM (named .dcm, or "DICM" after 128 bytes)."""
    for path in files:  # a folder, or an unreadable file, is said where it is read
        with contextlib.suppress(OSError), open(path, "rb") as f:
            if path.suffix.lower() == ".dcm" or f.read(132)[128:] == b"DICM":
                raise DataError(
                    f"{path} is DICOM, which unet-seg does not read: convert the series to NIfTI, "
                    "e.g. dcm2niix -z y -o OUT_FOLDER DICOM_FOLDER, and give its .nii.gz"
                )


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
        _refuse_dicom(sorted(folder.iterdir()))
        raise DataError(
            f"{folder} holds {len(images)} slice image(s) (PNG/TIFF): per-scan "
            "normalisation needs all slices of the scan, give the whole series"
        )
    by_number = {}
    for path in sorted(images):
        other = by_number.setdefault(_slice_number(path), path)
        if other != path:
            raise DataError(f"{path} and {other} have the same slice number: remove one")
    return [by_number[n] for n in sorted(by_number)]


def _read_image(path: Path) -> np.ndarray:
    """One slice as (H, W, C): C = 1 (FLAIR) or 3 (CHANNELS order), an opaque alpha dropped."""
    image = read_image(path)
    if image.ndim == 2:
        return image[..., None]
    if image.shape[2] in (2, 4):  # grey or colour + alpha: OpenCV reads a grey + alpha PNG as 4
        # channels (and a grey + alpha TIFF as grey, its alpha unseen)
        image = _without_alpha(image, path)
    if image.shape[2] == 1:
        return image
    if image.shape[2] != 3:
        raise DataError(
            f"{path}: {image.shape[2]} channels; the model reads 3 ({', '.join(CHANNELS)} "
            "stored as RGB, this set's order) or 1 (FLAIR): convert the slices"
        )
    # OpenCV reads BGR; the set's order is RGB. A reversed axis, not cv2.cvtColor, which refuses
    # int16 and float64 images
    return np.ascontiguousarray(image[..., ::-1])


def _without_alpha(image: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, C) without its last channel, an alpha that must be opaque everywhere, or DataError."""
    opaque = np.iinfo(image.dtype).max if image.dtype.kind in "ui" else 1.0  # float TIFF: 1
    if (image[..., -1] != opaque).any():  # see-through pixels: what lies behind them?
        raise DataError(
            f"{path}: {image.shape[2]} channels, the last not an opaque alpha (it has transparent "
            f"pixels, or holds a scan); the model reads 3 channels ({', '.join(CHANNELS)} stored "
            "as RGB) or 1 (FLAIR): save the slices without transparency or convert them"
        )
    return image[..., :-1]


def _stack(paths: list[Path], arrays: list[np.ndarray]) -> np.ndarray:
    """Stack slices (H, W, C) into (D, H, W, C), or DataError naming the odd one out."""
    for path, array in zip(paths, arrays):
        if array.shape != arrays[0].shape or array.dtype != arrays[0].dtype:
            raise DataError(
                f"{path}: {array.shape} {array.dtype} differs from {paths[0]} "
                f"{arrays[0].shape} {arrays[0].dtype}: one scan's slices must match"
            )
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
        raise DataError(
            f"{source}: voxels of type {volume.dtype} are not grey levels (colour or "
            "complex data?): save the scan as one grey volume"
        )
    else:
        # float64 stays float64: a scan beyond float32's range (1e39) keeps its signal
        v = volume.astype(np.result_type(volume.dtype, np.float32))
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
        raise DataError(
            f"{missing} has no {missing.stem}_mask file while other slices do: add it, "
            "or move the masks away to predict without Dice"
        )
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
    kind = "patient" if all(SLICE_NAME.match(p.name) for p in paths) else "slices"
    return Scan(folder, kind, full, present, [p.stem for p in paths], truth)


def _load_nifti(path: Path):
    """(nibabel image, 3D voxel array) of a NIfTI file, or DataError naming the file."""
    path = check_path(path, "a NIfTI volume", "give the NIfTI volume")
    if not path.is_file() or path.stat().st_size == 0:
        raise DataError(f"{path}: missing or empty file: give the NIfTI volume")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped != path.name.lower().endswith(".gz"):  # nibabel goes by the name
        right = f"{path.name}.gz" if gzipped else path.name[: -len(".gz")]
        raise DataError(
            f"{path}: the file is {'' if gzipped else 'not '}gzip-compressed, its name "
            f"says otherwise: rename it {right}"
        )
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)  # stored dtype, or float where the file scales
    except Exception as e:  # nibabel raises many kinds: ImageFileError, EOFError, zlib.error...
        raise DataError(f"{path}: cannot be read as NIfTI ({type(e).__name__}): replace it") from e
    axes = image.affine[:3, :3]  # voxel axes in mm: none of length 0, no two parallel, no NaN
    if not abs(np.linalg.det(axes)) > 1e-6 * np.linalg.norm(axes, axis=0).prod():
        raise DataError(
            f"{path}: its affine has a zero-length or singular axis ({axes.round(4).tolist()}): "
            "its geometry is broken; convert the scan again"
        )
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]  # one volume stored as 4D or 5D: (x, y, z, 1) or (x, y, z, 1, 1)
    if data.ndim > 3:
        raise DataError(
            f"{path}: shape {shape} holds several volumes or a vector per voxel; give "
            "one 3D volume (e.g. nibabel's image.slicer[..., 0], or fslroi)"
        )
    if data.ndim != 3 or min(data.shape) < 2:
        raise DataError(
            f"{path}: shape {shape} is not one 3D scan; give one 3D volume (a "
            "single 2D slice cannot be normalised like a whole scan)"
        )
    return image, data


def nifti_geometry(image, shape: tuple) -> NiftiGeometry:
    """The reorientation to AXIAL and the square padding for a NIfTI image of 3D `shape`."""
    orient = nib.orientations
    ornt, axial = orient.io_orientation(image.affine), orient.axcodes2ornt(AXIAL)
    to_axial = orient.ornt_transform(ornt, axial)
    voxel = tuple(float(v) for v in np.sqrt((image.affine[:3, :3] ** 2).sum(0)))
    size, spacing = [0, 0, 0], [0.0, 0.0, 0.0]  # in AXIAL order
    for axis, (target, _) in enumerate(to_axial.astype(int)):  # file axis -> AXIAL axis
        size[target], spacing[target] = shape[axis], voxel[axis]
    side = max(size[1] * spacing[1], size[2] * spacing[2])  # mm: a square field of view
    padded = tuple(max(n, round(side / s)) for n, s in zip(size[1:], spacing[1:]))
    return NiftiGeometry(
        image, to_axial, orient.ornt_transform(axial, ornt), tuple(size[1:]), padded, voxel
    )


def _padding(geometry: NiftiGeometry) -> list:
    """((top, bottom), (left, right)) zero padding from the slice plane to the square one."""
    return [((p - n) // 2, p - n - (p - n) // 2) for n, p in zip(geometry.plane, geometry.padded)]


def to_axial_slices(volume: np.ndarray, geometry: NiftiGeometry) -> np.ndarray:
    """File-layout uint8 volume -> (D, 256, 256) slices oriented like this set's."""
    axial = nib.orientations.apply_orientation(volume, geometry.to_axial)  # (D, h, w)
    axial = np.pad(axial, [(0, 0), *_padding(geometry)])  # (D, H', W') square in mm
    if axial.shape[1:] == (SLICE_SIZE, SLICE_SIZE):
        return np.ascontiguousarray(axial)
    size = (SLICE_SIZE, SLICE_SIZE)
    return np.stack([cv2.resize(s, size, interpolation=cv2.INTER_AREA) for s in axial])


def from_axial_slices(mask: np.ndarray, geometry: NiftiGeometry) -> np.ndarray:
    """Undo to_axial_slices for a (D, 256, 256) 0/1 mask: uint8 0/1 in the file's voxel grid."""
    size = geometry.padded[::-1]  # (W, H), as cv2 wants it; thresholded slice by slice
    big = np.stack([cv2.resize(m.astype(np.float32), size) >= 0.5 for m in mask])
    (top, _), (left, _) = _padding(geometry)
    plane = big[:, top : top + geometry.plane[0], left : left + geometry.plane[1]]
    return nib.orientations.apply_orientation(plane, geometry.from_axial).astype(np.uint8)


def read_nifti(flair: Path, t1=None, t1c=None) -> Scan:
    """NIfTI FLAIR (+ pre/post-contrast on the same grid) as axial slices of this set's look."""
    paths = {c: Path(p) for c, p in ((0, t1), (FLAIR, flair), (2, t1c)) if p}
    loaded = {c: _load_nifti(p) for c, p in paths.items()}  # {channel: (image, data)}
    reference, ref_data = loaded[FLAIR]
    for c, (image, data) in loaded.items():
        grid = np.allclose(image.affine, reference.affine, atol=1e-3)  # the same voxels in mm
        if data.shape != ref_data.shape or not grid:
            raise DataError(
                f"{paths[c]}: shape {data.shape} / affine differ from the FLAIR volume "
                f"{flair} {ref_data.shape}: resample it onto the FLAIR's grid first"
            )
    geometry = nifti_geometry(reference, ref_data.shape)
    voxels = ref_data.size // int(np.prod(geometry.plane)) * geometry.padded[0] * geometry.padded[1]
    if voxels > MAX_VOXELS:  # before any of them is allocated
        raise DataError(
            f"{flair}: voxels of {geometry.voxel_mm} mm need {voxels / 2**30:.0f} GiB a copy to "
            "resample: resample the scan to about 1 mm first (nibabel.processing.resample_to_output)"
        )
    slices = {
        c: to_axial_slices(to_uint8(data, paths[c]), geometry) for c, (_, data) in loaded.items()
    }
    volume = np.zeros((*slices[FLAIR].shape, 3), np.uint8)  # (D, 256, 256, 3)
    for c, channel in slices.items():
        volume[..., c] = channel
    names = [f"axial_{z + 1}" for z in range(len(volume))]
    return Scan(flair, "nifti", volume, tuple(sorted(paths)), names, nifti=geometry)


def nifti_mask(mask: np.ndarray, geometry: NiftiGeometry):
    """A (D, 256, 256) 0/1 mask as a uint8 NIfTI image on the input's grid, class and affine."""
    source = geometry.image
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    voxels = from_axial_slices(mask, geometry).reshape(source.shape)  # (x, y, z, 1) stays so
    image = type(source)(voxels, source.affine, header)
    image.header.set_slope_inter(1, 0)  # voxel values are the mask, unscaled
    return image


def slice_mm(geometry: NiftiGeometry) -> float:
    """The voxel size along the axis the axial slices are stacked on."""
    return geometry.voxel_mm[list(geometry.to_axial[:, 0]).index(0)]  # file axis -> AXIAL axis


def axis_codes(geometry: NiftiGeometry) -> str:
    """Where the file's axes point, e.g. 'LPS'."""
    return "".join(nib.aff2axcodes(geometry.image.affine))
