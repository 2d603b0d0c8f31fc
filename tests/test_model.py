"""Model, losses, metrics, training, resuming and checkpoints of seg_utils."""

import copy
import dataclasses
import json
import os
import re
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seg_hardware
import seg_runs
import seg_utils as su
from seg_utils import CheckpointError

CONFIG = su.TrainConfig(epochs=4, batch_size=8, precision="fp32", ema_decay=0.99)  # averaged
PRE = su.Preprocess(size=64)
DICE_FLOOR = 0.6  # measured (1 thread, with the average): validation Dice 0.58, 0.87, 0.91, 0.90


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: repeatable numbers


@pytest.fixture(scope="module")
def data(synthetic_set):
    """8 synthetic patients split by patient: (train SliceDataset, val PreparedVolumes)."""
    records = su.scan_dataset(synthetic_set(8, 0))
    split = su.split_by_patient(records, seed=0)
    assert split["train"] and split["val"]
    train_set = su.SliceDataset.from_records(
        split["train"], PRE, su.train_transform(seed=0), progress=False
    )
    val = su.prepare_volumes(su.load_volumes(split["val"], progress=False), PRE)
    return train_set, val


def stop_after_one_epoch(history):
    """on_epoch_end for train(): Ctrl-C after the first epoch's checkpoint is written."""
    raise KeyboardInterrupt


def new_model(seed: int) -> su.UNet:
    su.seed_everything(seed)
    return su.UNet(base_width=8, depth=3)


@pytest.fixture(scope="module")
def run_a(data, tmp_path_factory):
    """CONFIG.epochs epochs straight through; returns what the tests compare against."""
    train_set, val = data
    run_dir = tmp_path_factory.mktemp("run_a")
    model = new_model(0)
    history = su.train(model, train_set, val, run_dir, CONFIG, PRE, progress=False)
    return dict(
        model=model,
        history=history,
        run_dir=run_dir,
        state=copy.deepcopy(model.state_dict()),
    )


def without_time(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("size", [64, 128, 96])
@pytest.mark.parametrize("width", [4, 8])
@pytest.mark.parametrize("depth", [3, 4])
def test_unet_output_shape(size, width, depth):
    model = su.UNet(base_width=width, depth=depth).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1, size, size)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model.config == dict(in_channels=3, out_channels=1, base_width=width, depth=depth)


def test_unet_non_square_and_train_mode():
    model = su.UNet(base_width=4, depth=3)
    out = model(torch.randn(2, 3, 32, 48))
    assert out.shape == (2, 1, 32, 48)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unet_rejects_indivisible_size():
    model = su.UNet(base_width=4, depth=4).eval()
    with pytest.raises(ValueError, match=r"\(100, 100\).*divisible by 16"):
        model(torch.randn(1, 3, 100, 100))


def test_count_parameters():
    n = su.count_parameters(su.UNet(base_width=16, depth=4))
    assert 1.93e6 < n < 1.95e6, n
    model = su.UNet(base_width=4, depth=3)
    total = sum(p.numel() for p in model.parameters())
    model.head.weight.requires_grad_(False)
    assert su.count_parameters(model) == total - model.head.weight.numel()


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
    assert su.dice_score(empty, empty) == 1.0
    assert su.dice_score(a, empty) == 0.0  # prediction on an empty mask
    assert su.dice_score(empty, a) == 0.0  # nothing found on a tumour
    assert su.dice_score(half, a) == pytest.approx(2 * 2 / (4 + 4))  # 0.5
    assert su.dice_score(small, a) == pytest.approx(2 * 2 / (2 + 4))  # 2/3
    assert isinstance(su.dice_score(a, a), float)


def test_dice_inputs_torch_numpy_and_dtypes():
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


def test_dice_random_masks_match_numpy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        shape = tuple(rng.integers(1, 20, rng.integers(1, 4)))
        pred, truth = rng.random(shape) < rng.random(), rng.random(shape) < rng.random()
        total = pred.sum() + truth.sum()
        expected = 1.0 if total == 0 else 2 * (pred & truth).sum() / total
        assert su.dice_score(pred, truth) == pytest.approx(expected)
        assert su.dice_score(torch.from_numpy(pred), torch.from_numpy(truth)) == pytest.approx(
            expected
        )


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
    t[:2, :, 4:10, 3:12] = 1
    return t


