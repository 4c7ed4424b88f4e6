"""The enhanced channel of a two-channel input [original, enhanced] (`data.enhance`, `cat_elastic`).

Recipe (`clahe-sobel`), applied to the model-size uint8 image the cache holds (after the centre crop
and resize, so every command computes it from the same pixels):

1. CLAHE: ``c = skimage.exposure.equalize_adapthist(x, kernel_size=None, clip_limit=0.01, nbins=256)``
   (float in [0, 1]; tiles of 1/8 of each side, scikit-image's defaults);
2. Sobel edge magnitude: ``e = skimage.filters.sobel(c)`` (sqrt of the squared horizontal and vertical
   Sobel responses / sqrt(2), borders reflected);
3. back to uint8 with a per-image stretch: ``round(255 * e / max(e))`` (an image without edges is 0).

The channel is built where the cached uint8 image becomes model input (`runs.InputSettings.to_model`),
the one conversion that training, evaluate, predict, explain, localize and serve all call, so no
command can see a different second channel. Results are memoised per image content (a bounded LRU),
so training recomputes nothing after its first epoch.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np
import torch

from xraylens.errors import XraylensError

ENHANCE_NAMES = ("none", "clahe-sobel")
CLAHE_CLIP = 0.01
CLAHE_BINS = 256
MEMO_BYTES = 256 * 1024**2  # enough for ~25,000 images of 96x96 or ~5,000 of 224x224


def check_enhance(name: str) -> str:
    """The canonical name of an enhancement; a wrong one is a one-line error."""
    key = str(name or "none").strip().lower().replace("_", "-")
    if key not in ENHANCE_NAMES:
        raise XraylensError(f"data.enhance {name!r} is unknown; use one of {', '.join(ENHANCE_NAMES)}")
    return key


def clahe_sobel(image: np.ndarray) -> np.ndarray:
    """The enhanced channel (uint8 [H, W]) of one uint8 [H, W] image, as the module docstring says."""
    from skimage import exposure, filters

    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"clahe_sobel needs a uint8 [H, W] image, got {image.dtype} {image.shape}")
    if image.max() == image.min():
        return np.zeros_like(image)  # CLAHE of a constant image is constant: no edges
    c = exposure.equalize_adapthist(image, kernel_size=None, clip_limit=CLAHE_CLIP, nbins=CLAHE_BINS)
    e = filters.sobel(c)
    top = float(e.max())
    if top <= 0:
        return np.zeros_like(image)
    return np.rint(255.0 * e / top).astype(np.uint8)


class _Memo:
    """A thread-safe LRU of enhanced channels keyed by the image's bytes (bounded in bytes)."""

    def __init__(self, max_bytes: int = MEMO_BYTES):
        self.max_bytes = max_bytes
        self.items: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, image: np.ndarray) -> np.ndarray:
        h = hashlib.blake2b(repr(image.shape).encode(), digest_size=16)
        h.update(image.tobytes())
        key = h.digest()
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
                return hit
        out = clahe_sobel(image)
        with self.lock:
            if key not in self.items:
                self.items[key] = out
                self.bytes += out.nbytes
                while self.bytes > self.max_bytes and self.items:
                    _, old = self.items.popitem(last=False)
                    self.bytes -= old.nbytes
        return out


_MEMO = _Memo()


def add_enhanced_channel(x_uint8: torch.Tensor, enhance: str = "clahe-sobel") -> torch.Tensor:
    """uint8 [B, 1, H, W] (or [B, H, W]) -> uint8 [B, 2, H, W] = [original, enhanced], on x's device."""
    if check_enhance(enhance) == "none":
        return x_uint8
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"add_enhanced_channel expects uint8 images, got {x_uint8.dtype}")
    if x_uint8.ndim == 3:
        x_uint8 = x_uint8.unsqueeze(1)
    if x_uint8.ndim != 4 or x_uint8.shape[1] != 1:
        raise ValueError(f"add_enhanced_channel expects [B,1,H,W], got {list(x_uint8.shape)}")
    arr = x_uint8[:, 0].cpu().numpy()
    enh = np.stack([_MEMO.get(np.ascontiguousarray(a)) for a in arr]) if len(arr) else arr.copy()
    return torch.cat([x_uint8, torch.from_numpy(enh)[:, None].to(x_uint8.device)], dim=1)
