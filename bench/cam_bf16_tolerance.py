"""CAMs in bf16 against fp32 on real radiographs: per-map mean, 99th-percentile and max |difference|.

    .venv/bin/python bench/cam_bf16_tolerance.py                 # 224 px, 8 images each, CPU autocast
    .venv/bin/python bench/cam_bf16_tolerance.py --device cuda   # the same on a GPU

The figures behind `explain.engine.BF16_TOLERANCE` (docs/benchmarks.md). Random-init models (the
tolerance is about arithmetic, not about what a model learnt), the fixture's pneumonia and knee images,
the same explained class in both precisions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from xraylens.data.cache import load_split  # noqa: E402
from xraylens.data.loader import to_model_input  # noqa: E402
from xraylens.data.sources import load_source  # noqa: E402
from xraylens.explain.engine import BF16_TOLERANCE, BF16_TOLERANCE_P99, CamEngine  # noqa: E402
from xraylens.explain.methods import METHODS  # noqa: E402
from xraylens.models.registry import create_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/fixture"))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--models", default="resnet18,resnet50,densenet121,efficientnet_b0")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    methods = [m for m in METHODS if m != "scorecam"]  # Score-CAM: minutes on a CPU
    print(f"{'data':<10} {'model':<16} {'method':<18} {'mean':>7} {'p99':>7} {'max':>7}  within")
    for ds in ("pneumonia", "knee_kl"):
        src = load_source(Path(args.data) / ds)
        c = load_split(src, "train", args.image_size, cache_dir=args.cache_dir)
        x = to_model_input(torch.from_numpy(np.array(c.images[: args.images]))[:, None], device=device)
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = create_model(name, num_classes=len(src.classes), in_chans=1, image_size=args.image_size)
            model = model.to(device).eval()
            with CamEngine(model) as engine:
                ref = engine(x, methods, targets="pred")
                low = engine(x, methods, targets=ref.targets, precision="bf16")
            for m in methods:
                d = (ref.maps[m] - low.maps[m]).abs()
                mean = float(d.mean(dim=(1, 2, 3)).max())
                p99 = float(torch.quantile(d.flatten().float().cpu(), 0.99))
                ok = mean <= BF16_TOLERANCE and p99 <= BF16_TOLERANCE_P99
                worst = float(d.max())
                print(f"{ds:<10} {name:<16} {m:<18} {mean:>7.4f} {p99:>7.4f} {worst:>7.3f}  {'yes' if ok else 'NO'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
