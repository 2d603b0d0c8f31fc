"""Bad and unusual input for `unet-seg` (issue 34), as a hostile but realistic user gives it: each
ends in one line that names the file and the fix (status 2), or 130 on Ctrl-C; never in a
traceback, a crash, an output reported but not written, or a file deleted that predict did not
write. docs/predict.md ("What is guaranteed") promises this.

The command runs in-process (seg_cli.main) but in two processes of its own: as a user without
root's power over file permissions, and where OpenCV once crashed the process (a file name that is
not UTF-8); a forked child is killed mid-way to leave what a kill leaves.
"""

import ctypes
import errno
import gzip
import importlib
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
import types
from dataclasses import asdict
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch

import seg_cli
import seg_predict
import seg_runs
import seg_utils as su
from seg_scan import read_scan, to_uint8

REPO_ROOT = Path(__file__).resolve().parents[1]
LONG = "a" * 300  # longer than any file system's 255-byte name


@pytest.fixture(scope="module")
def folder(synthetic_set) -> Path:
    """A synthetic patient folder (33 slices, masks beside them)."""
    return sorted(p for p in synthetic_set(8, 0).iterdir() if p.is_dir())[0]


def run(argv: list) -> int:
    """seg_cli.main in-process; Ctrl-C escaping it fails the test instead of ending pytest."""
    try:
        return seg_cli.main([str(a) for a in argv])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped unet-seg: a traceback")


def refused(capsys, argv: list, *says: str) -> None:
    """The command must exit 2 with one line on stderr holding each of `says`, nothing else."""
    status = run(argv)
    said = capsys.readouterr()
    assert (status, said.out) == (2, ""), said
    assert said.err.startswith("error: ") and said.err.count("\n") == 1, said.err
    for words in says:
        assert words in said.err, (words, said.err)


def beside(out: Path) -> list[str]:
    """The hidden folders predict keeps beside `out` while it writes."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def nifti(path: Path, shape=(32, 32, 8), affine=None, header=None) -> Path:
    """A NIfTI file of random grey levels."""
    data = np.random.default_rng(0).uniform(0, 100, shape).astype(np.float32)
    affine = np.eye(4) if affine is None and header is None else affine  # else: the header's
    nib.Nifti1Image(data, affine, header).to_filename(path)
    return path


def model_with(tiny_model: Path, path: Path, change) -> Path:
    """A copy of tiny_model with change(state) applied, saved as an older program could."""
    state = torch.load(tiny_model, weights_only=True)
    change(state)
    torch.save(state, path)  # not write_checkpoint, which refuses such files
    return path


def ctrl_c(*args, **kwargs):
    """What Ctrl-C raises, wherever it comes."""
    raise KeyboardInterrupt


def earlier_results(out: Path, run: str) -> Path:
    """A folder as predict leaves it: the files its summary.json lists."""
    out.mkdir(exist_ok=True)
    (out / "mask.png").write_bytes(b"png")
    (out / "summary.json").write_text(
        json.dumps(dict(outputs=["mask.png", "summary.json"], run=run))
    )
    return out


# ----------------------------------------------------------------------------- 1. failed writes


def test_a_full_disk_is_an_error_and_leaves_no_out_folder(
    tiny_model, folder, tmp_path, monkeypatch, capsys
):
    """OpenCV's imwrite says False instead of raising: a full disk once gave exit 0 and a
    summary.json listing an overlay that was never written."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cv2, "imwrite", lambda *args, **kwargs: False)
    for method in ("write_bytes", "write_text"):
        monkeypatch.setattr(Path, method, full)
    monkeypatch.setattr(gzip.GzipFile, "write", full)  # nibabel's .nii.gz
    scan = nifti(tmp_path / "flair.nii")
    for source, flags in [(folder, []), (scan, ["--fill-missing", "flair"])]:
        out = tmp_path / f"out-{source.name}"
        argv = ["predict", source, "--checkpoint", tiny_model, "--out", out, "--quiet", *flags]
        refused(capsys, argv, "No space left on device")
        assert not out.exists() and beside(out) == []


# ----------------------------------------------------------------------------- 2. wrong answers