def test_losses_perfect_logits_near_zero(target):
    perfect = 20 * (2 * target - 1)
    random_logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(0))
    assert su.bce_dice_loss(perfect, target).item() < 1e-3
    assert su.soft_dice_loss(perfect, target).item() < 1e-3
    assert su.bce_dice_loss(random_logits, target) > su.bce_dice_loss(perfect, target) + 0.5
    assert su.soft_dice_loss(random_logits, target) > su.soft_dice_loss(perfect, target) + 0.3
    assert su.bce_dice_loss(-perfect, target) > su.bce_dice_loss(random_logits, target)


def test_bce_part_matches_torch(target):
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    bce = F.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(su.bce_dice_loss(logits, target, dice_weight=0), bce)
    combined = bce + 0.5 * su.soft_dice_loss(logits, target)
    assert torch.allclose(su.bce_dice_loss(logits, target, dice_weight=0.5), combined)
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    assert torch.allclose(su.soft_dice_loss(logits, target), dice)


def test_losses_stable_for_huge_logits(target):
    for scale in (1e4, -1e4):
        logits = (scale * (2 * target - 1)).requires_grad_()
        loss = su.bce_dice_loss(logits, target)
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(logits.grad).all()
    wrong = (-1e4 * (2 * target - 1)).requires_grad_()
    assert su.bce_dice_loss(wrong, target).item() > 100  # confidently wrong: large, finite


def test_losses_gradient_flows(target):
    logits = torch.zeros(target.shape, requires_grad=True)
    su.bce_dice_loss(logits, target).backward()
    grad = logits.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert (grad[target == 1] < 0).all() and (grad[target == 0] > 0).all()  # raise where tumour


