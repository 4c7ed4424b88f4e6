"""Every GPU figure of the project from one call, as one table with goals and PASS/FAIL, and a JSON.

    python bench/gpu_suite.py                         # on a GPU machine: the full suite (~10 min on an H100)
    python bench/gpu_suite.py --tiny --device cpu     # 32 px, few images and steps: exercises every path
    bench/gpu_suite.sh                                # the same, after unpacking carried data and wheels

Sections (and goals):

1. Training throughput on the real knee and pneumonia folders through xraylens' data path (cached
   uint8 split -> `iterate_batches` with `data.placement` auto -> normalise -> GpuAugment -> bf16
   autocast, channels_last -> forward/backward/AdamW step) against the same model on synthetic tensors
   already on the device (the ceiling); resnet18, resnet50, densenet121, efficientnet_b0, 224 px,
   batch 128. Goal: real >= 85 % of synthetic.
2. CAM throughput at batch 64 (resnet50, 224 px, fp32, as bench/cam_throughput.py, whose code this
   reuses): our Grad-CAM against pytorch-grad-cam's and Captum's, and against a forward pass alone;
   our Grad-CAM in bf16 is listed beside. Goals: ours >= 5x pytorch-grad-cam, >= 0.7x forward-only.
   pytorch-grad-cam and Captum are optional: "not installed" is reported instead of a rate.
3. GPU memory over 2,000 explained images (resnet50, Grad-CAM, batch 64, maps copied to the host as
   `xraylens explain` does): `torch.cuda.memory_allocated` and the peak after the first batch against
   after the last. Goal: no growth (under 1 MiB). On a CPU the process RSS is reported instead, no goal.

H100 reference ceilings (synthetic, bf16 + channels_last, batch 128): resnet18 10,359 img/s, resnet50
3,631, densenet121 1,663, efficientnet_b0 3,438; pytorch-grad-cam Grad-CAM 829 img/s, forward-only
5,680 (resnet50, 224, fp32, batch 64).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import cam_throughput  # noqa: E402  (bench/cam_throughput.py: model builder and interleaved timing)

from xraylens.data.augment import GpuAugment  # noqa: E402
from xraylens.data.cache import load_split  # noqa: E402
from xraylens.data.loader import iterate_batches, resolve_placement, to_model_input  # noqa: E402
from xraylens.data.sources import load_source  # noqa: E402
from xraylens.explain.engine import CamEngine, explain  # noqa: E402
from xraylens.models.registry import create_model  # noqa: E402

MODELS = ("resnet18", "resnet50", "densenet121", "efficientnet_b0")
DATASETS = ("knee_kl", "pneumonia")
H100_SYNTHETIC = {"resnet18": 10359, "resnet50": 3631, "densenet121": 1663, "efficientnet_b0": 3438}
H100_PGC_GRADCAM, H100_FORWARD = 829, 5680
GOAL_REAL_RATIO = 0.85
GOAL_VS_PGC = 5.0
GOAL_VS_FORWARD = 0.7
GOAL_GROWTH_BYTES = 1024**2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    # bf16 on CUDA, as `xraylens train` runs it; a CPU without bf16 units emulates it 10x slower, so fp32 there
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


# ---- 1. training throughput ---------------------------------------------------------------------


def train_throughput(
    data: Path,
    model_name: str,
    *,
    device: torch.device,
    size: int,
    batch: int,
    steps: int,
    warmup: int,
    rounds: int,
    cache_dir: str | None,
) -> dict[str, Any]:
    """Images/s of one model on one real folder (xraylens' data path) and on synthetic tensors."""
    t0 = time.perf_counter()
    source = load_source(data)
    cached = load_split(source, "train", size, cache_dir=cache_dir)
    cache_s = time.perf_counter() - t0
    if len(cached) < batch:
        raise SystemExit(f"{data}: {len(cached)} train images, fewer than one batch of {batch}; lower --batch")
    k = len(source.classes)
    cl = device.type == "cuda"
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=k, in_chans=1, image_size=size).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    aug = GpuAugment.from_names("flip,affine,jitter").to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    placement = resolve_placement("auto", int(cached.images.nbytes), device)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with _autocast(device):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    epoch = [0]

    def real(n: int) -> float:
        done = 0
        _sync(device)
        t = time.perf_counter()
        while done < n:
            for x, y, _ in iterate_batches(
                cached, batch, shuffle=True, seed=0, epoch=epoch[0], drop_last=True, device=device, placement="auto"
            ):
                xin = aug(to_model_input(x, device=device, channels_last=cl), generator=gen)
                step(xin, y.to(device, non_blocking=True))
                done += 1
                if done >= n:
                    break
            epoch[0] += 1
        _sync(device)
        return n * batch / (time.perf_counter() - t)

    xs = torch.randn(batch, 1, size, size, device=device)
    if cl:
        xs = xs.contiguous(memory_format=torch.channels_last)
    ys = torch.randint(0, k, (batch,), device=device)

    def synthetic(n: int) -> float:
        _sync(device)
        t = time.perf_counter()
        for _ in range(n):
            step(xs, ys)
        _sync(device)
        return n * batch / (time.perf_counter() - t)

    real(warmup)
    synthetic(warmup)
    r, s = [], []
    for _ in range(rounds):  # interleaved, so drift in the machine's load hits both alike
        r.append(real(steps))
        s.append(synthetic(steps))
    rr, ss = float(np.mean(r)), float(np.mean(s))
    return {
        "data": str(data),
        "model": model_name,
        "n_train": len(cached),
        "cache_s": round(cache_s, 2),
        "placement": placement,
        "real_img_s": round(rr, 3),
        "synthetic_img_s": round(ss, 3),
        "ratio": round(rr / ss, 4),
    }


