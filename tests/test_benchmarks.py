"""The benchmarks (benchmarks/*.py): cross-validation and its ensemble, recipes, time to Dice, the
site-shift simulator, leave one site out, the release of a model (with the development set and
the scan checks), and every script's --help.

One cross-validation runs, in this process and once for the module (the fixture `cv`): two folds
of a tiny U-Net on 8 synthetic patients, gathered with a second folder of the same folds. The
tests that need trained models share it; the rest need no training.
"""

import ast
import contextlib
import hashlib
import io
import json
import os
import re
import runpy
import shutil
import sys
from dataclasses import asdict
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT

import seg_runs
import seg_utils as su

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import cross_validate  # noqa: E402
import external_dev  # noqa: E402
import leave_one_site_out  # noqa: E402
import release_model  # noqa: E402
import scan_checks  # noqa: E402
import site_shift  # noqa: E402
import time_to_dice  # noqa: E402
import train_lgg  # noqa: E402

TINY = ["--size", "64", "--width", "8", "--depth", "3", "--epochs", "2", "--batch-size", "8"]
SCRIPTS = sorted((REPO_ROOT / "benchmarks").glob("*.py"))


@pytest.fixture(scope="module")
def cv(synthetic_set, tmp_path_factory) -> SimpleNamespace:
    """Run-dir a trains fold 1 and fold 2 as two `--fold` calls; b holds the same folds with each
    fold model's output bias raised by 0.5 (another run of those folds, without training one);
    then a gathers `--with b`. Returns the data, both folders, the split, the summary and the
    gather's printed output."""
    data, root = synthetic_set(8, 0), tmp_path_factory.mktemp("cv")
    a, b = root / "a", root / "b"
    run = ["--run-dir", str(a), "--folds", "2", *TINY]
    output = io.StringIO()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LGG_DATA", str(data))
        for k in ("1", "2"):
            cross_validate.main([*run, "--fold", k])
        for k in (0, 1):
            state = su.read_checkpoint(cross_validate.fold_dir(a, k) / "last.pt")
            state["networks"][0]["state"]["head.bias"] += 0.5
            seg_runs.write_checkpoint(cross_validate.fold_dir(b, k) / "last.pt", state)
        shutil.copy(a / "folds.json", b / "folds.json")
        with contextlib.redirect_stdout(output):
            cross_validate.main([*run, "--with", str(b)])
    summary = json.loads((a / "cv_summary.json").read_text())
    splits = su.split_by_patient(su.scan_dataset(data))
    return SimpleNamespace(
        data=data, a=a, b=b, splits=splits, summary=summary, output=output.getvalue()
    )


def test_two_fold_cross_validation_end_to_end(cv):
    """Every pool patient is scored out of fold once, by fold models that never trained on it;
    the CV mean is the chosen setting's swept Dice and the mean of the per-patient table;
    ensemble.pt holds the four fold models (a's, then b's) with the chosen PostProcess, and its
    test Dice recomputed here is the summary's."""
    summary, splits = cv.summary, cv.splits
    pool = {r.patient for r in splits["train"] + splits["val"]}
    test = {r.patient for r in splits["test"]}
    assert sorted(p for fold in summary["folds"] for p in fold) == sorted(pool)
    assert set(summary["cv_patient_dice"]) == pool
    assert set(summary["test_ensemble_patient_dice"]) == test
    cv_mean = summary["cv"]["patient Dice mean"]
    assert cv_mean == pytest.approx(summary["chosen_out_of_fold"]["dice"], abs=1e-12)
    assert cv_mean == pytest.approx(np.mean(list(summary["cv_patient_dice"].values())), abs=1e-4)
    assert "fold 1/2: 4 held-out patients: already done" in cv.output  # trained by --fold 1

    segmenter = su.load_segmenter(cv.a / "ensemble.pt")
    chosen = {k: v for k, v in summary["chosen_out_of_fold"].items() if k != "dice"}
    assert segmenter.post == su.PostProcess(**chosen) and segmenter.chosen_on == "out of fold"
    assert len(segmenter.nets) == len(summary["test_per_fold_model"]) == 4
    for k, who in enumerate(segmenter.patients):
        held_out = set(summary["folds"][k % 2])
        assert set(who["val"]) == held_out and not set(who["train"]) & (held_out | test)
    assert segmenter.pres[0] == su.Preprocess(size=64)  # the recipe reached the model
    assert segmenter.nets[0].config == dict(in_channels=3, out_channels=1, base_width=8, depth=3)
    volumes = su.load_volumes(splits["test"], progress=False)
    probs = segmenter.predict_volumes(volumes, progress=False)
    table, _, _ = su.score_patients(probs, volumes, segmenter.post)
    assert table.dice.mean() == pytest.approx(summary["test_ensemble"]["patient Dice mean"])


