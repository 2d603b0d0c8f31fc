"""Segment a new scan with a trained model and write the results where the user asked.

    summary = predict(None, "flair.nii.gz", "results/", t1="t1.nii.gz")  # the released model
    summary = predict("runs/unet/best.pt", "flair.nii.gz", "results/")

The command `unet-seg predict` (seg_cli.py) and notebook 06 call `predict`. INPUT is read by
seg_scan.read_scan (a patient folder of this data set, a folder of one patient's slices, or a
NIfTI FLAIR volume); the model file is RELEASED_MODEL (models/MODEL_CARD.md), a checkpoint of
training or a model file of notebook 04 or cross_validate.py, whose PostProcess says how
probabilities become the mask. Results (the mask in the input's own geometry, overlay.png,
summary.json with seg_checks' findings) land in a new folder, all at once.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import cv2
import numpy as np

import seg_utils as su
from seg_checks import scan_findings, scan_measures
from seg_draw import render_slice
from seg_files import CHANNELS, FLAIR, DataError, check_path
from seg_runs import usual_mode
from seg_scan import Scan, axis_codes, from_axial_slices, nifti_mask, read_scan, slice_mm

RELEASED_MODEL = Path(__file__).with_name("models") / "lgg_unet.pt"  # models/MODEL_CARD.md
INPUT_FLAGS = ("--t1", "INPUT", "--t1c")  # where each of CHANNELS comes from for NIfTI input
SYSTEM_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}  # a file browser's, not the user's
WRITING, PREVIOUS = "writing-", "previous-"  # .<out>.unet-seg-<this>XXXXXXXX beside --out: the
# new results being written, and the earlier ones they replace (a kill may leave them)


def model_file(model=None) -> Path:
    """The model file to use: `model`, or RELEASED_MODEL when None; DataError if unreadable."""
    if model:
        return check_path(model, "--checkpoint", "check the path given to --checkpoint")
    fix = "restore it (git checkout models/) or pass --checkpoint MODEL"
    return check_path(RELEASED_MODEL, "the released model", fix)


def needed_inputs(channels: tuple) -> str:
    """The scans a model reads, e.g. 'FLAIR (INPUT)' or 'pre-contrast (--t1), FLAIR (INPUT), ...'."""
    return ", ".join(f"{CHANNELS[c]} ({INPUT_FLAGS[c]})" for c in channels)


def model_image(scan: Scan, channels: tuple, model: Path, fill_missing=None):
    """The scan's (D, H, W, 3) image with every channel the model reads, and the names of those
    filled in ("flair": copied from FLAIR, as the model was trained to take them)."""
    missing = [c for c in channels if c not in scan.present]
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
    raise DataError(
        f"{model} needs {needed_inputs(channels)} but {scan.source} gives {given}: add {add}; "
        "or pass --fill-missing flair (copies FLAIR into the missing channels: expect worse "
        "masks); or use a FLAIR-only model"
    )


def channel_warnings(scan: Scan, channels: tuple) -> list[str]:
    """A note where the channels the model reads are all identical, as in a grey scan saved as
    RGB: the model then works from FLAIR alone."""
    image = scan.image[..., list(channels)]  # (D, H, W, C)
    given = len(channels) > 1 and all(c in scan.present for c in channels)
    if not given or (image != image[..., :1]).any():
        return []
    names = ", ".join(CHANNELS[c] for c in channels)
    return [
        f"{scan.source}: its {names} channels are identical (a grey scan saved as RGB?): the "
        "model then works from FLAIR alone, as for the 6 of the LGG set's 110 patients whose "
        "other scans are missing; give the other scans if you have them"
    ]


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a PNG or raise OSError (cv2.imwrite would only return False); any path name."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"cannot encode {path.name} as PNG")
    path.write_bytes(data.tobytes())


def montage(image: np.ndarray, pred: np.ndarray, names: list, truth=None, cols=6, tiles=36):
    """BGR uint8 grid of the slices with tumour (predicted or true), FLAIR grey, outlined
    (seg_draw.render_slice); at most `tiles` slices, evenly spread."""
    found = pred.any((1, 2)) | (truth.any((1, 2)) if truth is not None else False)
    picks = np.flatnonzero(found)
    if len(picks) > tiles:
        picks = picks[np.linspace(0, len(picks) - 1, tiles).round().astype(int)]
    if not len(picks):
        picks = [len(image) // 2]  # nothing found: show the middle slice, say so
    panels = []
    for z in picks:
        png = render_slice(image[z], None if truth is None else truth[z], pred[z], size=256)
        panel = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)  # (256, 256, 3)
        label = names[z] if found[z] else f"{names[z]}: no tumour found"
        label = label.encode("ascii", "replace").decode()  # putText crashes on a name not UTF-8
        cv2.putText(panel, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 255, 255), 1)
        panels.append(panel)
    panels += [np.zeros_like(panels[0])] * (-len(panels) % min(cols, len(panels)))
    width = min(cols, len(panels))
    return np.vstack([np.hstack(panels[i : i + width]) for i in range(0, len(panels), width)])


def write_results(folder: Path, scan: Scan, image: np.ndarray, pred: np.ndarray) -> list[str]:
    """The mask(s) in the input's own geometry and overlay.png; returns the file names."""
    if scan.nifti is not None:
        nifti_mask(pred, scan.nifti).to_filename(folder / "mask.nii.gz")
        written = ["mask.nii.gz"]
    else:
        written = [f"{name}_mask.png" for name in scan.names]
        for name, m in zip(written, pred):
            write_png(folder / name, m.astype(np.uint8) * 255)  # 0/255 like the set's masks
    write_png(folder / "overlay.png", montage(image, pred, scan.names, scan.truth))
    return written + ["overlay.png", "summary.json"]


