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
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED
