"""The import layering of the product modules, read from the source (ast), never imported.

The top-level seg_*.py modules stand in LAYERS, bottom up: each imports only modules below it,
so there is no circle and nothing reaches up. No module hides names behind a module-level
__getattr__ or __dir__; no private name (`_x`) of one of our modules is used outside it by the
product, the benchmarks or the notebooks; no formatter escape hatch is left in the repository;
pyproject.toml installs every module. Each checker is first shown a planted violation, so that no
test passes because its checker finds nothing.
"""

import ast
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = [
    "seg_files",
    "seg_hardware",
    "seg_scan",
    "seg_synthetic",
    "seg_runs",
    "seg_draw",
    "seg_utils",
    "seg_viewer",
    "seg_checks",
    "seg_predict",
    "seg_export",
    "seg_cli",
]
FMT_SKIP = "fmt: " + "skip"  # spelt in two parts, so that this file does not hold it
NOT_SOURCE = {"data", "runs", "test-artifacts", "node_modules", "__pycache__"}  # and hidden ones


def product_modules(root: Path) -> dict[str, Path]:
    """{name: path} of the top-level seg_*.py modules under root."""
    return {p.stem: p for p in sorted(root.glob("seg_*.py"))}


def notebook_source(path: Path) -> tuple[str, list[str]]:
    """The code cells of a notebook as one Python source (names flow from cell to cell), IPython
    magics and shell lines made comments; and for each line where it stands ("cell 2 line 3")."""
    lines, places = [], []
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    for number, cell in enumerate(code, 1):
        for n, line in enumerate("".join(cell["source"]).splitlines(), 1):
            lines.append(f"# {line}" if line.lstrip()[:1] in ("%", "!") else line)
            places.append(f"cell {number} line {n}")
    return "\n".join(lines), places


def parse(path: Path) -> tuple[ast.Module, callable]:
    """The file's syntax tree, and where(line) -> "name:line" (or "name cell c line n")."""
    if path.suffix == ".ipynb":
        source, places = notebook_source(path)
        return ast.parse(source, str(path)), lambda line: f"{path.name} {places[line - 1]}"
    return ast.parse(path.read_text(), str(path)), lambda line: f"{path.name}:{line}"


def imported(tree: ast.Module) -> list[tuple[str, int]]:
    """(top-level module name, line) of every import, also those inside functions."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[0], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno))
    return found


def layer_violations(root: Path, layers=LAYERS) -> list[str]:
    """Each seg_*.py under root in `layers`, importing only the modules listed before it."""
    modules = product_modules(root)
    wrong = [f"{name}.py is not in the layer list" for name in modules if name not in layers]
    for name, path in modules.items():
        if name not in layers:
            continue
        tree, where = parse(path)
        for other, line in imported(tree):
            if other in modules and other != name and layers.index(other) > layers.index(name):
                wrong.append(f"{where(line)} imports {other}, which is not below it")
    return wrong


def module_hooks(paths) -> list[str]:
    """Module-level __getattr__ / __dir__ (defined or assigned) in the given files."""
    wrong = []
    for path in paths:
        tree, where = parse(path)
        for node in tree.body:
            names = []
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            wrong += [f"{where(node.lineno)} {n}" for n in names if n in ("__getattr__", "__dir__")]
    return wrong


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(paths, ours) -> list[str]:
    """`mod._x` and `from mod import _x` where mod is one of `ours` (by any alias: su for
    seg_utils) and not the file's own module."""
    wrong = []
    for path in paths:
        (tree, where), own = parse(path), path.stem
        alias = {}  # name in this file -> our module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in ours:
                        alias[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module in ours and node.module != own:
                wrong += [
                    f"{where(node.lineno)} from {node.module} import {a.name}"
                    for a in node.names
                    if is_private(a.name)
                ]
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and alias.get(node.value.id, own) != own
                and is_private(node.attr)
            ):
                wrong.append(f"{where(node.lineno)} {node.value.id}.{node.attr}")
    return wrong


