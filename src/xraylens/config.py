"""Typed run configuration: dataclasses, YAML in/out and `section.key=value` overrides.

Every setting a run used is resolved into `config.yaml` in the run directory, so evaluate,
explain and localize rebuild exactly the same model and preprocessing from it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from xraylens.errors import XraylensError


@dataclass
class DataConfig:
    path: str = ""
    image_size: int | list[int] = 224  # one side (a square), or [height, width]: "704x407" or [704, 407]
    center_crop: float = 1.0  # keep this central fraction of each side before resizing (seed 001)
    val_fraction: float = 0.15  # used only when the source has no val split
    split_seed: int = 0
    # patient grouping of the automatic val split: a regex on the file name (first group, else the
    # whole match) or a manifest column; images of one group never straddle two splits
    group_pattern: str | None = None
    group_column: str | None = None
    # merge classes into one: "abnormal=osteopenia,osteoporosis" (several merges joined by ";")
    merge_classes: str | None = None
    # a CSV (id,split) that reassigns every image's split; images it does not list are left out
    # (crossval writes one per fold: train, val and the held-out test)
    splits_file: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.25])
    augment: str = "flip,affine,jitter"  # comma list of flip, affine, jitter, elastic; or "none"
    augment_p: float = 1.0  # per-sample probability of the geometric part
    # elastic: the fraction of training images deformed, and the (alpha, sigma) pairs in pixels one is
    # drawn from per image ("alpha:sigma,..."); see data.augment.GpuAugment
    elastic_p: float = 0.3
    elastic_params: str = "34:4,40:6,50:8"
    # a second input channel: "clahe-sobel" = Sobel edge magnitude of the CLAHE image (data.enhance);
    # needs model.in_chans 2. `augment: cat_elastic` sets it, elastic and in_chans 2 together
    enhance: str = "none"
    balanced: bool = False  # class-balanced sampling
    cache_dir: str | None = None
    workers: int | None = None
    # where a split's pixels live while training: auto | gpu | pinned | mmap (data.loader.stage_images)
    placement: str = "auto"


@dataclass
class ModelConfig:
    name: str = "resnet18"
    in_chans: int = 1
    weights: str | None = None  # local pretrained state dict; "hub" asks timm/torchvision (needs internet)
    init_from: str | None = None  # a run dir or .pt: start from its full weights, head included (fine-tuning)
    head_hidden: list[int] = field(default_factory=list)
    train_last: int | None = None  # train only the last N backbone stages (+ head)
    drop_rate: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adam | adamw | sgd | radam
    momentum: float = 0.9
    schedule: str = "cosine"  # cosine | step | none
    step_size: int = 10
    step_gamma: float = 0.1
    loss: str = "ce"  # ce | ce-weighted | focal | focal-seed | bce
    focal_gamma: float = 2.0
    focal_alpha: list[float] | None = None
    select: str = "accuracy"  # best-epoch metric or expression, e.g. "1.5*f2+accuracy"
    early_stopping: int | None = None  # patience in epochs
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision, GPU only
    channels_last: bool = True  # GPU only
    compile: bool = False  # torch.compile the training forward (CUDA only; refused on CPU)
    eval_batch_size: int = 64


@dataclass
class ClinicalConfig:
    """Clinical variables fused with the image (data.clinical, models.fusion); off when mode is none
    and no table is given."""

    file: str | None = None  # CSV with one row per image or patient
    cols: list[str] = field(default_factory=list)  # columns to use; "name:num" / "name:cat" forces a type
    key: str | None = None  # CSV column matching an image's path, file name or file stem
    from_name: str | None = None  # or: a regex with named groups over file names
    mode: str = "none"  # none | early (extra constant input planes) | late (beside pooled features)
    mlp_hidden: list[int] = field(default_factory=list)  # late: the clinical vector through Linear-ReLU first
    allow_leaky: list[str] = field(default_factory=list)  # columns the leakage guard may let through
    leak_threshold: float = 0.9  # one-column out-of-fold balanced accuracy at which a column is refused


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    clinical: ClinicalConfig = field(default_factory=ClinicalConfig)
    classes: list[str] = field(default_factory=list)  # filled in by training, in label order

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d or {})
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise XraylensError(f"unknown config section(s) {sorted(unknown)}; expected data, model, train, clinical")
        return cls(
            data=_build(DataConfig, d.get("data") or {}, "data"),
            model=_build(ModelConfig, d.get("model") or {}, "model"),
            train=_build(TrainConfig, d.get("train") or {}, "train"),
            clinical=_build(ClinicalConfig, d.get("clinical") or {}, "clinical"),
            classes=[str(c) for c in d.get("classes") or []],
        )

    def save(self, path: str | Path) -> None:
        from xraylens.io import write_text

        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise XraylensError(f"config file not found: {path}")
        try:
            d = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise XraylensError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if d is not None and not isinstance(d, dict):
            raise XraylensError(f"{path} must hold a mapping with sections data, model, train")
        return cls.from_dict(d or {})

    def set(self, key: str, value: Any) -> RunConfig:
        """Set `section.key` to a typed value (a path stays the string the user typed)."""
        section, _, name = key.partition(".")
        sec = getattr(self, section, None)
        if not name or sec is None or not dataclasses.is_dataclass(sec):
            raise XraylensError(
                f"setting {key!r}: unknown section {section!r}; use section.key with section "
                "data, model, train or clinical, e.g. train.lr"
            )
        setattr(sec, name, _coerce(type(sec), name, value, section))
        if key == "data.augment" and "cat_elastic" in _tokens(self.data.augment):
            # the seed workflow's preset: input [original, enhanced] + elastic, stored expanded
            self.data.augment = ",".join(dict.fromkeys("elastic" if t == "cat_elastic" else t for t in _tokens(value)))
            self.data.enhance = "clahe-sobel"
            self.model.in_chans = 2
        return self

    def apply(self, values: Mapping[str, Any]) -> RunConfig:
        """Set every `section.key` whose value is not None (command-line options not given are None)."""
        for key, value in values.items():
            if value is not None:
                self.set(key, value)
        return self

    def override(self, assignments: list[str]) -> RunConfig:
        """Apply free-form `section.key=value` strings (`--set`); values are parsed as YAML scalars/lists."""
        for a in assignments:
            if "=" not in a or "." not in a.split("=", 1)[0]:
                raise XraylensError(f"override {a!r} must look like section.key=value, e.g. train.lr=3e-4")
            key, raw = a.split("=", 1)
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
            self.set(key.strip(), value)
        return self

    def diff(self, other: RunConfig) -> dict[str, tuple[Any, Any]]:
        """Settings that differ: `section.key` -> (this value, other value); class lists are ignored
        (training fills them in)."""
        out = {}
        mine, theirs = self.to_dict(), other.to_dict()
        for section in ("data", "model", "train", "clinical"):
            for key, value in mine[section].items():
                if theirs[section].get(key) != value:
                    out[f"{section}.{key}"] = (value, theirs[section].get(key))
        return out

    def check(self) -> None:
        """Every numeric setting within its range; run before any data is decoded."""
        enhance = str(self.data.enhance or "none").strip().lower()
        if enhance not in ("none", "clahe-sobel"):
            raise XraylensError(f"data.enhance {self.data.enhance!r} is unknown; use none or clahe-sobel")
        if enhance != "none" and self.model.in_chans != 2:
            raise XraylensError(
                f"data.enhance {enhance} makes a two-channel input [original, enhanced]: set model.in_chans=2 "
                f"(got {self.model.in_chans}), or use --augment cat_elastic, which sets both"
            )
        if enhance == "none" and self.model.in_chans not in (1, 3):
            raise XraylensError(
                f"{flag_name('model.in_chans')} must be 1 (grey) or 3 (RGB), got {self.model.in_chans} "
                "(2 only with data.enhance clahe-sobel)"
            )
        parse_elastic_params(self.data.elastic_params)
        image_size(self.data.image_size)
        if str(self.clinical.mode).lower() not in ("none", "early", "late"):
            raise XraylensError(f"clinical.mode (--fusion) must be none, early or late, got {self.clinical.mode!r}")
        if any(h < 1 for h in self.clinical.mlp_hidden):
            raise XraylensError(
                f"clinical.mlp_hidden (--clinical-mlp) sizes must be at least 1, got {self.clinical.mlp_hidden}"
            )
        if any(h < 1 for h in self.model.head_hidden):
            raise XraylensError(
                f"{flag_name('model.head_hidden')} sizes must be at least 1, got {self.model.head_hidden}"
            )
        for key, (lo, lo_incl, hi, hi_incl, what) in LIMITS.items():
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            if value is None:
                continue
            if isinstance(value, list):  # [height, width]: each side within the limits
                value = min(value)
            bad = (
                not math.isfinite(value)
                or (lo is not None and (value < lo or (value == lo and not lo_incl)))
                or (hi is not None and (value > hi or (value == hi and not hi_incl)))
            )
            if bad:
                raise XraylensError(f"{flag_name(key)} must be {what}, got {value}")


_FLAGS = {"data.path": "--data", "model.name": "--model"}


def flag_name(key: str) -> str:
    """The command-line spelling of a setting, for messages: `train.lr (--lr)`."""
    return f"{key} ({_FLAGS.get(key, '--' + key.split('.')[-1].replace('_', '-'))})"


# section.key -> (low, low included, high, high included, the rule in words); None = unbounded
LIMITS: dict[str, tuple[float | None, bool, float | None, bool, str]] = {
    "data.image_size": (8, True, None, True, "at least 8 (pixels)"),
    "data.center_crop": (0, False, 1, True, "in (0, 1]"),
    "data.val_fraction": (0, True, 1, False, "in [0, 1)"),
    "data.augment_p": (0, True, 1, True, "in [0, 1]"),
    "data.elastic_p": (0, True, 1, True, "in [0, 1]"),
    "data.workers": (0, True, None, True, "0 or more"),
    "model.train_last": (0, True, None, True, "0 or more"),
    "model.drop_rate": (0, True, 1, False, "in [0, 1)"),
    "train.epochs": (1, True, None, True, "at least 1"),
    "train.batch_size": (1, True, None, True, "at least 1"),
    "train.eval_batch_size": (1, True, None, True, "at least 1"),
    "train.lr": (0, False, None, True, "greater than 0"),
    "train.weight_decay": (0, True, None, True, "0 or more"),
    "train.momentum": (0, True, 1, False, "in [0, 1)"),
    "train.step_size": (1, True, None, True, "at least 1"),
    "train.step_gamma": (0, False, None, True, "greater than 0"),
    "train.focal_gamma": (0, True, None, True, "0 or more"),
    "train.early_stopping": (1, True, None, True, "at least 1 (epochs)"),
    "clinical.leak_threshold": (0, False, 1, True, "in (0, 1]"),
}


def _tokens(text: Any) -> list[str]:
    return [t.strip().lower() for t in str(text or "").split(",") if t.strip()]


def image_size(value: int | list[int]) -> tuple[int, int]:
    """`data.image_size` as (height, width); a list must have two sides."""
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise XraylensError(f"data.image_size must be one side or height,width (e.g. 704x407), got {value}")
    return int(value[0]), int(value[1])


def parse_elastic_params(text: str) -> list[tuple[float, float]]:
    """ "34:4,40:6" -> [(34.0, 4.0), (40.0, 6.0)]: elastic (alpha, sigma) pairs in pixels, alpha >= 0 < sigma."""
    pairs = []
    for part in str(text or "").split(","):
        if not part.strip():
            continue
        a, sep, sg = part.partition(":")
        try:
            pair = (float(a), float(sg)) if sep else None
        except ValueError:
            pair = None
        if pair is None or not all(map(math.isfinite, pair)) or pair[0] < 0 or pair[1] <= 0:
            raise XraylensError(
                f"data.elastic_params {text!r}: each pair must be alpha:sigma in pixels with alpha >= 0 and "
                "sigma > 0, e.g. 34:4,40:6,50:8"
            )
        pairs.append(pair)
    if not pairs:
        raise XraylensError(f"data.elastic_params {text!r} names no alpha:sigma pair; use e.g. 34:4,40:6,50:8")
    return pairs


def _build(cls: type, d: dict[str, Any], section: str):
    if not isinstance(d, dict):
        raise XraylensError(f"config section {section!r} must be a mapping")
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise XraylensError(f"unknown {section} setting(s) {sorted(unknown)}; known: {', '.join(sorted(known))}")
    obj = cls()
    for k, v in d.items():
        setattr(obj, k, _coerce(cls, k, v, section))
    return obj


def _coerce(cls: type, name: str, value: Any, section: str) -> Any:
    """Check `value` against the dataclass field's annotation, converting where it is lossless."""
    hints = typing.get_type_hints(cls)
    if name not in hints:
        known = ", ".join(f.name for f in fields(cls))
        raise XraylensError(f"unknown {section} setting {name!r}; known: {known}")
    tp = hints[name]
    if (section, name) == ("data", "image_size") and isinstance(value, str):
        # "704x407" (height x width) or "704,407" or "224"
        parts = [v for v in value.lower().replace("x", ",").replace("×", ",").split(",") if v.strip()]
        value = parts[0] if len(parts) == 1 else parts
    try:
        return _convert(tp, value)
    except (TypeError, ValueError):
        raise XraylensError(f"{section}.{name}={value!r} is not a valid {_type_name(tp)}") from None


def _convert(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_convert(item, v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(value)
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(value)
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(value)
        return str(value)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
