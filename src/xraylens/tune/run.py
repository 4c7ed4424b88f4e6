"""`tune`: hyperparameter search with Optuna; every trial is an ordinary run directory.

OUT/
  study.db              the study (SQLite; absent with --storage)
  tune.json             which study and storage this folder belongs to
  trials/trial-NNNN/    one run directory per trial (NNNN = the trial number in the study)
  trials.csv            every trial: state, score, parameters, epochs, run directory
  best.json             best trial: score, parameters, run directory; counts; plot notes
  best-config.yaml      the best trial's config: `xraylens train --config` trains it again
  plots/history.png, importances.png, slice.png
  workers/<id>/         a lock per running worker (removed when it ends)

Several workers (processes, on one host or many with a shared --storage) may share one study; on
one host they may also share one OUT (each trial's run directory is locked by its own training).
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from xraylens.config import RunConfig
from xraylens.errors import XraylensError
from xraylens.io import write_json
from xraylens.tune import study as st
from xraylens.tune.outputs import write_outputs, write_plots
from xraylens.tune.space import SearchSpace, load_space

log = logging.getLogger("xraylens.tune")

MAX_FAILURES_IN_A_ROW = 3  # the same error every trial means a setting is wrong, not bad luck
# settings that may differ between workers of one study (where the data is mounted, which GPU)
MACHINE_KEYS = ("data.path", "data.cache_dir", "data.workers", "train.device", "train.eval_batch_size")


@dataclass
class TuneResult:
    study: str
    storage: str  # password hidden
    out: Path
    select: str
    counts: dict[str, int]
    ran: list[int]  # trial numbers this call trained
    best_number: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_dir: str | None = None
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class _Surplus(Exception):
    """Another worker took the last place in the budget between our check and our ask."""


def tune(
    cfg: RunConfig,
    out: str | Path,
    *,
    trials: int,
    study: str,
    storage: str | None = None,
    space: SearchSpace | str | Path | None = None,
    sampler: str = "tpe",
    seed: int = 0,
    pruner_patience: int | None = 2,
    startup_trials: int | None = None,
    plots: bool = True,
    progress: bool = False,
) -> TuneResult:
    """Search hyperparameters for `cfg` until study `study` holds `trials` finished trials.

    `cfg` is the base config (data, model, epochs, select, ...); `space` the search space (a
    SearchSpace, a YAML file, or None for the built-in one). The study maximises `cfg.train.select`
    (a metric or expression where higher is better; `loss` alone scores -loss). Finished = complete
    or pruned: a resumed or shared study runs only the trials still missing, and a study already
    holding `trials` just rewrites the outputs. Everything is checked before the first trial.
    """
    from xraylens.train.loop import check_config

    out = Path(out).expanduser()
    if trials < 0:
        raise XraylensError(f"--trials must be 0 or more (finished trials wanted in the study), got {trials}")
    if out.exists() and not out.is_dir():
        raise XraylensError(f"--out {out} is a file; choose a folder for the study")
    if not cfg.data.path:
        raise XraylensError("no data given: pass --data DIR (folder splits, a CSV manifest or an .npz)")
    space = space if isinstance(space, SearchSpace) else load_space(space)
    check_config(cfg)
    space.check(cfg)
    startup = startup_trials if startup_trials is not None else st.default_startup(trials)
    if startup < 0:
        raise XraylensError(f"--startup-trials must be 0 or more, got {startup}")
    sampler_obj = st.make_sampler(sampler, seed, startup)
    pruner = st.make_pruner(pruner_patience, startup)
    optuna_log = optuna.logging.get_verbosity()
    # one line per trial is ours (Optuna would add a traceback for every failed trial)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        return _tune(cfg, out, trials, study, storage, space, sampler, sampler_obj, pruner, plots, progress)
    finally:
        optuna.logging.set_verbosity(optuna_log)


def _tune(
    cfg: RunConfig,
    out: Path,
    trials: int,
    study: str,
    storage: str | None,
    space: SearchSpace,
    sampler: str,
    sampler_obj: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    plots: bool,
    progress: bool,
) -> TuneResult:
    from xraylens.train.loop import absolute_paths

    base = absolute_paths(copy.deepcopy(cfg))
    settings = {
        "space": space.to_dict(),
        # a searched setting's base value is never used, so it may differ
        "base": {k: v for k, v in _flat(base).items() if k not in MACHINE_KEYS and k not in space.names},
        "select": base.train.select,
        "sampler": sampler.lower().strip(),
    }
    url = st.storage_url(storage, out)
    shown = st.masked(url)
    # a given storage is opened before OUT is made: a wrong URL or a stopped server leaves no folder
    store = None if storage is None else st.open_storage(url)
    with st.setup_lock(out) as fresh:
        try:
            _claim_out(out, study, shown)
            store = store or st.open_storage(url)
            opt_study = st.open_study(study, store, sampler_obj, pruner, settings)
            _check_trial_dirs(opt_study, out)
        except BaseException:
            if fresh:  # nothing was trained and no other worker uses it: leave no half-made folder
                shutil.rmtree(out, ignore_errors=True)
            raise

    me = st.Worker(out)
    ran: list[int] = []
    notes: list[str] = []
    current: dict[str, Any] = {}
    try:
        with me.alive(), st.quiet_optuna():
            recovered = st.recover_dead(opt_study, me)
            if recovered:
                log.info("trial(s) %s of a dead worker failed and queued again", recovered)
            _loop(opt_study, me, space, base, out, trials, progress, ran, notes, current, shown)
    except KeyboardInterrupt:
        _requeue_interrupted(opt_study, current.get("number"))
        write_outputs(opt_study, out, shown, base.train.select)
        raise
    files: dict[str, Path] = {}
    extra: dict[str, Any] = {}
    if plots:
        files, plot_notes = write_plots(opt_study, out)
        notes += plot_notes
        extra = {"plots": sorted(files), "notes": notes}  # paths relative to OUT
    written, summary = write_outputs(opt_study, out, shown, base.train.select, extra)
    files = {**written, **files}
    result = TuneResult(study, shown, out, base.train.select, st.counts(opt_study), ran, files=files, notes=notes)
    best = summary.get("best")
    if best:
        result.best_number = best["number"]
        result.best_value = best["value"]
        result.best_params = best["params"]
        result.best_dir = best["trial_dir"]
    return result


def _loop(
    study: optuna.Study,
    me: st.Worker,
    space: SearchSpace,
    base: RunConfig,
    out: Path,
    trials: int,
    progress: bool,
    ran: list[int],
    notes: list[str],
    current: dict[str, Any],
    shown: str,
) -> None:
    failures: list[str] = []
    counts_cache: dict[tuple, list[int]] = {}
    while True:
        st.recover_dead(study, me)  # dead workers on this host: known at once
        optuna.storages.fail_stale_trials(study)  # other hosts: no heartbeat for GRACE_S seconds
        c = st.counts(study)
        if c["finished"] >= trials:
            break
        if c["finished"] + c["running"] >= trials:
            notes.append(f"{c['running']} trial(s) still running in other workers; this worker starts no more")
            log.info(notes[-1])
            break
        current.clear()
        objective = _objective(space, base, out, trials, me, progress, current, counts_cache)
        study.optimize(objective, n_trials=1, catch=(XraylensError, _Surplus))
        number = current.get("number")
        if number is None:
            continue
        t = _trial(study, number)
        if t.user_attrs.get("surplus"):
            log.info("trial %d not run: the study already has its %d trials (other workers)", number, trials)
            continue
        ran.append(number)
        _log_trial(study, t, base.train.select, trials)
        if t.state == TrialState.FAIL:
            failures.append(f"trial {number}: {t.user_attrs.get('error', 'failed')}")
            if len(failures) >= MAX_FAILURES_IN_A_ROW:
                write_outputs(study, out, shown, base.train.select)
                raise XraylensError(
                    f"{len(failures)} trials in a row failed (last: {failures[-1]}); fix the settings or the "
                    "space and run the same command again to continue the study"
                )
        else:
            failures.clear()
        write_outputs(study, out, shown, base.train.select)


def _trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def _objective(
    space: SearchSpace,
    base: RunConfig,
    out: Path,
    trials: int,
    me: st.Worker,
    progress: bool,
    current: dict[str, Any],
    counts_cache: dict[tuple, list[int]],
):
    from xraylens.train.loop import check_config, train

    def objective(trial: optuna.Trial) -> float:
        current["number"] = trial.number
        # who runs it, first: a dead worker's trial must be recognisable as such
        for k, v in me.attrs().items():
            trial.set_user_attr(k, v)
        if not st.in_budget(trial.study, trial.number, trials):
            trial.set_user_attr("surplus", True)
            raise _Surplus(f"trial {trial.number} is beyond the {trials} trials of the study")
        run_dir = out.resolve() / "trials" / f"trial-{trial.number:04d}"
        trial.set_user_attr("trial_dir", str(run_dir))
        params = space.suggest(trial)
        try:
            cfg = space.trial_config(base, params, lambda c: _class_counts(c, counts_cache))
            check_config(cfg)
        except XraylensError as e:
            trial.set_user_attr("error", str(e))
            raise
        trial.set_user_attr("config", _plain(cfg.to_dict()))
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()))

        def on_epoch(epoch: int, score: float, val: dict[str, Any]) -> None:
            trial.report(score if math.isfinite(score) else -1e300, epoch)  # -inf: "never preferred"
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: {cfg.train.select} {score:.4f} below the median")

        t0 = time.perf_counter()
        try:
            result = train(cfg, run_dir, progress=progress, on_epoch=on_epoch)
        except optuna.TrialPruned:
            _record_run(trial, run_dir, time.perf_counter() - t0)
            raise
        except XraylensError as e:
            trial.set_user_attr("error", str(e))
            _record_run(trial, run_dir, time.perf_counter() - t0)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted (Ctrl-C); queued again")
            raise
        _record_run(trial, run_dir, time.perf_counter() - t0)
        return float(result.best_score)

    return objective


def _record_run(trial: optuna.Trial, run_dir: Path, seconds: float) -> None:
    """Best epoch, epochs run and the best epoch's main validation metrics, from the run's metrics.json."""
    import json

    trial.set_user_attr("seconds", round(seconds, 2))
    try:
        m = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return
    val = m.get("val") or {}
    trial.set_user_attr("best_epoch", m.get("best_epoch"))
    trial.set_user_attr("epochs_run", m.get("epochs_run"))
    best = m.get("best_score")
    trial.set_user_attr("best_score", best if isinstance(best, (int, float)) and math.isfinite(best) else None)
    trial.set_user_attr("val", {k: val.get(k) for k in ("accuracy", "f1_weighted", "f1_macro", "qwk", "auc", "loss")})


def _class_counts(cfg: RunConfig, cache: dict[tuple, list[int]]) -> list[int]:
    """Training images per class of the trial's split (listed files; no decoding)."""
    from xraylens.runs import config_source

    d = cfg.data
    key = (d.path, d.val_fraction, d.split_seed, d.group_pattern, d.group_column, d.train_split)
    if key not in cache:
        source = config_source(cfg)
        labels = [r.label for r in source.split(d.train_split)]
        if not labels:
            raise XraylensError(f"{d.path} has no {d.train_split!r} images to weight the classes by")
        cache[key] = np.bincount(labels, minlength=len(source.classes)).tolist()
    return cache[key]


