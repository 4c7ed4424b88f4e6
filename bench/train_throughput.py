"""Training images/s from a real folder through xraylens' data path, against the same model on
synthetic tensors already in memory (the ceiling), from one run.

    .venv/bin/python bench/train_throughput.py --data ../shared/data/knee_kl --model resnet18 \
        --image-size 128 --batch-size 32 --steps 15

The real-data side runs exactly what `xraylens train` runs per step: cached uint8 batch ->
to_model_input (device, normalise) -> GpuAugment -> forward/backward/step. The cache is built (or
found) before timing starts; its build time is printed separately.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from xraylens.data.augment import GpuAugment  # noqa: E402
from xraylens.data.cache import cache_root, load_split, split_key  # noqa: E402
from xraylens.data.loader import iterate_batches, to_model_input  # noqa: E402
from xraylens.data.sources import load_source  # noqa: E402
from xraylens.models.registry import create_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(model, opt, x, y, device):
    with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null():
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/knee_kl"))
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--augment", default="flip,affine,jitter")
    args = ap.parse_args()
    device = torch.device(args.device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    t0 = time.perf_counter()
    source = load_source(args.data)
    was_cached = (cache_root() / f"{split_key(source, 'train', args.image_size)}.json").is_file()
    cached = load_split(source, "train", image_size=args.image_size, progress=True)
    cache_s = time.perf_counter() - t0
    k = len(source.classes)

    torch.manual_seed(0)
    model = create_model(args.model, num_classes=k, in_chans=1, image_size=args.image_size).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    aug = GpuAugment.from_names(args.augment).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    cl = device.type == "cuda"

    def real(n_steps: int) -> float:
        it = iterate_batches(cached, args.batch_size, shuffle=True, seed=0, epoch=0, drop_last=True)
        done = 0
        _sync(device)
        t = time.perf_counter()
        while done < n_steps:
            for x, y, _ in it:
                xin = aug(to_model_input(x, device=device, channels_last=cl), generator=gen)
                _step(model, opt, xin, y.to(device, non_blocking=True), device)
                done += 1
                if done >= n_steps:
                    break
            it = iterate_batches(cached, args.batch_size, shuffle=True, seed=0, epoch=done, drop_last=True)
        _sync(device)
        return n_steps * args.batch_size / (time.perf_counter() - t)

    xs = torch.randn(args.batch_size, 1, args.image_size, args.image_size, device=device)
    if cl:
        xs = xs.contiguous(memory_format=torch.channels_last)
    ys = torch.randint(0, k, (args.batch_size,), device=device)

    def synthetic(n_steps: int) -> float:
        _sync(device)
        t = time.perf_counter()
        for _ in range(n_steps):
            _step(model, opt, xs, ys, device)
        _sync(device)
        return n_steps * args.batch_size / (time.perf_counter() - t)

    real(args.warmup)
    synthetic(args.warmup)
    # interleave the two so drift in machine load hits both alike
    r1, s1 = real(args.steps), synthetic(args.steps)
    r2, s2 = real(args.steps), synthetic(args.steps)
    r, s = (r1 + r2) / 2, (s1 + s2) / 2
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else os.cpu_count()} "
        f"{'GPU' if device.type == 'cuda' else 'CPU threads'}), torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}"
    )
    print(
        f"data {args.data}: {len(cached.labels)} train images, cache "
        f"{'found' if was_cached else 'built (every image decoded once)'} in {cache_s:.1f} s; not timed below"
    )
    print(f"model {args.model}, {args.image_size}x{args.image_size}, batch {args.batch_size}, augment {args.augment}")
    print(f"{'path':<40}{'images/s':>12}")
    print(f"{'xraylens data path (real folder)':<40}{r:>12.1f}")
    print(f"{'synthetic in-memory tensors (ceiling)':<40}{s:>12.1f}")
    print(f"ratio real/ceiling: {r / s:.3f}  (loader overhead {100 * (1 - r / s):.1f} %)")


if __name__ == "__main__":
    main()
