"""Do DataLoader workers speed up training here? Times training steps with 0, 1 and 2 workers.

    .venv/bin/python benchmarks/bench_loader.py [--steps 30] [--size 128]

Runs on the synthetic set (generated into data/synthetic if missing), the project U-Net at the
default configuration, in the precision train() would pick. Rounds alternate the worker counts
so that machine noise hits all of them alike; the median seconds per step is printed.
"""

import argparse
import time

import numpy as np
import torch

import seg_utils as su

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--steps", type=int, default=30)  # timed steps per worker count and round
parser.add_argument("--rounds", type=int, default=3)  # alternating rounds
parser.add_argument("--size", type=int, default=128)  # training image size
parser.add_argument("--batch-size", type=int, default=16)
args = parser.parse_args()

pre = su.Preprocess(size=args.size)
records = su.scan_dataset(su.resolve_data_dir(""))
dataset = su.SliceDataset.from_records(records, pre, su.train_transform(seed=0), progress=False)
device = su.pick_device()
precision = su.pick_precision(device)
su.seed_everything(0)
model = su.to_layout(su.UNet().to(device), precision)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
config = su.TrainConfig(batch_size=args.batch_size)


def seconds_per_step(workers: int) -> float:
    """Median wall time of a training step, loading included, with `workers` loader workers."""
    config.num_workers = workers
    loader = iter(su.epoch_loader(dataset, config, su.tumour_weights(dataset), epoch=0))
    su.train_step(model, optimizer, *next(loader), precision)  # warm-up, workers started
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        su.train_step(model, optimizer, *next(loader), precision)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


results = {w: [] for w in (0, 1, 2)}
for _ in range(args.rounds):
    for workers in results:
        results[workers].append(seconds_per_step(workers))
print(
    f"{len(dataset)} slices, {args.size} px, batch {args.batch_size}, {precision}, "
    f"torch threads {torch.get_num_threads()}"
)
base = np.median(results[0])
for workers, times in results.items():
    step = np.median(times)
    print(
        f"num_workers={workers}: {1000 * step:6.1f} ms/step, "
        f"{args.batch_size / step:6.1f} img/s, {base / step:.2f}x of 0 workers"
    )
