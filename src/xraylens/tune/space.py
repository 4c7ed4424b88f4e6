"""The search space of `xraylens tune`: which settings each trial samples, in which range.

A dimension is named by its `section.key` setting (e.g. `train.lr`) or by the one tuner-only name
`focal_alpha_scale`. Every value a trial samples is written into an ordinary `RunConfig`, so a trial is
an ordinary run and the best one's `config.yaml` trains again with `xraylens train --config`.

`focal_alpha_scale` (s) sets the per-class focal weights `train.focal_alpha` to s times the balanced
class weights n / (K * n_c) of the trial's training split (the KL-grading original's "alpha scaling
factor" times its class weights). The class ratios are therefore always the balanced ones and s scales
the whole loss: with SGD that acts like a learning-rate factor; with SGD, Adam and RAdam (weight decay
added to the gradient) it also shifts the weight of the decay; with AdamW (decoupled decay) it changes
almost nothing, since Adam normalises the gradient scale.

A space file (YAML) changes the built-in space::

    replace: false            # true: search only the dimensions below (default: add to / change the built-in ones)
    search:
      train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}   # a float range (log: sample the exponent evenly)
      train.batch_size: [16, 32]                          # choices (also written {choices: [16, 32]})
      model.drop_rate: {low: 0.0, high: 0.5, step: 0.1}
      train.weight_decay: null                            # drop a built-in dimension
    fixed:                     # settings every trial uses (after --config and --set)
      train.loss: focal-seed

Every entry is checked against the settings' types and ranges before any trial starts.
"""

from __future__ import annotations

import copy
import math
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from xraylens.config import RunConfig
from xraylens.errors import XraylensError

ALPHA_SCALE = "focal_alpha_scale"
FOCAL_LOSSES = ("focal", "focal-seed")
# machine-specific or meaningless to search: where the data is, where it runs, the cache
NOT_SEARCHABLE = frozenset({"data.path", "data.cache_dir", "data.workers", "train.device"})
SPACE_KEYS = ("replace", "search", "fixed")


@dataclass(frozen=True)
class Dim:
    """One searched setting: a numeric range (`low`..`high`, optionally `log` or `step`) or `choices`."""

    name: str
    kind: str  # "float" | "int" | "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """Sample this dimension from an Optuna trial."""
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def describe(self) -> str:
        if self.kind == "categorical":
            return "{" + ", ".join(map(str, self.choices)) + "}"
        extra = ", log" if self.log else (f", step {self.step:g}" if self.step else "")
        return f"[{self.low:g}, {self.high:g}]{extra}"

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        d: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            d["log"] = True
        if self.step:
            d["step"] = self.step
        return d


# The KL-grading original searched focal gamma in [1.5, 2.5] and the alpha scale in [0.1, 3.0]; the issue
# widens gamma to [1, 3] and adds the optimiser settings.
DEFAULT_DIMS = (
    Dim("train.focal_gamma", "float", 1.0, 3.0),
    Dim(ALPHA_SCALE, "float", 0.1, 3.0),
    Dim("train.lr", "float", 1e-4, 1e-2, log=True),
    Dim("train.weight_decay", "float", 1e-6, 1e-2, log=True),
    Dim("train.batch_size", "categorical", choices=(16, 32, 64)),
    Dim("train.optimizer", "categorical", choices=("adamw", "adam", "sgd")),
)
DEFAULT_FIXED = {"train.loss": "focal"}