# ---- 2. CAM throughput ---------------------------------------------------------------------------


def _optional(module: str) -> Any | None:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        return None


def cam_benchmark(
    *, device: torch.device, model_name: str, size: int, batch: int, iters: int, warmup: int
) -> dict[str, Any]:
    """Images/s: ours (fp32, and bf16), pytorch-grad-cam, Captum, forward only; same model and batch."""
    model, layer, layer_name = cam_throughput.build_model(model_name, device)
    peer_layer = layer[-1] if isinstance(layer, torch.nn.Sequential) else layer
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    targets = torch.randint(0, 2, (batch,), generator=gen).to(device)

    def fwd() -> None:
        with torch.no_grad():
            model(x)

    contenders: dict[str, Callable[[], object]] = {
        "forward": fwd,
        "ours": lambda: explain(model, x, ["gradcam"], layers=[layer_name], targets=targets),
        "ours_bf16": lambda: explain(model, x, ["gradcam"], layers=[layer_name], targets=targets, precision="bf16"),
    }
    installed = {"pytorch-grad-cam": False, "captum": False}
    pgc = _optional("pytorch_grad_cam")
    if pgc is not None:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        installed["pytorch-grad-cam"] = True
        pgc_targets = [ClassifierOutputTarget(int(t)) for t in targets]

        def pgc_gradcam() -> object:
            with pgc.GradCAM(model=model, target_layers=[peer_layer]) as cam:
                return cam(input_tensor=x, targets=pgc_targets)

        contenders["pgc"] = pgc_gradcam
    captum_attr = _optional("captum.attr")
    if captum_attr is not None:
        installed["captum"] = True
        lgc = captum_attr.LayerGradCam(model, peer_layer)

        def captum_gradcam() -> None:
            captum_attr.LayerAttribution.interpolate(lgc.attribute(x, target=targets), (size, size), "bilinear")

        contenders["captum"] = captum_gradcam
    try:
        rates = cam_throughput.run_interleaved(contenders, iters, warmup, device, batch)
    finally:
        model.zero_grad(set_to_none=True)  # pytorch-grad-cam backprops into the weights
    out: dict[str, Any] = {
        "model": model_name,
        "image_size": size,
        "batch": batch,
        "iters": iters,
        "installed": installed,
        **{f"{k}_img_s": round(v, 3) for k, v in rates.items()},
    }
    out["ours_vs_forward"] = round(rates["ours"] / rates["forward"], 4)
    out["ours_vs_pgc"] = round(rates["ours"] / rates["pgc"], 3) if "pgc" in rates else None
    out["ours_vs_captum"] = round(rates["ours"] / rates["captum"], 3) if "captum" in rates else None
    return out


