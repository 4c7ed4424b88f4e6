"""What a study leaves in OUT: trials.csv, best.json, best-config.yaml and the PNG plots.

Everything is read back from the study storage, so any worker (or a rerun with the study's trials
already done) writes the same files for the whole study, and each write is atomic.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from xraylens.config import RunConfig
from xraylens.io import atomic_path, write_csv, write_json, write_text
from xraylens.tune import study as st

log = logging.getLogger("xraylens.tune")

VAL_KEYS = ("accuracy", "f1_weighted", "f1_macro", "qwk", "auc", "loss")
PLOTS = ("history", "importances", "slice")


def write_outputs(
    study: optuna.Study, out: Path, storage: str, select: str, extra: dict[str, Any] | None = None
) -> tuple[dict[str, Path], dict[str, Any]]:
    """trials.csv, best.json (with `extra` added) and, once a trial is complete, best-config.yaml;
    returns the files written and the best.json content."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    files = {"trials.csv": out / "trials.csv", "best.json": out / "best.json"}
    _write_trials_csv(files["trials.csv"], trials)
    best = _best(trials)
    summary: dict[str, Any] = {
        "study": study.study_name,
        "storage": storage,
        "select": select,
        "direction": "maximize",
        "counts": st.counts(study),
        "best": None,
    }
    if best is not None:
        ua = best.user_attrs
        summary["best"] = {
            "number": best.number,
            "value": best.value,
            "params": dict(best.params),
            "trial_dir": ua.get("trial_dir"),
            "host": ua.get("host"),
            "best_epoch": ua.get("best_epoch"),
            "val": ua.get("val"),
        }
        if ua.get("config"):
            files["best-config.yaml"] = out / "best-config.yaml"
            _write_best_config(files["best-config.yaml"], ua["config"], best, study.study_name, select)
    summary.update(extra or {})
    write_json(files["best.json"], summary)
    return files, summary


def _best(trials: list[FrozenTrial]) -> FrozenTrial | None:
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    # ties go to the earlier trial, as Optuna's best_trial does
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def _write_best_config(path: Path, config: dict, trial: FrozenTrial, study: str, select: str) -> None:
    cfg = RunConfig.from_dict(config)
    cfg.classes = []  # training fills them in from the data
    head = (
        f"# best trial {trial.number} of study {study!r}: {select} {trial.value:.6g} on the validation split\n"
        f"# run: {trial.user_attrs.get('trial_dir')}\n"
        "# train it again (same seed, same score on CPU): xraylens train --config best-config.yaml --out RUN\n"
    )
    write_text(path, head + yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _write_trials_csv(path: Path, trials: list[FrozenTrial]) -> None:
    params: list[str] = []
    for t in trials:
        params += [p for p in t.params if p not in params]
    header = [
        "number",
        "state",
        "value",
        "best_score",
        "best_epoch",
        "epochs_run",
        *(f"val_{k}" for k in VAL_KEYS),
        "seconds",
        *params,
        "trial_dir",
        "host",
        "retry_of",
        "error",
    ]
    rows = []
    for t in trials:
        ua = t.user_attrs
        val = ua.get("val") or {}
        rows.append(
            [
                t.number,
                t.state.name,
                _num(t.value) if t.state == TrialState.COMPLETE else "",
                _num(ua.get("best_score")),
                ua.get("best_epoch", ""),
                ua.get("epochs_run", ""),
                *(_num(val.get(k)) for k in VAL_KEYS),
                ua.get("seconds", ""),
                *(t.params.get(p, "") for p in params),
                ua.get("trial_dir", ""),
                ua.get("host", ""),
                ua.get("retry_of", ""),
                ua.get("error", ""),
            ]
        )
    write_csv(path, header, rows)


def _num(v: Any) -> Any:
    if v is None:
        return ""
    return round(float(v), 6) if isinstance(v, (int, float)) and math.isfinite(v) else v


def write_plots(study: optuna.Study, out: Path) -> tuple[dict[str, Path], list[str]]:
    """plots/history.png, importances.png and slice.png from Optuna's matplotlib visualisations;
    a plot that cannot be drawn yet (too few complete trials) is skipped with a note, never an error."""
    if "matplotlib.pyplot" not in sys.modules:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
    complete = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not t.user_attrs.get("surplus")
    ]
    varied = {p for t in complete for p in t.params if len({repr(u.params.get(p)) for u in complete}) > 1}
    files: dict[str, Path] = {}
    notes: list[str] = []
    # matplotlib logs a line per axis of numeric-looking choices (batch sizes); not news to the user
    category_log = logging.getLogger("matplotlib.category")
    level = category_log.level
    category_log.setLevel(logging.WARNING)
    try:
        _draw(study, out, complete, varied, files, notes)
    finally:
        category_log.setLevel(level)
    for note in notes:
        log.info(note)
    return files, notes


def _draw(
    study: optuna.Study,
    out: Path,
    complete: list[FrozenTrial],
    varied: set[str],
    files: dict[str, Path],
    notes: list[str],
) -> None:
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    need = {
        "history": (1, "needs a complete trial"),
        "slice": (1, "needs a complete trial"),
        "importances": (2, "needs at least 2 complete trials with different parameters"),
    }
    makers = {
        "history": lambda: ovm.plot_optimization_history(study),
        "importances": lambda: ovm.plot_param_importances(study),
        "slice": lambda: ovm.plot_slice(study),
    }
    for name in PLOTS:
        n, why = need[name]
        if len(complete) < n or (name == "importances" and not varied):
            notes.append(f"{name}.png skipped: {why} (the study has {len(complete)})")
            continue
        if name == "importances" and len({t.value for t in complete}) < 2:
            notes.append("importances.png skipped: every complete trial has the same score, so no parameter matters")
            continue
        path = out / "plots" / f"{name}.png"
        try:
            with st.quiet_optuna(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # e.g. few trials for the importance estimate
                ax = makers[name]()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(max(6.4, fig.get_figwidth()), max(4.0, fig.get_figheight()))
            with atomic_path(path, suffix=".png") as tmp:
                fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
            plt.close(fig)
            files[f"plots/{name}.png"] = path
        except Exception as e:  # a plot is a by-product: report it, keep the study's results
            notes.append(f"{name}.png skipped: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
            plt.close("all")
