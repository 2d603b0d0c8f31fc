"""The U-Net, its losses and Dice, training and its run folder, and checkpoint files."""

import copy
import json
import math
import os
import re
import stat
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from torch import nn

import seg_hardware
import seg_runs
import seg_utils as su
from seg_utils import CheckpointError

CPU = torch.device("cpu")
PRE = su.Preprocess(size=32)
# lr a NumPy number, as np.linspace or a sweep table hands one over: checkpoints must still load
CONFIG = su.TrainConfig(
    epochs=2, batch_size=8, precision="fp32", ema_decay=0.9, lr=np.float64(3e-3)
)
DICE_FLOOR = 0.6  # an untrained U-Net scores near 0; 3 epochs of TINY reach well above


@pytest.fixture(scope="module")
def data(synthetic_set):
    """3 of the session's synthetic patients at 32 px: (train SliceDataset of 2, [1 val volume]).
    Too little to learn much; enough to show that resuming and the run folder work."""
    records = su.scan_dataset(synthetic_set(8, 0))
    first = sorted({r.patient for r in records})[:3]
    volumes = su.load_volumes([r for r in records if r.patient in first], progress=False)
    prepared = su.prepare_volumes(volumes, PRE)
    return su.SliceDataset(prepared[:2], su.train_transform(seed=0)), prepared[2:]


def new_model(seed: int) -> su.UNet:
    su.seed_everything(seed)
    return su.UNet(base_width=4, depth=2)


def train(data, run_dir, config=CONFIG, model=None, **kwargs) -> list[dict]:
    model = new_model(0) if model is None else model
    return su.train(model, *data, run_dir, config, progress=False, **kwargs)


def stop_after_one_epoch(history):
    """on_epoch_end for train(): Ctrl-C after the first epoch's checkpoint is written."""
    raise KeyboardInterrupt


