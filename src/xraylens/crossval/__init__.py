"""Cross-validation of fusion modes (none, early, late, clinical-only): patient-grouped folds, one run
directory per mode and fold, resumable, and a mean ± sd table."""

from xraylens.crossval.run import MODES, CrossvalResult, crossval, format_table, make_folds, parse_modes

__all__ = ["MODES", "CrossvalResult", "crossval", "format_table", "make_folds", "parse_modes"]
