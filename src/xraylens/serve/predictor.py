"""The server's one model: a worker thread that owns it, takes prepared images from a queue and runs
them through the CAM engine, several at a time when they queue up together.

Why a worker and not a lock: the CAM engine registers hooks on the model, so two passes must never
interleave, and a single owner thread guarantees it. While one pass runs, new requests queue; the next
pass takes every queued image with the same methods and target (up to `max_batch`) at once. Nothing
waits for a batch to fill: an image that arrives alone runs alone. On a 2-core CPU at concurrency 4,
passes of up to 4 images served 18 % more requests/s than one at a time, with a lower p99 (docs/benchmarks.md).
"""

from __future__ import annotations

import base64
import io
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from xraylens.data.records import Geometry
from xraylens.errors import XraylensError
from xraylens.explain.engine import CamEngine
from xraylens.explain.methods import METHODS, resolve_methods
from xraylens.ops import class_probabilities
from xraylens.runs import Run

# Score-CAM runs one forward pass per channel (512 for resnet18): seconds per image on a CPU, so a
# server offers it only when asked to (`methods=`)
SLOW_METHODS = frozenset({"scorecam"})


def default_methods() -> list[str]:
    """The methods a server offers unless told otherwise: every method but the slow ones."""
    return [m for m in METHODS if m not in SLOW_METHODS]


@dataclass
class Prediction:
    """One image's result from the worker: probabilities [K], the explained class, maps [H,W] in [0,1]."""

    probabilities: np.ndarray
    target: int
    maps: dict[str, np.ndarray]
    constant: dict[str, bool]
    batch_size: int
    compute_ms: float  # the model pass this image was part of (queueing excluded)


@dataclass
class _Job:
    image: np.ndarray  # uint8 [H, W], the model's input size
    methods: tuple[str, ...]
    target: str | int
    future: Future


class Predictor:
    """Runs one loaded `Run` for many callers; `submit` is thread-safe, the model is touched only by
    the worker thread. `close()` stops the worker (pending jobs get an error)."""

    def __init__(
        self, run: Run, *, max_batch: int = 4, layers: Sequence[str] | None = None, warm_up: bool = True
    ) -> None:
        if max_batch < 1:
            raise XraylensError(f"max_batch={max_batch} must be at least 1")
        if run.clinical is not None:  # an upload carries no clinical values: refuse at start, not per request
            raise XraylensError(
                f"{run.run_dir} fuses clinical data ({run.config.clinical.mode}); serve takes images only: "
                "use predict --clinical FILE, or serve a run trained with --fusion none"
            )
        self.run = run
        self.inputs = run.inputs
        self.max_batch = max_batch
        # channels-last convolutions are ~10 % faster on a CPU (same results to 1e-6); the model is
        # changed in place, as the server is its only user
        self.channels_last = run.device.type == "cpu"
        if self.channels_last:
            run.model.to(memory_format=torch.channels_last)
        self.engine = CamEngine(run.model, layers)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="xraylens-model", daemon=True)
        self._thread.start()
        if warm_up:  # the first pass allocates; pay for it now, not in the first user's request
            h, w = self.input_size
            self.submit(np.zeros((h, w), np.uint8), ["gradcam"]).result()

    @property
    def input_size(self) -> tuple[int, int]:
        s = self.inputs.image_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    def submit(self, image: np.ndarray, methods: Sequence[str], target: str | int = "pred") -> Future:
        """Queue one prepared image (uint8 [H, W] at the input size); the future holds a `Prediction`."""
        if self._closed:
            raise RuntimeError("the predictor is closed")
        if image.dtype != np.uint8 or image.shape != self.input_size:
            raise ValueError(f"expected uint8 {self.input_size}, got {image.dtype} {image.shape}")
        fut: Future = Future()
        self._queue.put(_Job(image, tuple(resolve_methods(methods)) if methods else (), target, fut))
        return fut

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=30)

    # -- worker --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                break
            jobs, stop = [job], False
            while len(jobs) < self.max_batch * 4:  # take what is waiting now; never wait for more
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
            groups: dict[tuple, list[_Job]] = {}
            for j in jobs:
                groups.setdefault((j.methods, j.target), []).append(j)
            for (methods, target), group in groups.items():
                for i in range(0, len(group), self.max_batch):
                    self._run(group[i : i + self.max_batch], methods, target)
            if stop:
                break
        while True:  # closed: whatever is still queued gets an answer, not a hang
            try:
                j = self._queue.get_nowait()
            except queue.Empty:
                return
            if j is not None:
                j.future.set_exception(RuntimeError("the predictor is closed"))

    def _run(self, jobs: list[_Job], methods: tuple[str, ...], target: str | int) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        t0 = time.perf_counter()
        try:
            x8 = torch.from_numpy(np.stack([j.image for j in live]))[:, None]
            x = self.inputs.to_model(x8, self.run.device, channels_last=self.channels_last)
            maps: dict[str, np.ndarray] = {}
            constant: dict[str, np.ndarray] = {}
            if methods:
                with self.engine:  # hooks only for this pass
                    res = self.engine(x, list(methods), targets=target)
                logits, targets = res.logits, res.targets.cpu().numpy()
                for m in methods:
                    maps[m] = res.maps[m][:, 0].float().cpu().numpy()
                    constant[m] = res.constant[m].cpu().numpy()
            else:
                with torch.inference_mode():
                    logits = self.run.model(x)
                targets = None
            probs = class_probabilities(logits.detach()).cpu().numpy()
            ms = (time.perf_counter() - t0) * 1e3
            for i, j in enumerate(live):
                t = int(targets[i]) if targets is not None else int(probs[i].argmax())
                j.future.set_result(
                    Prediction(
                        probs[i],
                        t,
                        {m: maps[m][i] for m in methods},
                        {m: bool(constant[m][i]) for m in methods},
                        len(live),
                        ms,
                    )
                )
        except BaseException as exc:  # every caller gets the error; the worker lives on
            for j in live:
                if not j.future.done():
                    j.future.set_exception(exc)