def without_time(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """CONFIG.epochs epochs straight through: what a resumed run must equal."""
    run_dir = tmp_path_factory.mktemp("straight")
    model = new_model(0)
    history = train(data, run_dir, CONFIG, model)
    return dict(run_dir=run_dir, history=history, state=copy.deepcopy(model.state_dict()))


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize(
    "in_channels, height, width, base_width, depth",
    [(3, 64, 64, 4, 3), (1, 32, 48, 8, 2), (3, 96, 96, 4, 4)],
)
def test_unet_keeps_the_image_size_and_every_weight_learns(
    in_channels, height, width, base_width, depth
):
    model = su.UNet(in_channels, base_width=base_width, depth=depth)
    out = model(torch.randn(2, in_channels, height, width))
    assert out.shape == (2, 1, height, width) and out.dtype == torch.float32
    assert model.config == dict(
        in_channels=in_channels, out_channels=1, base_width=base_width, depth=depth
    )
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unet_refuses_a_size_not_divisible_by_2_to_the_depth():
    model = su.UNet(base_width=4, depth=4).eval()
    with pytest.raises(ValueError, match=r"\(100, 100\).*divisible by 16"):
        model(torch.randn(1, 3, 100, 100))


def test_count_parameters_known_answer():
    """The smallest U-Net, counted by hand: encoder 2 convs 1->1 (9 + 9) and 2 BatchNorms
    (2 + 2); bottleneck convs 1->2 and 2->2 (18 + 36) and BatchNorms (4 + 4); up-convolution
    2->1 (8 + 1 bias); decoder convs 2->1 and 1->1 (18 + 9), BatchNorms (2 + 2); head 1 + 1."""
    model = su.UNet(in_channels=1, base_width=1, depth=1)
    assert su.count_parameters(model) == 22 + 62 + 9 + 31 + 2
    model.head.weight.requires_grad_(False)  # frozen weights are not trainable parameters
    assert su.count_parameters(model) == 125


# ----------------------------------------------------------------------------- Dice


def test_dice_hand_made_cases():
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 pixels
    disjoint = np.zeros_like(a)
    disjoint[2:, 2:] = True
    half = np.zeros_like(a)
    half[:2, 1:3] = True  # 4 pixels, 2 of them shared with a
    small = np.zeros_like(a)
    small[0, :2] = True  # 2 pixels, both inside a
    empty = np.zeros_like(a)
    assert su.dice_score(a, a) == 1.0
    assert su.dice_score(a, disjoint) == 0.0
    assert su.dice_score(empty, empty) == 1.0  # nothing to find, nothing found
    assert su.dice_score(a, empty) == 0.0  # prediction on an empty mask
    assert su.dice_score(empty, a) == 0.0  # nothing found on a tumour
    assert su.dice_score(half, a) == pytest.approx(2 * 2 / (4 + 4))
    assert su.dice_score(small, a) == pytest.approx(2 * 2 / (2 + 4))
    assert type(su.dice_score(a, a)) is float


def test_dice_accepts_torch_and_numpy_of_any_dtype():
    a = np.zeros((2, 8, 8), np.uint8)
    b = np.zeros((2, 8, 8), np.uint8)
    a[0, :4], b[0, 2:6] = 1, 1  # 32 and 32 pixels, 16 shared
    expected = 2 * 16 / 64
    assert su.dice_score(a, b) == pytest.approx(expected)
    assert su.dice_score(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected)
    assert su.dice_score(torch.from_numpy(a).bool(), b) == pytest.approx(expected)
    assert su.dice_score(a.astype(np.float32), torch.from_numpy(b).float()) == pytest.approx(
        expected
    )
    assert su.dice_score(a * 255, b) == pytest.approx(expected)  # any non-zero is foreground


def test_dice_refuses_shapes_that_differ():
    """A (4, 1, 16, 16) prediction against its (4, 16, 16) truth broadcast to Dice 2.60."""
    pred, truth = np.zeros((4, 1, 16, 16)), np.zeros((4, 16, 16))
    pred[:, 0, 4:8, 4:8] = truth[:, 4:8, 4:8] = 1
    assert su.dice_score(pred[:, 0], truth) == 1.0
    for p, t in ((pred, truth), (torch.from_numpy(pred), torch.from_numpy(truth))):
        with pytest.raises(ValueError, match=re.escape("(4, 1, 16, 16) and truth (4, 16, 16)")):
            su.dice_score(p, t)


# ----------------------------------------------------------------------------- losses


@pytest.fixture
def target():
    t = torch.zeros(4, 1, 16, 16)
    t[:2, :, 4:10, 3:12] = 1  # 2 * 6 * 9 = 108 tumour pixels of 1024
    return t


def test_losses_known_answer_at_zero_logits(target):
    """Logits 0: every probability 0.5, so BCE = ln 2 and the soft Dice loss (smooth 1) is
    1 - (2 * 0.5 * 108 + 1) / (0.5 * 1024 + 108 + 1)."""
    zero = torch.zeros(target.shape)
    dice = 1 - 109 / 621
    assert su.soft_dice_loss(zero, target).item() == pytest.approx(dice)
    assert su.bce_dice_loss(zero, target).item() == pytest.approx(math.log(2) + dice)
    assert su.bce_dice_loss(zero, target, dice_weight=0.5).item() == pytest.approx(
        math.log(2) + 0.5 * dice
    )


def test_losses_of_perfect_logits_are_near_zero(target):
    perfect = 20 * (2 * target - 1)
    assert su.bce_dice_loss(perfect, target).item() < 1e-3
    assert su.soft_dice_loss(perfect, target).item() < 1e-3


def test_bce_part_equals_torchs(target):
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    bce = F.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(su.bce_dice_loss(logits, target, dice_weight=0), bce)


def test_losses_stable_for_huge_logits(target):
    for scale in (1e4, -1e4):  # confidently right, then confidently wrong
        logits = (scale * (2 * target - 1)).requires_grad_()
        loss = su.bce_dice_loss(logits, target)
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(logits.grad).all()
    assert loss.item() > 100  # confidently wrong: large, and finite


def test_loss_gradient_raises_tumour_logits_and_lowers_the_rest(target):
    logits = torch.zeros(target.shape, requires_grad=True)
    su.bce_dice_loss(logits, target).backward()
    assert (logits.grad[target == 1] < 0).all() and (logits.grad[target == 0] > 0).all()


def test_losses_accept_bf16_logits(target):
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(2))
    loss = su.bce_dice_loss(logits.bfloat16(), target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(su.bce_dice_loss(logits, target).item(), abs=0.02)


# ----------------------------------------------------------------------------- training


def test_training_learns_and_writes_its_run_folder(tiny_model):
    run_dir = tiny_model.parent
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "history.json", "last.pt"]
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert max(h["val_dice"] for h in history) > DICE_FLOOR, history
    assert history[-1]["lr"] < history[0]["lr"] / 100  # one-cycle anneals to about 0
    assert all("val_dice_raw" in h for h in history)  # TINY averages the weights
    last = su.read_checkpoint(run_dir / "last.pt")
    assert last["epoch"] == 3 and last["history"] == history