# ---- 3. memory over many explained images --------------------------------------------------------


def memory_over_images(
    data: Path, *, device: torch.device, size: int, batch: int, n_images: int, cache_dir: str | None
) -> dict[str, Any]:
    """Allocated and peak GPU memory after the first batch vs after the last, over `n_images`."""
    source = load_source(data)
    cached = load_split(source, "train", size, cache_dir=cache_dir)
    torch.manual_seed(0)
    model = create_model("resnet50", num_classes=len(source.classes), in_chans=1, image_size=size).to(device).eval()
    cuda = device.type == "cuda"
    # whole batches only (2,000 -> 32 x 64 = 2,048): a smaller last batch is a new shape, for which cuDNN's
    # autotuner allocates fresh workspace, and that would read as growth; cycles through a small split
    n_batches = -(-n_images // batch)
    order = np.arange(n_batches * batch) % len(cached)
    import psutil

    proc = psutil.Process()
    first: dict[str, int] = {}
    kept = 0
    with CamEngine(model) as engine:
        for b, lo in enumerate(range(0, len(order), batch)):
            idx = order[lo : lo + batch]
            x = to_model_input(torch.from_numpy(np.asarray(cached.images[idx])), device=device)
            res = engine(x, ["gradcam"], targets="pred")
            kept += res.maps["gradcam"][:, 0].half().cpu().numpy().shape[0]  # to the host, as explain does
            del res, x
            if b == 0:
                _sync(device)
                if cuda:
                    first = {
                        "allocated": torch.cuda.memory_allocated(device),
                        "peak": torch.cuda.max_memory_allocated(device),
                    }
                    torch.cuda.reset_peak_memory_stats(device)
                else:
                    first = {"rss": proc.memory_info().rss}
    _sync(device)
    out: dict[str, Any] = {"images": kept, "batch": batch, "image_size": size}
    if cuda:
        last_alloc, last_peak = torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
        out.update(
            allocated_after_first=first["allocated"],
            allocated_after_last=last_alloc,
            allocated_growth=last_alloc - first["allocated"],
            peak_first_batch=first["peak"],
            peak_later_batches=last_peak,
            peak_growth=last_peak - first["peak"],
        )
    else:
        rss = proc.memory_info().rss
        out.update(rss_after_first=first["rss"], rss_after_last=rss, rss_growth=rss - first["rss"])
    return out


# ---- the table -----------------------------------------------------------------------------------


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per goal: what, measured, goal, PASS / FAIL / SKIP (with the reason)."""
    rows = []
    for t in result["train"]:
        name = f"train {Path(t['data']).name} {t['model']}: real/synthetic"
        rows.append(_row(name, t["ratio"], f">= {GOAL_REAL_RATIO:.2f}", t["ratio"] >= GOAL_REAL_RATIO))
    cam = result["cam"]
    if cam["ours_vs_pgc"] is None:
        rows.append(
            {
                "goal": "Grad-CAM ours/pytorch-grad-cam",
                "measured": "not installed",
                "target": f">= {GOAL_VS_PGC:.0f}x",
                "status": "SKIP",
            }
        )
    else:
        rows.append(
            _row(
                "Grad-CAM ours/pytorch-grad-cam",
                cam["ours_vs_pgc"],
                f">= {GOAL_VS_PGC:.0f}x",
                cam["ours_vs_pgc"] >= GOAL_VS_PGC,
            )
        )
    rows.append(
        _row(
            "Grad-CAM ours/forward-only",
            cam["ours_vs_forward"],
            f">= {GOAL_VS_FORWARD}x",
            cam["ours_vs_forward"] >= GOAL_VS_FORWARD,
        )
    )
    mem = result["memory"]
    if "allocated_growth" in mem:
        grow = max(mem["allocated_growth"], mem["peak_growth"])
        rows.append(
            _row(f"GPU memory growth over {mem['images']} images (bytes)", grow, "< 1 MiB", grow < GOAL_GROWTH_BYTES)
        )
    else:
        rows.append(
            {
                "goal": f"GPU memory growth over {mem['images']} images",
                "measured": f"RSS {mem['rss_growth'] / 2**20:+.1f} MiB",
                "target": "< 1 MiB",
                "status": "SKIP (CUDA only)",
            }
        )
    return rows


def _row(goal: str, measured: float, target: str, ok: bool) -> dict[str, Any]:
    return {"goal": goal, "measured": measured, "target": target, "status": "PASS" if ok else "FAIL"}


def format_report(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [
        f"# xraylens GPU suite, {m['date']}, {m['machine']}, device {m['device']}, torch {m['torch']}",
        f"# command: {m['command']}",
    ]
    if m["tiny"]:
        lines.append("# --tiny: 32 px and a few steps; exercises the code, its figures are not the goals' setting")
    lines.append("")
    lines.append(
        f"{'training (bf16 + channels_last on CUDA)':<40}{'real img/s':>11}{'synthetic':>11}{'ratio':>8}"
        f"{'H100 ref':>10}  placement"
    )
    for t in result["train"]:
        ref = H100_SYNTHETIC.get(t["model"]) if not m["tiny"] else None
        lines.append(
            f"{Path(t['data']).name + ' ' + t['model']:<40}{t['real_img_s']:>11.1f}{t['synthetic_img_s']:>11.1f}"
            f"{t['ratio']:>8.3f}{(f'{ref:,}' if ref else '-'):>10}  {t['placement']}"
        )
    c = result["cam"]
    lines.append("")
    lines.append(f"CAM, {c['model']} {c['image_size']} px, batch {c['batch']}, best of {c['iters']}{'':<8}img/s")
    for key, label in (
        ("ours", "xraylens Grad-CAM (fp32)"),
        ("ours_bf16", "xraylens Grad-CAM (bf16)"),
        ("pgc", "pytorch-grad-cam Grad-CAM"),
        ("captum", "Captum LayerGradCam"),
        ("forward", "forward only"),
    ):
        v = c.get(f"{key}_img_s")
        lines.append(f"  {label:<44}{(f'{v:>10.1f}' if v is not None else '  not installed')}")
    mem = result["memory"]
    lines.append("")
    if "allocated_growth" in mem:
        lines.append(
            f"GPU memory over {mem['images']} explained images: "
            f"allocated {mem['allocated_after_first'] / 2**20:.1f} -> "
            f"{mem['allocated_after_last'] / 2**20:.1f} MiB, peak {mem['peak_first_batch'] / 2**20:.1f} -> "
            f"{mem['peak_later_batches'] / 2**20:.1f} MiB"
        )
    else:
        lines.append(
            f"CPU: RSS over {mem['images']} explained images {mem['rss_after_first'] / 2**20:.1f} -> "
            f"{mem['rss_after_last'] / 2**20:.1f} MiB (GPU memory goal: CUDA only)"
        )
    lines.append("")
    lines.append(f"{'goal':<58}{'measured':>16}  {'target':<10}status")
    for g in result["goals"]:
        meas = g["measured"]
        meas = f"{meas:.3f}" if isinstance(meas, float) else str(meas)
        lines.append(f"{g['goal']:<58}{meas:>16}  {g['target']:<10}{g['status']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="32 px, the fixture images, 1 step: a CPU smoke run")
    ap.add_argument(
        "--data-root",
        default=os.environ.get("XRAYLENS_DATA", str(HERE.parents[1] / "shared" / "data")),
        help="folder holding knee_kl/ and pneumonia/ (--tiny: fixture/knee_kl, fixture/pneumonia); "
        "default $XRAYLENS_DATA, else ../shared/data",
    )
    ap.add_argument("--models", default=",".join(MODELS), help="training models (default: the four of the goal)")
    ap.add_argument("--image-size", type=int, default=None, help="default 224 (tiny 32)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 128, tiny 4)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 30, tiny 1)")
    ap.add_argument("--cam-batch", type=int, default=None, help="CAM batch (default 64, tiny 4)")
    ap.add_argument("--cam-iters", type=int, default=None, help="timed CAM calls per contender (default 20, tiny 1)")
    ap.add_argument(
        "--mem-images", type=int, default=None, help="images explained for the memory check (default 2000, tiny 12)"
    )
    ap.add_argument(
        "--cache-dir", default=None, help="xraylens cache folder (default $XRAYLENS_CACHE or ~/.cache/xraylens)"
    )
    ap.add_argument(
        "--json", default=None, help="write the results here (default gpu_suite_<device>.json; $OUT/ when set)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's own; --tiny on CPU: 1, since spinning OpenMP threads "
        "on a shared, loaded machine can slow a step a hundredfold)",
    )
    ap.add_argument("--strict", action="store_true", help="exit 1 when a goal FAILs")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible; run with --device cpu --tiny")
    device = torch.device(args.device)
    tiny = args.tiny
    root = Path(args.data_root).expanduser()
    folders = [root / "fixture" / d if tiny else root / d for d in DATASETS]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise SystemExit(f"data folder(s) missing: {', '.join(missing)}; pass --data-root (see docs/benchmarks.md)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    threads = args.threads or (1 if tiny and device.type == "cpu" else None)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(args, device, tiny, argv)
    finally:
        torch.set_num_threads(before)  # a caller in the same process (the test) keeps its setting


def _run(args: argparse.Namespace, device: torch.device, tiny: bool, argv: list[str] | None) -> int:
    size = args.image_size or (32 if tiny else 224)
    batch = args.batch or (4 if tiny else 128)
    steps = args.steps or (1 if tiny else 30)
    cam_batch = args.cam_batch or (4 if tiny else 64)
    cam_iters = args.cam_iters or (1 if tiny else 20)
    mem_images = args.mem_images or (12 if tiny else 2000)
    root = Path(args.data_root).expanduser()
    folders = [root / "fixture" / d if tiny else root / d for d in DATASETS]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    result: dict[str, Any] = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{socket.gethostname()} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)",
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu, {torch.get_num_threads()} threads",
            "torch": torch.__version__,
            "command": " ".join(["python", "bench/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])]),
            "tiny": tiny,
            "image_size": size,
            "batch": batch,
            "steps": steps,
        },
        "train": [],
    }
    for folder in folders:
        for name in args.models.split(","):
            print(f"training throughput: {folder.name} {name} ...", file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the previous model's cached blocks
            result["train"].append(
                train_throughput(
                    folder,
                    name,
                    device=device,
                    size=size,
                    batch=batch,
                    steps=steps,
                    warmup=1 if tiny else 5,
                    rounds=1 if tiny else 2,
                    cache_dir=args.cache_dir,
                )
            )
    print("CAM throughput ...", file=sys.stderr, flush=True)
    result["cam"] = cam_benchmark(
        device=device,
        model_name="resnet18" if tiny else "resnet50",
        size=size,
        batch=cam_batch,
        iters=cam_iters,
        warmup=1 if tiny else 3,
    )
    print("memory over explained images ...", file=sys.stderr, flush=True)
    result["memory"] = memory_over_images(
        folders[1],
        device=device,
        size=size,
        batch=cam_batch if tiny else 64,
        n_images=mem_images,
        cache_dir=args.cache_dir,
    )
    result["goals"] = goals(result)
    print(format_report(result))
    out = (
        Path(args.json)
        if args.json
        else (Path(os.environ["OUT"]) if os.environ.get("OUT") else Path()) / f"gpu_suite_{device.type}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {out}")
    failed = [g for g in result["goals"] if g["status"] == "FAIL"]
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