def _not_results(out: Path) -> list[str]:
    """The names in folder `out` that no earlier predict wrote there (its summary.json lists
    what it wrote)."""
    try:
        listed = set(json.loads((out / "summary.json").read_text())["outputs"]) | {"summary.json"}
    except (OSError, ValueError, KeyError, TypeError):  # no summary, or not predict's
        listed = set()
    names = [p.name for p in out.iterdir() if p.name not in SYSTEM_FILES]
    return sorted(n for n in names if n not in listed and not n.startswith("._"))


def _finish_killed_run(out: Path) -> None:
    """Put right what a predict killed mid-way left beside `out` (WRITING, PREVIOUS)."""
    mine = f".{out.name}.unet-seg-"
    try:  # a link among them, or a folder of another's, fails here: nothing is deleted through it
        for path in out.parent.glob(glob.escape(mine + WRITING) + "*"):
            shutil.rmtree(path)  # killed while writing: half-written, or never moved in
        earlier = out.parent.glob(glob.escape(mine + PREVIOUS) + "*")
        for path in sorted(earlier, key=os.path.getctime, reverse=True):  # the newest first
            if not os.path.lexists(out):
                path.rename(out)  # killed between the renames: the earlier results come back
            elif (out / "summary.json").is_file():
                shutil.rmtree(path)  # killed after new results had replaced these
    except OSError as e:
        raise DataError(f"cannot put right what a killed run left beside {out} ({e})") from e


def check_out_folder(out: Path, overwrite: bool, keep=()) -> None:
    """DataError unless predict may write folder `out`: new or empty, or with `overwrite` one
    holding an earlier predict's results and nothing else; never a file, a folder holding one
    of `keep` (the input, the model) or the current folder; somewhere writable."""
    check_path(out, "--out")
    _finish_killed_run(out)
    where = Path(os.path.realpath(out))  # not resolve(): a link loop raises RuntimeError there
    named = [(Path.cwd(), "the current folder")] + [(Path(k), str(k)) for k in keep if k]
    for path, name in named:
        if Path(os.path.realpath(path)).is_relative_to(where):
            raise DataError(f"--out {out} holds {name}: give the results a folder of their own")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DataError(f"--out {out} is a file or a link, not a folder: choose another --out")
    if out.exists() and any(out.iterdir()):
        others = _not_results(out)
        if others:
            more = ", ..." if len(others) > 3 else ""
            raise DataError(
                f"--out {out} holds files predict did not write ({', '.join(others[:3])}{more}): "
                "choose another --out (--overwrite replaces earlier results only)"
            )
        if not overwrite:
            raise DataError(
                f"{out} already exists with results in it: choose another --out, or pass "
                "--overwrite (overwrite=True) to replace it"
            )


