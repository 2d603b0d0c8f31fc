"""CPU speed benchmark: the project U-Net against two well-known segmentation networks.

What it measures, in one run and on the same random batch (16 x 3 x 128 x 128 by default):

- models: the project U-Net (seg_utils.UNet, width 16, depth 4), MONAI BasicUNet with the same
  widths, segmentation-models-pytorch Unet with a resnet18 encoder and (unless left out with
  --models) with a mobilenet_v2 encoder; all randomly initialised, nothing is downloaded;
- training images/s (forward + seg_utils.bce_dice_loss + backward + Adam step) and inference
  images/s (torch.no_grad), each in fp32 and in bf16 autocast + channels_last; every number is
  the median of the timed steps that follow a few untimed warm-up steps. The timed steps of
  all configurations run interleaved, in rounds of one step each in a shuffled order, so that
  background load hits them all alike;
- the bf16/fp32 speed-up per model, and each model's speed as a ratio of the project U-Net's
  (compare ratios: they survive a busy machine much better than absolute numbers do);
- the process's peak resident memory (ru_maxrss) after each model's (warm-up) runs;
- inference images/s of the project U-Net exported to ONNX and run by onnxruntime (fp32, CPU),
  beside PyTorch's fp32 number; timed after the rounds, not interleaved; skipped with a note
  where onnxruntime/onnxscript are not installed;
- achieved GFLOP/s (conv/matmul FLOPs from torch.utils.flop_counter on one forward pass;
  training counts 3x forward) next to this machine's measured peak for fp32 and bf16: the
  better of a 3x3 conv (64 -> 64 channels, 16 x 64 x 128 x 128, channels_last) and a
  2048 x 2048 GEMM, timed the same way.

Run it from the repository root in the benchmark venv (see benchmarks/requirements.txt):

    .bench-venv/bin/python benchmarks/bench_speed.py [--quick]
    .venv/bin/python benchmarks/bench_speed.py --models unet   # the project U-Net alone (and its
                                                               # onnxruntime row): no MONAI, no smp

--quick runs 1 warm-up + 2 timed steps per configuration instead of 2 + up to 15, to check
that the script works. The full run stops adding timed rounds after --budget seconds (at least
3 rounds run), so a busy machine gets fewer steps.
Other flags: --batch, --size, --steps, --warmup, --threads, --models, --budget.
On CPUs without native bf16 (AVX2 only) bf16 is often much slower than fp32; the script
still finishes and says so.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

# Interleaving 4 models x 2 precisions x 2 modes needs more oneDNN kernels than its default
# caches (1024) hold; one training run does not. Both variables are read when torch loads.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")
os.environ.setdefault("LRU_CACHE_CAPACITY", "8192")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never reach the network
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # seg_utils lives in the root
import psutil  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import seg_utils as su  # noqa: E402

# ----------------------------------------------------------------------------- parameters

BATCH = 16  # images per step (--batch); the notebooks train with 16
SIZE = 128  # image height and width (--size); smp encoders need a multiple of 32
WARMUP = 2  # untimed steps per configuration first (oneDNN creates kernels, allocator warms)
STEPS = 15  # timed steps per configuration, interleaved in rounds; median reported (--steps)
QUICK_WARMUP = 1  # warm-up steps with --quick
QUICK_STEPS = 2  # timed steps with --quick
TIME_BUDGET = 300.0  # seconds for the whole run: no timed round starts that would end later
MIN_STEPS = 3  # timed rounds that always run, whatever the budget (fewer with --quick)
LR = 3e-3  # Adam learning rate (the project's one-cycle peak); only the step's cost matters
SEED = 0  # seeds the random batch and every model's initial weights
PEAK_CONV_SHAPE = (16, 64, 128, 128)  # N, C, H, W of the 3x3 C -> C conv that probes the peak
PEAK_GEMM_N = 2048  # n of the n x n x n GEMM that probes the peak
SLOW_BF16 = 0.9  # a bf16/fp32 speed-up below this is reported as "bf16 slower than fp32"


def monai_basic_unet():
    """MONAI's BasicUNet with the project U-Net's widths (imported here: `--models unet` and its
    onnxruntime row then run in the main .venv, without MONAI or smp)."""
    from monai.networks.nets import BasicUNet

    return BasicUNet(
        spatial_dims=2, in_channels=3, out_channels=1, features=(16, 32, 64, 128, 256, 16)
    )


def smp_unet(encoder: str):
    """segmentation-models-pytorch Unet with a randomly initialised encoder."""
    import segmentation_models_pytorch as smp

    return smp.Unet(encoder, encoder_weights=None, in_channels=3, classes=1)


MODELS = {  # --models key -> (label, constructor); each maps (B, 3, H, W) to (B, 1, H, W) logits
    "unet": (
        "project U-Net",
        lambda: su.UNet(in_channels=3, out_channels=1, base_width=16, depth=4),
    ),
    "monai": ("MONAI BasicUNet", monai_basic_unet),
    "resnet18": ("smp Unet resnet18", lambda: smp_unet("resnet18")),
    "mobilenet_v2": ("smp Unet mobilenet_v2", lambda: smp_unet("mobilenet_v2")),
}
REFERENCE = "unet"  # the model the ratios divide by
PRECISIONS = ("fp32", "bf16")  # fp32: NCHW, no autocast; bf16: autocast + channels_last
MODES = ("train", "infer")  # train: fwd + loss + bwd + Adam; infer: no_grad forward

# ----------------------------------------------------------------------------- helpers


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (Linux), else whatever platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Conv/matmul FLOPs of one fp32 forward pass on batch x (multiply-add = 2 FLOPs)."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def model_steps(model: torch.nn.Module, x, y, precision: str) -> dict:
    """{"train": step(), "infer": step()} for a copy of `model` in one precision."""
    model = su.to_layout(copy.deepcopy(model), precision)  # same weights for each, fresh Adam
    x = su.to_layout(x, precision)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def train_step():
        model.train()  # infer_step leaves it in eval mode
        su.train_step(model, optimizer, x, y, precision)  # the step su.train takes

    def infer_step():
        model.eval()
        with torch.no_grad(), su.autocast(x.device, precision):
            model(x)

    return {"train": train_step, "infer": infer_step}


def peak_steps(dtype: torch.dtype) -> dict:
    """{"conv": (step(), FLOPs), "gemm": (step(), FLOPs)}: the probes of the machine's peak."""
    gen = torch.Generator().manual_seed(SEED)
    n, c, h, w = PEAK_CONV_SHAPE
    image = torch.randn(PEAK_CONV_SHAPE, generator=gen).to(dtype)
    image = image.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, c, 3, 3, generator=gen).to(dtype)
    weight = weight.contiguous(memory_format=torch.channels_last)
    a = torch.randn(PEAK_GEMM_N, PEAK_GEMM_N, generator=gen).to(dtype)
    b = torch.randn(PEAK_GEMM_N, PEAK_GEMM_N, generator=gen).to(dtype)

    def conv():
        with torch.no_grad():
            F.conv2d(image, weight, padding=1)

    def gemm():
        with torch.no_grad():
            torch.mm(a, b)

    return {"conv": (conv, 2 * n * h * w * c * c * 9), "gemm": (gemm, 2 * PEAK_GEMM_N**3)}


