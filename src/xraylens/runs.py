"""A run directory, opened once: config, classes, model, input settings, data and split loader.

Every command that reads a run (evaluate, predict, explain, localize, demo) goes through `open_run`,
and every API function accepts either a run path or the `Run` it returns, so a caller that chains
several steps loads the model once.

Checkpoints hold only tensors and plain Python values so that they load with
`torch.load(..., weights_only=True)`: no pickled classes, ever.

Paths: training stores `data.path`, `data.cache_dir` and `model.weights` as absolute paths, so a run
directory works from any working directory. Runs written before that stored paths relative to where
`train` was typed; those are looked up relative to the current directory, then beside the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xraylens.config import RunConfig
from xraylens.data.cache import CachedSplit, load_split, prepare_image
from xraylens.data.enhance import add_enhanced_channel
from xraylens.data.loader import iterate_batches, to_model_input
from xraylens.data.records import Geometry, SourceSet
from xraylens.data.relabel import apply_splits_file, merge_classes
from xraylens.data.sources import is_plain_image_folder, load_image_folder, load_source
from xraylens.errors import XraylensError
from xraylens.models.fusion import clinical_batch, forward_with
from xraylens.runtime import resolve_device

CHECKPOINT_FORMAT = 1
CHECKPOINTS = ("best", "last")


@dataclass(frozen=True)
class InputSettings:
    """How an image becomes model input: identical at train, evaluate, explain and predict time."""

    image_size: int | tuple[int, int] | list[int]  # one side, or (height, width)
    center_crop: float
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    enhance: str = "none"  # "clahe-sobel": input [original, enhanced] (data/enhance.py)

    @classmethod
    def from_config(cls, config: RunConfig) -> InputSettings:
        return cls(
            image_size=config.data.image_size,
            center_crop=config.data.center_crop,
            in_chans=config.model.in_chans,
            mean=tuple(config.data.mean),
            std=tuple(config.data.std),
            enhance=config.data.enhance,
        )

    def to_model(
        self, x_uint8: torch.Tensor, device: torch.device | str | None = None, channels_last: bool = False
    ) -> torch.Tensor:
        """uint8 [B,1,H,W] from the cache -> normalised float model input on `device`.

        With `enhance`, the second channel (CLAHE + Sobel of the same uint8 image) is added here, the one
        conversion every command uses, so training, evaluation, explanation and serving agree."""
        if self.enhance != "none":
            x_uint8 = add_enhanced_channel(x_uint8, self.enhance)
        return to_model_input(
            x_uint8, in_chans=self.in_chans, mean=self.mean, std=self.std, device=device, channels_last=channels_last
        )

    def prepare(self, image: str | Path | np.ndarray) -> tuple[np.ndarray, Geometry]:
        """One file (or uint8 array) through the cache's own crop and resize: uint8 [H, W] + geometry."""
        return prepare_image(image, self.image_size, self.center_crop)


