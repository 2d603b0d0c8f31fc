"""Reading the kaggle_3m folder safely: the file names, the checks on every folder
and file (and on the probabilities handed to scoring), and DataError, whose message names the file
and the fix. seg_utils.scan_dataset and read_slice (lesson 01) build on these; no lesson teaches
them. Its public names are su.<name> too.

The layout (the LGG MRI Segmentation set, and the synthetic stand-in of seg_synthetic.py):
    kaggle_3m/<patient>/<patient>_<n>.tif         (H, W, 3) uint8 slice n, channels as CHANNELS
    kaggle_3m/<patient>/<patient>_<n>_mask.tif    (H, W) uint8, 0 or 255
"""

from __future__ import annotations

import errno
import numbers
import os
import re
from pathlib import Path

import cv2
import numpy as np

CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")  # channel order of every image
FLAIR = 1


class DataError(ValueError):
    """A data-set problem that the user can fix; the message names the file and the fix."""


def error_gist(error: Exception) -> str:
    """The type and first sentence of an exception, for messages that say what went wrong."""
    text = " ".join(str(error).split()).split("WeightsUnpickler error: ")[-1]  # torch.load's gist
    return f"{type(error).__name__}: {text.split('. ')[0][:240]}"


PATH_PROBLEMS = {  # an OSError's errno on a path the user gave: what it means, what to do
    errno.ELOOP: "is a loop of symbolic links: point the link at a real file or folder",
    errno.ENAMETOOLONG: "has a name too long for this file system: choose a shorter one",
    errno.EACCES: "is not open to you (permission denied): ask its owner for access, or use your own",
}


def check_path(path, what: str, missing: str | None = None, kind=DataError) -> Path:
    """Path(path) if readable, or (`missing` None) writable; else `kind` saying why and the fix."""
    path = Path(path)
    try:
        os.stat(path)  # raises what is wrong: missing, a loop, too long, not allowed
        if os.path.isdir(path):
            os.listdir(path)
        elif os.path.isfile(path):  # not a FIFO: opening one would wait for a writer
            open(path, "rb").close()
    except FileNotFoundError as e:
        if missing is not None:
            raise kind(f"{path} does not exist: {missing}") from e
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        fix = PATH_PROBLEMS.get(getattr(e, "errno", None), f"cannot be used ({e}): check it")
        raise kind(f"{path} ({what}) {fix}") from e
    if missing is None:  # an output: fail before the work, not after it
        parent = next(p for p in Path(os.path.abspath(path)).parents if p.exists())
        if not os.access(parent, os.W_OK):
            raise kind(f"cannot write in {parent} (permission denied): choose an {what} elsewhere")
    return path


def read_image(path: Path) -> np.ndarray:
    """cv2.imread(path, IMREAD_UNCHANGED) but through bytes: OpenCV's crashes on non-UTF-8 names."""
    data = np.fromfile(check_path(path, "an image", "restore it"), np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None or image.size == 0:
        raise DataError(
            f"{path}: cannot be read as an image (empty, corrupt, not PNG/TIFF): replace it"
        )
    return image


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


SLICE_NAME = re.compile(r"^(?P<patient>.+)_(?P<n>\d+)(?P<mask>_mask)?\.tiff?$", re.IGNORECASE)


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


def patient_folders(root: Path) -> list[Path]:
    """Every patient folder under root, sorted (hidden ones such as .ipynb_checkpoints are not)."""
    return [p for p in _listing(root) if p.is_dir() and not p.name.startswith(".")]


def slice_files(folder: Path) -> tuple[dict, dict]:
    """{slice number: path} of a patient's images and of its masks (.tif/.tiff, any case)."""
    images, masks = {}, {}
    for path in [p for p in _listing(folder) if p.suffix.lower() in (".tif", ".tiff")]:
        match = SLICE_NAME.match(path.name)
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


def read_tiff(path: Path, what: str) -> np.ndarray:
    """Read a TIFF unchanged, or raise DataError naming the file."""
    if not path.is_file():
        raise DataError(f"{path}: {what} file is missing")
    array = read_image(path)
    if array.dtype != np.uint8:
        raise DataError(f"{path}: expected 8-bit pixels, found {array.dtype}")
    return array


def is_number(value, kind=numbers.Real) -> bool:
    """True for a number of that kind (NumPy's too), False for a bool, a string or None."""
    return isinstance(value, kind) and not isinstance(value, (bool, np.bool_))


def check_probabilities(prob: np.ndarray, volume, threshold: float) -> None:
    """Raise ValueError unless threshold and every probability of a patient lie in [0, 1] and
    the probabilities have the shape of volume.mask (seg_utils.score_patients checks with it)."""
    if not is_number(threshold) or not 0 <= threshold <= 1:  # NaN fails too
        raise ValueError(f"threshold {threshold!r} is not a probability: choose one in [0, 1]")
    if prob.shape != volume.mask.shape:
        raise ValueError(
            f"probabilities of {volume.patient} have shape {prob.shape}, its mask "
            f"{volume.mask.shape}: predict this volume with Segmenter.probabilities"
        )
    if not (np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1):
        raise ValueError(
            f"probabilities of {volume.patient} hold NaN, infinity or values outside [0, 1]: pass "
            "sigmoid outputs (Segmenter.probabilities), not logits"
        )
