"""Train the project U-Net on the real LGG set outside Jupyter (same calls as notebook 03).

    LGG_DATA=/path/to/kaggle_3m python benchmarks/train_lgg.py --run-dir runs/lgg --epochs 40
    LGG_DATA=... python benchmarks/train_lgg.py --run-dir runs/lgg-flair --channels flair

Writes best.pt, last.pt and history.json to --run-dir; --resume continues an interrupted run.
The split is seg_utils.split_by_patient(seed 0), which reproduces the benchmark's split.json.
"""

import argparse
import time

import seg_utils as su

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--run-dir", default="runs/lgg")
parser.add_argument("--size", type=int, default=128)  # training image size
parser.add_argument("--width", type=int, default=16)  # U-Net base width
parser.add_argument("--depth", type=int, default=4)  # U-Net levels
parser.add_argument("--epochs", type=int, default=40)
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--patience", type=int, default=su.TrainConfig.patience)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--channels", default="all", help="input channels: all, flair, or e.g. 1,2")
args = parser.parse_args()

start = time.perf_counter()
splits = su.split_by_patient(su.scan_dataset(su.resolve_data_dir()))
pre = su.Preprocess(size=args.size, channels=su.parse_channels(args.channels))
train_set = su.SliceDataset.from_records(splits["train"], pre, su.train_transform())
val_volumes = su.prepare_volumes(su.load_volumes(splits["val"]), pre)
su.seed_everything(args.seed)
model = su.UNet(in_channels=len(pre.channels), base_width=args.width, depth=args.depth)
config = su.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, patience=args.patience)  # fmt: skip
print(f"{su.count_parameters(model):,} parameters, {len(train_set)} training slices, {config}")
history = su.train(model, train_set, val_volumes, args.run_dir, config, pre, resume=args.resume)
best = max(history, key=lambda h: h["val_dice"])
print(f"best validation Dice {best['val_dice']:.4f} at epoch {best['epoch']}; "
      f"{len(history)} epochs; wall {time.perf_counter() - start:.0f} s")  # fmt: skip
