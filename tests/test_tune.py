"""`xraylens tune`: a study on the real fixture writes every output, its best config trains again to
the same score, a killed study resumes without losing or double-counting a trial, two workers share a
PostgreSQL study, and a bad search space is a one-line error before any trial."""

from __future__ import annotations

import csv
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from xraylens.cli import main
from xraylens.config import RunConfig
from xraylens.errors import XraylensError
from xraylens.evaluate.run import evaluate_run
from xraylens.train.loop import train
from xraylens.tune import tune
from xraylens.tune.space import DEFAULT_DIMS, alpha_from_scale

# the same tiny training everywhere: 32 px TinyVGG on the 40 fixture knees, CPU
SMALL = {
    "model.name": "tinyvgg",
    "data.image_size": 32,
    "train.epochs": 2,
    "train.device": "cpu",
}
REPRO_TOL = 1e-6  # CPU, same seed, same thread count: the scores are in fact identical


def _cfg(data: Path, **over) -> RunConfig:
    return RunConfig().apply({"data.path": data, **SMALL, **over})


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _cli(out: Path, data: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "xraylens",
        "tune",
        "--data",
        str(data),
        "--model",
        "tinyvgg",
        "--image-size",
        "32",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def knee(fixture_dir) -> Path:
    return fixture_dir / "knee_kl"


@pytest.fixture(scope="module")
def study3(knee, tmp_path_factory):
    """A 3-trial study through the CLI; the score is -loss, so trials always differ."""
    out = tmp_path_factory.mktemp("tune") / "study"
    argv = ["tune", "--data", str(knee), "--model", "tinyvgg", "--image-size", "32", "--epochs", "2"]
    argv += ["--device", "cpu", "--trials", "3", "--study", "knee", "--select", "loss", "--quiet", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return out


def test_a_three_trial_study_writes_every_output(study3, capsys):
    out = study3
    rows = _rows(out / "trials.csv")
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    assert {r["state"] for r in rows} == {"COMPLETE"}
    for dim in DEFAULT_DIMS:
        assert dim.name in rows[0], f"trials.csv lacks the parameter column {dim.name}"
    best = json.loads((out / "best.json").read_text())
    assert best["counts"]["finished"] == 3 and best["select"] == "loss"
    values = [float(r["value"]) for r in rows]
    assert best["best"]["value"] == pytest.approx(max(values))  # "loss" scores -loss: higher is better
    assert all(v < 0 for v in values)
    assert best["best"]["trial_dir"] == str(out / "trials" / f"trial-{best['best']['number']:04d}")
    for name in ("history", "importances", "slice"):
        png = out / "plots" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", name
    assert best["notes"] == [] and best["plots"] == [f"plots/{n}.png" for n in ("history", "importances", "slice")]
    assert (out / "study.db").is_file() and json.loads((out / "tune.json").read_text())["study"] == "knee"
    assert not (out / "workers").exists(), "a finished worker leaves its lock folder behind"
    # every trial is an ordinary run directory, with the sampled settings in its config.yaml
    for r in rows:
        run = Path(r["trial_dir"])
        assert (run / "checkpoints" / "best.pt").is_file() and (run / "metrics.json").is_file()
        cfg = RunConfig.load(run / "config.yaml")
        assert cfg.train.loss == "focal"
        assert cfg.train.lr == pytest.approx(float(r["train.lr"]))
        assert cfg.train.focal_gamma == pytest.approx(float(r["train.focal_gamma"]))
        # the alpha scale times the balanced class weights (the fixture is balanced: weights 1)
        assert cfg.train.focal_alpha == alpha_from_scale(float(r["focal_alpha_scale"]), [7] * 5)
    m = evaluate_run(best["best"]["trial_dir"], split="val", device="cpu")
    assert m["n_images"] > 0


def test_best_config_reproduces_the_best_trial(study3, knee, tmp_path):
    best = json.loads((study3 / "best.json").read_text())["best"]
    cfg = RunConfig.load(study3 / "best-config.yaml")
    result = train(cfg, tmp_path / "again", progress=False)
    assert abs(result.best_score - best["value"]) <= REPRO_TOL
    trial = json.loads((Path(best["trial_dir"]) / "metrics.json").read_text())
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["best_epoch"] == trial["best_epoch"]
    assert again["val"]["confusion_matrix"] == trial["val"]["confusion_matrix"]


def test_a_finished_study_runs_nothing_more_and_refuses_other_settings(study3, knee):
    cfg = _cfg(knee, **{"train.select": "loss"})
    r = tune(cfg, study3, trials=3, study="knee")
    assert r.ran == [] and r.counts["finished"] == 3
    with pytest.raises(XraylensError, match="other settings.*train.epochs"):
        tune(_cfg(knee, **{"train.select": "loss", "train.epochs": 3}), study3, trials=4, study="knee")
    with pytest.raises(XraylensError, match="holds study 'knee'"):
        tune(cfg, study3, trials=4, study="other")


def test_pruning_and_failures_are_recorded(knee, tmp_path, monkeypatch):
    """The pruner sees every epoch's score; a pruned trial counts as finished, a failed one does not."""
    import xraylens.train.loop as loop

    curves = iter([[0.5, 0.6, 0.7], [0.5, 0.65, 0.8], [0.1, 0.05, 0.01], "fail", [0.4, 0.6, 0.9]])

    def fake_train(cfg, out, *, progress, on_epoch):
        curve = next(curves)
        out.mkdir(parents=True)
        if curve == "fail":
            raise XraylensError("loss became nan at epoch 1; lower train.lr")
        for epoch, score in enumerate(curve, 1):
            (out / "metrics.json").write_text(json.dumps({"best_epoch": epoch, "best_score": score, "val": {}}))
            on_epoch(epoch, score, {})
        return loop.TrainResult(out, len(curve), max(curve), len(curve), {})

    monkeypatch.setattr(loop, "train", fake_train)
    r = tune(_cfg(knee), tmp_path / "s", trials=4, study="p", pruner_patience=0, startup_trials=2, plots=False)
    rows = {int(r["number"]): r for r in _rows(tmp_path / "s" / "trials.csv")}
    assert [rows[i]["state"] for i in range(5)] == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    pruned = optuna.load_study(study_name="p", storage=f"sqlite:///{tmp_path / 's' / 'study.db'}").trials[2]
    assert pruned.intermediate_values == {1: 0.1, 2: 0.05}  # stopped at epoch 2 of 3
    assert "lower train.lr" in rows[3]["error"]
    assert r.counts == {**r.counts, "finished": 4, "pruned": 1, "failed": 1}
    assert r.best_number == 4 and r.best_value == pytest.approx(0.9)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"tune ended (code {proc.returncode}) before {path} appeared")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.02)


