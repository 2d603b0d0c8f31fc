"""Notebook 05 served by Voila, driven by a headless Chromium through Playwright.

A tiny U-Net is trained for a few seconds on a 3-patient synthetic set so that the app shows real
predictions; the test then moves the slice and threshold sliders with the keyboard and checks the
label against seg_utils computed here from the same checkpoint and data.

Needs /usr/bin/chromium (`make browser-deps`). Without it the test skips, unless
SEG_REQUIRE_BROWSER=1 (set by CI), where it fails instead. Screenshots, the Voila log and the
timings go to test-artifacts/ (git-ignored).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from viewer_label import parse

import seg_utils as su

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "05_mask_viewer.ipynb"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STARTUP_TIMEOUT_S = 120  # Voila runs the whole notebook before it sends the page
UPDATE_TIMEOUT_MS = 15_000  # one kernel round trip; generous for a loaded 2-core machine


def require_browser() -> None:
    """Skip (or, with SEG_REQUIRE_BROWSER=1, fail) when the browser test cannot run here."""
    required = os.environ.get("SEG_REQUIRE_BROWSER") == "1"
    problem = None
    if not CHROMIUM.is_file():
        problem = f"{CHROMIUM} not found: install it with `make browser-deps`"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright package is missing: run `make venv`"
    if problem and required:
        pytest.fail(f"SEG_REQUIRE_BROWSER=1 but {problem}", pytrace=False)
    if problem:
        pytest.skip(
            f"browser test skipped: {problem} (set SEG_REQUIRE_BROWSER=1 to make this fail)"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll the TCP port (an HTTP GET of / would run the notebook in a kernel of its own)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"voila exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"voila did not open port {port} in {timeout} s:\n{log.read_text()[-3000:]}")


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Voila's kernels run in sessions of their own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def timings():
    record = {}
    yield record
    if record:  # nothing when the test was skipped
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "browser_timings.json").write_text(json.dumps(record, indent=1))
        print("\nbrowser test timings (s):", json.dumps(record))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, timings):
    """A 3-patient synthetic set and a tiny U-Net trained on it: (kaggle_3m dir, run dir)."""
    require_browser()
    start = time.perf_counter()
    tmp = tmp_path_factory.mktemp("browser")
    data = su.make_synthetic_dataset(tmp / "data", n_patients=3, seed=0)
    timings["synthetic_data"] = round(time.perf_counter() - start, 2)

    start = time.perf_counter()
    pre = su.Preprocess(size=32)
    prepared = su.prepare_volumes(su.load_volumes(su.scan_dataset(data), progress=False), pre)
    su.seed_everything(0)
    model = su.UNet(base_width=4, depth=2)
    config = su.TrainConfig(epochs=10, batch_size=8, precision="fp32")
    # One thread: on a busy 2-core machine two torch threads made these tiny epochs 15-60x slower
    # (measured: 2-9 s instead of 0.15 s each). Restored before any prediction is compared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # all three patients serve as "validation": a 3-patient split has an empty val split
        su.train(model, su.SliceDataset(prepared), prepared, tmp / "run", config, pre,
                 progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert (tmp / "run" / "best.pt").is_file()
    timings["tiny_training"] = round(time.perf_counter() - start, 2)
    return data, tmp / "run"


@pytest.fixture(scope="module")
def voila(trained, timings):
    """Voila serving notebook 05 on a free port, in its own process group; yields the URL."""
    data, run_dir = trained
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "voila.log"
    port = free_port()
    env = dict(os.environ, LGG_DATA=str(data), SEG_RUN_DIR=str(run_dir), SEG_QUICK="1")
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    env.pop("MPLBACKEND", None)  # conftest's Agg would stop the kernel's inline figures
    voila_bin = Path(sys.executable).parent / "voila"
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(voila_bin), str(NOTEBOOK), f"--port={port}", "--Voila.ip=127.0.0.1",
             "--no-browser", "--show_tracebacks=True"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    kernels = []
    try:
        wait_for_port(port, process, log, STARTUP_TIMEOUT_S)
        timings["voila_port_open"] = round(time.perf_counter() - start, 2)
        yield dict(url=f"http://127.0.0.1:{port}/", process=process, kernels=kernels, log=log)
    finally:
        start = time.perf_counter()
        kernels += children(process.pid)  # kernels started while the page was served
        try:
            os.killpg(process.pid, signal.SIGTERM)  # Voila shuts its kernels down on SIGTERM
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            pytest.fail(f"voila ignored SIGTERM for 20 s (killed):\n{log.read_text()[-2000:]}")
        deadline = time.monotonic() + 10
        while any(alive(k) for k in kernels) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [k for k in kernels if alive(k)]
        for k in left:
            os.kill(k, signal.SIGKILL)
        timings["voila_shutdown"] = round(time.perf_counter() - start, 2)
        assert process.returncode is not None, "voila is still running"
        assert not left, f"kernel processes {left} outlived voila (killed)"


@pytest.fixture(scope="module")
def page(voila, timings):
    from playwright.sync_api import sync_playwright

    start = time.perf_counter()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            headless=True, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(voila["url"], timeout=STARTUP_TIMEOUT_S * 1000)
            page.wait_for_selector(
                ".viewer-label", state="visible", timeout=STARTUP_TIMEOUT_S * 1000
            )
            page.wait_for_selector(".viewer-slice .noUi-handle", state="visible")
            page.wait_for_function(
                "document.querySelector('.viewer-label').innerText.includes('tumour px')"
            )
            timings["page_ready"] = round(time.perf_counter() - start, 2)
            voila["kernels"] += children(voila["process"].pid)
            yield page
        finally:
            browser.close()


def shoot(page, name: str) -> None:
    """Screenshot of the viewer (controls, image, label) into test-artifacts/. Voila's page
    scrolls inside an inner panel, so a full-page screenshot would not reach the viewer."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator(".viewer-label").locator("xpath=..").screenshot(path=ARTIFACTS / name)


