"""Run-folder bookkeeping for seg_utils.train: checkpoints written atomically and read safely,
resume, and earlier runs kept instead of overwritten.

No lesson teaches this file (notebook 03 says what it guarantees); seg_utils.train calls it, and
`su.save_checkpoint`, `su.read_checkpoint`, `su.check_split` and `su.CheckpointError` are the
same objects. A run folder holds best.pt, last.pt and history.json (and notebook 04's
test_metrics.json); a fresh start moves an earlier run to previous-<time>/. Each checkpoint
records its training and validation patients, which check_split holds an evaluation split against.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from seg_files import DataError, error_gist

CHECKPOINT_FORMAT = "seg_utils.unet.v1"


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


def _temporary_name(name: str) -> tuple[str, str]:
    """(prefix, suffix) of write_atomically's temporary files for a file name: <name>.<random>.tmp."""
    return name + ".", ".tmp"


def usual_mode(full: int) -> int:
    """`full` (0o666 for a file, 0o777 for a folder) less this process's umask: the mode open()
    and mkdir() would give, for what mkstemp and mkdtemp make private (0600, 0700)."""
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return full & ~umask


def write_atomically(path: str | Path, write) -> None:
    """write(binary file) into a temporary file of its own in path's folder, then os.replace: a
    reader never sees half a file, processes writing one path side by side (cross_validate.py
    --fold K) never share a temporary file, and a hard link to the old file keeps its content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temporary_name(path.name)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, usual_mode(0o666))  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write a checkpoint atomically (write_atomically), plain types only."""
    write_atomically(path, lambda f: torch.save(_plain(state), f))


def write_json(path: Path, value) -> None:
    """Write JSON atomically (write_atomically)."""
    write_atomically(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint dict (weights_only) or raise CheckpointError saying why and what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: run notebook 03 (training) first")
    if path.stat().st_size < 4:
        raise CheckpointError(f"{path} is empty or cut short: copy it again (or train again)")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive; a truncated one too
            onnx = " (an ONNX model?)" if path.suffix.lower() == ".onnx" else ""
            raise CheckpointError(f"{path} is not a PyTorch checkpoint{onnx}: pass best.pt or "
                                  "last.pt from notebook 03 or train_lgg.py")  # fmt: skip
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, objects weights_only refuses
        raise CheckpointError(f"{path} could not be read ({error_gist(e)}). Keep it: copy it again "
                              "if the copy is incomplete; if you trust a file holding objects that "
                              "safe loading refuses, torch.load(path, weights_only=False) reads "
                              "it") from e  # fmt: skip
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was not written by seg_utils.train ({CHECKPOINT_FORMAT})")
    return state


def _remove_partial_writes(run_dir: Path) -> None:
    """Delete temporary files that a killed save_checkpoint or _save_run left behind: the names
    write_atomically gives (_temporary_name), and history.json.tmp of older versions."""
    patterns = ["{}*{}".format(*_temporary_name(name)) for name in ("*.pt", "history.json")]
    for pattern in (*patterns, "history.json.tmp"):
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


def _resume(path: Path, model, optimizer, scheduler, config, pre, data, average) -> list[dict]:
    """Restore model, its moving average, optimiser, schedule and RNG from last.pt; return its
    history."""
    state = read_checkpoint(path)
    saved_pre = asdict(type(pre).from_saved(state["preprocess"]))  # older checkpoints too
    if state["model_config"] != model.config or saved_pre != asdict(pre):
        raise CheckpointError(f"{path} holds a model {state['model_config']} with preprocessing "
                              f"{state['preprocess']}: build the same, or use a new run folder")  # fmt: skip
    # only the stopping rule may change on resume: compare with the new patience filled in;
    # checkpoints from before train_crop / sampling_uniform / ema_decay: whole images, 0.1, none
    before = {"train_crop": 1.0, "sampling_uniform": 0.1, "ema_decay": 0.0}
    saved = {**before, **state["train_config"], "patience": config.patience}
    if saved != asdict(config):
        raise CheckpointError(f"{path} was trained with {state['train_config']}, not {asdict(config)}: "
                              "use the same parameters, or a new run folder")  # fmt: skip
    _check_same_data(path, state, data)
    model.load_state_dict(state.get("live_state", state["model_state"]))
    if average is not None:  # model_state is the average where there is one
        average.load_state_dict(state["model_state"])
    optimizer.load_state_dict(state["optimizer_state"])
    scheduler.load_state_dict(state["scheduler_state"])
    torch.set_rng_state(state["torch_rng"])
    print(f"resuming {path} after epoch {state['epoch']}")
    return state["history"]


def start_run(run_dir: Path, resume: bool, model, optimizer, scheduler, config, pre, data,
              average=None) -> list:  # fmt: skip
    """Clear half-written files, then resume from last.pt (its history) or set an earlier run
    aside and start afresh (an empty history)."""
    _remove_partial_writes(run_dir)
    if resume and (run_dir / "last.pt").exists():
        return _resume(run_dir / "last.pt", model, optimizer, scheduler, config, pre, data, average)
    if resume:
        print(f"nothing to resume: {run_dir / 'last.pt'} does not exist; starting a new run")
    _keep_previous_run(run_dir)
    return []


def _weights(model) -> dict:
    """The model's state dict with contiguous (NCHW) tensors: the same file from any layout."""
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def save_run(run_dir, model, optimizer, scheduler, config, pre, history, precision, data,
             average=None) -> None:  # fmt: skip
    """Write last.pt, best.pt when validation Dice improved, and history.json (all atomic).
    model_state holds the validated weights: the moving average where there is one; the
    trained weights go to live_state then, for a resume."""
    state = dict(
        **data,  # patients {"train": [...], "val": [...]} and train_slices: see train()
        format=CHECKPOINT_FORMAT, model_config=model.config,
        model_state=_weights(model if average is None else average),
        **({} if average is None else {"live_state": _weights(model)}),
        optimizer_state=optimizer.state_dict(), scheduler_state=scheduler.state_dict(),
        epoch=len(history), history=history, train_config=asdict(config),
        preprocess=asdict(pre), precision=precision, torch_rng=torch.get_rng_state(),
    )  # fmt: skip
    if history[-1]["val_dice"] >= max(h["val_dice"] for h in history):
        save_checkpoint(state, run_dir / "best.pt")
    save_checkpoint(state, run_dir / "last.pt")
    write_json(run_dir / "history.json", history)


def on_disk_after_interrupt(run_dir: Path) -> str:
    """What last.pt holds, read back: Ctrl-C may have cut the newest epoch's write short."""
    last = run_dir / "last.pt"
    if not last.exists():
        return f"Interrupted before the first epoch was saved: {run_dir} holds no last.pt."
    epoch = read_checkpoint(last)["epoch"]
    return f"Interrupted. {last} holds epoch {epoch}: call train(..., resume=True) to continue."


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
