"""Cross-validation folds, ensembles, out-of-fold choices and the time-to-Dice benchmark.

The end-to-end test runs benchmarks/cross_validate.py as a user would, 2 folds of a tiny U-Net
for one epoch on the synthetic set (about half a minute on 2 cores).
"""

import ast
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT

import seg_utils as su

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import time_to_dice  # noqa: E402
import train_lgg  # noqa: E402

TINY = ["--size", "32", "--width", "4", "--depth", "2", "--epochs", "1", "--batch-size", "4"]
TINY_RECIPE = dict(train_lgg.DEFAULTS, size=32, width=4, depth=2, epochs=1, batch_size=4)  # = TINY


def test_fold_processes_side_by_side_never_share_a_temporary_file(tmp_path, monkeypatch):
    """Every `--fold K` process writes run-dir/folds.json at its start; two starting together
    once shared folds.json.tmp, and the second os.replace found it gone."""
    import seg_runs

    path, replace = tmp_path / "folds.json", os.replace

    def another_process_finishes_first(src, dst):
        monkeypatch.setattr(os, "replace", replace)
        seg_runs.write_json(path, {"by": "the other process"})
        replace(src, dst)

    monkeypatch.setattr(os, "replace", another_process_finishes_first)
    seg_runs.write_json(path, {"by": "this one"})
    assert json.loads(path.read_text()) == {"by": "this one"}
    assert [p.name for p in tmp_path.iterdir()] == ["folds.json"]  # no temporary file left


def test_folds_cover_every_patient_once_in_near_equal_sizes():
    ids = [f"P{i:02d}" for i in range(11)]
    folds = su.cross_validation_folds(ids + ids[:3], k=5, seed=0)  # duplicates count once
    assert sorted(len(f) for f in folds) == [2, 2, 2, 2, 3]
    assert sorted(p for f in folds for p in f) == ids
    assert folds == su.cross_validation_folds(list(reversed(ids)), k=5, seed=0)  # order-free
    assert folds != su.cross_validation_folds(ids, k=5, seed=1)


@pytest.mark.parametrize("k", [1, 12])
def test_impossible_fold_counts_are_refused(k):
    with pytest.raises(ValueError, match="folds need"):
        su.cross_validation_folds([f"P{i}" for i in range(11)], k=k)


def test_ensemble_is_the_mean_probability_of_its_members(synthetic_set):
    volume = su.load_volumes(su.scan_dataset(synthetic_set(4))[:6], progress=False)[0]
    pre = su.Preprocess(size=32)
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append((su.UNet(base_width=4, depth=2).eval(), pre))
    singles = [su.predict_volume(m, volume, p) for m, p in members]
    assert not np.allclose(singles[0], singles[1])  # two different models
    ensemble = su.predict_ensemble(members, [volume], progress=False)[volume.patient]
    np.testing.assert_allclose(ensemble, (singles[0] + singles[1]) / 2, atol=1e-6)


def test_choose_settings_takes_the_best_row_and_breaks_ties_towards_no_tta():
    def table(dice):
        return pd.DataFrame(
            dict(threshold=[0.4, 0.5], min_size=[0, 100], keep_largest=[False, False], dice=dice)
        )

    chosen = su.choose_settings({False: table([0.70, 0.80]), True: table([0.80, 0.75])})
    assert chosen == dict(tta=False, threshold=0.5, min_size=100, keep_largest=False,
                          drop_ends=0.0, dice=0.80)  # fmt: skip
    chosen = su.choose_settings({False: table([0.70, 0.80]), True: table([0.81, 0.75])})
    assert (chosen["tta"], chosen["threshold"], chosen["min_size"]) == (True, 0.4, 0)
    mass = pd.DataFrame(dict(threshold=[0.5, 0.5], min_size=[0, 0], keep_largest=[True, "mass"],
                             dice=[0.80, 0.82]))  # fmt: skip
    assert su.choose_settings({False: mass})["keep_largest"] == "mass"  # not bool("mass")
    assert su.choose_settings({False: mass.assign(dice=[0.82, 0.82])})["keep_largest"] is True
    ends = mass.assign(keep_largest=[True, True], drop_ends=[0.0, 0.2])
    assert su.choose_settings({False: ends})["drop_ends"] == 0.2


def _run(script, *args, data):
    env = dict(os.environ, LGG_DATA=str(data), PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), *args],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip


