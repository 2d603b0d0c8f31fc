"""Notebooks are committed clean (no outputs, no execution counts), keep their parameters in one
cell near the top (reading from the environment only what CI or a user varies from outside), and
share one lesson frame (defined below, above its test)."""

import inspect
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9]*.ipynb"))


def test_the_notebooks_are_numbered_in_order():
    names = [p.stem.split("_")[0] for p in NOTEBOOKS]
    assert names == [f"{n:02d}" for n in range(1, len(names) + 1)] and len(names) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_no_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    dirty = [
        i
        for i, c in enumerate(cells)
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count"))
    ]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


# What a notebook may read from the environment: CI's fast mode, the small real-data mode of the
# exercises, the data, the run folder that notebook 03 writes and 04-06 read, and (notebook 04)
# another model file to evaluate. Every other parameter is a literal in the notebook's
# parameters cell.
ENVIRONMENT = {"SEG_QUICK", "SEG_MINI", "LGG_DATA", "SEG_RUN_DIR", "SEG_MODEL"}
READS = re.compile(
    r"""(?:environ\.get|environ\.setdefault|getenv)\(\s*["']([^"']+)["']|environ\[["']([^"']+)"""
)


def _code(path: Path) -> list[str]:
    return [
        "".join(c["source"])
        for c in json.loads(path.read_text())["cells"]
        if c["cell_type"] == "code"
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_reads_only_the_variables_it_varies(path):
    code = _code(path)
    first = code[0]
    assert "os.environ.get(" in first, f"{path.name}: the first code cell is not the parameters"
    cells = json.loads(path.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1 and "".join(tagged[0]["source"]) == first, (
        f"{path.name}: tag the first code cell (and only it) 'parameters'"
    )
    read = {a or b for cell in code for a, b in READS.findall(cell)}
    assert read <= ENVIRONMENT, (
        f"{path.name} reads {sorted(read - ENVIRONMENT)}: make them literals"
    )
    assert "environ" not in "".join(code[1:]), (
        f"{path.name}: read the environment in the first cell"
    )
    assert "SEG_MODEL" not in read or path.name.startswith("04_"), f"{path.name}: SEG_MODEL is 04's"


# ----------------------------------------------------------------------------- the lesson frame
# Every notebooks/[0-9]*.ipynb (06 and later included) has the same frame:
# - the first cell is markdown, its first line "# NN · <Verb> ..." (NN the file's number, the
#   verb capitalised), and it holds "What you will do", "What you will learn", "What you need";
# - numbered sections "## 1. ...", "## 2. ...", ... in order;
# - after them "## What you learned", then "## Exercises" with at least 2 "<details>" blocks
#   (one folded hint per exercise), then "## Next", in that order;
# - its last code cell checks what the lesson taught: it holds an `assert` (nbval runs it).
TITLE = re.compile(r"^# (\d\d) · [A-Z][a-z]+ \S")


def _markdown_headings(cells: list) -> list[str]:
    """Every '## ' heading of the markdown cells, in order."""
    return [
        line.strip()
        for c in cells
        if c["cell_type"] == "markdown"
        for line in "".join(c["source"]).splitlines()
        if line.startswith("## ")
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_the_lesson_frame(path):
    cells = json.loads(path.read_text())["cells"]
    first = "".join(cells[0]["source"])
    match = TITLE.match(first)
    assert cells[0]["cell_type"] == "markdown" and match, f"{path.name}: no '# NN · Verb' title"
    assert match[1] == path.name[:2], f"{path.name}: the title's number differs from the file's"
    for part in ("What you will do", "What you will learn", "What you need"):
        assert part in first, f"{path.name}: the first cell lacks '{part}'"
    headings = _markdown_headings(cells)
    numbers = [int(m[1]) for h in headings if (m := re.match(r"## (\d+)\. ", h))]
    assert numbers and numbers == list(range(1, len(numbers) + 1)), f"{path.name}: {numbers}"
    closing = ["## What you learned", "## Exercises", "## Next"]
    found = [h for h in headings if h in closing]
    assert found == closing, f"{path.name}: closing sections {found}, expected {closing}"
    last_numbered = max(i for i, h in enumerate(headings) if re.match(r"## \d+\. ", h))
    assert last_numbered < headings.index("## What you learned"), f"{path.name}: sections after it"
    exercises = "".join(
        "".join(c["source"]) for c in cells if "## Exercises" in "".join(c["source"])
    )
    assert exercises.count("<details>") >= 2, f"{path.name}: fewer than 2 exercises with hints"
    code = [c for c in cells if c["cell_type"] == "code"]
    assert "assert " in "".join(code[-1]["source"]), (
        f"{path.name}: the last code cell checks nothing"
    )


def test_notebook_03_trains_the_library_defaults(monkeypatch):
    """Notebook 03's parameters cell holds what the lesson varies, each a literal with its value
    for the small modes: outside them they must be the library's defaults, or the lesson trains
    another recipe. Every other setting comes from the library (su.TrainConfig(epochs, seed))."""
    import seg_utils as su

    monkeypatch.delenv("SEG_QUICK", raising=False)
    monkeypatch.delenv("SEG_MINI", raising=False)
    path = next(p for p in NOTEBOOKS if p.name.startswith("03_"))
    params: dict = {}
    exec(_code(path)[0], params)  # the parameters cell only reads the environment
    assert params["QUICK"] is False and params["MINI"] is False
    unet = inspect.signature(su.UNet).parameters
    config = su.TrainConfig()
    library = {
        "IMAGE_SIZE": su.Preprocess().size,
        "WIDTH": unet["base_width"].default,
        "DEPTH": unet["depth"].default,
        "EPOCHS": config.epochs,
        "SEED": config.seed,
        "TRAIN_EVERY": 1,  # every training patient
    }
    assert set(library) <= set(params), f"{path.name}: {sorted(set(library) - set(params))}"
    assert {name: params[name] for name in library} == library, (
        f"{path.name}'s parameters cell: update its defaults to the library's"
    )
    code = "".join(_code(path))
    assert "su.TrainConfig(epochs=EPOCHS, seed=SEED)" in code, "03 trains the library's config"


def test_notebook_04_scores_a_cross_validation_ensemble_with_the_choice_it_holds(
    tiny_model, synthetic_set, tmp_path, monkeypatch
):
    """A model file whose PostProcess was chosen out of fold (cross_validate.py's ensemble.pt):
    notebook 04 chooses nothing on validation (those patients trained it), scores the test
    patients with the file's PostProcess, and leaves the file as it was."""
    import nbformat
    from nbclient import NotebookClient

    import seg_utils as su

    ensemble = su.load_segmenter(tiny_model, tiny_model)
    ensemble.post = su.PostProcess(threshold=0.4, keep="largest")
    ensemble.chosen_on = "out of fold"
    path = tmp_path / "ensemble.pt"
    ensemble.save(path)
    saved = path.read_bytes()
    data = synthetic_set(8, 0)
    for name, value in dict(
        SEG_QUICK="1", LGG_DATA=data, SEG_RUN_DIR=tmp_path, SEG_MODEL=path
    ).items():
        monkeypatch.setenv(name, str(value))
    notebook = nbformat.read(NOTEBOOKS[3], as_version=4)
    where = {"metadata": {"path": str(NOTEBOOKS[3].parent)}}
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources=where).execute()
    record = json.loads((tmp_path / "ensemble_test.json").read_text())
    assert (record["chosen_on"], record["networks"]) == ("out of fold", 2)
    assert su.PostProcess(**record["postprocess"]) == ensemble.post
    assert path.read_bytes() == saved, "04 wrote into a model file chosen out of fold"
    test = su.load_volumes(su.split_by_patient(su.scan_dataset(data))["test"], progress=False)
    patients, _, _ = su.score_patients(
        ensemble.predict_volumes(test, progress=False), test, ensemble.post
    )
    assert record["test"]["patient Dice mean"] == pytest.approx(patients.dice.mean(), abs=1e-6)