def test_a_model_with_non_finite_weights_is_refused(tiny_model, folder, tmp_path, capsys):
    """A diverged run's weights once predicted "0 of 33 slices with tumour" as a result."""

    def diverge(state):
        weights = state["networks"][0]["state"]
        weights[next(k for k, v in weights.items() if v.is_floating_point())].view(-1)[0] = np.nan

    model = model_with(tiny_model, tmp_path / "last.pt", diverge)
    says = [str(model), "NaN or infinite weights", "lower learning rate"]
    out = tmp_path / "out"
    refused(capsys, ["predict", folder, "--checkpoint", model, "--out", out], *says)
    refused(capsys, ["export", tmp_path / "model.onnx", "--checkpoint", model], *says)
    refused(capsys, ["inputs", "--checkpoint", model], *says)
    assert not out.exists() and not (tmp_path / "model.onnx").exists()


def test_training_never_saves_non_finite_weights(tmp_path):
    """save_run refuses the epoch whose weights diverged: train() stops there, and last.pt keeps
    the epoch before."""
    net = su.UNet(in_channels=3, base_width=8, depth=3)
    optimizer = torch.optim.Adam(net.parameters())
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=10)
    network = dict(config=net.config, preprocess=asdict(su.Preprocess(size=64)))
    data = dict(network=network | dict(patients=dict(train=["A"], val=["B"])), train_slices=8)
    data |= dict(postprocess=asdict(su.PostProcess()), precision="fp32")
    history = [dict(epoch=1, val_dice=0.5)]
    args = (optimizer, scheduler, su.TrainConfig(), history, data, None)
    seg_runs.save_run(tmp_path, net, *args)
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] = np.inf
    history.append(dict(epoch=2, val_dice=0.9))
    with pytest.raises(
        su.CheckpointError,
        match=r"best.pt not written: NaN or infinite weights at epoch 2; .*lower learning rate",
    ):
        seg_runs.save_run(tmp_path, net, *args)
    for name in ("best.pt", "last.pt"):
        assert seg_runs.read_checkpoint(tmp_path / name)["epoch"] == 1
    assert len(su.load_segmenter(tmp_path / "last.pt").nets) == 1


# --min-size with keep != "all" (applied or not, it was recorded): refused by PostProcess, tested
# in test_predict.py::test_nonsense_postprocess_changes_are_refused_before_any_work.


# ----------------------------------------------------------------------------- 3. tracebacks