def time_interleaved(steps: dict, rounds: int, started: float, budget: float) -> dict:
    """{key: [seconds, ...]}: `rounds` rounds, each calling every step once in a shuffled order.

    Interleaving puts every configuration under the same background load, so their ratios
    stay fair on a busy machine. After MIN_STEPS rounds, no round starts that would end more
    than `budget` seconds after `started` (bf16 emulated on AVX2 must not stall the run).
    """
    times = {key: [] for key in steps}
    order = list(steps)
    rng = random.Random(SEED)
    for r in range(rounds):
        t0 = time.perf_counter()
        rng.shuffle(order)
        for key in order:
            t1 = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - t1)
        now = time.perf_counter()
        log(f"  timed round {r + 1}/{rounds}: {now - t0:.0f} s (total {now - started:.0f} s)")
        done = r + 1
        if done < rounds and done >= MIN_STEPS and now + (now - t0) - started > budget:
            log(f"  stopping after {done} rounds: the next would end past {budget:.0f} s")
            break
    return times


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """Left-align the first column, right-align the rest."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for r in [headers, *rows]:
        cells = [str(r[0]).ljust(widths[0])]
        cells += [str(v).rjust(wd) for v, wd in zip(r[1:], widths[1:])]
        print("  ".join(cells).rstrip())
    print()


def onnxruntime_ips(x: torch.Tensor, steps: int, warmup: int) -> float | None:
    """Inference images/s of the project U-Net run by onnxruntime (fp32, CPU, torch's thread
    count), median of `steps` runs; None, with a printed note, if it is not installed."""
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx.export needs it)
    except ImportError as e:
        print(
            f"onnxruntime: skipped, {e.name} is not installed (see benchmarks/requirements.txt)\n"
        )
        return None
    torch.manual_seed(SEED)  # the same initial weights as the PyTorch rows
    model = MODELS[REFERENCE][1]().eval()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "unet.onnx"
        torch.onnx.export(
            model,
            (x,),
            path,
            input_names=["image"],
            verbose=False,
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        )
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    feed = {"image": x.numpy()}
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times[warmup:])


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, for judging how busy the machine was."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def log(message: str) -> None:
    """A progress line, printed at once (runs take seconds to minutes)."""
    print(message, flush=True)


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny step counts: a smoke test")
    parser.add_argument("--batch", type=int, default=BATCH, help="images per step")
    parser.add_argument("--size", type=int, default=SIZE, help="image height and width")
    parser.add_argument("--steps", type=int, help=f"timed steps per configuration ({STEPS})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps per configuration ({WARMUP})")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated subset of: " + ", ".join(MODELS) + " (default: all)",
    )
    parser.add_argument(
        "--budget", type=float, default=TIME_BUDGET, help="seconds after which no round starts"
    )
    args = parser.parse_args()
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else WARMUP)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if REFERENCE not in keys:
        keys.insert(0, REFERENCE)  # the ratios need it
    label = {k: MODELS[k][0] for k in keys} | {"peak": "peak"}
    if args.size % 32:
        parser.error("--size must be a multiple of 32 (the smp encoders halve it 5 times)")
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    native_bf16 = su.cpu_supports_bf16()
    print(f"date            {datetime.now().isoformat(timespec='seconds')}")
    print(
        f"CPU             {cpu_model()} ({psutil.cpu_count(logical=False)} cores, "
        f"{psutil.cpu_count()} logical; torch kernels: {torch.backends.cpu.get_cpu_capability()})"
    )
    print(f"native bf16     cpu_supports_bf16() = {native_bf16}")
    print(f"torch           {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"load average    {load_average()} (1/5/15 min; other work on the machine)")
    print(
        f"batch           {args.batch} x 3 x {args.size} x {args.size}; {warmup} warm-up + "
        f"up to {steps} timed steps per configuration, interleaved in rounds, median reported; "
        f"no round starts past {args.budget:.0f} s" + (" (--quick)" if args.quick else "")
    )
    if not native_bf16:
        print("note            no native bf16 on this CPU: expect bf16 to be slower than fp32")
    print()

    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    y = (torch.rand(args.batch, 1, args.size, args.size, generator=gen) > 0.9).float()
    baseline_rss = peak_rss_mib()

    # Models one after another: build, count, warm up (the warm-up steps also set the memory
    # high-water mark that each model's row reports). All stay resident for the timed rounds.
    info, steps_by_key = {}, {}
    for name in keys:
        t0 = time.perf_counter()
        torch.manual_seed(SEED)
        model = MODELS[name][1]()
        info[name] = {"params": su.count_parameters(model), "flops": forward_flops(model, x)}
        for precision in PRECISIONS:
            for mode, step in model_steps(model, x, y, precision).items():
                for _ in range(warmup):
                    step()
                steps_by_key[name, mode, precision] = step
        del model
        gc.collect()
        info[name]["peak_rss"] = peak_rss_mib()
        log(f"  {label[name]}: built and warmed up in {time.perf_counter() - t0:.0f} s")
    probes = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for kind, (step, flops) in peak_steps(dtype).items():
            for _ in range(warmup):
                step()
            steps_by_key["peak", kind, precision] = step
            probes[kind, precision] = flops
    log("  peak probes (3x3 conv, GEMM) warmed up")

    times = time_interleaved(steps_by_key, steps, started, args.budget)
    median = {key: statistics.median(t) for key, t in times.items()}
    rounds = len(next(iter(times.values())))
    print()

    def ips(name, mode, precision):
        return args.batch / median[name, mode, precision]

    def speedup(name, mode):
        return ips(name, mode, "bf16") / ips(name, mode, "fp32")

    print(f"Speed in images/s (higher is better; median of {rounds} steps); speed-up = bf16/fp32")
    rows = []
    previous_rss = baseline_rss
    for name in keys:
        r = info[name]
        cells = [label[name], f"{r['params'] / 1e6:.2f}M", f"{r['flops'] / 1e9:.1f}"]
        for mode in MODES:
            cells += [f"{ips(name, mode, p):.1f}" for p in PRECISIONS]
            cells.append(f"{speedup(name, mode):.2f}x")
        cells += [f"{r['peak_rss']:.0f}", f"+{r['peak_rss'] - previous_rss:.0f}"]
        previous_rss = r["peak_rss"]
        rows.append(cells)
    columns = [c for mode in MODES for c in (*(f"{mode} {p}" for p in PRECISIONS), "speed-up")]
    print_table(["model", "params", "GFLOP/batch", *columns, "peak RSS MiB", "(+MiB)"], rows)
    print("GFLOP/batch: conv/matmul FLOPs of one forward pass of the batch (training: 3x).")
    print(
        f"peak RSS: the process's high-water mark (ru_maxrss) after that model's warm-up runs "
        f"(before any model: {baseline_rss:.0f} MiB; at the end: {peak_rss_mib():.0f} MiB);\n"
        "  earlier models stay resident, so (+MiB) is what each model added to the peak."
    )
    print()

    ort = onnxruntime_ips(x, steps, warmup)
    if ort is not None:
        torch_ips = ips(REFERENCE, "infer", "fp32")
        print(
            f"Inference fp32, {label[REFERENCE]}: PyTorch {torch_ips:.1f} images/s, "
            f"onnxruntime {ort:.1f} images/s ({ort / torch_ips:.2f}x; timed after the rounds, "
            "not interleaved)\n"
        )

    print(f"Speed relative to the {label[REFERENCE]} (images/s ratio; >1 = faster than it)")
    rows = [
        [label[name]]
        + [f"{ips(name, m, p) / ips(REFERENCE, m, p):.2f}" for m in MODES for p in PRECISIONS]
        for name in keys
    ]
    print_table(["model", "train fp32", "train bf16", "infer fp32", "infer bf16"], rows)

    peak = {
        (kind, p): probes[kind, p] / median["peak", kind, p] / 1e9
        for kind in ("conv", "gemm")
        for p in PRECISIONS
    }
    best = {p: max(peak["conv", p], peak["gemm", p]) for p in PRECISIONS}
    print("Achieved GFLOP/s (% of this machine's measured peak in the same precision)")
    rows = []
    for name in keys:
        cells = [label[name]]
        for mode in MODES:
            for p in PRECISIONS:
                flops = (3 if mode == "train" else 1) * info[name]["flops"]
                done = flops / median[name, mode, p] / 1e9
                cells.append(f"{done:.1f} ({100 * done / best[p]:.0f}%)")
        rows.append(cells)
    print_table(["model", "train fp32", "train bf16", "infer fp32", "infer bf16"], rows)
    conv_shape = "x".join(map(str, PEAK_CONV_SHAPE))
    for p in PRECISIONS:
        print(
            f"peak {p}: {best[p]:.1f} GFLOP/s = best of 3x3 conv {peak['conv', p]:.1f} "
            f"({conv_shape}, channels_last) and {PEAK_GEMM_N}^3 GEMM {peak['gemm', p]:.1f}"
        )
    print()

    print("Timing detail: seconds per step, median [min - max] (the spread shows the noise)")
    rows = [
        [" ".join([label[key[0]], *key[1:]])]
        + [f"{median[key]:.3f} [{min(times[key]):.3f} - {max(times[key]):.3f}]"]
        for key in steps_by_key
    ]
    print_table(["configuration", "s/step"], rows)

    slow = [
        f"{label[name]} {mode} ({speedup(name, mode):.2f}x)"
        for name in keys
        for mode in MODES
        if speedup(name, mode) < SLOW_BF16
    ]
    if slow:
        print(f"bf16 is SLOWER than fp32 for: {', '.join(slow)}.")
        if native_bf16:
            print(
                "  This CPU has native bf16, so it lies in those models' bf16 kernels "
                "(or in noise: see the timing detail)."
            )
        else:
            print("  This CPU has no native bf16 (AVX2 only?): use fp32 here.")
    else:
        print(f"bf16 is at least {SLOW_BF16:.1f}x as fast as fp32 for every model and mode.")
    print(
        f"load average at the end: {load_average()}; "
        f"total time {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
