"""Run-folder bookkeeping for seg_utils.train: checkpoints written atomically and read safely,
resume, and earlier runs kept instead of overwritten.

No lesson teaches this file (notebook 03 says what it guarantees); seg_utils.train calls it. A run
folder holds best.pt, last.pt and history.json; a fresh start moves an earlier run to
previous-<time>/. A checkpoint is a model file (seg_utils.load_segmenter reads it: its networks,
each with its Preprocess and patients, and the PostProcess) plus what a resume needs.
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

from seg_files import check_path, error_gist

CHECKPOINT_FORMAT = "seg_utils.unet.v2"  # v1 held one network without its post-processing
DIVERGED = "the training diverged: train again with a lower learning rate (TrainConfig.lr)"
A_MODEL = "pass best.pt or last.pt of training, or a model file of notebook 04 or cross_validate.py"


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


def _finite(state: dict) -> bool:
    """False if a network's weights (or the trained ones kept for a resume) hold NaN or infinity."""
    try:
        weights = [n["state"] for n in state["networks"]] + [state.get("live_state", {})]
        tensors = [t for w in weights for t in w.values() if torch.is_tensor(t)]
    except (KeyError, TypeError, AttributeError):
        return True  # not laid out as this code writes it: load_segmenter says so
    return all(t.isfinite().all() for t in tensors if t.is_floating_point())


def write_checkpoint(path: str | Path, state: dict) -> None:
    """Write a model file or checkpoint atomically (write_atomically), plain types, finite."""
    if not _finite(state):  # train() stops here: last.pt keeps the epoch before
        when = f" at epoch {state['epoch']}" if "epoch" in state else ""
        raise CheckpointError(f"{path} not written: NaN or infinite weights{when}; {DIVERGED}")
    state = _plain(dict(state, format=CHECKPOINT_FORMAT))
    write_atomically(path, lambda f: torch.save(state, f))