def test_checkpoint_records_patients_preprocess_and_the_moving_average(tiny_model, synthetic_set):
    split = su.split_by_patient(su.scan_dataset(synthetic_set(8, 0)), seed=0)
    best = su.read_checkpoint(tiny_model)
    (network,) = best["networks"]
    patients = {name: sorted({r.patient for r in split[name]}) for name in ("train", "val")}
    assert network["patients"] == patients
    assert network["preprocess"] == asdict(su.Preprocess(size=64))
    assert network["config"] == dict(in_channels=3, out_channels=1, base_width=8, depth=3)
    assert network["input_dropout"] == TINY.input_dropout  # > 0: predict fills missing inputs
    assert (best["postprocess"], best["chosen_on"]) == (asdict(su.PostProcess()), "defaults")
    assert best["train_config"] == asdict(TINY) and best["format"] == "seg_utils.unet.v2"
    full = su.read_checkpoint(tiny_model.parent / "last.pt")["history"]
    best_dice = max(h["val_dice"] for h in full)  # best.pt: its epoch, the later one of a tie
    assert best["epoch"] == max(h["epoch"] for h in full if h["val_dice"] == best_dice)
    history = best["history"]

    # the file's network is the moving average, the one validated; live_state what trained
    segmenter = su.load_segmenter(tiny_model, device=CPU)
    (net,) = segmenter.nets
    assert not any(m.training for m in net.modules())
    assert segmenter.pres == [su.Preprocess(size=64)]
    val = su.prepare_volumes(su.load_volumes(split["val"], progress=False), segmenter.pres[0])
    live = su.UNet(**network["config"])
    live.load_state_dict(best["live_state"])
    assert history[-1]["val_dice"] != history[-1]["val_dice_raw"]
    assert su.validate(net, val, TINY.precision) == pytest.approx(history[-1]["val_dice"], abs=1e-6)
    assert su.validate(live, val, TINY.precision) == pytest.approx(
        history[-1]["val_dice_raw"], abs=1e-6
    )


def test_moving_average_of_weights_known_answer():
    """update_ema: average <- d * average + (1 - d) * model, BatchNorm statistics too, with the
    warm-up d = min(decay, (1 + step) / (10 + step)); the count of batches is copied."""
    average, model = (nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)) for _ in range(2))
    for net, value in ((average, 1.0), (model, 3.0)):
        for tensor in net.state_dict().values():
            tensor.fill_(value)
    model[1].num_batches_tracked.fill_(7)
    su.update_ema(average, model, decay=0.5, step=1000)  # d = 0.5: the midpoint
    assert torch.equal(average[0].weight, torch.full_like(average[0].weight, 2.0))
    assert torch.equal(average[1].running_mean, torch.full((2,), 2.0))
    assert int(average[1].num_batches_tracked) == 7
    su.update_ema(average, model, decay=0.99, step=0)  # warm-up: d = 1/10, 2 -> 0.1*2 + 0.9*3
    assert torch.allclose(average[0].weight, torch.full_like(average[0].weight, 2.9))
    assert torch.equal(model[0].weight, torch.full_like(model[0].weight, 3.0))  # left alone


def assert_same_weights(mine: dict, plain: dict) -> None:
    assert mine.keys() == plain.keys()
    for key, value in plain.items():
        assert torch.allclose(mine[key].float(), value.float(), atol=1e-5), key