def test_kill_and_resume_keeps_the_count(knee, tmp_path):
    out = tmp_path / "s"
    # 20 epochs keep each trial busy for seconds, so the kill lands inside the 2nd trial
    extra = ["--trials", "2", "--study", "k", "--epochs", "20", "--no-prune"]
    proc = subprocess.Popen(_cli(out, knee, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(out / "trials" / "trial-0001" / "checkpoints" / "last.pt", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    url = f"sqlite:///{out / 'study.db'}"
    states = {t.number: t.state for t in optuna.load_study(study_name="k", storage=url).trials}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.RUNNING}, "the kill missed the 2nd trial"

    r = tune(_cfg(knee, **{"train.epochs": 20}), out, trials=2, study="k", pruner_patience=None)
    trials = optuna.load_study(study_name="k", storage=url).trials
    by = {t.number: t for t in trials}
    assert by[1].state == TrialState.FAIL and "died" in by[1].user_attrs["error"]
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 1)
    assert retry.state == TrialState.COMPLETE and retry.params == by[1].params  # retried with its parameters
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 2 and r.counts["finished"] == 2 and r.ran == [retry.number]
    assert len({t.user_attrs["trial_dir"] for t in finished}) == 2  # no run counted twice
    assert len(_rows(out / "trials.csv")) == 3  # 2 finished + the killed one, marked FAIL


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_trial_gone_silent_on_another_host_is_retried(knee, tmp_path, monkeypatch):
    """Heartbeats: a RUNNING trial of another machine that stopped beating is failed and re-queued."""
    from xraylens.tune import study as st
    from xraylens.tune.space import SearchSpace

    monkeypatch.setattr(st, "HEARTBEAT_S", 1)
    monkeypatch.setattr(st, "GRACE_S", 2)
    out = tmp_path / "s"
    out.mkdir()
    url = f"sqlite:///{out / 'study.db'}"
    with st.quiet_optuna():
        other = optuna.create_study(study_name="h", storage=st.open_storage(url), direction="maximize")
        lost = other.ask()
        SearchSpace().suggest(lost)
        lost.set_user_attr("host", "elsewhere")
        other._storage.record_heartbeat(lost._trial_id)
    time.sleep(3.2)  # past the grace period even at SQLite's one-second clock
    r = tune(_cfg(knee), out, trials=2, study="h", plots=False)
    trials = optuna.load_study(study_name="h", storage=url).trials
    assert trials[0].state == TrialState.FAIL
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 0)
    assert retry.state == TrialState.COMPLETE and retry.params == trials[0].params
    assert r.counts["finished"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL server on loopback; yields its SQLAlchemy URL."""
    pytest.importorskip("psycopg2", reason="psycopg2-binary is not installed (pip install -e .[test])")
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb") or ""]
    if not initdb[-1]:
        pytest.skip("PostgreSQL is not installed (scripts/system-deps.sh installs the Debian package postgresql)")
    bindir = Path(initdb[-1]).resolve().parent
    prefix: list[str] = []
    root = tempfile.mkdtemp(prefix="xraylens-pg-")  # not in tmp_path: the server user must reach it
    if os.geteuid() == 0:
        # postgres refuses to run as root: run it as its own system user (or nobody)
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        runuser = shutil.which("runuser")
        if user is None or runuser is None:
            pytest.skip("running as root without a postgres/nobody user or runuser: cannot start PostgreSQL")
        prefix = [runuser, "-u", user, "--"]
        shutil.chown(root, user)
    port = _free_port()
    data = os.path.join(root, "data")
    steps = [
        [str(bindir / "initdb"), "-D", data, "-A", "trust", "-U", "xraylens", "-E", "UTF8", "--no-sync"],
        [str(bindir / "pg_ctl"), "-D", data, "-l", os.path.join(root, "log"), "-w", "-t", "60", "start", "-o",
         f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=50"],
        [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "xraylens", "optuna"],
    ]  # fmt: skip
    try:
        for cmd in steps:
            r = subprocess.run(prefix + cmd, capture_output=True, text=True, timeout=120)
            if r.returncode != 0:
                why = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
                pytest.skip(f"cannot start PostgreSQL ({Path(cmd[0]).name}: {why[0]})")
        yield f"postgresql+psycopg2://xraylens@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run(prefix + [str(bindir / "pg_ctl"), "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_two_workers_share_a_postgresql_study(postgres, knee, tmp_path):
    out = tmp_path / "shared"  # both workers on this host write into one folder
    extra = ["--trials", "6", "--study", "shared", "--storage", postgres, "--epochs", "10", "--no-prune"]
    procs = [
        subprocess.Popen(_cli(out, knee, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, text in zip(procs, logs, strict=True):
        assert p.returncode == 0, text[-2000:]
    trials = optuna.load_study(study_name="shared", storage=postgres).trials
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 6, [(t.number, t.state.name, t.user_attrs.get("surplus")) for t in trials]
    # anything else is a trial that lost the race for the last place and never trained
    assert all(t.user_attrs.get("surplus") for t in trials if t not in finished)
    assert len({t.number for t in trials}) == len(trials)
    dirs = [t.user_attrs["trial_dir"] for t in finished]
    assert len(set(dirs)) == 6
    for d in dirs:
        assert (Path(d) / "checkpoints" / "best.pt").is_file() and (Path(d) / "metrics.json").is_file()
    assert len({t.user_attrs["worker"] for t in finished}) == 2, "one worker ran every trial:\n" + logs[0][-1500:]
    assert len(_rows(out / "trials.csv")) == 6


BAD_SPACES = [
    ("search:\n  train.nope: {low: 1, high: 2}\n", "train.nope"),
    ("search:\n  nope: [1, 2]\n", "unknown setting 'nope'"),
    ("search:\n  train.lr: {low: 1.0e-2, high: 1.0e-4, log: true}\n", "must be below high"),
    ("search:\n  train.batch_size: {low: 8.5, high: 64}\n", "whole number"),
    ("search:\n  train.lr: {low: small, high: 1}\n", "must be a number"),
    ("search:\n  train.optimizer: {low: 1, high: 2}\n", "give choices"),
    ("search:\n  train.batch_size: [16, big]\n", "'big' is not a valid int"),
    ("search:\n  train.weight_decay: {low: 0, high: 1.0e-2, log: true}\n", "log range needs low > 0"),
    ("search:\n  train.lr: {low: 0, high: 1.0e-2}\n", "greater than 0"),
    ("search:\n  train.optimizer: [adamw, nope]\n", "nope"),
    ("search:\n  train.lr: 0.1\n", "fixed:"),
    ("search:\n  data.path: [a, b]\n", "cannot be searched"),
    ("search:\n  train.momentum: null\n", "not searched"),
    ("fixed:\n  train.loss: ce\n", "focal"),
    ("train.lr: {low: 1, high: 2}\n", "search: or fixed:"),
    ("replace: true\n", "searches nothing"),
    ("search: [\n", "not valid YAML"),
]


@pytest.mark.parametrize("text,words", BAD_SPACES, ids=[w for _, w in BAD_SPACES])
def test_a_bad_space_is_one_line_before_any_trial(text, words, knee, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(text)
    out = tmp_path / "out"
    argv = ["tune", "--data", str(knee), "--model", "tinyvgg", "--device", "cpu", "--trials", "1", "--study", "s"]
    with pytest.raises(SystemExit) as e:
        main(argv + ["--space", str(space), "--out", str(out)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: --space"), err
    assert words in err[0]
    assert not out.exists(), "a bad space created the study folder"


def test_a_space_file_extends_or_replaces_the_built_in_one(knee, tmp_path):
    from xraylens.tune.space import load_space

    f = tmp_path / "space.yaml"
    f.write_text(
        "search:\n  train.lr: {low: 1e-4, high: 1e-3, log: true}\n  train.weight_decay: null\n"
        "  model.head_hidden: [[], [64], '128,32']\n  data.augment: [flip, none]\n"
        "fixed:\n  train.loss: focal-seed\n"
    )
    s = load_space(f)
    by = {d.name: d for d in s.dims}
    assert "train.weight_decay" not in by and by["train.lr"].low == pytest.approx(1e-4)  # "1e-4": a YAML string
    assert by["model.head_hidden"].choices == ("", "64", "128,32")
    s.check(_cfg(knee))
    cfg = s.trial_config(_cfg(knee), {"model.head_hidden": "128,32", "focal_alpha_scale": 0.5}, lambda c: [10, 30])
    assert cfg.model.head_hidden == [128, 32] and cfg.train.loss == "focal-seed"
    assert cfg.train.focal_alpha == pytest.approx([1.0, 1 / 3])  # 0.5 x the balanced weights 40/(2*n_c)
    f.write_text("search:\n  train.loss: [focal, ce]\n")  # searching the loss the built-in space fixes
    s = load_space(f)
    assert "train.loss" not in s.fixed and "train.loss" in s.names
    s.check(_cfg(knee))
    f.write_text("replace: true\nsearch:\n  train.lr: {low: 1.0e-4, high: 1.0e-3}\n")
    assert [d.name for d in load_space(f).dims] == ["train.lr"]