def files_with_fmt_skip(root: Path) -> list[str]:
    """Files under root (not hidden folders, the virtual environments, data or run outputs)
    that hold the formatter's escape hatch."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in NOT_SOURCE and not d.startswith("."))
        for name in sorted(files):
            path = Path(folder, name)
            if FMT_SKIP.encode() in path.read_bytes():
                found.append(str(path.relative_to(root)))
    return found


def uninstalled_modules(root: Path) -> list[str]:
    """seg_*.py modules that pyproject.toml's py-modules leaves out, and listed ones missing."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, present = set(setuptools["py-modules"]), set(product_modules(root))
    return [f"{m} not in py-modules" for m in sorted(present - listed)] + [
        f"{m} listed but not there" for m in sorted(listed - present)
    ]


def plant(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def notebook(*cells: str) -> str:
    """A notebook's JSON with these code cells."""
    return json.dumps(dict(cells=[dict(cell_type="code", source=c) for c in cells]))


# ----------------------------------------------------------------------------- the checks


def test_each_product_module_imports_only_the_modules_below_it(tmp_path):
    planted = plant(
        tmp_path,
        {
            "seg_files.py": "import numpy\nimport seg_cli  # reaches up\n",
            "seg_utils.py": "import seg_files\n\ndef f():\n    from seg_viewer import mask_viewer\n",
            "seg_viewer.py": "import seg_utils as su\n",
            "seg_cli.py": "import seg_viewer\n",
            "seg_extra.py": "",
        },
    )
    assert layer_violations(planted) == [
        "seg_extra.py is not in the layer list",
        "seg_files.py:2 imports seg_cli, which is not below it",
        "seg_utils.py:4 imports seg_viewer, which is not below it",
    ]
    assert layer_violations(REPO) == []


def test_no_module_defines_a_module_level_getattr_or_dir(tmp_path):
    planted = plant(
        tmp_path,
        {
            "seg_a.py": "def __getattr__(name):\n    return name\n",
            "seg_b.py": "__dir__ = lambda: []\nclass C:\n    def __getattr__(self, name):\n        pass\n",
        },
    )
    assert module_hooks(sorted(planted.glob("*.py"))) == [
        "seg_a.py:1 __getattr__",
        "seg_b.py:1 __dir__",
    ]
    assert module_hooks([*product_modules(REPO).values(), *REPO.glob("benchmarks/*.py")]) == []


def test_no_private_name_of_our_modules_is_used_outside_them(tmp_path):
    ours = set(LAYERS)
    planted = plant(
        tmp_path,
        {
            "seg_predict.py": "from seg_runs import _temporary_name, usual_mode\n",
            "seg_utils.py": "import seg_utils\nseg_utils._own = 1\nprint(seg_utils.__file__)\n",
            "benchmarks/bench.py": "import seg_utils as su\nsu._train_one_epoch()\n",
            "notebooks/01.ipynb": notebook(
                "%matplotlib inline\nimport seg_utils as su", "!ls\nsu.train()\nx = su._seed_worker"
            ),
        },
    )
    paths = [
        *sorted(planted.glob("*.py")),
        planted / "benchmarks/bench.py",
        planted / "notebooks/01.ipynb",
    ]
    assert private_uses(paths, ours) == [
        "seg_predict.py:1 from seg_runs import _temporary_name",
        "bench.py:2 su._train_one_epoch",
        "01.ipynb cell 2 line 3 su._seed_worker",
    ]
    modules = product_modules(REPO)
    paths = [*modules.values(), *REPO.glob("benchmarks/*.py"), *REPO.glob("notebooks/*.ipynb")]
    assert private_uses(paths, set(modules)) == []


def test_no_formatter_escape_hatch_in_the_repository(tmp_path):
    line = f"x = [1,2]  # {FMT_SKIP}\n"
    planted = plant(tmp_path, {"tests/test_x.py": line, ".venv/lib/y.py": line, "ok.py": "x = 1\n"})
    assert files_with_fmt_skip(planted) == ["tests/test_x.py"]
    assert files_with_fmt_skip(REPO) == []


def test_pyproject_installs_every_product_module(tmp_path):
    planted = plant(
        tmp_path,
        {
            "pyproject.toml": '[tool.setuptools]\npy-modules = ["seg_a", "seg_gone"]\n',
            "seg_a.py": "",
            "seg_b.py": "",
        },
    )
    assert uninstalled_modules(planted) == [
        "seg_b not in py-modules",
        "seg_gone listed but not there",
    ]
    assert uninstalled_modules(REPO) == []