def test_resume_equals_an_uninterrupted_run(straight, data, tmp_path):
    """Interrupted after epoch 1, resumed into a differently initialised model: the same
    history, weights and checkpoints as straight through. The first half trains through
    torch.compile's wrapper, whose checkpoints must hold the plain U-Net's weights (no
    "_orig_mod." keys), moving average included, or the plain resume could not load them."""
    compiled = torch.compile(new_model(0), backend="eager")  # no C++ compiler needed
    first = train(data, tmp_path, model=compiled, on_epoch_end=stop_after_one_epoch)
    assert len(first) == 1 and su.read_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    model = new_model(123)
    history = train(data, tmp_path, model=model, resume=True)
    for mine, plain in zip(without_time(history), without_time(straight["history"]), strict=True):
        assert mine == pytest.approx(plain)
    assert json.loads((tmp_path / "history.json").read_text()) == history
    assert_same_weights(model.state_dict(), straight["state"])
    for name in ("best.pt", "last.pt"):
        mine, plain = (su.read_checkpoint(d / name) for d in (tmp_path, straight["run_dir"]))
        assert_same_weights(mine["networks"][0]["state"], plain["networks"][0]["state"])


def test_without_a_moving_average_the_checkpoint_holds_the_trained_weights_and_resumes(
    data, tmp_path
):
    config = replace(CONFIG, ema_decay=0.0)
    model = new_model(0)
    straight = train(data, tmp_path / "a", config, model)
    assert all("val_dice_raw" not in h for h in straight)
    saved = su.read_checkpoint(tmp_path / "a" / "last.pt")["networks"][0]["state"]
    for key, value in model.state_dict().items():
        assert torch.equal(saved[key], value), key
    train(data, tmp_path / "b", config, on_epoch_end=stop_after_one_epoch)
    resumed = train(data, tmp_path / "b", config, new_model(123), resume=True)
    assert without_time(resumed) == without_time(straight)


@pytest.mark.parametrize(
    "change",
    [
        "wider model",
        "other Preprocess",
        "other lr",
        "train patient removed",
        "val patient added",
        "fewer slices",
    ],
)
def test_resume_of_another_run_refused_naming_what_differs(straight, data, tmp_path, change):
    """Only patience may change: anything else would continue another run, and the record of
    its patients (which check_split trusts) would be wrong."""
    last = tmp_path / "last.pt"
    last.write_bytes((straight["run_dir"] / "last.pt").read_bytes())
    train_set, val = data
    volumes, model, config = list(train_set.volumes), new_model(0), CONFIG
    if change == "wider model":
        model = su.UNet(base_width=8, depth=2)
        expected = "a U-Net {'in_channels': 3, 'out_channels': 1, 'base_width': 4, 'depth': 2}"
    elif change == "other Preprocess":
        other = su.Preprocess(size=32, crop_brain=False)
        volumes, val = ([replace(v, pre=other) for v in vs] for vs in (volumes, val))
        expected = "with {'size': 32, 'crop_brain': True, 'channels': (0, 1, 2)}"
    elif change == "other lr":
        config = replace(CONFIG, lr=1e-3)
        expected = "the parameters {'epochs': 2, 'batch_size': 8, 'lr': 0.003,"
    elif change == "train patient removed":
        expected = f"train patients ['{volumes.pop(0).patient}'] (now [])"
    elif change == "val patient added":
        val = val + volumes[-1:]
        expected = f"val patients [] (now ['{volumes[-1].patient}'])"
    else:
        volumes[0] = replace(volumes[0], image=volumes[0].image[1:], mask=volumes[0].mask[1:])
        expected = f"{len(train_set)} training slices, not {len(train_set) - 1}"
    other_set = su.SliceDataset(volumes, train_set.transform)
    with pytest.raises(
        CheckpointError, match=re.escape(f"{last} trained") + ".*" + re.escape(expected)
    ):
        train((other_set, val), tmp_path, config, model, resume=True)
    assert last.read_bytes() == (straight["run_dir"] / "last.pt").read_bytes()