def _requeue_interrupted(study: optuna.Study, number: int | None) -> None:
    """Ctrl-C: Optuna has failed the running trial; queue its parameters again for the next run."""
    if number is None:
        return
    t = _trial(study, number)
    if t.state == TrialState.FAIL and not t.user_attrs.get("surplus"):
        st.requeue(study, t)


def _claim_out(out: Path, study: str, storage: str) -> None:
    """OUT holds one study: a second study (or the same name in another storage) would mix trial folders."""
    import json

    marker = out / "tune.json"
    if marker.is_file():
        try:
            have = json.loads(marker.read_text())
        except (OSError, ValueError):
            have = {}
        if have.get("study") != study or have.get("storage") != storage:
            raise XraylensError(
                f"{out} holds study {have.get('study')!r} in {have.get('storage')}; give the same --study and "
                "--storage to continue it, or choose another --out"
            )
        return
    if (out / "trials").is_dir() and any((out / "trials").iterdir()):
        raise XraylensError(f"{out}/trials holds runs of an unknown study; choose another --out")
    write_json(marker, {"study": study, "storage": storage})


def _check_trial_dirs(study: optuna.Study, out: Path) -> None:
    """A fresh study with run folders already in OUT/trials (its database was deleted, say) would
    collide with them trial by trial: say so now."""
    trials_dir = out / "trials"
    if study.get_trials(deepcopy=False) or not trials_dir.is_dir():
        return
    if any(p.name.startswith("trial-") for p in trials_dir.iterdir()):
        raise XraylensError(
            f"study {study.study_name!r} is new but {trials_dir} already holds trial runs (was the study "
            "database deleted?); choose another --out or remove those runs"
        )


def _log_trial(study: optuna.Study, t: optuna.trial.FrozenTrial, select: str, trials: int) -> None:
    c = st.counts(study)
    try:
        best = study.best_trial
        best_text = f"best {best.value:.4f} (trial {best.number})"
    except ValueError:
        best_text = "no complete trial yet"
    state = t.state.name.lower()
    if t.state == TrialState.PRUNED:
        state += f" at epoch {t.user_attrs.get('epochs_run', '?')}"
    score = t.user_attrs.get("best_score")
    what = f"{select} {score:.4f}" if isinstance(score, float) else (t.user_attrs.get("error") or "")
    log.info(
        "trial %d %s: %s in %.0f s; %s; %d/%d finished",
        t.number,
        state,
        what,
        t.user_attrs.get("seconds") or 0,
        best_text,
        c["finished"],
        trials,
    )


def _flat(cfg: RunConfig) -> dict[str, Any]:
    d = cfg.to_dict()
    return {f"{s}.{k}": v for s in ("data", "model", "train") for k, v in d[s].items()}


def _plain(obj: Any) -> Any:
    """JSON-safe copy (Optuna stores user attributes as JSON)."""
    import json

    return json.loads(json.dumps(obj, default=str))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