def write_json(path: Path, value) -> None:
    """Write JSON atomically (write_atomically)."""
    write_atomically(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint dict (weights_only) or raise CheckpointError saying why and what to do."""
    path = check_path(path, "the model file", "run notebook 03 (training) first", CheckpointError)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file: pass a model file, e.g. best.pt")
    if path.stat().st_size < 4:
        raise CheckpointError(f"{path} is empty or cut short: copy it again (or train again)")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive; a truncated one too
            onnx = " (an ONNX model?)" if path.suffix.lower() == ".onnx" else ""
            raise CheckpointError(f"{path} is not a PyTorch checkpoint{onnx}: {A_MODEL}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, objects weights_only refuses
        raise CheckpointError(
            f"{path} could not be read ({error_gist(e)}). Keep it: copy it again if the copy is "
            "incomplete; if you trust a file holding objects that safe loading refuses, "
            "torch.load(path, weights_only=False) reads it"
        ) from e
    found = state.get("format") if isinstance(state, dict) else None
    if found != CHECKPOINT_FORMAT and str(found).startswith("seg_utils.unet."):
        raise CheckpointError(
            f"{path} has the retired format {found}: train it again (notebook 03, "
            f"benchmarks/train_lgg.py) with this seg_utils, which writes {CHECKPOINT_FORMAT}"
        )
    if found != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} was not written by seg_utils ({CHECKPOINT_FORMAT}): {A_MODEL}"
        )
    if not _finite(state):
        raise CheckpointError(f"{path} holds NaN or infinite weights: {DIVERGED}")
    return state


def _remove_partial_writes(run_dir: Path) -> None:
    """Delete the temporary files (_temporary_name) that a killed save_run left behind."""
    for name in ("*.pt", "history.json"):
        for path in run_dir.glob("{}*{}".format(*_temporary_name(name))):
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
    """Move all an earlier run left in run_dir (checkpoints, history, ...)
    to a new run_dir/previous-<time last written>/: a fresh start deletes or mixes up nothing."""
    earlier = [p for p in sorted(run_dir.glob("*")) if not p.name.startswith("previous")]
    if not earlier:
        return
    written = max(p.lstat().st_mtime for p in earlier)
    target = _new_folder(run_dir / time.strftime("previous-%Y%m%d-%H%M%S", time.localtime(written)))
    for path in earlier:
        os.replace(path, target / path.name)
    print(f"moved the earlier run in {run_dir} to {target} (resume=True continues a run instead)")


def _check_same_run(path: Path, state: dict, net, config, data: dict) -> None:
    """Raise CheckpointError unless last.pt trained this network, Preprocess, TrainConfig (only
    the stopping rule may change) and data: a resume of anything else would be another run."""
    saved = state["networks"][0]
    changes = []
    if saved["config"] != net.config or saved["preprocess"] != data["network"]["preprocess"]:
        changes.append(f"a U-Net {saved['config']} with {saved['preprocess']}")
    if dict(state["train_config"], patience=config.patience) != asdict(config):
        changes.append(f"the parameters {state['train_config']}")
    for name in ("train", "val"):
        then, now = set(saved["patients"][name]), set(data["network"]["patients"][name])
        if then != now:
            changes.append(
                f"{name} patients {sorted(then - now)[:3]} (now {sorted(now - then)[:3]})"
            )
    if state["precision"] != data["precision"]:  # "auto" resolves per machine
        changes.append(f"in {state['precision']}, not {data['precision']} (TrainConfig.precision)")
    if state["train_slices"] != data["train_slices"]:
        changes.append(f"{state['train_slices']} training slices, not {data['train_slices']}")
    if changes:
        raise CheckpointError(
            f"{path} trained {'; '.join(changes)}: resume with the same model, parameters and "
            "data (LGG_DATA, split), or start a new run folder"
        )


def _resume(path: Path, net, optimizer, scheduler, config, data, average) -> list[dict]:
    """Restore the U-Net, its moving average, optimiser, schedule and RNG from last.pt; return
    its history."""
    state = read_checkpoint(path)
    _check_same_run(path, state, net, config, data)
    net.load_state_dict(state["live_state"])
    if average is not None:
        average.load_state_dict(state["networks"][0]["state"])
    optimizer.load_state_dict(state["optimizer_state"])
    scheduler.load_state_dict(state["scheduler_state"])
    torch.set_rng_state(state["torch_rng"])
    print(f"resuming {path} after epoch {state['epoch']}")
    return state["history"]


def start_run(run_dir: Path, resume: bool, net, optimizer, scheduler, config, data, average):
    """Clear half-written files, then resume from last.pt (its history) or set an earlier run
    aside and start afresh (an empty history)."""
    _remove_partial_writes(run_dir)
    if resume and (run_dir / "last.pt").exists():
        return _resume(run_dir / "last.pt", net, optimizer, scheduler, config, data, average)
    if resume:
        print(f"nothing to resume: {run_dir / 'last.pt'} does not exist; starting a new run")
    _keep_previous_run(run_dir)
    return []


def contiguous_state(model) -> dict:
    """The model's state dict with contiguous (NCHW) tensors: the same file from any layout."""
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def save_run(run_dir, net, optimizer, scheduler, config, history, data, average):
    """Write last.pt, best.pt when validation Dice improved, and history.json (all atomic). The
    network's state is the validated weights (the moving average, where there is one);
    live_state the trained weights, for a resume. `data` is train()'s record of the network
    (config, Preprocess, patients), the default PostProcess and the training slice count."""
    validated = net if average is None else average
    state = dict(
        networks=[dict(data["network"], state=contiguous_state(validated))],
        postprocess=data["postprocess"],
        chosen_on="defaults",
        live_state=contiguous_state(net),
        optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(),
        epoch=len(history),
        history=history,
        train_config=asdict(config),
        precision=data["precision"],
        torch_rng=torch.get_rng_state(),
        train_slices=data["train_slices"],
    )
    if history[-1]["val_dice"] >= max(h["val_dice"] for h in history):
        write_checkpoint(run_dir / "best.pt", state)
    write_checkpoint(run_dir / "last.pt", state)
    write_json(run_dir / "history.json", history)


def on_disk_after_interrupt(run_dir: Path) -> str:
    """What last.pt holds, read back: Ctrl-C may have cut the newest epoch's write short."""
    last = run_dir / "last.pt"
    if not last.exists():
        return f"Interrupted before the first epoch was saved: {run_dir} holds no last.pt."
    epoch = read_checkpoint(last)["epoch"]
    return f"Interrupted. {last} holds epoch {epoch}: call train(..., resume=True) to continue."