# -- the JSON of a prediction ---------------------------------------------------------------------


def png_base64(image: np.ndarray) -> str:
    """uint8 [H, W] (or [H, W, 3]) as a base64 PNG; compression level 1: the maps are small and the
    time matters more than a few kilobytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def map_uint8(cam: np.ndarray) -> np.ndarray:
    """A map in [0, 1] as 8-bit grey levels (value / 255 is the map)."""
    return np.rint(np.clip(np.nan_to_num(cam), 0.0, 1.0) * 255.0).astype(np.uint8)


def peak(cam: np.ndarray, geometry: Geometry, constant: bool) -> dict | None:
    """The map's first maximum (row-major, as the localisation metrics take it) at the pixel centre, in
    input and original pixels (x, y); None for a constant map, which has no peak."""
    if constant:
        return None
    r, c = np.unravel_index(int(np.argmax(cam)), cam.shape)
    xy = np.array([c + 0.5, r + 0.5])
    ox, oy = geometry.to_original(xy)
    return {"input": [float(xy[0]), float(xy[1])], "original": [round(float(ox), 2), round(float(oy), 2)]}


def prediction_json(pred: Prediction, classes: Sequence[str], image: np.ndarray, geometry: Geometry, fmt: str) -> dict:
    """The /predict answer for one image (timings are added by the caller)."""
    probs = [float(p) for p in pred.probabilities]
    k = int(np.argmax(probs))
    return {
        "class": classes[k],
        "class_index": k,
        "probability": probs[k],
        "probabilities": dict(zip(classes, probs, strict=True)),
        "explained_class": classes[pred.target] if 0 <= pred.target < len(classes) else None,
        "image": {
            "format": fmt,
            "width": geometry.orig_w,
            "height": geometry.orig_h,
            "crop": [round(float(v), 3) for v in geometry.crop],
        },
        "input": {"width": geometry.out_w, "height": geometry.out_h, "png": png_base64(image)},
        "cams": {
            m: {
                "png": png_base64(map_uint8(cam)),
                "peak": peak(cam, geometry, pred.constant[m]),
                "constant": pred.constant[m],
            }
            for m, cam in pred.maps.items()
        },
    }
