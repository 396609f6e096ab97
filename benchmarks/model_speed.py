"""The model's appetite on this machine: train steps/s of small_cnn by depth, width and format.

    .venv/bin/python benchmarks/model_speed.py            # results go to BENCHMARKS.md

Train steps (forward, backward, AdamW) on one batch already in memory, as
``throughput.measure_model`` does, for every (depth, width, channels_last) cell in interleaved
rounds of one invocation; medians, and ratios against depth 4, width 32 in NCHW (session 1's
model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from feedtune.config import ModelConfig  # noqa: E402
from feedtune.training.devices import prepare_model  # noqa: E402
from feedtune.training.models import build_model  # noqa: E402


def steps_per_s(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), targets).backward()
        optimizer.step()

    for _ in range(2):  # warm-up: oneDNN picks its kernels on the first calls
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(targets) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 5])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 24, 16])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size)
    targets = torch.randint(0, 10, (args.batch,))
    cells = [(d, w, cl) for d in args.depths for w in args.widths for cl in (False, True)]
    models = {
        cell: prepare_model(
            build_model(ModelConfig(depth=cell[0], width=cell[1]), num_classes=10),
            torch.device("cpu"),
            channels_last=cell[2],
        )
        for cell in cells
    }
    rates: dict[tuple[int, int, bool], list[float]] = {cell: [] for cell in cells}
    for _ in range(args.rounds):
        for cell, model in models.items():
            x = images.contiguous(memory_format=torch.channels_last) if cell[2] else images
            rates[cell].append(steps_per_s(model, x, targets, args.steps))
    base = statistics.median(rates[cells[0]])
    print(
        f"small_cnn train steps, batch {args.batch}, {args.size} px, {args.threads} torch "
        f"threads, torch {torch.__version__}; {args.rounds} interleaved rounds of "
        f"{args.steps} steps\n"
    )
    first = f"depth {cells[0][0]} width {cells[0][1]} NCHW"
    print(f"| depth | width | memory format | samples/s (median) | vs {first} | rounds |")
    print("|---:|---:|---|---:|---:|---|")
    for (depth, width, cl), values in rates.items():
        med = statistics.median(values)
        fmt = "channels_last" if cl else "NCHW"
        rounds = ", ".join(f"{v:.0f}" for v in values)
        print(f"| {depth} | {width} | {fmt} | {med:.0f} | {med / base:.2f}x | {rounds} |")


if __name__ == "__main__":
    main()
