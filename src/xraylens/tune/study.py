"""The Optuna study behind `xraylens tune`: storage, samplers, pruner, and the bookkeeping that keeps
the trial count right when workers die or share one study.

Workers. Every `tune` process is a worker with an id (host-pid-random) that holds an OS lock on
`OUT/workers/<id>/` while it runs; each trial records its worker's host, id and OUT. A RUNNING trial
of a worker on this host whose lock is free belongs to a dead process (kill -9, power cut): it is
marked FAIL at once and re-queued with the same parameters. Workers on other hosts are covered by
Optuna's heartbeats (RDB storage): a trial without a heartbeat for `GRACE_S` seconds is failed and
re-queued by the next worker that starts a trial.

Budget. `--trials N` is the number of finished (complete or pruned) trials the study should hold. A
worker starts a trial only while finished + running < N, and a trial is run only if fewer than N
trials numbered below it are finished, running or queued; a trial that loses that race (two workers
asked at the same moment) is closed as FAIL with user attribute `surplus` and never trained, so the
study ends with exactly N finished trials.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import secrets
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from xraylens.errors import XraylensError
from xraylens.io import LOCK_NAME, lock_dir

log = logging.getLogger("xraylens.tune")

SAMPLERS = ("tpe", "qmc")
HEARTBEAT_S = 30  # how often a running trial says it is alive
GRACE_S = 180  # a trial silent this long is taken for dead (other hosts; this host knows at once)
MAX_RETRIES = 2  # a trial whose process keeps dying (out of memory, say) is retried this often
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def default_startup(trials: int) -> int:
    """Random trials before TPE models the results (and trials before the median pruner acts): a third
    of the study, between 2 and 10."""
    return max(2, min(10, trials // 3))


# ---------------------------------------------------------------------------- storage


def storage_url(storage: str | None, out: Path) -> str:
    """The SQLAlchemy URL: `storage` as given, or SQLite in OUT/study.db."""
    if storage:
        return storage.strip()
    return f"sqlite:///{(out / 'study.db').resolve()}"


def masked(url: str) -> str:
    """The URL with its password hidden, for messages and files."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is reported by open_storage; never echo a password
        return url.split("@")[-1] if "@" in url else url


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats and stale-trial retries; one-line errors for bad URLs, missing
    drivers and unreachable servers."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError

    shown = masked(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise XraylensError(
            f"--storage {shown} is not a database URL; use e.g. sqlite:///study.db or "
            "postgresql+psycopg2://user:password@host:5432/db"
        ) from None
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            folder = Path(parsed.database).expanduser().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise XraylensError(f"--storage {shown}: cannot create {folder} ({e.strerror})") from None
        engine = {"connect_args": {"timeout": 60}}  # workers sharing the file wait for its lock
    kwargs: dict[str, Any] = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S}
    # optuna >= 4.9 renamed failed_trial_callback
    params = inspect.signature(optuna.storages.RDBStorage).parameters
    key = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
    kwargs[key] = requeue
    for attempt in range(3):
        try:
            with quiet_optuna():
                return optuna.storages.RDBStorage(url, engine_kwargs=engine, **kwargs)
        except ImportError as e:
            raise XraylensError(
                f"--storage {shown}: the database driver is missing ({e}); install it, e.g. pip install psycopg2-binary"
            ) from None
        except IntegrityError:
            # another worker is creating the tables at this moment: open them once it is done
            if attempt == 2:
                raise
            time.sleep(1 + attempt)
        except (SQLAlchemyError, OSError) as e:
            first = str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise XraylensError(
                f"cannot open the study storage {shown} ({first}); check the URL and that the database server runs"
            ) from None
    raise AssertionError("unreachable")


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Optuna's experimental-feature warnings (heartbeats, QMC) are noise to a user of `tune`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


