"""Notebook 05 served by Voila, driven by a headless Chromium through Playwright.

The app shows conftest's synthetic set with predictions of tiny_model (copied to best.pt of a run
folder); the test moves the slice and threshold sliders with the keyboard and checks the label
against the patient's mask and the Segmenter loaded here from the same file. One Voila server,
one page, for the module.

Needs /usr/bin/chromium (`make browser-deps`). Without it the test skips, unless
SEG_REQUIRE_BROWSER=1 (set by CI), where it fails instead. Screenshots, the Voila log and the
timings go to test-artifacts/ (git-ignored).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from viewer_label import parse

import seg_utils as su

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "05_where_the_model_is_wrong.ipynb"
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
LABEL = ".viewer-label"


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
            time.sleep(0.1)
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
def voila(synthetic_set, tmp_path_factory, timings):
    """Voila serving notebook 05 on a free port, in its own process group, for a run folder
    that gets its best.pt later (the notebook runs when the page is asked for: Voila starts
    while the model is made). Yields the URL, the run folder and the data folder."""
    require_browser()
    data, run_dir = synthetic_set(8, 0), tmp_path_factory.mktemp("browser-run")
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "voila.log"
    port = free_port()
    env = dict(os.environ, LGG_DATA=str(data), SEG_RUN_DIR=str(run_dir), SEG_QUICK="1")
    env.pop("MPLBACKEND", None)  # conftest's Agg would stop the kernel's inline figures
    voila_bin = Path(sys.executable).parent / "voila"
    command = [str(voila_bin), str(NOTEBOOK), f"--port={port}", "--Voila.ip=127.0.0.1"]
    command += ["--no-browser", "--show_tracebacks=True"]
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    kernels = []
    try:
        yield dict(
            port=port,
            process=process,
            kernels=kernels,
            log=log,
            run=run_dir,
            data=data,
            start=start,
        )
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
            time.sleep(0.1)
        left = [k for k in kernels if alive(k)]
        for k in left:
            os.kill(k, signal.SIGKILL)
        timings["voila_shutdown"] = round(time.perf_counter() - start, 2)
        assert process.returncode is not None, "voila is still running"
        assert not left, f"kernel processes {left} outlived voila (killed)"


@pytest.fixture(scope="module")
def page(voila, tiny_model, timings):
    """The app's page in headless Chromium, once the viewer's label shows."""
    from playwright.sync_api import sync_playwright

    shutil.copy(tiny_model, voila["run"] / "best.pt")
    start = time.perf_counter()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            headless=True, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            wait_for_port(voila["port"], voila["process"], voila["log"], STARTUP_TIMEOUT_S)
            timings["voila_port_open"] = round(time.perf_counter() - voila["start"], 2)
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(f"http://127.0.0.1:{voila['port']}/", timeout=STARTUP_TIMEOUT_S * 1000)
            page.wait_for_selector(LABEL, state="visible", timeout=STARTUP_TIMEOUT_S * 1000)
            page.wait_for_selector(".viewer-slice .noUi-handle", state="visible")
            page.wait_for_function(
                f"document.querySelector('{LABEL}').innerText.includes('tumour px')"
            )
            timings["page_ready"] = round(time.perf_counter() - start, 2)
            voila["kernels"] += children(voila["process"].pid)
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def expected(voila):
    """The app's patients, and the Dice its label should show for a patient, a slice and a
    threshold: the Segmenter of the same best.pt, its PostProcess at that threshold."""
    segmenter = su.load_segmenter(voila["run"] / "best.pt")
    volumes = {v.patient: v for v in su.load_volumes(su.scan_dataset(voila["data"]), False)}
    cache = {}

    def dice(patient: str, pos: int, threshold: float) -> tuple[str, str]:
        if patient not in cache:
            cache[patient] = segmenter.probabilities(volumes[patient].image)
        mask = replace(segmenter.post, threshold=threshold).apply(cache[patient])
        truth, z = volumes[patient].mask, pos - 1
        return f"{su.dice_score(mask[z], truth[z]):.3f}", f"{su.dice_score(mask, truth):.3f}"

    return volumes, segmenter.post, dice


def shoot(page, name: str) -> None:
    """Screenshot of the viewer (controls, image, label) into test-artifacts/. Voila's page
    scrolls inside an inner panel, so a full-page screenshot would not reach the viewer."""
    page.locator(LABEL).locator("xpath=..").screenshot(path=ARTIFACTS / name)


def label_text(page) -> str:
    return page.inner_text(LABEL).strip()


def press(page, handle: str, key: str, until: str, arg: str) -> None:
    """Focus a slider handle, press a key, wait until the JavaScript `until`(label, arg) holds."""
    page.locator(handle).focus()
    page.keyboard.press(key)
    page.wait_for_function(
        f"arg => (label => {until})(document.querySelector('{LABEL}').innerText.trim())",
        arg=arg,
        timeout=UPDATE_TIMEOUT_MS,
    )


def test_slice_slider_keys_step_one_slice(page, expected, timings):
    volumes, _, _ = expected
    shoot(page, "viewer_before.png")
    first = parse(label_text(page))
    assert first["dice_slice"] is not None, "the app should show predictions of best.pt"
    vol = volumes[first["patient"]]
    pos = int(first["pos"])
    assert pos - 1 == su.middle_tumour_slice(vol.mask), "it opens on the middle tumour slice"
    assert int(first["px"]) == int(vol.mask[pos - 1].sum())
    src = page.get_attribute(".viewer-image", "src")
    keys = ["ArrowRight", "ArrowLeft"] if pos < len(vol.slices) else ["ArrowLeft", "ArrowRight"]
    for key in keys:
        start = time.perf_counter()
        press(page, ".viewer-slice .noUi-handle", key, "label !== arg", label_text(page))
        timings.setdefault("slice_key_to_label", []).append(round(time.perf_counter() - start, 3))
        pos += 1 if key == "ArrowRight" else -1
        label = parse(label_text(page))
        assert (label["patient"], int(label["pos"])) == (first["patient"], pos), key
        assert int(label["n"]) == vol.slices[pos - 1]
        assert int(label["px"]) == int(vol.mask[pos - 1].sum())
        if key == keys[0]:
            page.wait_for_function(
                "s => document.querySelector('.viewer-image').src !== s", arg=src
            )
            shoot(page, "viewer_after_slice.png")


def test_threshold_slider_keys_give_the_segmenters_dice(page, expected, timings):
    _, post, dice = expected
    label = parse(label_text(page))
    assert label["threshold"] == f"{post.threshold:.2f}", "it opens at the model's threshold"
    patient, pos = label["patient"], int(label["pos"])
    assert (label["dice_slice"], label["dice_patient"]) == dice(patient, pos, post.threshold)
    seen = set()
    for key, step in [("ArrowRight", 1), ("ArrowLeft", 0), ("ArrowLeft", -1)]:  # in 0.05s
        want = f"{post.threshold + 0.05 * step:.2f}"
        start = time.perf_counter()
        press(
            page, ".viewer-threshold .noUi-handle", key, "label.endsWith('threshold ' + arg)", want
        )
        timings.setdefault("threshold_key_to_label", []).append(
            round(time.perf_counter() - start, 3)
        )
        label = parse(label_text(page))
        # the readout, not aria-valuenow: noUiSlider rounds that to one decimal ("0.6" for 0.55)
        assert page.inner_text(".viewer-threshold .widget-readout").strip() == want
        got = (label["dice_slice"], label["dice_patient"])
        assert got == dice(patient, pos, float(want)), f"Dice at threshold {want}"
        seen.add(got)
    assert len(seen) > 1, "the Dice should move with the threshold"
    shoot(page, "viewer_after_threshold.png")
