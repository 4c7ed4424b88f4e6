"""Batched augmentation on the input's device, applied after `to_model_input` (normalised floats).

Per-sample random parameters come from a `torch.Generator`, so a seeded run augments the same way
every time. Centre crop is not here: it is preprocessing in the cache (train = eval = explain).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xraylens.errors import XraylensError
from xraylens.ops import gaussian_blur

AUGMENT_NAMES = ("flip", "affine", "jitter", "elastic")


class GpuAugment(nn.Module):
    """Horizontal flip, affine (rotation + scale), brightness/contrast jitter and elastic deformation.

    - `flip`: probability of a horizontal flip per sample (0 disables).
    - `affine` / `elastic`: the geometric part (one `grid_sample` for both). Affine is applied to
      each sample with probability `p`: rotation uniform in ±`degrees`, scale uniform in `scale`.
      Elastic is applied to each sample with probability `elastic_p` (default: `p`; training uses
      `data.elastic_p`, 0.3): its (alpha, sigma) is drawn per sample, uniformly from
      `elastic_params` (default the one pair (`elastic_alpha`, `elastic_sigma`)); the displacement
      is uniform noise in [-1, 1] per pixel and axis, smoothed by a Gaussian of sigma pixels, times
      alpha pixels (Simard et al. 2003). Pixels from outside the image are filled with 0, which is
      the dataset mean after normalisation. Every channel of a sample gets the same warp, so the
      [original, enhanced] channels of `cat_elastic` stay aligned.
    - `jitter`: per sample, x -> (x - mean_x) * contrast + mean_x + brightness with contrast uniform
      in 1 ± `contrast` and brightness uniform in ± `brightness` (normalised units).
    Identity in eval mode and when every part is disabled.
    """

    def __init__(
        self,
        *,
        flip: float = 0.0,
        affine: bool = False,
        degrees: float = 10.0,
        scale: tuple[float, float] = (0.9, 1.1),
        jitter: bool = False,
        brightness: float = 0.2,
        contrast: float = 0.2,
        elastic: bool = False,
        elastic_alpha: float = 40.0,
        elastic_sigma: float = 6.0,
        elastic_params: Sequence[tuple[float, float]] | None = None,
        elastic_p: float | None = None,
        p: float = 1.0,
        padding_mode: str = "zeros",
        seed: int | None = None,
    ):
        super().__init__()
        if not 0.0 <= flip <= 1.0 or not 0.0 <= p <= 1.0:
            raise XraylensError(f"augment probabilities must be in [0, 1], got flip={flip}, p={p}")
        if not 0 < scale[0] <= scale[1]:
            raise XraylensError(f"augment scale range must be 0 < low <= high, got {scale}")
        pairs = [(float(a), float(sg)) for a, sg in (elastic_params or [(elastic_alpha, elastic_sigma)])]
        if elastic and (not pairs or any(sg <= 0 or a < 0 for a, sg in pairs)):
            raise XraylensError(f"elastic (alpha, sigma) pairs need alpha >= 0 and sigma > 0, got {pairs}")
        elastic_p = p if elastic_p is None else float(elastic_p)
        if not 0.0 <= elastic_p <= 1.0:
            raise XraylensError(f"elastic_p must be in [0, 1], got {elastic_p}")
        self.flip, self.affine, self.degrees, self.scale = float(flip), affine, float(degrees), tuple(scale)
        self.jitter, self.brightness, self.contrast = jitter, float(brightness), float(contrast)
        self.elastic, self.elastic_params, self.elastic_p = elastic, pairs, elastic_p
        self.elastic_alpha, self.elastic_sigma = pairs[0]
        self.p, self.padding_mode, self.seed = float(p), padding_mode, seed
        self._generators: dict[str, torch.Generator] = {}

    @classmethod
    def from_names(cls, names: str | Iterable[str] | None, **kwargs) -> GpuAugment:
        """Build from "flip,affine,jitter,elastic" (any subset, any order; `cat_elastic` = elastic) or "none" / ""."""
        if names is None:
            parts: list[str] = []
        elif isinstance(names, str):
            parts = [n.strip().lower() for n in names.split(",") if n.strip()]
        else:
            parts = [str(n).strip().lower() for n in names if str(n).strip()]
        # the seed workflow's `cat_elastic` names the input ([original, enhanced], see data.enhance)
        # and elastic deformation together; here only its augmentation part counts
        parts = ["elastic" if n == "cat_elastic" else n for n in parts if n != "none"]
        unknown = [n for n in parts if n not in AUGMENT_NAMES]
        if unknown:
            raise XraylensError(
                f"unknown augmentation(s) {unknown}; use a comma list of {', '.join(AUGMENT_NAMES)}, or none"
            )
        enabled = {
            "flip": 0.5 if "flip" in parts else 0.0,
            "affine": "affine" in parts,
            "jitter": "jitter" in parts,
            "elastic": "elastic" in parts,
        }
        if "flip" in kwargs and "flip" in parts:
            enabled["flip"] = kwargs.pop("flip")  # a flip probability given explicitly
        kwargs.pop("flip", None)
        return cls(**enabled, **kwargs)

    @property
    def enabled(self) -> bool:
        return self.flip > 0 or self.jitter or (self.affine and self.p > 0) or (self.elastic and self.elastic_p > 0)

    def extra_repr(self) -> str:
        parts = [f"flip={self.flip}"] if self.flip else []
        if self.affine:
            parts.append(f"affine(degrees={self.degrees}, scale={self.scale})")
        if self.affine:
            parts.append(f"p={self.p}")
        if self.elastic:
            pairs = ",".join(f"{a:g}:{sg:g}" for a, sg in self.elastic_params)
            parts.append(f"elastic(alpha:sigma={pairs}, p={self.elastic_p})")
        if self.jitter:
            parts.append(f"jitter(brightness={self.brightness}, contrast={self.contrast})")
        return ", ".join(parts) or "identity"

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None  # torch's global RNG for that device
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a float batch [B, C, H, W]; returns a new tensor of the same shape (or `x`)."""
        if not self.training or not self.enabled or x.shape[0] == 0:
            return x
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"GpuAugment expects a float [B,C,H,W] batch, got {x.dtype} {list(x.shape)}")
        g = generator if generator is not None else self._generator(x.device)
        gdev = g.device if g is not None else x.device

        def rand(*shape: int) -> torch.Tensor:
            # drawn on the generator's device, then moved (no-op when they match)
            return torch.rand(*shape, generator=g, device=gdev).to(x.device)

        b = x.shape[0]
        # draw every parameter whether used or not, so enabling one part does not reshuffle the others
        u_flip, u_geo, u_rot, u_scale, u_bright, u_con = rand(6, b).unbind(0)
        out = x
        if self.flip > 0:
            out = torch.where((u_flip < self.flip).view(b, 1, 1, 1), out.flip(-1), out)
        if self.affine or self.elastic:
            do_affine = (u_geo < self.p) if self.affine else torch.zeros_like(u_geo, dtype=torch.bool)
            do_elastic = torch.zeros_like(do_affine)
            pick = None
            if self.elastic:
                # drawn only with elastic on, after the six above: turning it on keeps this batch's others
                u_el, u_pick = rand(2, b).unbind(0)
                do_elastic = u_el < self.elastic_p
                pick = (u_pick * len(self.elastic_params)).long().clamp_(max=len(self.elastic_params) - 1)
            sel = torch.nonzero(do_affine | do_elastic).flatten()
            if sel.numel():
                noise = None
                if self.elastic:
                    noise = rand(sel.numel(), 2, *x.shape[-2:])
                    # a sample selected for affine only gets no displacement (its pair index -1)
                    pick = torch.where(do_elastic[sel], pick[sel], torch.full_like(pick[sel], -1))
                warped = self._warp(out[sel], u_rot[sel], u_scale[sel], noise, do_affine[sel], pick)
                out = out.clone() if out is x else out
                out[sel] = warped
        if self.jitter:
            con = (1.0 + (2.0 * u_con - 1.0) * self.contrast).view(b, 1, 1, 1).to(x.dtype)
            bright = ((2.0 * u_bright - 1.0) * self.brightness).view(b, 1, 1, 1).to(x.dtype)
            mu = out.mean(dim=(1, 2, 3), keepdim=True)
            out = (out - mu) * con + mu + bright
        return out

    def _warp(
        self,
        x: torch.Tensor,
        u_rot: torch.Tensor,
        u_scale: torch.Tensor,
        noise: torch.Tensor | None,
        do_affine: torch.Tensor,
        pick: torch.Tensor | None,
    ) -> torch.Tensor:
        n, _, h, w = x.shape
        dtype = torch.float32  # sampling grids in fp32 even under half precision inputs
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        if self.affine and bool(do_affine.any()):
            ang = (2.0 * u_rot - 1.0) * math.radians(self.degrees)
            s = self.scale[0] + u_scale * (self.scale[1] - self.scale[0])
            cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
            # rotation in pixel space, expressed in normalised coordinates (keeps non-square images
            # undistorted): output -> input map is R(-angle) / scale
            a = do_affine.view(n)
            theta[a, 0, 0], theta[a, 0, 1] = cos[a].to(dtype), (sin * (h / w))[a].to(dtype)
            theta[a, 1, 0], theta[a, 1, 1] = (-sin * (w / h))[a].to(dtype), cos[a].to(dtype)
        grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
        if noise is not None and pick is not None:
            # one blur per (alpha, sigma) pair over the samples that drew it; the rest stay undisplaced
            disp = torch.zeros(n, 2, h, w, device=x.device, dtype=dtype)
            for i, (alpha, sigma) in enumerate(self.elastic_params):
                rows = torch.nonzero(pick == i).flatten()
                if rows.numel():
                    disp[rows] = gaussian_blur(noise[rows].to(dtype) * 2.0 - 1.0, sigma) * alpha  # pixels
            # pixels -> normalised units (2 / size); grid's last dim is (x, y)
            scale = torch.tensor([2.0 / w, 2.0 / h], device=x.device, dtype=dtype)
            grid = grid + disp.permute(0, 2, 3, 1) * scale
        out = F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode=self.padding_mode, align_corners=False)
        return out.to(x.dtype)
