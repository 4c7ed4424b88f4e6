"""Hyperparameter search with Optuna (`xraylens tune`): every trial is an ordinary run directory."""

from xraylens.tune.run import TuneResult, tune
from xraylens.tune.space import DEFAULT_DIMS, Dim, SearchSpace, load_space, parse_space

__all__ = ["DEFAULT_DIMS", "Dim", "SearchSpace", "TuneResult", "load_space", "parse_space", "tune"]
