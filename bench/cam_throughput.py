"""CAM throughput: xraylens' engine vs pytorch-grad-cam vs Captum, same model, same batch, one run.

    python bench/cam_throughput.py --device cpu --iters 2
    python bench/cam_throughput.py --device cuda            # batch 64, 20 iterations

Prints images/s per method for ours and pytorch-grad-cam's same method (Captum's LayerGradCam on the
Grad-CAM row), the forward-only rate, and the cost of all our gradient methods from one pass vs one.
Fairness: every contender gets the same model object (random weights, eval mode), the same input
batch and targets, the same layer (layer4's output), warm-up calls before timing, CUDA synchronised
around each timed block, and gradients enabled (no ``torch.no_grad``) for every gradient method.
Outputs are what each tool returns by default: ours are normalised maps at the input size kept on the
device; pytorch-grad-cam's are normalised numpy maps at the input size; Captum's are raw layer maps,
upsampled here with its ``LayerAttribution.interpolate``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from xraylens.explain import explain
from xraylens.explain.methods import METHODS

PEERS = {  # our name -> pytorch-grad-cam class
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
    "eigencam": "EigenCAM",
    "scorecam": "ScoreCAM",
}
OURS_ONLY = ["normgrad-scaling", "normgrad-conv1x1", "normgrad-conv3x3"]


def build_model(name: str, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """(model, layer module for the peers, layer name for us); random weights, eval mode."""
    import torchvision

    torch.manual_seed(0)
    if hasattr(torchvision.models, name):
        model = getattr(torchvision.models, name)(weights=None, num_classes=2)
    else:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=2)
    model = model.to(device).eval()
    if hasattr(model, "layer4"):
        return model, model.layer4, "layer4"
    raise SystemExit(f"--model {name}: this benchmark knows the CAM layer of ResNets only (model.layer4)")


def run_interleaved(
    contenders: dict[str, Callable[[], object]], iters: int, warmup: int, device: torch.device, batch: int
) -> dict[str, float]:
    """Images/s per contender: best of ``iters`` calls, taken round-robin after ``warmup`` calls each.

    Round-robin plus best-of keeps a shared, busy machine from favouring whoever ran in a quiet moment.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    best = {k: float("inf") for k in contenders}
    for _ in range(iters):
        for k, fn in contenders.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: batch / t for k, t in best.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 on cpu, 64 on cuda")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per contender (default 2 cpu, 20 cuda)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument(
        "--scorecam",
        action="store_true",
        help="also time Score-CAM (one forward per channel per image: minutes on CPU)",
    )
    ap.add_argument("--no-peers", action="store_true", help="time ours only")
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible; use --device cpu")
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    batch = args.batch_size or (8 if cpu else 64)
    iters = args.iters or (2 if cpu else 20)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    model, layer, layer_name = build_model(args.model, device)
    peer_layer = layer[-1] if isinstance(layer, torch.nn.Sequential) else layer  # same output tensor
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, args.image_size, args.image_size, generator=gen).to(device)
    targets = torch.randint(0, 2, (batch,), generator=gen).to(device)

    methods = [m for m in PEERS if m != "scorecam" or args.scorecam]
    grad_methods = [m for m in [*methods, *OURS_ONLY] if METHODS[m].needs_gradients]
    print(
        f"# {args.model} {args.image_size}x{args.image_size}, batch {batch}, best of {iters} calls "
        f"(+{args.warmup} warm-up, round-robin), device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if not cpu else f", {torch.get_num_threads()} threads"),
        flush=True,
    )

    def fwd():
        with torch.no_grad():
            model(x)

    # every contender hooks the layer only for its own call (hooks left on a shared model would fire
    # during the others' passes): ours via explain(), pytorch-grad-cam via its context manager
    contenders: dict[str, Callable[[], object]] = {"forward": fwd}
    for m in [*methods, *OURS_ONLY]:
        contenders[f"ours:{m}"] = lambda m=m: explain(model, x, [m], layers=[layer_name], targets=targets)
    contenders["ours:all"] = lambda: explain(model, x, grad_methods, layers=[layer_name], targets=targets)
    if not args.no_peers:
        import pytorch_grad_cam as pgc
        from captum.attr import LayerAttribution, LayerGradCam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        pgc_targets = [ClassifierOutputTarget(int(t)) for t in targets]

        def peer(cls):
            with cls(model=model, target_layers=[peer_layer]) as cam:
                cam.batch_size = batch  # Score-CAM's chunk of masked images; ignored by the others
                return cam(input_tensor=x, targets=pgc_targets)

        for m in methods:
            contenders[f"pgc:{m}"] = lambda cls=getattr(pgc, PEERS[m]): peer(cls)
        lgc = LayerGradCam(model, peer_layer)
        size = (args.image_size, args.image_size)

        def captum_gradcam():
            LayerAttribution.interpolate(lgc.attribute(x, target=targets), size, "bilinear")

        contenders["captum:gradcam"] = captum_gradcam
    try:
        res = run_interleaved(contenders, iters, args.warmup, device, batch)
    finally:
        model.zero_grad(set_to_none=True)  # pytorch-grad-cam backprops into the weights

    rates: dict[str, dict[str, float]] = {}
    for key, r in res.items():
        who, _, m = key.partition(":")
        if m and m != "all":
            rates.setdefault(m, {})[who] = r
    forward_rate, all_rate = res["forward"], res["ours:all"]

    print()
    print(
        f"{'method':<18} {'ours img/s':>11} {'pgc img/s':>10} {'ours/pgc':>9} {'captum img/s':>13} {'ours/captum':>12}"
    )
    for m, r in rates.items():
        pgc_r, cap_r = r.get("pgc"), r.get("captum")
        print(
            f"{m:<18} {r['ours']:>11.1f} "
            + (f"{pgc_r:>10.1f} {r['ours'] / pgc_r:>8.2f}x" if pgc_r else f"{'-':>10} {'-':>9}")
            + (f" {cap_r:>13.1f} {r['ours'] / cap_r:>11.2f}x" if cap_r else f" {'-':>13} {'-':>12}")
        )
    print(f"{'forward only':<18} {forward_rate:>11.1f}")
    one = rates["gradcam"]["ours"]
    print()
    print(
        f"all {len(grad_methods)} gradient methods from one pass: {batch / all_rate * 1000:.1f} ms/batch "
        f"vs gradcam alone {batch / one * 1000:.1f} ms/batch ({one / all_rate:.2f}x the time of one; "
        f"{len(grad_methods)} separate calls would be ~{len(grad_methods)}x)"
    )
    print(f"gradcam vs forward only: {forward_rate / one:.2f}x the time of a forward pass")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