@dataclass
class SearchSpace:
    """The dimensions sampled per trial and the settings fixed for every trial."""

    dims: tuple[Dim, ...] = DEFAULT_DIMS
    fixed: dict[str, Any] | None = None
    source: str = "built-in"  # the space file, for messages

    def __post_init__(self) -> None:
        if self.fixed is None:
            self.fixed = dict(DEFAULT_FIXED)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dims]

    def to_dict(self) -> dict[str, Any]:
        """A canonical form, stored with the study so a resumed or joining worker can be compared."""
        return {"search": {d.name: d.to_dict() for d in self.dims}, "fixed": dict(self.fixed or {})}

    def base(self, cfg: RunConfig) -> RunConfig:
        """`cfg` with the fixed settings applied (a copy)."""
        out = copy.deepcopy(cfg)
        for key, value in (self.fixed or {}).items():
            out.set(key, value)
        return out

    def suggest(self, trial: Any) -> dict[str, Any]:
        return {d.name: d.suggest(trial) for d in self.dims}

    def trial_config(
        self, cfg: RunConfig, params: dict[str, Any], class_counts: typing.Callable[[RunConfig], list[int]]
    ) -> RunConfig:
        """The config of one trial: `cfg` + fixed settings + the sampled `params`. `class_counts(cfg)`
        gives the training images per class, for `focal_alpha_scale`."""
        out = self.base(cfg)
        scale = None
        for name, value in params.items():
            if name == ALPHA_SCALE:
                scale = float(value)
            else:
                out.set(name, value)
        if scale is not None:
            out.train.focal_alpha = alpha_from_scale(scale, class_counts(out))
        return out

    def check(self, cfg: RunConfig) -> None:
        """Every range end and every choice yields a valid config (names, ranges, types), and focal
        settings are searched only with a focal loss: one-line errors before any trial starts."""
        from xraylens.train.loop import check_config

        base = self.base(cfg)
        for d in self.dims:
            if d.name == ALPHA_SCALE:
                continue  # checked as a range when loaded (> 0)
            values = d.choices if d.kind == "categorical" else (d.low, d.high)
            for v in values:
                trial_cfg = copy.deepcopy(base)
                try:
                    trial_cfg.set(d.name, v)
                    check_config(trial_cfg)
                except XraylensError as e:
                    raise XraylensError(f"{self.source}: {d.name} value {v!r} is not usable: {e}") from None
        searched_loss = "train.loss" in self.names
        focal = [n for n in self.names if n in ("train.focal_gamma", ALPHA_SCALE)]
        if focal and not searched_loss and base.train.loss.replace("_", "-") not in FOCAL_LOSSES:
            raise XraylensError(
                f"{self.source}: {' and '.join(focal)} searched but the loss is {base.train.loss!r}; use loss "
                "focal or focal-seed, or drop them from the space (write e.g. train.focal_gamma: null under search:)"
            )


def alpha_from_scale(scale: float, counts: list[int]) -> list[float]:
    """`scale` times the balanced class weights n / (K * n_c), rounded so config.yaml stays readable."""
    from xraylens.train.losses import balanced_class_weights

    w = balanced_class_weights(counts, len(counts)).tolist()
    return [round(scale * x, 6) for x in w]