def find_checkpoint(run_dir: str | Path, which: str = "best") -> Path:
    """`RUN/checkpoints/<which>.pt`, or `run_dir` itself when it is a checkpoint file."""
    if which not in CHECKPOINTS:
        raise XraylensError(f"--checkpoint {which!r}: use best or last")
    run_dir = Path(run_dir)
    if run_dir.is_file():
        return run_dir
    if not run_dir.is_dir():
        raise XraylensError(f"run directory not found: {run_dir}")
    path = run_dir / "checkpoints" / f"{which}.pt"
    if not path.is_file():
        raise XraylensError(f"{path} not found: is {run_dir} a finished xraylens run? (train writes it)")
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's dict, weights-only; a corrupt or foreign file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise XraylensError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, or a pickle that is not weights-only
        raise XraylensError(f"cannot load checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise XraylensError(f"{path} is not an xraylens checkpoint (no model/config entries)")
    return ckpt


def build_model(config: RunConfig, *, weights: bool = True, clinical_features: int = 0) -> nn.Module:
    """The model a config describes (pretrained weights only when training starts); with clinical
    fusion (`clinical.mode` early/late) the zoo model wrapped for `clinical_features` inputs."""
    from xraylens.models.fusion import fuse_model
    from xraylens.models.registry import create_model

    m = config.model
    pretrained: bool | str = False
    if weights and m.weights:
        pretrained = True if m.weights == "hub" else m.weights
    model = create_model(
        m.name,
        num_classes=len(config.classes),
        in_chans=m.in_chans,
        pretrained=pretrained,
        head_hidden=tuple(m.head_hidden),
        train_last=m.train_last,
        drop_rate=m.drop_rate,
        image_size=config.data.image_size,
    )
    c = config.clinical
    if c.mode == "none":
        return model
    return fuse_model(
        model, c.mode, clinical_features, mlp_hidden=c.mlp_hidden, head_hidden=m.head_hidden, drop_rate=m.drop_rate
    )


@torch.no_grad()
def predict_logits(
    model: nn.Module, cached: CachedSplit, inputs: InputSettings, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    """Logits [N, K] (float32, numpy) for every image of a cached split, in cache order.

    The one inference path shared by training's validation, `evaluate` and the report."""
    was_training = model.training
    model.eval()
    out = []
    for x, _, idx in iterate_batches(cached, batch_size, shuffle=False):
        z = clinical_batch(cached.clinical, idx, device)
        out.append(forward_with(model, inputs.to_model(x, device), z).float().cpu())
    model.train(was_training)
    if not out:
        return np.zeros((0, getattr(model, "num_classes", 0)), dtype=np.float32)
    return torch.cat(out).numpy()


def ce_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """Plain cross-entropy, reported as `loss` whatever the training loss was (comparable across runs)."""
    if len(labels) == 0:
        return float("nan")
    t = torch.from_numpy(logits)
    if t.shape[1] == 1:  # one BCE logit: the loss of the two-class reading
        t = torch.cat([torch.zeros_like(t), t], dim=1)
    return float(F.cross_entropy(t, torch.from_numpy(labels).long()).item())


def open_source(config: RunConfig, data: str | Path | None = None, *, grouped: bool = True) -> SourceSet:
    """The records of `data` (default: the config's data) with the config's val split, and with its
    patient grouping when `grouped` (the run's own data: its val split is then exactly the one trained
    with; other data need not follow the training set's naming). A plain folder of images (no class
    folders) is one unlabelled split "all"."""
    d = config.data
    path = data if data is not None else d.path
    if not path:
        raise XraylensError("no data given: pass --data DIR (folder splits, a CSV manifest or an .npz)")
    if is_plain_image_folder(path):
        return load_image_folder(path)
    return config_source(config, path, grouped=grouped)


def config_source(config: RunConfig, data: str | Path | None = None, *, grouped: bool = True) -> SourceSet:
    """`load_source` of `data` (default: the config's) with the config's val split and, when `grouped`,
    its patient grouping: the one place a config becomes a dataset's records."""
    d = config.data
    own = data is None or (bool(d.path) and Path(data).expanduser().resolve() == Path(d.path).expanduser().resolve())
    source = load_source(
        data if data is not None else d.path,
        val_fraction=0.0 if d.splits_file and own else d.val_fraction,
        seed=d.split_seed,
        group_pattern=d.group_pattern if grouped else None,
        group_column=d.group_column if grouped else None,
    )
    # classes merged for every data (the model's outputs are the merged classes); the splits file
    # belongs to the run's own data only
    merge_classes(source, d.merge_classes)
    return apply_splits_file(source, d.splits_file) if own else source


def cached_split(config: RunConfig, source: SourceSet, split: str, *, progress: bool = False) -> CachedSplit:
    """One split of `source`, decoded through the config's crop and resize (from the cache when it can)."""
    d = config.data
    if source.kind != "images" and split not in source.splits:
        raise XraylensError(
            f"{source.root} has no {split!r} split (found: {', '.join(source.splits)}); pick one with --split"
        )
    return load_split(
        source,
        "all" if source.kind == "images" else split,
        d.image_size,
        center_crop=d.center_crop,
        cache_dir=d.cache_dir,
        workers=d.workers,
        progress=progress,
    )


def load_data_split(
    config: RunConfig, data: str | Path | None, split: str, *, progress: bool = False, grouped: bool = True
) -> tuple[SourceSet, CachedSplit]:
    """A split of `data` (default: the config's data) through the config's own preprocessing.

    A plain folder of images is one unlabelled split "all" (`source.kind == "images"`) whatever
    `split` says: explain and localize accept it, evaluate does not."""
    source = open_source(config, data, grouped=grouped)
    if source.kind != "images" and config.classes and list(source.classes) != list(config.classes):
        raise XraylensError(f"classes of {source.root} {source.classes} differ from the run's {config.classes}")
    return source, cached_split(config, source, split, progress=progress)


@dataclass
class Run:
    """A trained run, loaded: the model in eval mode on `device`, and everything to feed it."""

    run_dir: Path
    config: RunConfig
    model: nn.Module
    device: torch.device
    epoch: int
    checkpoint: Path
    # the train-fitted clinical preprocessing (data.clinical.ClinicalPreprocessor) of a fused run, and
    # an optional other table (same key and columns) for data the run's own table does not cover
    clinical: Any = None
    clinical_file: str | Path | None = None

    @property
    def classes(self) -> list[str]:
        return self.config.classes

    @property
    def inputs(self) -> InputSettings:
        return InputSettings.from_config(self.config)

    @property
    def data_path(self) -> Path:
        """The data the run was trained on, found from any working directory."""
        p = Path(self.config.data.path)
        if p.is_absolute() or p.exists():
            return p
        beside = self.run_dir / p
        return beside if beside.exists() else p

    def load_split(
        self, data: str | Path | None = None, split: str = "test", progress: bool = False
    ) -> tuple[SourceSet, CachedSplit]:
        """A split of `data` (default: the run's own data) through the run's preprocessing."""
        own = data is None
        source, cached = load_data_split(
            self.config, self.data_path if own else data, split, progress=progress, grouped=own
        )
        if self.clinical is not None:  # fused run: each image's clinical features, the run's transform
            from xraylens.data.clinical import attach_clinical, table_for_run

            table = table_for_run(self.config.clinical, source.root, cached.ids, self.clinical_file)
            cached = attach_clinical(self.clinical, table, source.root, cached)
        return source, cached

    def predict_logits(self, cached: CachedSplit, batch_size: int | None = None) -> np.ndarray:
        return predict_logits(
            self.model, cached, self.inputs, self.device, batch_size or self.config.train.eval_batch_size
        )


RunLike = str | Path | Run


def open_run(run: RunLike, which: str = "best", device: str = "auto") -> Run:
    """Load a run directory (or a .pt checkpoint) once; a `Run` passes through unchanged."""
    if isinstance(run, Run):
        return run
    path = find_checkpoint(run, which)
    ckpt = read_checkpoint(path)
    config = RunConfig.from_dict(ckpt["config"])
    clinical = None
    if (ckpt.get("state") or {}).get("clinical") and config.clinical.mode != "none":
        from xraylens.data.clinical import ClinicalPreprocessor

        clinical = ClinicalPreprocessor.from_dict(ckpt["state"]["clinical"])
    model = build_model(config, weights=False, clinical_features=clinical.width if clinical else 0)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise XraylensError(f"{path} does not fit model {config.model.name}: {str(e).splitlines()[0]}") from None
    dev = resolve_device(device)
    model.to(dev).eval()
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return Run(run_dir, config, model, dev, int(ckpt.get("epoch", 0)), path, clinical)