def test_early_stopping_fires_after_patience_epochs_and_a_resume_may_change_patience(
    data, tmp_path, monkeypatch, capsys
):
    """A validation Dice that only falls: patience 2 stops after epoch 3; a resume with the
    default patience 0 (no early stopping) trains on to the last epoch."""
    scores = iter([0.5, 0.4, 0.3, 0.2])
    monkeypatch.setattr(su, "validate", lambda model, volumes, precision: next(scores))
    config = replace(CONFIG, epochs=4, ema_decay=0.0, patience=2)
    history = train(data, tmp_path, config)
    assert [h["val_dice"] for h in history] == [0.5, 0.4, 0.3]
    assert "early stop: no better validation Dice since epoch 1" in capsys.readouterr().out
    history = train(data, tmp_path, replace(config, patience=0), resume=True)
    assert [h["val_dice"] for h in history] == [0.5, 0.4, 0.3, 0.2]
    assert su.TrainConfig().patience == 0


ONE_EPOCH = replace(CONFIG, epochs=1, ema_decay=0.0)


def test_resume_without_last_pt_starts_fresh_and_keeps_the_earlier_files(straight, data, tmp_path):
    """resume=True with best.pt but no last.pt overwrote best.pt and history.json."""
    earlier = {n: (straight["run_dir"] / n).read_bytes() for n in ("best.pt", "history.json")}
    for name, content in earlier.items():
        (tmp_path / name).write_bytes(content)
    history = train(data, tmp_path, ONE_EPOCH, resume=True)
    assert [h["epoch"] for h in history] == [1]
    (kept,) = tmp_path.glob("previous-*")
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == earlier


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_fresh_runs_keep_every_earlier_run(data, tmp_path):
    """Each fresh start moves all the earlier run left, other notebooks' output included, to a
    new previous-<time last written>/ folder; an existing previous-* folder is never reused."""
    written = time.mktime((2024, 1, 2, 3, 4, 5, 0, 0, -1))
    (tmp_path / "new_scan").mkdir()  # notebook 06 writes its results there
    run0 = {"best.pt": b"0 best", "last.pt": b"0 last", "history.json": b"[]"}
    run0["new_scan/summary.json"] = b'{"run": 0}'
    for name, content in run0.items():
        (tmp_path / name).write_bytes(content)
        os.utime(tmp_path / name, (written, written))
    os.utime(tmp_path / "new_scan", (written, written))
    taken = tmp_path / "previous-20240102-030405"
    taken.mkdir()
    (taken / "notes.txt").write_text("older")
    train(data, tmp_path, ONE_EPOCH)
    moved = tmp_path / "previous-20240102-030405-2"
    assert files_under(moved) == run0
    assert files_under(taken) == {"notes.txt": b"older"}

    run1 = {n: (tmp_path / n).read_bytes() for n in ("best.pt", "last.pt", "history.json")}
    (tmp_path / "new_scan").mkdir()
    run1["new_scan/summary.json"] = b'{"run": 1}'
    (tmp_path / "new_scan/summary.json").write_bytes(run1["new_scan/summary.json"])
    train(data, tmp_path, ONE_EPOCH, new_model(1))
    (newest,) = set(tmp_path.glob("previous-*")) - {taken, moved}
    assert files_under(newest) == run1
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("previous-"))
    assert left == ["best.pt", "history.json", "last.pt"]  # no results of another model


def test_numpy_numbers_in_the_config_are_saved_as_python_numbers(straight):
    """TrainConfig(lr=np.float64(...)) trained, then every load called the checkpoint damaged."""
    state = su.read_checkpoint(straight["run_dir"] / "last.pt")
    assert type(state["train_config"]["lr"]) is float and state["train_config"]["lr"] == 3e-3
    assert su.load_segmenter(straight["run_dir"] / "best.pt", device=CPU).pres == [PRE]


def test_ctrl_c_during_a_checkpoint_write_reports_what_is_on_disk(
    data, tmp_path, monkeypatch, capsys
):
    write = seg_runs.write_checkpoint

    def interrupted(path, state):
        if Path(path).name == "last.pt" and state["epoch"] == 2:
            raise KeyboardInterrupt  # Ctrl-C before the new last.pt replaced the old one
        write(path, state)

    monkeypatch.setattr(seg_runs, "write_checkpoint", interrupted)
    train(data, tmp_path, replace(CONFIG, ema_decay=0.0))
    assert su.read_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert f"{tmp_path / 'last.pt'} holds epoch 1:" in capsys.readouterr().out


