"""The shipped configs load, name real models and losses, and build their model."""

from pathlib import Path

import pytest

from xraylens.config import RunConfig
from xraylens.models import create_model, list_models
from xraylens.train.losses import build_loss

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_valid(path):
    cfg = RunConfig.load(path)
    assert cfg.model.name in list_models()
    build_loss(cfg.train.loss, 2, class_counts=[10, 5])
    assert len(cfg.data.mean) in (1, cfg.model.in_chans) and len(cfg.data.std) == len(cfg.data.mean)
    create_model(
        cfg.model.name,
        num_classes=2,
        in_chans=cfg.model.in_chans,
        head_hidden=tuple(cfg.model.head_hidden),
        train_last=cfg.model.train_last,
        image_size=64,
    )


def test_there_are_configs():
    assert len(CONFIGS) >= 3