def label_text(page) -> str:
    return page.inner_text(".viewer-label").strip()


def press_and_wait(page, handle: str, key: str) -> str:
    """Focus a slider handle, press a key, wait until the label changes; return the new label."""
    before = label_text(page)
    page.locator(handle).focus()
    page.keyboard.press(key)
    page.wait_for_function(
        "old => document.querySelector('.viewer-label').innerText.trim() !== old",
        arg=before,
        timeout=UPDATE_TIMEOUT_MS,
    )
    return label_text(page)


@pytest.fixture(scope="module")
def expected(trained, timings):
    """Probabilities computed here from the same checkpoint and data the app uses."""
    data, run_dir = trained
    start = time.perf_counter()
    model, pre, _ = su.load_checkpoint(run_dir / "best.pt")
    volumes = {v.patient: v for v in su.load_volumes(su.scan_dataset(data), progress=False)}
    cache = {}
    timings["expected_setup"] = round(time.perf_counter() - start, 2)

    def dice(patient: str, pos: int, threshold: float) -> tuple[str, str]:
        if patient not in cache:
            cache[patient] = su.predict_volume(model, volumes[patient], pre)
        vol, pred = volumes[patient], cache[patient] >= threshold
        z = pos - 1
        return (
            f"{su.dice_score(pred[z], vol.mask[z]):.3f}",
            f"{su.dice_score(pred, vol.mask):.3f}",
        )

    return volumes, dice


def test_slice_slider_keys(page, expected, timings):
    volumes, _ = expected
    shoot(page, "viewer_before.png")
    first = parse(label_text(page))
    assert first["patient"] in volumes
    assert first["dice_slice"] is not None, "the app should show predictions from best.pt"
    vol = volumes[first["patient"]]
    pos = int(first["pos"])
    assert int(first["px"]) == int(vol.mask[pos - 1].sum())
    src = page.get_attribute(".viewer-image", "src")

    handle = ".viewer-slice .noUi-handle"
    keys = ["ArrowRight", "ArrowLeft"] if pos < len(vol.slices) else ["ArrowLeft", "ArrowRight"]
    for key in keys:
        start = time.perf_counter()
        label = parse(press_and_wait(page, handle, key))
        timings.setdefault("slice_key_to_label", []).append(round(time.perf_counter() - start, 3))
        step = 1 if key == "ArrowRight" else -1
        assert int(label["pos"]) == pos + step, f"{key}: {first} -> {label}"
        assert int(label["n"]) == vol.slices[pos + step - 1]
        assert int(label["px"]) == int(vol.mask[pos + step - 1].sum())
        assert label["patient"] == first["patient"]
        if key == keys[0]:
            page.wait_for_function(
                "s => document.querySelector('.viewer-image').src !== s", arg=src
            )
            shoot(page, "viewer_after_slice.png")
        pos += step


def test_threshold_slider_keys(page, expected, timings):
    volumes, dice = expected
    label = parse(label_text(page))
    assert label["threshold"] == "0.50"
    assert (label["dice_slice"], label["dice_patient"]) == dice(
        label["patient"], int(label["pos"]), 0.5
    )
    handle = ".viewer-threshold .noUi-handle"
    seen = {"0.50": label["dice_patient"]}
    for key, want in [("ArrowRight", "0.55"), ("ArrowRight", "0.60"), ("ArrowLeft", "0.55"),
                      ("ArrowLeft", "0.50"), ("ArrowLeft", "0.45")]:  # fmt: skip
        start = time.perf_counter()
        page.locator(handle).focus()
        page.keyboard.press(key)
        page.wait_for_function(
            "t => document.querySelector('.viewer-label').innerText.includes('threshold ' + t)",
            arg=want,
            timeout=UPDATE_TIMEOUT_MS,
        )
        timings.setdefault("threshold_key_to_label", []).append(
            round(time.perf_counter() - start, 3)
        )
        label = parse(label_text(page))
        assert label["threshold"] == want
        # the readout, not aria-valuenow: noUiSlider rounds that to one decimal ("0.6" for 0.55)
        assert page.inner_text(".viewer-threshold .widget-readout").strip() == want
        assert (label["dice_slice"], label["dice_patient"]) == dice(
            label["patient"], int(label["pos"]), float(want)
        ), f"Dice at threshold {want}"
        seen[want] = label["dice_patient"]
    shoot(page, "viewer_after_threshold.png")
    timings["threshold_dice"] = seen
