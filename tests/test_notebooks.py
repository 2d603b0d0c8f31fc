"""Notebooks are committed clean (no outputs, no execution counts), read parameters from the
environment, and share one lesson frame (defined below, above its test)."""

import inspect
import json
import os
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_reads_parameters_from_the_environment(path):
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    first_cells = "".join("".join(c["source"]) for c in code[:3])
    assert "os.environ.get(" in first_cells, f"{path.name}: no parameters cell near the top"


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
    """Notebook 03's parameters cell spells the defaults out as literals (a flat, readable block):
    outside quick mode they must be the library's, or the lesson trains another recipe."""
    import seg_utils as su

    for name in [n for n in os.environ if n.startswith("SEG_")]:
        monkeypatch.delenv(name)
    path = next(p for p in NOTEBOOKS if p.name.startswith("03_"))
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    cell = next("".join(c["source"]) for c in code if "EPOCHS =" in "".join(c["source"]))
    params: dict = {}
    exec(cell, params)  # the parameters cell only reads the environment
    unet = inspect.signature(su.UNet).parameters
    config, pre = su.TrainConfig(), su.Preprocess()
    notebook = [params[k] for k in ("IMAGE_SIZE", "WIDTH", "DEPTH", "EPOCHS", "BATCH_SIZE",
                                    "TRAIN_CROP", "EMA_DECAY", "LR", "SEED", "PRECISION")]  # fmt: skip
    library = [pre.size, unet["base_width"].default, unet["depth"].default, config.epochs,
               config.batch_size, config.train_crop, config.ema_decay, config.lr, config.seed,
               config.precision]  # fmt: skip
    assert notebook == library, (
        f"{path.name}'s parameters cell: update its defaults to the library's"
    )
    assert su.parse_channels(params["CHANNELS"]) == pre.channels
