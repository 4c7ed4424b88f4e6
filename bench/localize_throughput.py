"""Throughput of the localisation metrics: N maps of 224x224 with one box each through the pointing game
(tolerance 15 original px, anisotropic scale) and the energy pointing game, beside Quantus 0.6
PointingGame / RelevanceMassAccuracy (tolerance 0, masks materialised) on a subset, scaled to N:
their numpy kernels (`evaluate_batch`) on --quantus-n maps, and the public call on --quantus-call-n.

    .venv/bin/python bench/localize_throughput.py [--n 10000] [--quantus-n 1000] [--quantus-call-n 100]

Map generation is not timed. Ours is timed end to end (peak, distances, energies; best of --repeat):
the original-pixel pointing game that `localize` uses (sub-pixel peak through the geometry, distance to
the box in original pixels), the model-grid one it replaced, and the 1,000-replicate bootstrap interval
of the N hits (the CI every localisation figure now carries).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch

from xraylens.localize.metrics import energy_pointing_game, pointing_game, pointing_game_original
from xraylens.metrics import bootstrap_mean_ci


def make_inputs(n: int, size: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, 1, size, size, generator=g, dtype=torch.float32).to(dtype)
    xy = torch.rand(n, 2, generator=g) * (size - 40)
    wh = torch.rand(n, 2, generator=g) * 60 + 8
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], -1)[:, None]  # [N, 1, 4] input px
    return maps, boxes


def masks_from_boxes(boxes: torch.Tensor, size: int) -> np.ndarray:
    """Pixel-centre rule, the same one `rasterize` and the box path use."""
    r = torch.arange(size) + 0.5
    b = boxes[:, 0]
    rows = (r[None] >= b[:, 1:2]) & (r[None] <= b[:, 3:4])
    cols = (r[None] >= b[:, 0:1]) & (r[None] <= b[:, 2:3])
    return (rows[:, :, None] & cols[:, None, :])[:, None].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--quantus-n", type=int, default=1_000)
    ap.add_argument("--quantus-call-n", type=int, default=100)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--chunk", type=int, default=512)  # 512 maps x 200 KB: bounded temporaries
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    maps, boxes = make_inputs(args.n, args.size, getattr(torch, args.dtype))
    scale = (224 / 1024, 224 / 1024 * 1.2)  # e.g. a 1024 px original, slightly anisotropic

    offset = (12.0, 30.0)  # a crop corner in original pixels
    boxes_orig = boxes.double().clone()  # the same boxes in original pixels: input / scale + crop corner
    boxes_orig[..., 0::2] = boxes_orig[..., 0::2] / scale[0] + offset[0]
    boxes_orig[..., 1::2] = boxes_orig[..., 1::2] / scale[1] + offset[1]

    def ours() -> tuple[torch.Tensor, torch.Tensor]:
        pg = pointing_game_original(
            maps, boxes=boxes_orig, tolerance=15.0, scale=scale, offset=offset, chunk_size=args.chunk
        )
        en = energy_pointing_game(maps, boxes=boxes, chunk_size=args.chunk)
        return pg.hit, en

    def grid() -> tuple[torch.Tensor, torch.Tensor]:
        pg = pointing_game(maps, boxes=boxes, tolerance=15.0, scale=scale, chunk_size=args.chunk)
        en = energy_pointing_game(maps, boxes=boxes, chunk_size=args.chunk)
        return pg.hit, en

    rows = []
    default_threads = torch.get_num_threads()
    for threads in sorted({1, default_threads}):
        # the CPU is shared: with other jobs running, 2 OpenMP threads can be slower than 1
        torch.set_num_threads(threads)
        for name, fn in (("original px", ours), ("model grid", grid)):
            fn()  # warm-up (allocator, thread pool)
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                hit, en = fn()
                times.append(time.perf_counter() - t0)
            t_ours = min(times)
            rows.append((f"xraylens pointing+energy, {name} {threads}T", args.n, t_ours, t_ours))
    torch.set_num_threads(default_threads)
    hit, en = ours()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        ci = bootstrap_mean_ci(hit.numpy(), seed=0)
        times.append(time.perf_counter() - t0)
    rows.append(("bootstrap 95% CI of the hits, 1000 replicates", args.n, min(times), min(times)))
    try:
        import quantus
    except ImportError:
        quantus = None
    notes = []
    if quantus is not None and args.quantus_n > 0:
        k = min(args.quantus_n, args.n)
        a = maps[:k].float().numpy()
        s = masks_from_boxes(boxes[:k], args.size).astype(np.float32)
        x = np.zeros_like(a)
        y = np.zeros(k, dtype=np.int64)
        pg = quantus.PointingGame(disable_warnings=True)
        rma = quantus.RelevanceMassAccuracy(disable_warnings=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the metrics' own numpy kernels on the subset (maps already max-normalised, as the call does)
            a_norm = a / a.reshape(k, -1).max(1)[:, None, None, None]
            t0 = time.perf_counter()
            q_pg = np.asarray(pg.evaluate_batch(a_batch=a_norm, s_batch=s), dtype=float)
            t_pg = time.perf_counter() - t0
            t0 = time.perf_counter()
            q_rma = np.asarray(rma.evaluate_batch(a_batch=a, s_batch=s), dtype=float)
            t_rma = time.perf_counter() - t0
            # ... and the public call end to end (its input checks build a Python set of every value)
            ke = min(args.quantus_call_n, k)
            t0 = time.perf_counter()
            pg(None, x[:ke], y[:ke], a[:ke], s[:ke], batch_size=256)
            t_call = time.perf_counter() - t0
        rows.append(("quantus PointingGame.evaluate_batch (tol 0)", k, t_pg, t_pg * args.n / k))
        rows.append(("quantus RelevanceMassAccuracy.evaluate_batch", k, t_rma, t_rma * args.n / k))
        rows.append(("quantus PointingGame()(...) public call", ke, t_call, t_call * args.n / ke))
        # same inputs at tolerance 0: equal except where the maximum is tied (Quantus: hit if ANY tied
        # maximum is inside; ours: the first in row-major order)
        ours0 = pointing_game(maps[:k], boxes=boxes[:k], tolerance=0).hit.numpy()
        flat = torch.from_numpy(a_norm.reshape(k, -1))
        ties = ((flat == flat.amax(1, keepdim=True)).sum(1) > 1).numpy()
        differ = ours0 != q_pg
        notes.append(
            f"vs quantus at tolerance 0 on {k} maps: pointing differs on {int(differ.sum())} "
            f"({int((differ & ~ties).sum())} without a tied maximum; {int(ties.sum())} maps have ties), "
            f"max |energy - RMA| {float(np.max(np.abs(en[:k].numpy() - q_rma))):.1e}"
        )

    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs (load avg {load:.1f}), "
        f"{args.dtype} maps {args.size}x{args.size}, chunk {args.chunk}, best of {args.repeat}"
    )
    print(f"{'implementation':46s} {'maps':>6s} {'seconds':>9s} {'maps/s':>9s} {'s per ' + str(args.n):>11s}")
    for name, k, t, scaled in rows:
        print(f"{name:46s} {k:6d} {t:9.3f} {k / t:9.0f} {scaled:11.3f}")
    print(
        f"xraylens pointing game {float(hit.nanmean()):.3f} [{ci[0]:.3f}, {ci[1]:.3f}], "
        f"mean energy {float(en.nanmean()):.4f}"
    )
    for line in notes:
        print(line)


if __name__ == "__main__":
    main()
