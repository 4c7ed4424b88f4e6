"""Pretrained weights: local ImageNet state dicts (``--weights PATH``) and a fail-fast hub path.

One loader serves every family (timm, torchvision and our own): it adapts the stem conv to
``in_chans``, skips the ImageNet classifier and reports a file that does not fit in one line.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from xraylens.errors import XraylensError
from xraylens.models.arch import Arch

_HOSTS = {"timm": "huggingface.co", "torchvision": "download.pytorch.org"}
_TRUE = {"1", "true", "yes", "on"}


def _preview(keys: list[str], n: int = 3) -> str:
    more = f", +{len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _reachable(host: str, port: int = 443, timeout: float = 1.0) -> bool:
    """True if a TCP connect to ``host`` succeeds within ``timeout`` s, DNS included.

    The connect runs in a daemon thread because ``getaddrinfo`` ignores socket timeouts and a
    dead resolver can block for many seconds.
    """
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except Exception:  # any failure to connect means "offline" here
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def check_online(source: str, model_name: str) -> None:
    """Raise at once (< ~1 s) if the weights host cannot be reached."""
    host = _HOSTS[source]
    hint = (
        f"download the ImageNet {model_name} state dict on a connected machine and pass the file "
        f"with --weights PATH (pretrained='PATH' in Python), or train from scratch without pretrained weights"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        raise XraylensError(f"pretrained weights need {host} but HF_HUB_OFFLINE is set; {hint}")
    if not _reachable(host):
        raise XraylensError(f"pretrained weights need {host}, which cannot be reached in 1 s (offline?); {hint}")


def check_hub(hub: tuple[str, str] | None, model_name: str) -> tuple[str, str]:
    """Raise unless ``pretrained=True`` can work (the model has hub weights and the host answers);
    return ``hub``."""
    if hub is None:
        raise XraylensError(
            f"{model_name} has no ImageNet weights; use pretrained=False (or --weights PATH for your own file)"
        )
    check_online(hub[0], model_name)
    return hub


def load_hub_weights(model: nn.Module, arch: Arch, model_name: str, hub: tuple[str, str]) -> None:
    """``pretrained=True``: fetch the ImageNet state dict named by ``hub`` and load it."""
    source, hub_name = hub
    try:
        if source == "timm":
            import timm

            state = timm.create_model(hub_name, pretrained=True).state_dict()
        else:
            import torchvision

            state = torchvision.models.get_model_weights(hub_name).DEFAULT.get_state_dict(progress=False)
    except Exception as e:  # network drop, proxy, hash mismatch...
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise XraylensError(
            f"could not download {hub_name} weights ({msg}); pass a local file with --weights PATH"
        ) from None
    load_state(model, arch, state, model_name, f"hub weights {hub_name}")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or weights-only torch file; unwrap ``state_dict``/``model``/DDP."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise XraylensError(f"weights file not found: {p}; pass an existing ImageNet state dict with --weights PATH")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or a pickle that is more than tensors
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise XraylensError(
            f"cannot read weights file {p} ({msg}); save it with torch.save(model.state_dict(), PATH)"
        ) from None
    # Training checkpoints often wrap the state dict; accept the common wrappers.
    for k in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping):
            obj = obj[k]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise XraylensError(
            f"{p} does not hold a state dict of tensors; save it with torch.save(model.state_dict(), PATH)"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights_file(model: nn.Module, arch: Arch, path: str | os.PathLike[str], model_name: str) -> None:
    """``pretrained=PATH``: load a local ImageNet state dict of the base architecture."""
    load_state(model, arch, read_state_dict(path), model_name, str(path))


def adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Map an RGB conv kernel [O, 3, k, k] to ``in_chans`` inputs.

    One channel: sum over RGB, so a grey image (R = G = B) gives the same activations as before.
    Other counts: repeat RGB and rescale so the summed response keeps its magnitude (timm's rule).
    """
    if weight.shape[1] == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def load_state(model: nn.Module, arch: Arch, state: Mapping[str, torch.Tensor], model_name: str, origin: str) -> None:
    """Load ``state`` into ``model``: adapt the stem, skip the classifier, allow only SE keys missing."""
    if arch.remap is not None:
        state = {arch.remap(k): v for k, v in state.items()}

    def is_head(k: str) -> bool:
        return k.startswith(arch.head + ".")

    def is_new(k: str) -> bool:
        return any(k.startswith(p + ".") for p in arch.new_prefixes)

    target = model.state_dict()
    stem_key = arch.stem + ".weight"
    fitted: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for k, v in state.items():
        if is_head(k):
            continue  # the ImageNet classifier; ours has num_classes outputs
        if k not in target:
            unexpected.append(k)
            continue
        if k == stem_key and v.ndim == 4:
            v = adapt_stem(v, target[k].shape[1])
        if v.shape != target[k].shape:
            mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}")
            continue
        fitted[k] = v
    # num_batches_tracked is absent from old torchvision files and harmless to leave at 0.
    missing = [
        k
        for k in target
        if k not in fitted
        and not is_head(k)
        and not is_new(k)
        and not k.endswith("num_batches_tracked")
        and k not in {m.split(" ")[0] for m in mismatched}
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_preview(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_preview(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} wrong shape ({_preview(mismatched)})")
        raise XraylensError(
            f"weights {origin} do not fit {model_name}: {'; '.join(parts)}; "
            f"pass the ImageNet state dict of {model_name} with --weights PATH"
        )
    model.load_state_dict(fitted, strict=False)