@contextlib.contextmanager
def setup_lock(out: Path) -> Iterator[bool]:
    """Workers on one host set up a study in OUT one at a time (SQLite creates its tables once); yields
    whether OUT was new or empty. Blocking: another worker's setup takes a second or two."""
    fresh = not out.exists() or not any(out.iterdir())
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / ".tune-setup.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise XraylensError(f"cannot write the study to {out} ({e.strerror}); choose a writable --out") from None
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - no flock (Windows): one worker per OUT
            pass
        fresh = fresh or {p.name for p in out.iterdir()} <= {".tune-setup.lock"}
        yield fresh
    finally:
        os.close(fd)  # closing drops the lock


# ---------------------------------------------------------------------------- samplers and pruner


class PerTrialSeed(optuna.samplers.BaseSampler):
    """A sampler re-made for each trial with seed `seed + trial number`.

    Workers that start together with one --seed would otherwise draw the same random start-up
    parameters; this way every trial number has its own stream, and a single worker is reproducible.
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make = make
        self._seed = seed
        self._inner = make(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner = self._make(self._seed + trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, dist: Any) -> Any:
        return self._inner.sample_independent(study, trial, param_name, dist)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_sampler(kind: str, seed: int, startup: int) -> optuna.samplers.BaseSampler:
    """TPE (default) or scrambled Sobol QMC as in the KL-grading original; both seeded."""
    kind = kind.lower().strip()
    with quiet_optuna():
        if kind == "tpe":
            return PerTrialSeed(
                lambda s: optuna.samplers.TPESampler(seed=s, n_startup_trials=startup, constant_liar=True), seed
            )
        if kind == "qmc":
            # one seed for every worker (the scramble must be shared); the study counts the sample index
            return optuna.samplers.QMCSampler(
                qmc_type="sobol",
                scramble=True,
                seed=seed,
                independent_sampler=PerTrialSeed(lambda s: optuna.samplers.RandomSampler(seed=s), seed),
                warn_independent_sampling=False,
            )
    raise XraylensError(f"unknown sampler {kind!r}; use {' or '.join(SAMPLERS)}")


def make_pruner(patience: int | None, startup: int) -> optuna.pruners.BasePruner:
    """The original's pruner: a median pruner inside a patient pruner. A trial is pruned at an epoch
    when its score has not improved for `patience` epochs and is below the median of earlier trials
    at that epoch. `patience` None: no pruning."""
    if patience is None:
        return optuna.pruners.NopPruner()
    if patience < 0:
        raise XraylensError(f"--pruner-patience must be 0 or more epochs, got {patience}")
    median = optuna.pruners.MedianPruner(n_startup_trials=min(startup, 5), n_warmup_steps=0)
    with quiet_optuna():
        return optuna.pruners.PatientPruner(median, patience=patience)


# ---------------------------------------------------------------------------- the study


def open_study(
    name: str,
    storage: optuna.storages.RDBStorage,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    settings: dict[str, Any],
) -> optuna.Study:
    """Create the study or join it. `settings` (search space, base config, score, sampler) are stored
    with a new study; a worker with other settings is refused, naming what differs."""
    if not name.strip():
        raise XraylensError("--study must name the study, e.g. --study knee-focal")
    with quiet_optuna():
        study = optuna.create_study(
            study_name=name, storage=storage, sampler=sampler, pruner=pruner, direction="maximize", load_if_exists=True
        )
    if len(study.directions) != 1 or study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise XraylensError(
            f"study {name!r} exists with direction {study.directions}; xraylens maximises the --select score: "
            "use another --study"
        )
    want = json.loads(json.dumps(settings))
    if "xraylens" not in study.user_attrs:
        study.set_user_attr("xraylens", want)
    have = study.user_attrs.get("xraylens")  # re-read: two workers may have created it at the same moment
    if have != want:
        raise XraylensError(
            f"study {name!r} was started with other settings ({_differences(have, want)}); "
            "give the same --space, --config, options and --sampler, or use another --study"
        )
    return study


def _differences(have: Any, want: Any) -> str:
    if not isinstance(have, dict):
        return "it was not made by xraylens tune"
    out = []
    for part in sorted(set(have) | set(want)):
        a, b = have.get(part), want.get(part)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out.append(f"{part}: " + ", ".join(f"{k} was {a.get(k)!r}, now {b.get(k)!r}" for k in keys[:3]))
        else:
            out.append(f"{part} was {a!r}, now {b!r}")
    return "; ".join(out)[:400]


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state; `surplus` trials (never trained) are counted apart from failures."""
    out = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0, "surplus": 0}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            out["surplus"] += 1
        elif t.state == TrialState.COMPLETE:
            out["complete"] += 1
        elif t.state == TrialState.PRUNED:
            out["pruned"] += 1
        elif t.state == TrialState.FAIL:
            out["failed"] += 1
        elif t.state == TrialState.RUNNING:
            out["running"] += 1
        elif t.state == TrialState.WAITING:
            out["waiting"] += 1
    out["finished"] = out["complete"] + out["pruned"]
    return out