def test_leftover_temporary_files_are_removed_on_resume(straight, data, tmp_path):
    (tmp_path / "last.pt").write_bytes((straight["run_dir"] / "last.pt").read_bytes())
    for name in ("last.pt.k2x9.tmp", "best.pt.a7b1.tmp", "history.json.c3d4.tmp"):
        (tmp_path / name).write_bytes(b"half a file")  # what a killed write leaves
    train(data, tmp_path, resume=True)  # all epochs done: nothing to train
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_train_refuses_validation_it_cannot_use(data, tmp_path):
    train_set, val = data
    with pytest.raises(ValueError, match="needs validation volumes"):
        train((train_set, []), tmp_path)
    other = [replace(v, pre=su.Preprocess(size=32, crop_brain=False)) for v in val]
    with pytest.raises(
        ValueError, match="validation volumes prepared with the training Preprocess"
    ):
        train((train_set, other), tmp_path)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- checkpoint files


def test_write_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    su.write_checkpoint(path, dict(weights=torch.arange(1000.0), epoch=1))

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        su.write_checkpoint(path, dict(weights=torch.zeros(3), epoch=2))
    monkeypatch.undo()
    loaded = su.read_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["weights"], torch.arange(1000.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no *.tmp left


def test_checkpoint_file_mode_like_any_other_file(tmp_path):
    """best.pt should be as readable as history.json (umask), not 0600 from mkstemp."""
    path = tmp_path / "best.pt"
    su.write_checkpoint(path, dict(epoch=1))
    plain = tmp_path / "history.json"
    plain.write_text("[]")
    assert oct(stat.S_IMODE(path.stat().st_mode)) == oct(stat.S_IMODE(plain.stat().st_mode))


def write_truncated(path: Path) -> None:
    su.write_checkpoint(path, dict(weights=torch.arange(1000.0)))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


UNREADABLE = {  # name: (how to write the file, the reason and fix its message gives)
    "missing": (lambda path: None, "run notebook 03 (training) first"),
    "empty": (Path.touch, "is empty or cut short: copy it again"),
    "text": (lambda path: path.write_text("not weights\n"), "is not a PyTorch checkpoint: pass"),
    "onnx": (lambda path: path.write_bytes(b"\x08\x07\x12\x04"), "(an ONNX model?): pass"),
    "truncated": (write_truncated, "Keep it: copy it again if the copy is incomplete"),
    "NumPy objects": (
        lambda path: torch.save(dict(format=seg_runs.CHECKPOINT_FORMAT, lr=np.float64(3e-3)), path),
        "torch.load(path, weights_only=False) reads it",
    ),
    "foreign dict": (
        lambda path: torch.save({"model_state": {}, "epoch": 3}, path),
        "was not written by seg_utils (seg_utils.unet.v2): pass best.pt",
    ),
    "list": (lambda path: torch.save([1, 2, 3], path), "seg_utils.unet.v2): pass best.pt"),
    "retired format": (
        lambda path: torch.save(dict(format="seg_utils.unet.v1", model_state={}), path),
        "has the retired format seg_utils.unet.v1: train it again",
    ),
}


@pytest.mark.parametrize("kind", UNREADABLE)
def test_unreadable_checkpoint_named_with_the_fix(tmp_path, kind):
    write, reason = UNREADABLE[kind]
    path = tmp_path / ("model.onnx" if kind == "onnx" else "best.pt")
    write(path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + re.escape(reason)):
        su.load_segmenter(path, device=CPU)
    if kind in ("truncated", "NumPy objects"):  # good weights may be in there: never "delete"
        assert path.exists()


@pytest.mark.parametrize(
    "change", ["wider model", "missing weights", "unknown Preprocess field", "no postprocess"]
)
def test_model_file_that_does_not_fit_the_architecture_named(tmp_path, change):
    path = tmp_path / "best.pt"
    su.Segmenter([su.UNet(base_width=4, depth=2)], [PRE]).save(path)
    state = su.read_checkpoint(path)
    network = state["networks"][0]
    if change == "wider model":
        network["config"]["base_width"] = 8
    elif change == "missing weights":
        del network["state"]["head.weight"]
    elif change == "unknown Preprocess field":
        network["preprocess"]["colour_space"] = "HSV"
    else:
        del state["postprocess"]
    su.write_checkpoint(path, state)
    with pytest.raises(
        CheckpointError, match=re.escape(f"{path} does not fit") + ".*train it again"
    ):
        su.load_segmenter(path, device=CPU)


# ----------------------------------------------------------------------------- settings


def test_pick_precision(monkeypatch):
    assert su.pick_precision(CPU, "fp32") == "fp32"
    assert su.pick_precision(CPU, "bf16") == "bf16"
    for supported, answer in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(
            seg_hardware, "cpu_supports_bf16", lambda supported=supported: supported
        )
        assert su.pick_precision(CPU) == su.pick_precision(CPU, "auto") == answer
    with pytest.raises(ValueError, match="'auto', 'bf16' or 'fp32', not 'fp16'"):
        su.pick_precision(CPU, "fp16")


def test_crop_side_known_answers():
    """(size, fraction, depth) -> the window's side: the fraction rounded down to a multiple
    of 2**depth, at least one such step; fraction 1 keeps the whole image."""
    cases = {(128, 0.75, 4): 96, (64, 0.75, 4): 48, (128, 1.0, 4): 128, (100, 0.5, 3): 48}
    cases[(32, 0.1, 4)] = 16
    assert {args: su.crop_side(*args) for args in cases} == cases


@pytest.mark.parametrize(
    "field, value",
    [
        ("train_crop", 0),
        ("train_crop", 1.5),
        ("ema_decay", -0.1),
        ("ema_decay", 1.0),
        ("sampling_uniform", -0.1),
        ("sampling_uniform", float("nan")),
    ],
)
def test_train_config_out_of_range_refused(field, value):
    with pytest.raises(ValueError, match=f"{field} is"):
        su.TrainConfig(**{field: value})


def test_random_crops_cut_the_same_window_of_image_and_mask():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    y = x[:, :1].clone()  # the mask is the first channel: windows must stay aligned
    xs, ys = su.random_crops(x, y, 4, torch.Generator().manual_seed(0))
    assert xs.shape == (2, 3, 4, 4) and ys.shape == (2, 1, 4, 4)
    assert torch.equal(xs[:, :1], ys)
    for image, crop in zip(x, xs):  # each crop is a contiguous 4 x 4 window of its own image
        top, left = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 8)
        assert torch.equal(crop, image[:, top : top + 4, left : left + 4])
    again = su.random_crops(x, y, 4, torch.Generator().manual_seed(0))[0]
    assert torch.equal(again, xs)  # seeded: a resumed epoch draws the same windows
    assert su.random_crops(x, y, 8, torch.Generator())[0] is x  # whole image: nothing to cut