def load_space(path: str | Path | None) -> SearchSpace:
    """The built-in space (`path` None) or the built-in one changed by a YAML space file."""
    if path is None:
        return SearchSpace()
    path = Path(path)
    src = f"--space {path}"
    if not path.is_file():
        raise XraylensError(f"{src}: no such file; pass a YAML search-space file (see README, tune)")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise XraylensError(f"{src} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise XraylensError(f"{src} is not a UTF-8 text file; pass a YAML search-space file") from None
    return parse_space(doc or {}, src)


def parse_space(doc: Any, source: str = "space") -> SearchSpace:
    """Build a SearchSpace from the mapping of a space file (see the module docstring)."""
    if not isinstance(doc, dict):
        raise XraylensError(f"{source} must hold a mapping with keys {', '.join(SPACE_KEYS)}")
    unknown = [k for k in doc if k not in SPACE_KEYS]
    if unknown:
        hint = " (put settings under search: or fixed:)" if any("." in str(k) for k in unknown) else ""
        raise XraylensError(f"{source}: unknown key(s) {unknown}; use {', '.join(SPACE_KEYS)}{hint}")
    replace = doc.get("replace", False)
    if not isinstance(replace, bool):
        raise XraylensError(f"{source}: replace must be true or false, got {replace!r}")
    search = doc.get("search") or {}
    fixed_in = doc.get("fixed") or {}
    for what, m in (("search", search), ("fixed", fixed_in)):
        if not isinstance(m, dict):
            raise XraylensError(f"{source}: {what} must be a mapping of section.key entries, got {type(m).__name__}")

    dims = {} if replace else {d.name: d for d in DEFAULT_DIMS}
    fixed = {} if replace else dict(DEFAULT_FIXED)
    for name, spec in search.items():
        name = str(name)
        if spec is None:
            if name not in dims:
                raise XraylensError(f"{source}: {name}: null drops a built-in dimension, but {name} is not searched")
            del dims[name]
            continue
        dims[name] = parse_dim(name, spec, source)
    for key, value in fixed_in.items():
        key = str(key)
        _field_type(key, source)
        if key in NOT_SEARCHABLE:
            raise XraylensError(f"{source}: fixed {key} is given on the command line (--data, --device), not here")
        try:
            RunConfig().set(key, value)
        except XraylensError as e:
            raise XraylensError(f"{source}: fixed {key}: {e}") from None
        fixed[key] = value
    for key in [k for k in fixed if k in dims and k not in fixed_in]:
        del fixed[key]  # searching a setting the built-in space fixes (the loss) replaces that fixed value
    both = sorted(set(dims) & set(fixed))
    if both:
        raise XraylensError(f"{source}: {', '.join(both)} is both searched and fixed; keep one")
    if not dims:
        raise XraylensError(f"{source}: the space searches nothing; add entries under search:")
    return SearchSpace(tuple(dims.values()), fixed, source)


def parse_dim(name: str, spec: Any, source: str = "space") -> Dim:
    """One `search:` entry -> Dim, checked against the setting's type."""
    where = f"{source}: {name}"
    if name == ALPHA_SCALE:
        tp: Any = float
    else:
        tp = _field_type(name, source)
        if name in NOT_SEARCHABLE:
            raise XraylensError(f"{where} cannot be searched (it says where the data is or where training runs)")
    if isinstance(spec, (list, tuple)):
        spec = {"choices": list(spec)}
    if not isinstance(spec, dict):
        raise XraylensError(
            f"{where}: give a range {{low: .., high: ..}} or a list of choices, not {spec!r} "
            "(a single value belongs under fixed:)"
        )
    keys = set(spec)
    if "choices" in keys:
        extra = keys - {"choices"}
        if extra:
            raise XraylensError(f"{where}: choices cannot be combined with {sorted(extra)}")
        return _categorical(name, spec["choices"], tp, where)
    allowed = {"low", "high", "log", "step"}
    if keys - allowed or not {"low", "high"} <= keys:
        raise XraylensError(
            f"{where}: a range needs low and high (optionally log or step); got keys {sorted(keys)}; "
            "or give choices: [...]"
        )
    base = _numeric_base(tp)
    if base is None:
        raise XraylensError(
            f"{where} is a {_type_name(tp)} setting: give choices, e.g. {name}: [a, b], not a low/high range"
        )
    low = _number(spec["low"], base, f"{where} low")
    high = _number(spec["high"], base, f"{where} high")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise XraylensError(f"{where}: log must be true or false, got {log!r}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, base, f"{where} step")
        if step <= 0:
            raise XraylensError(f"{where}: step must be greater than 0, got {step}")
        if log:
            raise XraylensError(f"{where}: give log or step, not both")
    if not low < high:
        raise XraylensError(
            f"{where}: low {low} must be below high {high} (inverted or empty range); "
            "to keep one value put it under fixed:"
        )
    if log and low <= 0:
        raise XraylensError(f"{where}: a log range needs low > 0, got {low}")
    if name == ALPHA_SCALE and low <= 0:
        raise XraylensError(f"{where}: the alpha scale must be greater than 0, got low {low}")
    return Dim(name, "int" if base is int else "float", low, high, log=log, step=step)


def _categorical(name: str, choices: Any, tp: Any, where: str) -> Dim:
    if not isinstance(choices, (list, tuple)) or not choices:
        raise XraylensError(f"{where}: choices must be a non-empty list")
    out = []
    for c in choices:
        try:
            value = RunConfig().set(name, c) if name != ALPHA_SCALE else None
            v = _typed_value(value, name) if value is not None else float(c)
        except (XraylensError, TypeError, ValueError):
            raise XraylensError(f"{where}: choice {c!r} is not a valid {_type_name(tp)}") from None
        if name == ALPHA_SCALE and not (math.isfinite(v) and v > 0):
            raise XraylensError(f"{where}: the alpha scale must be greater than 0, got choice {c!r}")
        # Optuna stores choices as None/bool/int/float/str: a list-valued setting is kept as "a,b"
        out.append(",".join(map(str, v)) if isinstance(v, list) else v)
    if len(set(map(repr, out))) != len(out):
        raise XraylensError(f"{where}: choices {list(choices)} repeat a value")
    return Dim(name, "categorical", choices=tuple(out))


def _typed_value(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


def _field_type(key: str, source: str) -> Any:
    section, _, name = key.partition(".")
    sections = {f.name for f in fields(RunConfig)} - {"classes"}
    if section not in sections or not name:
        raise XraylensError(
            f"{source}: unknown setting {key!r}; use section.key with section data, model or train "
            f"(e.g. train.lr), or {ALPHA_SCALE}"
        )
    cls = type(getattr(RunConfig(), section))
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise XraylensError(f"{source}: unknown setting {key!r}; known {section} settings: {', '.join(sorted(hints))}")
    return hints[name]


def _numeric_base(tp: Any) -> type | None:
    """int or float for an int/float setting (optional or not); None for anything else."""
    args = typing.get_args(tp) if typing.get_origin(tp) is not None else (tp,)
    nums = [a for a in args if a in (int, float)]
    others = [a for a in args if a not in (int, float, type(None))]
    return nums[0] if len(nums) == 1 and not others else None


def _number(v: Any, base: type, where: str) -> int | float:
    # PyYAML reads 1e-4 (no dot) as a string: accept numeric strings
    if isinstance(v, bool):
        raise XraylensError(f"{where} must be a number, got {v!r}")
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise XraylensError(f"{where} must be a number, got {v!r}") from None
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        raise XraylensError(f"{where} must be a finite number, got {v!r}")
    if base is int:
        if isinstance(v, float) and not v.is_integer():
            raise XraylensError(f"{where} must be a whole number (the setting is an int), got {v!r}")
        return int(v)
    return float(v)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