def test_every_benchmark_script_answers_help_with_its_whole_first_paragraph():
    """`--help` of every benchmarks/*.py exits 0 (a % in a help text once made site_shift.py's
    crash) and shows its docstring's first paragraph whole (it was cut at the first line)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    for script in sorted((REPO_ROOT / "benchmarks").glob("*.py")):
        done = subprocess.run([sys.executable, str(script), "--help"], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        out = done.stdout
        assert done.returncode == 0, f"{script.name} --help: {done.stderr[-1500:]}"
        paragraph = ast.get_docstring(ast.parse(script.read_text())).split("\n\n")[0]
        no_spaces = "".join(paragraph.split())  # argparse re-wraps it, breaking at hyphens too
        assert no_spaces in "".join(out.split()), f"{script.name}: {out[:600]}"


def test_two_fold_cross_validation_end_to_end(synthetic_set, tmp_path):
    data, run_dir = synthetic_set(10), tmp_path / "cv"
    done = _run("cross_validate.py", "--run-dir", str(run_dir), "--folds", "2", *TINY, data=data)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run_dir / "cv_summary.json").read_text())
    splits = su.split_by_patient(su.scan_dataset(data))
    pool = {r.patient for r in splits["train"] + splits["val"]}
    test = {r.patient for r in splits["test"]}
    assert set(summary["cv_patient_dice"]) == pool  # every pool patient scored out-of-fold once
    assert set(summary["test_ensemble_patient_dice"]) == test and not pool & test
    assert sorted(p for fold in summary["folds"] for p in fold) == sorted(pool)
    assert len(summary["test_per_fold_model"]) == 2 and len(summary["fold_train_seconds"]) == 2
    cv = summary["cv"]["patient Dice mean"]
    test_mean = summary["test_ensemble"]["patient Dice mean"]
    assert cv == pytest.approx(summary["chosen_out_of_fold"]["dice"], abs=1e-12)  # its swept Dice
    # the headline means are the means of the per-patient tables (stored to 4 places)
    assert cv == pytest.approx(np.mean(list(summary["cv_patient_dice"].values())), abs=1e-4)
    assert test_mean == pytest.approx(
        np.mean(list(summary["test_ensemble_patient_dice"].values())), abs=1e-4
    )
    for k in (1, 2):  # the fold model never trained on its held-out patients
        state = su.read_checkpoint(run_dir / f"fold-{k}" / "last.pt")
        assert set(state["patients"]["val"]) == set(summary["folds"][k - 1])
        assert not set(state["patients"]["train"]) & (set(summary["folds"][k - 1]) | test)
    again = _run("cross_validate.py", "--run-dir", str(run_dir), "--folds", "2", "--fold", "2",
                 *TINY, data=data)  # fmt: skip
    assert again.returncode == 0 and "fold 2/2: 4 held-out patients: already done" in again.stdout


def test_cross_validation_with_a_second_folder_of_the_same_folds(synthetic_set, tmp_path):
    """--with B: each fold's out-of-fold prediction is the mean of run-dir's and B's fold model
    (known answer from the models themselves), all four models score test, notebook 04 loads all
    four; other folds, --fold and a summary of another ensemble are refused."""
    data, first, second, both = synthetic_set(10), tmp_path / "a", tmp_path / "b", tmp_path / "ab"
    for where, extra in ((first, []), (second, ["--lr", "0.01"])):
        done = _run("cross_validate.py", "--run-dir", str(where), "--folds", "2", *TINY, *extra,
                    data=data)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    both.mkdir()
    for name in ("folds.json", "fold-1", "fold-2"):  # the folds of a, not its summary
        (both / name).symlink_to(first / name)
    done = _run("cross_validate.py", "--run-dir", str(both), "--folds", "2", *TINY, "--with",
                str(second), data=data)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((both / "cv_summary.json").read_text())
    assert len(summary["test_per_fold_model"]) == 4
    chosen = summary["chosen_out_of_fold"]
    splits = su.split_by_patient(su.scan_dataset(data))
    held_out = set(summary["folds"][0])
    volumes = su.load_volumes([r for r in splits["train"] + splits["val"] if r.patient in held_out],
                              progress=False)  # fmt: skip
    pairs = [su.load_checkpoint(d / "fold-1" / "last.pt")[:2] for d in (first, second)]
    alone = [su.predict_ensemble([pair], volumes, chosen["tta"], progress=False) for pair in pairs]
    assert not np.allclose(alone[0][volumes[0].patient], alone[1][volumes[0].patient])  # 2 models
    prob = su.predict_ensemble(pairs, volumes, chosen["tta"], progress=False)
    table, _ = su.evaluate_patients(prob, volumes, chosen["threshold"], chosen["min_size"],
                                    chosen["keep_largest"])  # fmt: skip
    for patient, dice in zip(table.patient, table.dice):  # fold 1's patients: their mean's Dice
        assert summary["cv_patient_dice"][patient] == pytest.approx(dice, abs=1e-4), patient
    assert summary["with_folders"] == ["../b"]  # relative: runs/ can move as a whole
    members, settings = su.models_to_score(both)
    assert len(members) == 4 and settings == chosen
    again = _run("cross_validate.py", "--run-dir", str(both), "--folds", "2", *TINY, data=data)
    assert again.returncode != 0 and "gathers another ensemble" in again.stderr
    other = _run("cross_validate.py", "--run-dir", str(tmp_path / "c"), "--folds", "2",
                 "--cv-seed", "1", *TINY, "--with", str(second), data=data)  # fmt: skip
    assert (
        other.returncode != 0 and "not a cross_validate.py folder of the same folds" in other.stderr
    )
    twice = _run("cross_validate.py", "--run-dir", str(tmp_path / "d"), "--folds", "2", *TINY,
                 "--with", str(second), "--with", str(second), data=data)  # fmt: skip
    assert twice.returncode != 0 and "each folder once" in twice.stderr
    one = _run("cross_validate.py", "--run-dir", str(both), "--folds", "2", "--fold", "1", *TINY,
               "--with", str(second), data=data)  # fmt: skip
    assert one.returncode != 0 and "leave out --fold" in one.stderr


def _notebook_04(tmp_path, data, run_dir, ensemble=""):
    """Execute notebook 04 in quick mode as a user would; returns the finished process."""
    env = dict(os.environ, LGG_DATA=str(data), SEG_RUN_DIR=str(run_dir), SEG_ENSEMBLE=ensemble,
               SEG_QUICK="1", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="2")  # fmt: skip
    command = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
               "--output-dir", str(tmp_path / "executed"), "04_evaluate.ipynb"]  # fmt: skip
    return subprocess.run(command, cwd=REPO_ROOT / "notebooks", env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip


def test_notebook_04_scores_a_cross_validation_folder_as_cross_validate_did(
    synthetic_set, tmp_path
):
    """Same fold models, same out-of-fold settings, same test patients: the same test Dice."""
    data, run_dir = synthetic_set(10), tmp_path / "cv"
    done = _run("cross_validate.py", "--run-dir", str(run_dir), "--folds", "2", *TINY, data=data)
    assert done.returncode == 0, done.stderr[-2000:]
    executed = _notebook_04(tmp_path, data, run_dir)
    assert executed.returncode == 0, executed.stderr[-3000:]
    summary = json.loads((run_dir / "cv_summary.json").read_text())
    record = json.loads((run_dir / "ensemble_test_metrics.json").read_text())
    chosen = {k: v for k, v in summary["chosen_out_of_fold"].items() if k != "dice"}
    assert {k: record["chosen_on_validation"][k] for k in chosen} == chosen
    assert record["test"]["patient Dice mean"] == pytest.approx(
        summary["test_ensemble"]["patient Dice mean"], abs=1e-6
    )
    assert record["members"] == 2  # the two fold models
    with pytest.raises(ValueError, match="cross-validation folder"):
        su.models_to_score(run_dir, [run_dir / "fold-1"])


def test_notebook_04_scores_an_ensemble_of_run_folders(synthetic_set, tmp_path):
    data = synthetic_set(10)
    splits = su.split_by_patient(su.scan_dataset(data))
    for seed in (0, 1):
        train_lgg.train_run(splits["train"], splits["val"], tmp_path / f"seed{seed}",
                            dict(TINY_RECIPE, seed=seed), progress=False)  # fmt: skip
    executed = _notebook_04(tmp_path, data, tmp_path / "seed0", str(tmp_path / "seed1"))
    assert executed.returncode == 0, executed.stderr[-3000:]
    record = json.loads((tmp_path / "seed0" / "ensemble_test_metrics.json").read_text())
    assert record["ensemble_with"] == [str(tmp_path / "seed1" / "best.pt")]
    assert record["test_patients"] == len({r.patient for r in splits["test"]})
    assert not (
        tmp_path / "seed0" / "test_metrics.json"
    ).exists()  # the single model's is not touched


def test_cross_validation_refuses_another_recipe_in_the_same_folder(synthetic_set, tmp_path):
    data, run_dir = synthetic_set(10), tmp_path / "cv"
    plain = (*TINY, "--ema", "0")  # the recipe a folds.json from before --ema describes
    first = _run("cross_validate.py", "--run-dir", str(run_dir), "--folds", "2", "--fold", "1",
                 *plain, data=data)  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    other = _run("cross_validate.py", "--run-dir", str(run_dir), "--folds", "2", *plain,
                 "--lr", "0.01", data=data)  # fmt: skip
    assert other.returncode != 0 and "holds other folds or another recipe" in other.stderr
    plan = run_dir / "folds.json"  # as written before --ema existed: no key, no moving average
    saved = json.loads(plan.read_text())
    del saved["recipe"]["ema"]
    plan.write_text(json.dumps(saved))
    same = _run("cross_validate.py", "--run-dir", str(run_dir), "--folds", "2", "--fold", "1",
                *plain, data=data)  # fmt: skip
    assert same.returncode == 0 and "already done" in same.stdout, same.stderr[-2000:]
    averaged = _run("cross_validate.py", "--run-dir", str(run_dir), "--folds", "2", "--fold", "1",
                    *TINY, "--ema", "0.99", data=data)  # fmt: skip
    assert averaged.returncode != 0 and "another recipe" in averaged.stderr
    bad = _run("cross_validate.py", "--run-dir", str(run_dir), "--folds", "2", "--fold", "3",
               *TINY, data=data)  # fmt: skip
    assert bad.returncode != 0 and "choose one of 1..2" in bad.stderr


def test_recipes_explicit_flags_win_over_the_named_recipe():
    parser = train_lgg.argparse.ArgumentParser()
    train_lgg.add_recipe_arguments(parser)
    old = train_lgg.recipe_from_args(parser.parse_args(["--recipe", "old", "--epochs", "7"]))
    assert old["epochs"] == 7 and old["size"] == 128 and old["width"] == 16
    assert old["ema"] == 0.0 and train_lgg.DEFAULTS["ema"] == su.TrainConfig.ema_decay
    averaged = train_lgg.recipe_from_args(parser.parse_args(["--ema", "0.99"]))
    assert averaged["ema"] == 0.99 and averaged["epochs"] == su.TrainConfig.epochs
    name, recipe = time_to_dice.parse_recipe("old:size=96,lr=0.001")
    assert (recipe["size"], recipe["lr"], recipe["epochs"]) == (96, 0.001, 40)
    with pytest.raises(SystemExit, match="not one of"):
        time_to_dice.parse_recipe("old:colour=red")


def test_time_to_reach_a_dice_known_answer():
    history = [dict(seconds=10.0, val_dice=0.5), dict(seconds=20.0, val_dice=0.7),
               dict(seconds=10.0, val_dice=0.65)]  # fmt: skip
    points = time_to_dice.curve(history)
    assert points == [(10.0, 0.5), (30.0, 0.7), (40.0, 0.65)]
    assert time_to_dice.seconds_to_reach(points, 0.6) == 30.0
    assert time_to_dice.seconds_to_reach(points, 0.71) is None


def test_time_to_dice_summary_says_never_for_a_recipe_that_missed_the_target():
    points = [(10.0, 0.5), (20.0, 0.7), (30.0, 0.8)]
    assert time_to_dice.summary_line("new", points, 0.7, base=60.0) == (
        "new: best 0.8000 after 30 s in all; target reached: 20 s, 3.00x faster"
    )
    assert time_to_dice.summary_line("new", points, 0.9, base=60.0).endswith("reached: never")
    assert time_to_dice.summary_line("new", points, 0.7, base=None).endswith("reached: 20 s")


def test_time_to_dice_reuses_a_finished_run_and_refuses_another_recipe(synthetic_set, tmp_path):
    splits = su.split_by_patient(su.scan_dataset(synthetic_set(6)), seed=0)
    first, earlier = time_to_dice.run_recipe("tiny", TINY_RECIPE, splits, tmp_path)
    assert earlier == 0 and len(first) == 1
    again, earlier = time_to_dice.run_recipe("tiny", TINY_RECIPE, splits, tmp_path)
    assert earlier == 1 and again == first  # reused: nothing trained, the seconds are the first's
    with pytest.raises(su.CheckpointError, match="was trained with"):
        time_to_dice.run_recipe("tiny", dict(TINY_RECIPE, lr=0.01), splits, tmp_path)


def test_time_to_dice_stops_a_recipe_at_a_given_target_and_reuses_it(synthetic_set, tmp_path):
    """--target: training stops at the first epoch that reaches it (resumable), and a second call
    reuses that run instead of training on; a target never reached trains the whole schedule."""
    splits = su.split_by_patient(su.scan_dataset(synthetic_set(6)), seed=0)
    three = dict(TINY_RECIPE, epochs=3)
    stopped, earlier = time_to_dice.run_recipe("tiny", three, splits, tmp_path, target=0.0)
    assert earlier == 0 and len(stopped) == 1  # any Dice >= 0: stopped after epoch 1 of 3
    again, earlier = time_to_dice.run_recipe("tiny", three, splits, tmp_path, target=0.0)
    assert earlier == 1 and again == stopped  # reached already: nothing trained
    whole, earlier = time_to_dice.run_recipe("tiny", three, splits, tmp_path, target=1.01)
    assert earlier == 1 and len(whole) == 3 and whole[0] == stopped[0]  # resumed to the end


def test_train_run_trains_where_pick_device_points(synthetic_set, monkeypatch, tmp_path):
    """train() computes where the model is, so train_run must put it on the GPU when there is one
    (it once left it on the CPU beside an idle GPU)."""
    splits = su.split_by_patient(su.scan_dataset(synthetic_set(6)), seed=0)
    seen = []
    monkeypatch.setattr(su, "pick_device", lambda: torch.device("meta"))  # stands in for "cuda"
    monkeypatch.setattr(su, "train", lambda model, *a, **k: seen.append(model.head.weight.device))
    train_lgg.train_run(splits["train"], splits["val"], tmp_path, TINY_RECIPE, progress=False)
    assert seen == [torch.device("meta")]


def test_train_run_passes_the_moving_average_on(synthetic_set, tmp_path):
    """--ema 0.99: the run averages its weights; the checkpoint says so and keeps both."""
    splits = su.split_by_patient(su.scan_dataset(synthetic_set(6)), seed=0)
    train_lgg.train_run(splits["train"], splits["val"], tmp_path, dict(TINY_RECIPE, ema=0.99),
                        progress=False)  # fmt: skip
    state = su.read_checkpoint(tmp_path / "last.pt")
    assert state["train_config"]["ema_decay"] == 0.99 and "live_state" in state


@pytest.mark.parametrize("kind", ["strip", "site"])
def test_train_run_adds_twins_when_asked(synthetic_set, tmp_path, kind):
    """--strip 1 / --site 1: every training patient appears twice in what trained (itself and its
    twin), the epoch keeps its length, and the patients stay the split's training patients."""
    splits = su.split_by_patient(su.scan_dataset(synthetic_set(6)), seed=0)
    both = dict(TINY_RECIPE, strip=0.5, site=0.5)
    with pytest.raises(SystemExit, match="two kinds of twins"):
        train_lgg.train_run(splits["train"], splits["val"], tmp_path, both, progress=False)
    tiny = dict(TINY_RECIPE, **{kind: 1.0})
    train_lgg.train_run(splits["train"], splits["val"], tmp_path, tiny, progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    names = sorted({r.patient for r in splits["train"]})
    assert sorted(state["patients"]["train"]) == sorted(names * 2)
    assert state["train_slices"] == len(splits["train"])


def test_site_shift_scores_the_validation_patients_when_asked(synthetic_set, tmp_path):
    data = synthetic_set(6)
    splits = su.split_by_patient(su.scan_dataset(data), seed=0)
    train_lgg.train_run(splits["train"], splits["val"], tmp_path, TINY_RECIPE, progress=False)
    done = _run("site_shift.py", str(tmp_path / "best.pt"), "--split", "val", "--shifts",
                "skull stripped", data=data)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    n_val = len({r.patient for r in splits["val"]})
    assert f"{n_val} val patients" in done.stdout and "skull stripped" in done.stdout