def _swap_in(staging: Path, out: Path) -> None:
    """Rename `staging` to `out`; earlier results at `out` go only once the new ones are there,
    and come back if the rename fails."""
    old = out.with_name(f".{out.name}.unet-seg-{PREVIOUS}{staging.name.rsplit(WRITING)[-1]}")
    try:
        if out.exists():
            out.rename(old)
        staging.rename(out)
    except BaseException:  # Ctrl-C between the renames too
        if old.exists() and not out.exists():
            old.rename(out)  # the earlier results back where they were
        raise
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def staged_folder(out: Path, overwrite: bool = False, keep=()):
    """Yield an empty folder beside `out` that replaces `out` at the end, or goes on error."""
    check_out_folder(out, overwrite, keep)
    staging = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.unet-seg-{WRITING}", dir=out.parent))
        os.chmod(staging, usual_mode(0o777))  # mkdtemp makes 0700
        yield staging
        _swap_in(staging, out)
    except OSError as e:  # a full disk, a read-only mount, a path that cannot be a folder
        raise DataError(
            f"writing the results to {out} failed ({e}): check that path, its permissions and "
            "the free space, or choose another --out"
        ) from e
    finally:  # Ctrl-C included: nothing half-written stays
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def summarise_prediction(scan: Scan, pred: np.ndarray) -> dict:
    """Slices with tumour, its size (mL for NIfTI, pixels otherwise) and Dice if masks exist."""
    tumour = [scan.names[z] for z in np.flatnonzero(pred.any((1, 2)))]
    out = dict(slices=len(pred), tumour_slices=tumour, tumour_slice_count=len(tumour))
    if scan.nifti is not None:
        voxels = int(from_axial_slices(pred, scan.nifti).sum())  # counted in the file's grid
        ml = voxels * float(np.prod(scan.nifti.voxel_mm)) / 1000
        out |= dict(tumour_voxels=voxels, voxel_mm=list(scan.nifti.voxel_mm), tumour_volume_ml=ml)
        out["axcodes"] = axis_codes(scan.nifti)
    else:
        out["tumour_pixels"] = int(pred.sum())
    if scan.truth is not None:
        out["dice"] = su.dice_score(pred, scan.truth)
    return out


def predict(
    model,
    source,
    out_dir,
    t1=None,
    t1c=None,
    changes=None,
    fill_missing=None,
    overwrite=False,
    progress=True,
) -> dict:
    """Segment a new scan `source` (patient folder, slice folder or NIfTI FLAIR) with the model
    file `model`: write its mask(s), overlay.png and summary.json to out_dir (all at once) and
    return the summary. `changes` ({"threshold": 0.4, ...}) replace fields of the model's
    PostProcess."""
    model = model_file(model)
    out_dir = Path(os.path.abspath(out_dir))  # "new/.." as its parent
    keep = (model, source, t1, t1c)  # never inside out_dir, which gets replaced
    check_out_folder(out_dir, overwrite, keep)  # before any work: fail fast
    segmenter = su.load_segmenter(model)
    try:
        segmenter.post = replace(segmenter.post, **(changes or {}))
    except (TypeError, ValueError) as e:
        raise DataError(f"{e}: change the flags ({model} holds {segmenter.post})") from e
    scan = read_scan(source, t1, t1c)
    in_file, segmenter = len(segmenter.nets), segmenter.for_inputs(scan.present)
    fill_missing = fill_missing or ("flair" if segmenter.fills_missing else None)
    image, filled = model_image(scan, segmenter.channels, model, fill_missing)
    pred = segmenter.mask(image, progress).astype(np.uint8)
    measures = scan_measures(image, pred)
    summary = dict(input=str(source), t1=t1 and str(t1), t1c=t1c and str(t1c))
    summary |= dict(input_kind=scan.kind, model=str(model), networks=len(segmenter.nets))
    summary["networks_in_file"] = in_file  # for_inputs: those for the inputs given
    summary["model_sha256"] = hashlib.sha256(model.read_bytes()).hexdigest()
    summary |= dict(model_inputs=needed_inputs(segmenter.channels), filled_from_flair=filled)
    summary |= dict(given_inputs=[CHANNELS[c] for c in scan.present])
    summary |= dict(postprocess=asdict(segmenter.post), chosen_on=segmenter.chosen_on)
    summary |= dict(changed=sorted(changes or {}), preprocess=[asdict(p) for p in segmenter.pres])
    summary["trained_for_missing_inputs"] = segmenter.fills_missing
    summary["measures"] = measures
    thickness = slice_mm(scan.nifti) if scan.nifti else None
    summary["warnings"] = scan_findings(measures, filled, thickness)
    summary["warnings"] += [] if filled else channel_warnings(scan, segmenter.channels)
    summary |= summarise_prediction(scan, pred)
    with staged_folder(out_dir, overwrite, keep) as folder:
        summary["outputs"] = write_results(folder, scan, image, pred)
        text = json.dumps(summary, indent=1)
        (folder / "summary.json").write_text(text)
    return json.loads(text)  # exactly what summary.json holds
