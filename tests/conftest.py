import os
from pathlib import Path

import pytest

# No hub downloads in tests: timm/huggingface fail at once instead of retrying for ~47 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("XRAYLENS_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "test-cache"))

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FIXTURE = SHARED / "fixture"


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not FIXTURE.is_dir():
        pytest.skip(f"real-image fixture not found at {FIXTURE} (needs ../shared/data/fixture beside the repo)")
    return FIXTURE


@pytest.fixture(scope="session")
def osteo(fixture_dir: Path) -> Path:
    """The osteoporosis fixture: 9 knee radiographs under images/ and their clinical.csv."""
    d = fixture_dir / "osteoporosis"
    if not (d / "clinical.csv").is_file():
        pytest.skip(f"osteoporosis fixture not found at {d}")
    return d


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


def tiny_config(data, **settings):
    """The smallest real training run: tinyvgg at 32 px, one epoch, on the CPU (settings override)."""
    from xraylens.config import RunConfig

    base = {"data.path": data, "model.name": "tinyvgg", "data.image_size": 32, "train.epochs": 1,
            "train.batch_size": 8, "train.device": "cpu"}  # fmt: skip
    return RunConfig().apply({**base, **settings})


@pytest.fixture(scope="session")
def tiny_run(fixture_dir, tmp_path_factory) -> Path:
    """One tiny pneumonia run shared by tests that only read it (write their outputs elsewhere)."""
    from xraylens.train.loop import train

    run = tmp_path_factory.mktemp("tiny") / "run"
    train(tiny_config(fixture_dir / "pneumonia"), run, progress=False)
    return run


CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="session")
def chromium_launch() -> dict:
    """Keyword arguments for Playwright's `chromium.launch`: Debian's Chromium, headless, no network
    chatter (Playwright's own browser download does not work here)."""
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: run `bash scripts/system-deps.sh` as root to install it")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    return {"executable_path": str(CHROMIUM), "args": args}