def test_losses_accept_bf16_logits(target):
    logits = torch.randn(target.shape, generator=torch.Generator().manual_seed(2))
    loss = su.bce_dice_loss(logits.bfloat16(), target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(su.bce_dice_loss(logits, target).item(), abs=0.02)


# ----------------------------------------------------------------------------- training


def test_training_learns(run_a, data):
    history = run_a["history"]
    assert [h["epoch"] for h in history] == list(range(1, CONFIG.epochs + 1))
    untrained = su.validate(new_model(0), data[1], "fp32")
    best = max(h["val_dice"] for h in history)
    assert best > DICE_FLOOR, history
    assert best > untrained + 0.3, (untrained, history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(np.isfinite(h["train_loss"]) for h in history)
    assert history[-1]["lr"] < history[0]["lr"]  # one-cycle anneals to ~0 at the end


def test_training_writes_run_files(run_a, data):
    run_dir, history = run_a["run_dir"], run_a["history"]
    for name in ("best.pt", "last.pt", "history.json"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("*.tmp"))
    assert json.loads((run_dir / "history.json").read_text()) == history

    last = su.read_checkpoint(run_dir / "last.pt")
    assert last["format"] == su.CHECKPOINT_FORMAT
    assert last["epoch"] == CONFIG.epochs
    assert last["train_config"] == vars(CONFIG)
    assert last["preprocess"] == vars(PRE)
    assert last["precision"] == "fp32"

    x = torch.stack([data[0][i][0] for i in range(8)])
    model, pre, state = su.load_checkpoint(run_dir / "last.pt", torch.device("cpu"))
    assert not model.training and not any(m.training for m in model.modules())
    assert pre == PRE and state["epoch"] == CONFIG.epochs
    # the checkpoint's model is the moving average, the one validated; live_state the trained one
    assert su.validate(model, data[1], "fp32") == pytest.approx(history[-1]["val_dice"], abs=1e-6)
    trained = run_a["model"].eval()
    live = su.UNet(**state["model_config"])
    live.load_state_dict(state["live_state"])
    with torch.no_grad():
        assert torch.allclose(live.eval()(x), trained(x), atol=1e-6)
        assert not torch.allclose(model(x), trained(x), atol=1e-3)  # an average, not a copy

    best_model, _, best_state = su.load_checkpoint(run_dir / "best.pt", torch.device("cpu"))
    assert not best_model.training
    best_dice = max(h["val_dice"] for h in history)
    # save_run keeps the LAST epoch of a tie (>=), so the last epoch with the best Dice
    best_epoch = max(i for i, h in enumerate(history, 1) if h["val_dice"] == best_dice)
    assert best_state["epoch"] == best_epoch and best_state["history"] == history[:best_epoch]
    assert su.validate(best_model, data[1], "fp32") == pytest.approx(best_dice, abs=1e-6)
    with torch.no_grad():  # last.pt's weights exactly when the best epoch was the last
        same = torch.allclose(best_model(x), model(x), atol=1e-6)
    assert same == (best_epoch == CONFIG.epochs), best_epoch


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


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_ema_decay_outside_0_1_refused(decay):
    with pytest.raises(ValueError, match="ema_decay"):
        su.TrainConfig(ema_decay=decay)


def test_without_a_moving_average_the_checkpoint_holds_the_trained_weights(data, tmp_path):
    config = dataclasses.replace(CONFIG, epochs=1, ema_decay=0.0)
    model = new_model(0)
    history = su.train(model, data[0], data[1], tmp_path, config, PRE, progress=False)
    state = su.read_checkpoint(tmp_path / "last.pt")
    assert "live_state" not in state
    for key, value in model.state_dict().items():
        assert torch.equal(state["model_state"][key], value), key
    assert su.validate(model, data[1], "fp32") == pytest.approx(history[-1]["val_dice"], abs=1e-6)


@pytest.mark.parametrize("source, target", [("train", "test"), ("train", "val"), ("val", "test")])
def test_checkpoint_records_patients_and_refuses_a_leaky_split(run_a, data, synthetic_set,
                                                               source, target):  # fmt: skip
    """Every way a patient the model trained on (train) or was chosen on (val) can reach the
    patients it is scored on is refused, naming that patient."""
    state = su.read_checkpoint(run_a["run_dir"] / "best.pt")
    train_set, val = data
    assert state["patients"] == dict(
        train=[v.patient for v in train_set.volumes], val=[v.patient for v in val]
    )
    records = su.scan_dataset(synthetic_set(8, 0))
    su.check_split(state, su.split_by_patient(records, seed=0))  # the split 03 used: fine
    leaky = su.split_by_patient(records, seed=0)
    leaked = leaky[source][0].patient
    leaky[target] = leaky[target] + [r for r in leaky[source] if r.patient == leaked]
    with pytest.raises(su.DataError, match=rf"1 evaluation patients \({leaked}, .*SEG_SPLIT_SEED"):
        su.check_split(state, leaky)


def test_resume_equals_uninterrupted_run(run_a, data, tmp_path):
    train_set, val = data
    stop_after = 2

    def interrupt(history):
        if len(history) == stop_after:
            raise KeyboardInterrupt

    first = su.train(new_model(0), train_set, val, tmp_path, CONFIG, PRE,
                     on_epoch_end=interrupt, progress=False)  # fmt: skip
    assert len(first) == stop_after
    assert su.read_checkpoint(tmp_path / "last.pt")["epoch"] == stop_after
    assert without_time(first) == without_time(run_a["history"][:stop_after])

    model = new_model(123)  # a different initialisation: resume must overwrite it all
    history = su.train(model, train_set, val, tmp_path, CONFIG, PRE, resume=True, progress=False)
    assert without_time(history) == without_time(run_a["history"])
    state = model.state_dict()
    assert state.keys() == run_a["state"].keys()
    for key, value in run_a["state"].items():
        assert torch.allclose(state[key].float(), value.float(), atol=1e-6), key
    saved = json.loads((tmp_path / "history.json").read_text())
    assert without_time(saved) == without_time(run_a["history"])


def compiled(model: nn.Module) -> nn.Module:
    """torch.compile's real wrapper (keys "_orig_mod.*"), with no C++ compiler needed."""
    return torch.compile(model, backend="eager")


def same_run(run_dir, history, plain_dir, plain_history) -> None:
    """Histories equal (to rounding), and best.pt / last.pt hold the plain U-Net's weights."""
    for mine, plain in zip(without_time(history), without_time(plain_history), strict=True):
        assert mine == pytest.approx(plain)
    for name in ("best.pt", "last.pt"):
        loaded = su.load_checkpoint(run_dir / name, torch.device("cpu"))[0].state_dict()
        plain = su.read_checkpoint(plain_dir / name)["model_state"]
        assert loaded.keys() == plain.keys()
        for key, value in plain.items():
            assert torch.allclose(loaded[key].float(), value.float(), atol=1e-5), key


@pytest.mark.parametrize("ema_decay", [0.0, 0.99])
def test_a_compiled_model_trains_into_checkpoints_of_the_plain_u_net(data, tmp_path, ema_decay):
    """torch.compile(model) trains through its wrapper, but the checkpoints hold the U-Net's own
    weights (not the wrapper's "_orig_mod." keys), with or without a moving average."""
    config = dataclasses.replace(CONFIG, ema_decay=ema_decay)
    plain = su.train(new_model(0), *data, tmp_path / "plain", config, PRE, progress=False)
    mine = su.train(compiled(new_model(0)), *data, tmp_path / "c", config, PRE, progress=False)
    same_run(tmp_path / "c", mine, tmp_path / "plain", plain)


def test_a_compiled_model_resumes_like_an_uninterrupted_run(run_a, data, tmp_path):
    su.train(compiled(new_model(0)), *data, tmp_path, CONFIG, PRE,
             on_epoch_end=stop_after_one_epoch, progress=False)  # fmt: skip
    history = su.train(compiled(new_model(123)), *data, tmp_path, CONFIG, PRE, resume=True,
                       progress=False)  # fmt: skip
    same_run(tmp_path, history, run_a["run_dir"], run_a["history"])


def test_resume_without_a_moving_average_equals_uninterrupted_run(data, tmp_path):
    """Without a moving average (ema_decay 0): model_state is the trained weights, and resume
    restores them."""
    config = dataclasses.replace(CONFIG, epochs=2, ema_decay=0.0)
    straight = su.train(new_model(0), data[0], data[1], tmp_path / "a", config, PRE, progress=False)

    su.train(new_model(0), data[0], data[1], tmp_path / "b", config, PRE,
             on_epoch_end=stop_after_one_epoch, progress=False)  # fmt: skip
    resumed = su.train(new_model(123), data[0], data[1], tmp_path / "b", config, PRE, resume=True,
                       progress=False)  # fmt: skip
    assert without_time(resumed) == without_time(straight)


def test_resume_with_other_config_refused(run_a, data, tmp_path):
    last = tmp_path / "last.pt"
    last.write_bytes((run_a["run_dir"] / "last.pt").read_bytes())
    other = su.TrainConfig(epochs=4, batch_size=8, precision="fp32", lr=1e-3)
    with pytest.raises(CheckpointError, match=re.escape(str(last))):
        su.train(new_model(0), data[0], data[1], tmp_path, other, PRE, resume=True, progress=False)


@pytest.mark.parametrize("change", ["train patient removed", "val patient added", "fewer slices"])
def test_resume_on_other_data_refused(run_a, data, tmp_path, change):
    """Another split or a grown/shrunk data set: the schedule and the checkpoint's record of
    its training patients (which check_split trusts) would be wrong, so resume refuses."""
    train_set, val = data
    last = tmp_path / "last.pt"
    last.write_bytes((run_a["run_dir"] / "last.pt").read_bytes())
    volumes = list(train_set.volumes)
    if change == "train patient removed":
        expected = f"train patients added [], removed ['{volumes.pop(0).patient}']"
    elif change == "val patient added":
        val = val + volumes[-1:]
        expected = f"val patients added ['{volumes[-1].patient}'], removed []"
    else:
        first = volumes[0]
        volumes[0] = dataclasses.replace(first, image=first.image[1:], mask=first.mask[1:])
        expected = f"{len(train_set) - 1} training slices, not {len(train_set)}"
    other = su.SliceDataset(volumes, train_set.transform)
    with pytest.raises(CheckpointError, match=re.escape(str(last)) + ".*" + re.escape(expected)):
        su.train(new_model(0), other, val, tmp_path, CONFIG, PRE, resume=True, progress=False)
    assert last.read_bytes() == (run_a["run_dir"] / "last.pt").read_bytes()  # record unchanged


def test_resume_continues_past_early_stopping_with_more_patience(data, tmp_path):
    stopped = dataclasses.replace(CONFIG, patience=0)  # stops after epoch 2 at the latest
    history = su.train(new_model(0), data[0], data[1], tmp_path, stopped, PRE, progress=False)
    assert len(history) < CONFIG.epochs
    more = su.train(
        new_model(0), data[0], data[1], tmp_path, CONFIG, PRE, resume=True, progress=False
    )
    assert [h["epoch"] for h in more] == list(range(1, CONFIG.epochs + 1))
    assert more[: len(history)] == history
    assert su.read_checkpoint(tmp_path / "last.pt")["train_config"]["patience"] == CONFIG.patience


def test_resume_without_last_pt_starts_fresh_and_keeps_the_earlier_files(run_a, data, tmp_path):
    """resume=True with best.pt but no last.pt overwrote best.pt and history.json."""
    earlier = {n: (run_a["run_dir"] / n).read_bytes() for n in ("best.pt", "history.json")}
    for name, content in earlier.items():
        (tmp_path / name).write_bytes(content)
    config = su.TrainConfig(epochs=1, batch_size=8, precision="fp32")
    history = su.train(new_model(0), data[0], data[1], tmp_path, config, PRE, resume=True,
                       progress=False)  # fmt: skip
    assert [h["epoch"] for h in history] == [1]
    (kept,) = tmp_path.glob("previous-*")
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == earlier
    assert su.read_checkpoint(tmp_path / "best.pt")["epoch"] == 1  # the new run's own


def test_fresh_runs_keep_every_earlier_run(data, tmp_path):
    """Each fresh start moves all the earlier run left, test_metrics.json included, to a new
    previous-<time last written>/ folder; an existing previous-* folder is never reused."""
    written = time.mktime((2024, 1, 2, 3, 4, 5, 0, 0, -1))
    run0 = {"best.pt": b"0 best", "last.pt": b"0 last", "history.json": b"[]",
            "test_metrics.json": b'{"run": 0}'}  # fmt: skip
    for name, content in run0.items():
        (tmp_path / name).write_bytes(content)
        os.utime(tmp_path / name, (written, written))
    (tmp_path / "last.pt.k2x9.tmp").write_bytes(b"half a checkpoint")  # a killed write
    taken = tmp_path / "previous-20240102-030405"
    taken.mkdir()
    (taken / "notes.txt").write_text("older")
    config = su.TrainConfig(epochs=1, batch_size=8, precision="fp32")
    su.train(new_model(0), data[0], data[1], tmp_path, config, PRE, progress=False)
    moved = tmp_path / "previous-20240102-030405-2"
    assert {p.name: p.read_bytes() for p in moved.iterdir()} == run0
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]

    run1 = {n: (tmp_path / n).read_bytes() for n in ("best.pt", "last.pt", "history.json")}
    run1["test_metrics.json"] = b'{"run": 1}'  # as notebook 04 writes it
    (tmp_path / "test_metrics.json").write_bytes(run1["test_metrics.json"])
    su.train(new_model(1), data[0], data[1], tmp_path, config, PRE, progress=False)
    (newest,) = set(tmp_path.glob("previous-*")) - {taken, moved}
    assert {p.name: p.read_bytes() for p in newest.iterdir()} == run1
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert left == ["best.pt", "history.json", "last.pt"]  # no test_metrics.json of another model


def test_numpy_numbers_in_the_config(data, tmp_path):
    """TrainConfig(lr=np.float64(...)) trained, then every load called the checkpoint damaged."""
    config = su.TrainConfig(epochs=2, batch_size=8, precision="fp32", lr=np.float64(3e-3),
                            dice_weight=np.float32(1.0))  # fmt: skip

    su.train(new_model(0), data[0], data[1], tmp_path, config, PRE,
             on_epoch_end=stop_after_one_epoch, progress=False)  # fmt: skip
    model, pre, state = su.load_checkpoint(tmp_path / "best.pt", torch.device("cpu"))
    assert type(state["train_config"]["lr"]) is float and state["train_config"]["lr"] == 3e-3
    assert pre == PRE and state["epoch"] == 1
    history = su.train(new_model(0), data[0], data[1], tmp_path, config, PRE, resume=True,
                       progress=False)  # fmt: skip
    assert [h["epoch"] for h in history] == [1, 2]


def test_ctrl_c_during_a_checkpoint_write_reports_what_is_on_disk(data, tmp_path, monkeypatch,
                                                                  capsys):  # fmt: skip
    save = su.save_checkpoint

    def interrupted(state, path):
        if Path(path).name == "last.pt" and state["epoch"] == 2:
            raise KeyboardInterrupt  # Ctrl-C before the new last.pt replaced the old one
        save(state, path)

    monkeypatch.setattr(seg_runs, "save_checkpoint", interrupted)
    config = su.TrainConfig(epochs=3, batch_size=8, precision="fp32")
    su.train(new_model(0), data[0], data[1], tmp_path, config, PRE, progress=False)
    assert su.read_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert f"{tmp_path / 'last.pt'} holds epoch 1:" in capsys.readouterr().out


def test_leftover_temporary_files_are_removed_on_resume(run_a, data, tmp_path):
    last = tmp_path / "last.pt"
    last.write_bytes((run_a["run_dir"] / "last.pt").read_bytes())  # all epochs done
    for name in (
        "last.pt.k2x9.tmp",
        "best.pt.a7b1.tmp",
        "history.json.c3d4.tmp",
        "history.json.tmp",
    ):
        (tmp_path / name).write_bytes(b"half a file")
    su.train(new_model(0), data[0], data[1], tmp_path, CONFIG, PRE, resume=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_train_without_validation_refused(data, tmp_path):
    with pytest.raises(ValueError, match="validation"):
        su.train(new_model(0), data[0], [], tmp_path, CONFIG, PRE, progress=False)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- checkpoints


def small_state():
    return dict(format=su.CHECKPOINT_FORMAT, weights=torch.arange(1000.0), epoch=1)


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "last.pt"
    su.save_checkpoint(small_state(), path)
    assert su.read_checkpoint(path)["epoch"] == 1

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(su.torch, "save", broken_save)
    state = small_state()
    state["epoch"] = 2
    with pytest.raises(OSError, match="disk full"):
        su.save_checkpoint(state, path)
    monkeypatch.undo()
    loaded = su.read_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["weights"], torch.arange(1000.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no *.tmp left


def test_checkpoint_file_mode_like_any_other_file(tmp_path):
    """best.pt should be as readable as history.json (umask), not 0600 from mkstemp."""
    path = tmp_path / "best.pt"
    su.save_checkpoint(small_state(), path)
    plain = tmp_path / "history.json"
    plain.write_text("[]")
    assert oct(stat.S_IMODE(path.stat().st_mode)) == oct(stat.S_IMODE(plain.stat().st_mode))


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "runs" / "best.pt"
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*notebook 03"):
        su.read_checkpoint(path)
    with pytest.raises(CheckpointError, match="notebook 03"):
        su.load_checkpoint(path)


def test_truncated_checkpoint(run_a, tmp_path):
    data = (run_a["run_dir"] / "last.pt").read_bytes()
    path = tmp_path / "best.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*zip archive") as error:
        su.load_checkpoint(path)
    assert "delete" not in str(error.value) and "Keep it" in str(error.value)


def test_checkpoint_with_numpy_objects_is_not_called_damaged(tmp_path):
    """A file an older version wrote with a np.float64 in it holds good weights: keep it."""
    path = tmp_path / "best.pt"
    torch.save(dict(small_state(), lr=np.float64(3e-3)), path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*numpy") as error:
        su.read_checkpoint(path)
    assert "delete" not in str(error.value) and "Keep it" in str(error.value)


@pytest.mark.parametrize("change", ["wider model", "missing weights", "no model_config",
                                    "unknown Preprocess field"])  # fmt: skip
def test_checkpoint_that_does_not_fit_names_the_file(run_a, tmp_path, change):
    state = su.read_checkpoint(run_a["run_dir"] / "best.pt")
    if change == "wider model":
        state["model_config"]["base_width"] *= 2
    elif change == "missing weights":
        del state["model_state"]["head.weight"]
    elif change == "no model_config":
        del state["model_config"]
    else:
        state["preprocess"]["colour_space"] = "HSV"
    path = tmp_path / "best.pt"
    su.save_checkpoint(state, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + " does not fit"):
        su.load_checkpoint(path, torch.device("cpu"))


class Foreign:
    pass


@pytest.mark.parametrize("kind", ["plain dict", "list", "text", "empty", "pickled object"])
def test_foreign_checkpoint(tmp_path, kind):
    path = tmp_path / "model.pt"
    if kind == "plain dict":
        torch.save({"model_state": {}, "epoch": 3}, path)
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif kind == "empty":
        path.touch()
    else:
        torch.save(Foreign(), path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        su.read_checkpoint(path)


# ----------------------------------------------------------------------------- precision


def test_pick_precision(monkeypatch):
    cpu = torch.device("cpu")
    assert su.pick_precision(cpu, "fp32") == "fp32"
    assert su.pick_precision(cpu, "bf16") == "bf16"
    expected = "bf16" if su.cpu_supports_bf16() else "fp32"
    assert su.pick_precision(cpu) == su.pick_precision(cpu, "auto") == expected
    for supported, answer in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(
            seg_hardware, "cpu_supports_bf16", lambda supported=supported: supported
        )
        assert su.pick_precision(cpu, "auto") == answer
        assert su.pick_precision(cpu, "fp32") == "fp32"


def test_checkpoints_from_before_channels_and_the_retired_normalisation_still_load():
    old = dict(size=64, crop_brain=True, normalisation="volume", mean=[0.0] * 3, std=[1.0] * 3)
    assert su.Preprocess.from_saved(old) == su.Preprocess(size=64, channels=[0, 1, 2])
    with pytest.raises(ValueError, match="global normalisation"):
        su.Preprocess.from_saved(dict(old, normalisation="global"))


@pytest.mark.parametrize(
    "size, fraction, depth, side",
    [
        (128, 0.75, 4, 96),
        (64, 0.75, 4, 48),
        (128, 1.0, 4, 128),
        (100, 0.5, 3, 48),
        (32, 0.1, 4, 16),
    ],
)
def test_crop_side_known_answers(size, fraction, depth, side):
    assert su.crop_side(size, fraction, depth) == side


@pytest.mark.parametrize("share", [0, -0.5, 1.5])
def test_train_crop_outside_0_1_refused(share):
    with pytest.raises(ValueError, match="train_crop"):
        su.TrainConfig(train_crop=share)


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan")])
def test_sampling_uniform_outside_0_1_refused(share):
    with pytest.raises(ValueError, match="sampling_uniform"):
        su.TrainConfig(sampling_uniform=share)


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


def test_resume_of_a_run_from_before_train_crop(data, tmp_path):
    """Older checkpoints have no train_crop, sampling_uniform or ema_decay: they trained on whole
    images with 10 % uniform draws and no moving average, and resume as such."""
    whole = dataclasses.replace(CONFIG, epochs=2, train_crop=1.0, sampling_uniform=0.1,
                                ema_decay=0.0)  # fmt: skip

    su.train(new_model(0), data[0], data[1], tmp_path, whole, PRE,
             on_epoch_end=stop_after_one_epoch, progress=False)  # fmt: skip
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    for key in ("train_crop", "sampling_uniform", "ema_decay"):
        del state["train_config"][key]
    torch.save(state, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="train_crop"):  # default windows: another recipe
        su.train(new_model(0), data[0], data[1], tmp_path, dataclasses.replace(whole, train_crop=0.75),
                 PRE, resume=True, progress=False)  # fmt: skip
    with pytest.raises(CheckpointError, match="ema_decay"):  # an average: another recipe
        su.train(new_model(0), data[0], data[1], tmp_path, dataclasses.replace(whole, ema_decay=0.99),
                 PRE, resume=True, progress=False)  # fmt: skip
    with pytest.raises(CheckpointError, match="sampling_uniform"):
        su.train(new_model(0), data[0], data[1], tmp_path,
                 dataclasses.replace(whole, sampling_uniform=0.5), PRE, resume=True, progress=False)  # fmt: skip
    history = su.train(new_model(0), data[0], data[1], tmp_path, whole, PRE, resume=True,
                       progress=False)  # fmt: skip
    assert [h["epoch"] for h in history] == [1, 2]