def test_drop_inputs_copies_flair_into_the_dropped_inputs_only():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)  # (B, C, S, S)
    always = su.drop_inputs(x, (0, 1, 2), 1.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(always[:, c], x[:, 1]) for c in range(3))  # FLAIR everywhere
    assert su.drop_inputs(x, (0, 1, 2), 0.0, None) is x
    assert su.drop_inputs(x[:, [0, 2]], (0, 2), 1.0, None).equal(x[:, [0, 2]])  # no FLAIR: kept
    some = su.drop_inputs(x.repeat(500, 1, 1, 1), (0, 1, 2), 0.3, torch.Generator().manual_seed(0))
    dropped = (some[:, [0, 2]] == some[:, [1, 1]]).all(-1).all(-1).float().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.05)
    assert torch.equal(some[:, 1], x.repeat(500, 1, 1, 1)[:, 1])  # FLAIR itself never changes


def test_resume_on_a_machine_that_computes_in_another_precision_is_refused(
    data, tmp_path, monkeypatch
):
    """precision="auto" is bf16 on a CPU with native bf16 and fp32 elsewhere: a run moved between
    the two would not end as an uninterrupted run, so the resume says so."""
    auto = replace(CONFIG, epochs=2, precision="auto")
    train(data, tmp_path, auto, on_epoch_end=stop_after_one_epoch)
    saved = su.read_checkpoint(tmp_path / "last.pt")["precision"]
    other = "fp32" if saved == "bf16" else "bf16"
    monkeypatch.setattr(su, "pick_precision", lambda device, requested="auto": other)
    with pytest.raises(CheckpointError, match=f"in {saved}, not {other}"):
        train(data, tmp_path, auto, resume=True)