def test_link_loops_are_named(tiny_model, folder, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    scan = tmp_path / "scan"
    shutil.copytree(folder, scan)
    first = sorted(scan.glob("*_1.tif"))[0]
    first.unlink()
    first.symlink_to(first)  # a slice that points at itself
    flair = nifti(tmp_path / "flair.nii.gz")
    out, tiny = tmp_path / "out", ["--checkpoint", tiny_model]
    for argv, named in [
        (["predict", loop, "--checkpoint", tiny_model, "--out", out], loop),
        (["predict", scan, "--checkpoint", tiny_model, "--out", out], first),
        (["predict", flair, "--t1", loop, "--t1c", flair, *tiny, "--out", out], loop),
        (["predict", folder, "--checkpoint", loop, "--out", out], loop),
        (["predict", folder, "--checkpoint", tiny_model, "--out", loop], loop),
        (["predict", folder, "--checkpoint", tiny_model, "--out", loop / "out"], loop / "out"),
        (["export", loop, "--checkpoint", tiny_model], loop),
        (["export", tmp_path / "model.onnx", "--checkpoint", loop], loop),
        (["inputs", "--checkpoint", loop], loop),
    ]:
        refused(capsys, argv, f"{named} (", "is a loop of symbolic links")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flair.nii.gz", "loop", "scan"]


def test_names_too_long_are_named(tiny_model, folder, tmp_path, capsys):
    long, out = tmp_path / LONG, tmp_path / "out"
    for argv in [
        ["predict", long, "--checkpoint", tiny_model, "--out", out],
        ["predict", folder, "--checkpoint", long, "--out", out],
        ["predict", folder, "--checkpoint", tiny_model, "--out", long],
        ["export", f"{long}.onnx", "--checkpoint", tiny_model],
    ]:
        refused(capsys, argv, LONG, "has a name too long")
    assert list(tmp_path.iterdir()) == []


def test_a_model_whose_tensors_do_not_fit_its_network_is_refused(
    tiny_model, folder, tmp_path, capsys
):
    def widen(state):
        state["networks"][0]["config"]["base_width"] = 16  # the tensors are 8 wide

    model = model_with(tiny_model, tmp_path / "wide.pt", widen)
    says = ["wide.pt does not fit", "train it again"]
    refused(capsys, ["predict", folder, "--checkpoint", model, "--out", tmp_path / "out"], *says)
    refused(capsys, ["export", tmp_path / "model.onnx", "--checkpoint", model], *says)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.pt"]


def test_a_nifti_with_a_broken_affine_is_refused(tiny_model, tmp_path, capsys):
    for name, axes in [
        ("flat", np.diag([1.0, 0.0, 1.0])),
        ("parallel", [[1, 1, 0], [0, 0, 0], [0, 0, 1]]),
    ]:
        header = nib.Nifti1Header()
        affine = np.eye(4)
        affine[:3, :3] = axes
        header.set_sform(affine, code=1)  # only the sform says where the voxels lie
        scan = nifti(tmp_path / f"{name}.nii.gz", affine=None, header=header)
        out = tmp_path / f"out-{name}"
        argv = ["predict", scan, "--checkpoint", tiny_model, "--out", out, "--fill-missing"]
        argv.append("flair")
        refused(capsys, argv, scan.name, "zero-length or singular axis", "convert the scan again")
        assert not out.exists()


def test_voxels_too_fine_to_resample_are_refused_before_allocating(tmp_path):
    """1e-7 mm columns in a square field of view: tens of GiB, once allocated until memory ran
    out."""
    scan = nifti(tmp_path / "fine.nii.gz", affine=np.diag([1e-7, 1.0, 1.0, 1.0]))
    tracemalloc.start()
    try:
        with pytest.raises(
            su.DataError, match=r"fine.nii.gz: voxels of .* GiB a copy to resample.*about 1 mm"
        ):
            read_scan(scan)
        assert tracemalloc.get_traced_memory()[1] < 2**27
    finally:
        tracemalloc.stop()


AS_ANOTHER_USER = """
import contextlib, io, json, sys
try:
    open(sys.argv[1], "rb")
    sys.exit("root's power over file permissions was not dropped: " + sys.argv[1] + " opened")
except PermissionError:
    pass
import seg_cli
said = {}
for name, argv in json.loads(sys.argv[2]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = seg_cli.main(argv)
        except BaseException as e:  # a traceback: what the test must not see
            status = repr(e)
    said[name] = [status, err.getvalue()]
print(json.dumps(said))
"""


def without_root_file_powers() -> None:
    """In the child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, root's power to
    read and write whatever a file's mode says, so that modes bind root as any user (an
    ordinary user could not run this interpreter where it lives in root's private home)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone at exec
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_permission_denied_is_named_for_every_path(tiny_model, folder, tmp_path):
    """Common on shared machines: a scan, model, or folder of someone else's. An unreadable slice
    was once called corrupt; the others ended in a traceback."""
    model, scan = tmp_path / "model.pt", tmp_path / "scan"
    shutil.copy(tiny_model, model)
    shutil.copytree(folder, scan)
    locked = {name: tmp_path / name for name in ("locked.pt", "locked.nii.gz", "locked-out")}
    shutil.copy(tiny_model, locked["locked.pt"])
    nifti(locked["locked.nii.gz"])
    locked["locked-out"].mkdir()
    locked["locked-scan"] = shutil.copytree(folder, tmp_path / "locked-scan")
    locked["slice"] = scan / f"{folder.name}_1.tif"
    locked["read-only"] = tmp_path / "read-only"
    locked["read-only"].mkdir()
    flair, outs = nifti(tmp_path / "flair.nii.gz"), tmp_path / "outs"
    outs.mkdir()
    given = ["--checkpoint", model]  # the readable model
    cases = {  # name: (the command, the path its message must name)
        "input": (
            ["predict", locked["locked.nii.gz"], *given, "--out", outs / "1"],
            "locked.nii.gz",
        ),
        "--t1": (
            ["predict", flair, "--t1", locked["locked.nii.gz"], *given, "--out", outs / "2"],
            "locked.nii.gz",
        ),
        "slice": (["predict", scan, *given, "--out", outs / "3"], f"scan/{folder.name}_1.tif"),
        "folder": (["predict", locked["locked-scan"], *given, "--out", outs / "4"], "locked-scan"),
        "model": (
            ["predict", scan, "--checkpoint", locked["locked.pt"], "--out", outs / "5"],
            "locked.pt",
        ),
        "inputs": (["inputs", "--checkpoint", locked["locked.pt"]], "locked.pt"),
        "--out": (
            ["predict", flair, *given, "--out", locked["locked-out"], "--overwrite"],
            "locked-out",
        ),
        "--out in": (["predict", scan, *given, "--out", locked["read-only"] / "new"], "read-only"),
        "export": (["export", locked["locked-out"] / "model.onnx", *given], "locked-out"),
        "export in": (["export", locked["read-only"] / "model.onnx", *given], "read-only"),
    }
    for path in locked.values():
        path.chmod(0o555 if path.name == "read-only" else 0)
    command = [sys.executable, "-c", AS_ANOTHER_USER, str(locked["locked.pt"])]
    command.append(json.dumps({k: [str(a) for a in v[0]] for k, v in cases.items()}))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    drop = without_root_file_powers if os.geteuid() == 0 else None  # else: an ordinary user
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, preexec_fn=drop)
    except subprocess.SubprocessError as e:
        pytest.skip(f"cannot drop root's power over file permissions here ({e}): run as a user")
    finally:
        for path in locked.values():
            path.chmod(0o755)
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout)
    assert said.keys() == cases.keys()
    for name, (status, err) in said.items():
        assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert "ermission denied" in err and cases[name][1] in err, (name, err)
    assert list(outs.iterdir()) == [] and list(locked["read-only"].iterdir()) == []


# ----------------------------------------------------------------------------- 4. crashes


def test_file_names_that_are_not_utf8_are_read_and_written(tiny_model, folder, tmp_path):
    """OpenCV's imread and imwrite end the process (segmentation fault) on such a name: a
    process of its own, so that a crash fails this test instead of ending pytest."""
    scan, out = tmp_path / os.fsdecode(b"scan\xff"), tmp_path / os.fsdecode(b"out\xff")
    scan.mkdir()
    for n in range(1, 7):
        source = folder / f"{folder.name}_{n}.tif"
        shutil.copy(source, scan / os.fsdecode(b"slice\xff_%d.tif" % n))
    command = [sys.executable, "-m", "seg_cli", "predict", scan, "--out", out]
    command += ["--checkpoint", tiny_model]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.endswith(
        b"results in " + os.fsencode(out).replace(b"\xff", b"\\xff") + b"/\n"
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"] == str(scan) and summary["slices"] == 6
    masks = sorted(os.fsencode(p.name) for p in out.glob("*_mask.png"))
    assert masks == [b"slice\xff_%d_mask.png" % n for n in range(1, 7)]


# ----------------------------------------------------------------------------- 5. interruptions


def test_ctrl_c_says_in_one_line_that_the_earlier_results_are_untouched(
    tiny_model, folder, tmp_path, monkeypatch, capsys
):
    out = earlier_results(tmp_path / "out", "earlier")
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    write = seg_predict.write_results

    def interrupted(staging, *args):
        write(staging, *args)  # the results, then Ctrl-C before summary.json
        ctrl_c()

    monkeypatch.setattr(seg_predict, "write_results", interrupted)
    status = run(
        ["predict", folder, "--checkpoint", tiny_model, "--out", out, "--overwrite", "--quiet"]
    )
    said = capsys.readouterr()
    assert status == 130 and said.out == "" and said.err.count("\n") == 1
    assert said.err == f"interrupted: {out} is as it was before (nothing half-written)\n"
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
    assert beside(out) == []
    monkeypatch.setattr(torch.onnx, "export", ctrl_c)
    onnx = tmp_path / "model.onnx"
    assert run(["export", onnx, "--checkpoint", tiny_model]) == 130
    assert (
        capsys.readouterr().err
        == f"interrupted: {onnx} is as it was before (nothing half-written)\n"
    )
    assert not onnx.exists()


def test_ctrl_c_while_torch_loads_says_so_in_one_line(monkeypatch, capsys):
    """Importing torch is most of a short run: Ctrl-C there once ended in a traceback too."""

    class Loading(types.ModuleType):
        def __getattr__(self, name):
            if name != "export_onnx":  # what seg_cli takes from it; reprs ask for others
                raise AttributeError(name)
            raise KeyboardInterrupt  # as if Ctrl-C came while this module loads

    monkeypatch.setitem(sys.modules, "seg_export", Loading("seg_export"))
    try:
        with pytest.raises(SystemExit) as ended:
            importlib.reload(seg_cli)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped unet-seg: a traceback")
    finally:
        monkeypatch.undo()
        importlib.reload(seg_cli)
    assert ended.value.code == 130
    assert capsys.readouterr().err == "interrupted: nothing was written\n"


def killed(out: Path, at: str) -> None:
    """Write results to `out` (overwrite) in a forked child that is killed (os._exit: no cleanup
    runs) at the rename that moves them in ("rename"), or just after it ("rmtree")."""
    child = os.fork()
    if child == 0:  # the child: no pytest, no torch, only files
        try:

            def kill(*args, **kwargs):
                os._exit(9)

            rename = Path.rename
            if at == "rename":
                Path.rename = lambda self, target: (
                    kill() if Path(target) == out else rename(self, target)
                )
            else:
                shutil.rmtree = kill
            with seg_predict.staged_folder(out, overwrite=True) as staging:
                earlier_results(staging, "new")
        finally:
            os._exit(1)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 9


def test_a_killed_predict_is_put_right_by_the_next_one(tiny_model, folder, tmp_path, capsys):
    """A kill during the final renames once left hidden folders named .out.XXXX (one holding the
    earlier results) that no later run restored or removed."""
    out = tmp_path / "out"
    argv = ["predict", folder, "--checkpoint", tiny_model, "--out", out]
    earlier_results(out, "earlier")
    killed(out, "rename")  # between the renames: no out, the earlier results moved aside
    kinds = sorted(name.split(".unet-seg-")[-1].split("-")[0] for name in beside(out))
    assert not out.exists() and kinds == ["previous", "writing"]  # names that say what they are
    refused(capsys, argv, "already exists with results")
    assert json.loads((out / "summary.json").read_text())["run"] == "earlier" and beside(out) == []
    killed(out, "rmtree")  # after the renames: the new results in, the earlier ones beside
    assert json.loads((out / "summary.json").read_text())["run"] == "new" and len(beside(out)) == 1
    refused(capsys, argv, "already exists with results")
    assert json.loads((out / "summary.json").read_text())["run"] == "new" and beside(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- 6. broken promises


def test_dicom_is_named_with_how_to_convert_it(tiny_model, tmp_path, capsys):
    dicom = tmp_path / "series"
    dicom.mkdir()
    for n in (1, 2):
        (dicom / f"IM{n:04}").write_bytes(bytes(128) + b"DICM" + bytes(64))  # no suffix, as often
    out = tmp_path / "out"
    (tmp_path / "scan.dcm").write_bytes(b"")
    for source, named in [
        (dicom, "IM0001"),
        (dicom / "IM0002", "IM0002"),
        (tmp_path / "scan.dcm", "scan.dcm"),
    ]:
        refused(
            capsys,
            ["predict", source, "--checkpoint", tiny_model, "--out", out],
            f"{named} is DICOM",
            "dcm2niix",
        )
    assert not out.exists()


def test_a_nifti_with_trailing_axes_of_one_gets_a_mask_of_its_shape(tiny_model, tmp_path, capsys):
    for shape in [(32, 32, 8, 1), (32, 32, 8, 1, 1)]:
        scan = nifti(tmp_path / f"scan{len(shape)}.nii.gz", shape)
        out = tmp_path / f"out{len(shape)}"
        argv = ["predict", scan, "--checkpoint", tiny_model, "--out", out, "--quiet"]
        argv += ["--fill-missing", "flair"]
        assert run(argv) == 0, capsys.readouterr()
        mask = nib.load(out / "mask.nii.gz")
        assert mask.shape == shape and np.allclose(mask.affine, nib.load(scan).affine)


def test_export_to_a_folder_name_asks_for_a_file_name(tiny_model, tmp_path, capsys):
    """`export model/` once wrote a file named model."""
    named = str(tmp_path / "model") + os.sep
    refused(
        capsys, ["export", named, "--checkpoint", tiny_model], f"{named} is a folder: name the file"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_float64_scan_beyond_float32s_range_keeps_its_signal(tmp_path):
    """Cast to float32 it was all infinity, and called "no signal"."""
    volume = np.linspace(1e39, 2e39, 4 * 16 * 16).reshape(4, 16, 16)
    grey = to_uint8(volume, tmp_path / "huge.nii")
    assert grey.min() == 128 and grey.max() == 255  # from 0 (no value below 0) to the top
    assert (np.diff(grey.ravel().astype(int)) >= 0).all()