def in_budget(study: optuna.Study, number: int, trials: int) -> bool:
    """Whether trial `number` is within the first `trials` live trials (finished, running or queued)."""
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    ahead = sum(1 for t in study.get_trials(deepcopy=False, states=live) if t.number < number)
    return ahead < trials


# ---------------------------------------------------------------------------- workers


class Worker:
    """This process as a worker of the study: its id and the lock that says it is alive."""

    def __init__(self, out: Path) -> None:
        self.host = socket.gethostname()
        self.id = f"{self.host}-{os.getpid()}-{secrets.token_hex(3)}"
        self.out = out.resolve()
        self.dir = self.out / "workers" / self.id

    @contextlib.contextmanager
    def alive(self) -> Iterator[Worker]:
        with lock_dir(self.dir, "tune worker"):
            try:
                yield self
            finally:
                _remove_worker_dir(self.dir)
                with contextlib.suppress(OSError):
                    self.dir.parent.rmdir()  # only when no other worker is in it

    def attrs(self) -> dict[str, str]:
        return {"host": self.host, "worker": self.id, "out": str(self.out)}


def worker_alive(out: str | None, worker: str | None) -> bool | None:
    """True/False when this host can tell (the worker's lock is held / free), None when it cannot."""
    if not out or not worker:
        return None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock: leave it to the heartbeats
        return None
    try:
        fd = os.open(Path(out) / "workers" / worker / LOCK_NAME, os.O_RDWR)
    except OSError:  # gone (already recovered and removed) or unreadable: cannot tell
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _remove_worker_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        (path / LOCK_NAME).unlink(missing_ok=True)
        path.rmdir()


def recover_dead(study: optuna.Study, me: Worker) -> list[int]:
    """Fail and re-queue the RUNNING trials of dead workers on this host; returns their numbers."""
    from sqlalchemy.exc import SQLAlchemyError

    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        ua = t.user_attrs
        if ua.get("host") != me.host or ua.get("worker") == me.id:
            continue
        if worker_alive(ua.get("out"), ua.get("worker")) is not False:
            continue
        try:
            if fail(study, t, f"its worker {ua.get('worker')} died (killed or crashed)"):
                requeue(study, t)
                recovered.append(t.number)
        except SQLAlchemyError as e:  # another worker is recovering it at this moment
            log.debug("trial %d: recovery skipped (%s)", t.number, e)
    workers = me.out / "workers"
    if workers.is_dir():
        for d in workers.iterdir():
            if d.name != me.id and worker_alive(str(me.out), d.name) is False:
                _remove_worker_dir(d)
    return recovered


def fail(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with `reason`; False if another worker finished or failed it first."""
    # Study.tell cannot say whether it or a concurrent worker closed the trial; the storage call can
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "error", reason)
        return bool(storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL))
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        return False


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a failed trial's parameters again (at most MAX_RETRIES times for one original trial).
    Also Optuna's callback for trials that went stale on other hosts."""
    origin = trial.user_attrs.get("retry_of", trial.number)
    tries = int(trial.user_attrs.get("retries", 0)) + 1
    if tries > MAX_RETRIES:
        log.warning("trial %d failed %d times (first as trial %s); not retried again", trial.number, tries, origin)
        return
    with quiet_optuna():
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=trial.params,
                distributions=trial.distributions,
                user_attrs={"retry_of": origin, "retries": tries},
            )
        )
    log.info("trial %d interrupted: its parameters are queued again (retry %d of %s)", trial.number, tries, origin)