def test_out_of_fold_prediction_with_a_second_folder_is_the_mean_of_both(cv):
    """--with b: a fold-1 patient's out-of-fold Dice is that of the mean probability of a's and
    b's fold-1 models, and the summary names b relative to a (runs/ can move as a whole)."""
    chosen = {k: v for k, v in cv.summary["chosen_out_of_fold"].items() if k != "dice"}
    post = su.PostProcess(**chosen)
    patient = cv.summary["folds"][0][0]
    records = [r for r in cv.splits["train"] + cv.splits["val"] if r.patient == patient]
    volume = su.load_volumes(records, progress=False)[0]
    fold_models = [su.load_segmenter(d / "fold-1" / "last.pt") for d in (cv.a, cv.b)]
    prob_a, prob_b = (m.probabilities(volume.image, post.tta) for m in fold_models)
    assert not np.allclose(prob_a, prob_b)
    table, _, _ = su.score_patients({patient: (prob_a + prob_b) / 2}, [volume], post)
    assert cv.summary["cv_patient_dice"][patient] == pytest.approx(table.dice[0], abs=1e-4)
    assert cv.summary["with_folders"] == ["../b"]


def test_cross_validate_refuses_what_would_mix_runs(cv, tmp_path, monkeypatch):
    """Another recipe in a folder, a gather that would replace another ensemble's summary, a
    --with folder twice or of other folds, --with beside --fold, a fold or fold count that does
    not exist: each stops before any training, saying what to do."""
    monkeypatch.setenv("LGG_DATA", str(cv.data))
    run, other = ["--run-dir", str(cv.a), *TINY, "--folds"], ["--with", str(cv.b)]
    cases = [
        ([*run, "2", "--lr", "0.01"], "holds other folds or another recipe"),
        ([*run, "2"], "gathers another ensemble"),  # without b: a's summary is of a and b
        ([*run, "2", *other, *other], "each folder once"),
        ([*run, "2", "--fold", "3"], "choose one of 1..2"),
        ([*run, "2", "--fold", "1", *other], "leave out --fold"),
        ([*run, "9"], "9 folds need 2 <= k <= the number of patients"),
        (
            ["--run-dir", str(tmp_path / "c"), *TINY, "--folds", "2", "--cv-seed", "1", *other],
            "not a cross_validate.py folder of the same folds",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=re.escape(message)):
            cross_validate.main(argv)


def test_time_to_dice_reuses_a_finished_run(cv):
    """A finished run folder (cross-validation's fold 1, with its split and recipe) is reused:
    nothing trains, every epoch is an earlier call's, with or without a target."""
    recipe = json.loads((cv.a / "folds.json").read_text())["recipe"]
    held_out = set(cv.summary["folds"][0])
    pool = cv.splits["train"] + cv.splits["val"]
    split = dict(
        train=[r for r in pool if r.patient not in held_out],
        val=[r for r in pool if r.patient in held_out],
    )
    history, earlier = time_to_dice.run_recipe("fold-1", recipe, split, cv.a)
    assert earlier == len(history) == recipe["epochs"]
    assert history == json.loads((cv.a / "fold-1" / "history.json").read_text())
    assert time_to_dice.run_recipe("fold-1", recipe, split, cv.a, target=0.0) == (history, 2)


def test_site_shift_scores_with_the_model_files_postprocess(cv):
    """The clean column is the test Dice that cross_validate.py gave ensemble.pt's patients."""
    segmenter = su.load_segmenter(cv.a / "ensemble.pt")
    volumes = su.load_volumes(cv.splits["test"], progress=False)
    scores = site_shift.site_shift_scores(segmenter, volumes, ["intensity x0.6"], progress=False)
    assert list(scores.columns) == ["clean", "intensity x0.6"]
    for patient, dice in cv.summary["test_ensemble_patient_dice"].items():
        assert scores.loc[patient, "clean"] == pytest.approx(dice, abs=1e-4)


def test_site_shifts_are_deterministic_and_change_the_scan(synthetic_set):
    records = su.scan_dataset(synthetic_set(8, 0))
    full = su.load_volumes([r for r in records if r.patient == records[0].patient], False)[0]
    middle = len(full.image) // 2
    window = slice(middle - 3, middle + 3)  # 6 slices show every shift, at a fraction of the cost
    vol = su.Volume(full.patient, full.slices[window], full.image[window], full.mask[window])
    for name, shift in site_shift.SHIFTS.items():
        out = shift(vol, site_shift.shift_rng(0, 0, name))
        assert out.image.dtype == np.uint8 and out.image.shape[1:] == vol.image.shape[1:], name
        assert out.mask.shape == out.image.shape[:3], name
        assert not np.array_equal(out.image, vol.image), name
        again = shift(vol, site_shift.shift_rng(0, 0, name))
        np.testing.assert_array_equal(out.image, again.image, err_msg=name)
    assert len(site_shift.SHIFTS["thinner slices (2x in z)"](vol, None).image) == 11
    stripped = site_shift.skull_strip(vol)
    head = np.nonzero(su.head_mask(vol.image).any(0))  # (ys, xs) of the head on some slice
    kept = np.nonzero(stripped.image.max(-1).any(0))  # of what stripping kept
    margin = 0.04 * vol.image.shape[2]  # the scalp and skull: 6 % eroded, 1 % dilated back
    for inside, outside in zip(kept, head):
        assert inside.min() > outside.min() + margin and inside.max() < outside.max() - margin
    assert (stripped.mask == vol.mask).all()


def test_site_shift_table_known_answer():
    """Clean Dice 0.8 and 0.6, shifted 0.5 and 0.5: means 0.7 and 0.5, a change of -0.2 (a drop
    is negative)."""
    scores = pd.DataFrame({"clean": [0.8, 0.6], "gamma 0.7": [0.5, 0.5]}, index=["P1", "P2"])
    table = site_shift.site_shift_table(scores)
    assert table.loc["gamma 0.7"].tolist() == pytest.approx([0.5, -0.2])
    assert table.loc["clean"].tolist() == pytest.approx([0.7, 0.0])


def test_folds_cover_every_patient_once_in_near_equal_sizes():
    ids = [f"P{i:02d}" for i in range(11)]
    folds = cross_validate.cross_validation_folds(ids + ids[:3], k=5, seed=0)  # once each
    assert sorted(len(f) for f in folds) == [2, 2, 2, 2, 3]
    assert sorted(p for f in folds for p in f) == ids
    assert folds == cross_validate.cross_validation_folds(ids[::-1], k=5, seed=0)  # order-free
    assert folds != cross_validate.cross_validation_folds(ids, k=5, seed=1)


@pytest.mark.parametrize("k", [1, 12])
def test_impossible_fold_counts_are_refused(k):
    with pytest.raises(ValueError, match="folds need"):
        cross_validate.cross_validation_folds([f"P{i}" for i in range(11)], k=k)


def test_fold_processes_side_by_side_never_share_a_temporary_file(tmp_path, monkeypatch):
    """Every `--fold K` process writes run-dir/folds.json at its start: when another process
    finishes its write in the middle of this one's, both complete and no temporary file stays."""
    path, replace = tmp_path / "folds.json", os.replace

    def another_process_finishes_first(src, dst):
        monkeypatch.setattr(os, "replace", replace)
        seg_runs.write_json(path, {"by": "the other process"})
        replace(src, dst)

    monkeypatch.setattr(os, "replace", another_process_finishes_first)
    seg_runs.write_json(path, {"by": "this one"})
    assert json.loads(path.read_text()) == {"by": "this one"}
    assert [p.name for p in tmp_path.iterdir()] == ["folds.json"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_script_answers_help_with_its_first_paragraph(script, capsys, monkeypatch):
    """`--help` exits 0 (a % in a help text once crashed one) and shows the docstring's first
    paragraph whole (argparse re-wraps it, so spaces are compared away)."""
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # what the script adds goes with the test
    monkeypatch.setattr(os, "environ", dict(os.environ))  # so does what it sets
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    paragraph = ast.get_docstring(ast.parse(script.read_text())).split("\n\n")[0]
    assert "".join(paragraph.split()) in "".join(out.split()), out[:600]


def test_recipes_explicit_flags_win_over_the_named_recipe():
    parser = train_lgg.argparse.ArgumentParser()
    train_lgg.add_recipe_arguments(parser)
    old = train_lgg.recipe_from_args(parser.parse_args(["--recipe", "old", "--epochs", "7"]))
    assert (old["epochs"], old["size"], old["width"], old["ema"]) == (7, 128, 16, 0.0)
    plain = train_lgg.recipe_from_args(parser.parse_args(["--ema", "0.99"]))
    assert plain["ema"] == 0.99 and plain["epochs"] == su.TrainConfig.epochs
    _, recipe = time_to_dice.parse_recipe("old:size=96,lr=0.001")
    assert (recipe["size"], recipe["lr"], recipe["epochs"]) == (96, 0.001, 40)
    with pytest.raises(SystemExit, match="not one of"):
        time_to_dice.parse_recipe("old:colour=red")


def test_time_to_reach_a_dice_known_answers():
    history = [dict(seconds=10.0, val_dice=0.5), dict(seconds=20.0, val_dice=0.7)]
    points = time_to_dice.curve(history + [dict(seconds=10.0, val_dice=0.65)])
    assert points == [(10.0, 0.5), (30.0, 0.7), (40.0, 0.65)]
    assert time_to_dice.seconds_to_reach(points, 0.6) == 30.0
    assert time_to_dice.seconds_to_reach(points, 0.71) is None
    points = [(10.0, 0.5), (20.0, 0.7), (30.0, 0.8)]
    assert time_to_dice.summary_line("new", points, 0.7, base=60.0) == (
        "new: best 0.8000 after 30 s in all; target reached: 20 s, 3.00x faster"
    )
    assert time_to_dice.summary_line("new", points, 0.9, base=60.0).endswith("reached: never")
    assert time_to_dice.summary_line("new", points, 0.7, base=None).endswith("reached: 20 s")


def test_site_split_known_answer():
    ids = [f"TCGA_{s}_{n}" for s, n in [("CS", 1), ("CS", 2), ("DU", 1), ("DU", 2), ("DU", 3)]]
    ids += ["TCGA_HT_1", "TCGA_EZ_1"]
    groups = leave_one_site_out.site_split(ids, "DU")
    assert groups["new"] == ["TCGA_DU_1", "TCGA_DU_2", "TCGA_DU_3"]
    assert len(groups["seen"]) == 1 and len(groups["train"]) == 3  # a fifth of 4, at least one
    assert sorted(groups["seen"] + groups["train"]) == [
        "TCGA_CS_1",
        "TCGA_CS_2",
        "TCGA_EZ_1",
        "TCGA_HT_1",
    ]


@pytest.fixture(scope="module")
def loso(synthetic_set, tmp_path_factory) -> SimpleNamespace:
    """A leave-one-site-out run of two held-out sites (one epoch, inputs dropped, the other-site
    augmentations). Synthetic ids (SYN_P000_0000) make every patient a site of its own."""
    data, run_dir = synthetic_set(8, 0), tmp_path_factory.mktemp("loso")
    pool = su.split_by_patient(su.scan_dataset(data))
    held_out = sorted({leave_one_site_out.site(r.patient) for r in pool["train"]})[:2]
    recipe = [*TINY, "--epochs", "1", "--input-dropout", "0.5", "--other-sites"]
    output = io.StringIO()
    with pytest.MonkeyPatch.context() as env, contextlib.redirect_stdout(output):
        env.setenv("LGG_DATA", str(data))
        leave_one_site_out.main(["--run-dir", str(run_dir), "--sites", ",".join(held_out), *recipe])
    return SimpleNamespace(data=data, run_dir=run_dir, held_out=held_out, recipe=recipe, out=output)


def test_leave_one_site_out_scores_sites_the_model_never_saw(loso):
    """Each model trains without its site, and the summary holds every input condition."""
    summary = json.loads((loso.run_dir / "loso_summary.json").read_text())
    assert sorted(summary["sites"]) == loso.held_out
    for name, scores in summary["sites"].items():
        segmenter = su.load_segmenter(loso.run_dir / name / "last.pt")
        trained = set(segmenter.patients[0]["train"]) | set(segmenter.patients[0]["val"])
        assert all(leave_one_site_out.site(p) != name for p in trained)
        assert segmenter.input_dropout == [0.5]
        new = scores["new site"]
        assert list(new) == list(leave_one_site_out.MISSING)
        assert [leave_one_site_out.site(p) for p in new["every input"]] == [name]
        assert all(0 <= d <= 1 for c in new.values() for d in c.values())
    assert "FLAIR only" in loso.out.getvalue()


def write_dev_case(folder, volume: su.Volume) -> None:
    """A development-set case folder from a synthetic volume: {flair,t1,t1c,truth}.nii."""
    folder.mkdir(parents=True)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    names = {"t1": volume.image[..., 0], "flair": volume.image[..., 1], "t1c": volume.image[..., 2]}
    for name, array in (names | {"truth": volume.mask}).items():  # (D, H, W) -> (W, H, D)
        image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
        nib.save(image, folder / f"{name}.nii")


def test_a_release_chooses_out_of_fold_trains_on_the_pool_and_scores_test_and_dev(
    loso, tmp_path, monkeypatch, capsys
):
    """release_model.py: the PostProcess from the site models' unseen sites, training on train +
    val, the model file with its SHA-256, every figure in release.json; and the dev set's and
    the scan checks' tables from it. A recipe other than the leave-one-site-out run's, or an
    existing model file without --overwrite, is refused."""
    monkeypatch.setenv("LGG_DATA", str(loso.data))
    splits = su.split_by_patient(su.scan_dataset(loso.data))
    first = [r for r in splits["test"] if r.patient == splits["test"][0].patient]
    write_dev_case(tmp_path / "dev" / "case-a", su.load_volumes(first, progress=False)[0])
    out, run_dir = tmp_path / "models" / "model.pt", tmp_path / "release"
    flags = ["--loso", str(loso.run_dir), "--run-dir", str(run_dir), "--out", str(out)]
    release_model.main([*flags, "--dev", str(tmp_path / "dev"), *loso.recipe])
    report = json.loads((run_dir / "release.json").read_text())
    segmenter = su.load_segmenter(out)
    assert segmenter.chosen_on == "leave one site out" and segmenter.fills_missing
    saved = su.read_checkpoint(out)["networks"][0]["state"]
    assert saved["head.weight"].dtype == torch.float16  # half the size on disk
    assert segmenter.nets[0].head.weight.dtype == torch.float32
    assert asdict(segmenter.post) == report["postprocess"]
    pool = {r.patient for r in splits["train"] + splits["val"]}
    assert set(segmenter.patients[0]["train"]) == pool
    sha = (out.parent / "SHA256SUMS").read_text().split()
    assert (
        sha
        == [hashlib.sha256(out.read_bytes()).hexdigest(), "model.pt"]
        == [report["sha256"], "model.pt"]
    )
    assert list(report["test"]) == list(report["dev"]) == list(leave_one_site_out.MISSING)
    assert all(0 <= v[1] <= v[0] <= v[2] <= 1 for v in report["test"].values())  # mean in its CI
    assert all(list(v) == ["case-a"] for v in report["dev"].values())
    with pytest.raises(SystemExit, match="exists"):
        release_model.main([*flags, *loso.recipe])
    with pytest.raises(SystemExit, match="another recipe"):
        release_model.main([*flags, "--overwrite", *loso.recipe, "--epochs", "3"])
    capsys.readouterr()
    external_dev.main([str(tmp_path / "dev"), str(out), str(out)])
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[1:]] == ["every", "no", "no", "FLAIR"]
    scan_checks.main(["--checkpoint", str(out), "--dev", str(tmp_path / "dev")])
    rows = capsys.readouterr().out.splitlines()[1:]
    names = ["LGG test", *site_shift.SHIFTS, "other hospitals (dev)"]
    assert [row[:32].strip() for row in rows] == names
    n_test = len({r.patient for r in splits["test"]})
    for row in rows:  # the scans counted, then how many got each finding
        counts = [int(c) for c in row[32:].split()]
        assert all(0 <= c <= counts[0] for c in counts[1:])
        assert counts[0] == (1 if "dev" in row else n_test)
