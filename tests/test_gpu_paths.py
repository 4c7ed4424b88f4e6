"""CUDA-only training paths checked on the CPU: the SyncBatchNorm conversion DDP does on CUDA, and
checkpoints of a wrapped (DistributedDataParallel / torch.compile) model."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests.conftest import tiny_config
from xraylens.runs import InputSettings, build_model, open_run, read_checkpoint
from xraylens.train.checkpoint import save_checkpoint, unwrap
from xraylens.train.loop import sync_batchnorm


def _real_batch(fixture_dir: Path, cfg) -> torch.Tensor:
    """Four fixture radiographs (two per class) as the run's normalised model input."""
    inputs = InputSettings.from_config(cfg)
    paths = [p for c in ("NORMAL", "PNEUMONIA") for p in sorted((fixture_dir / "pneumonia" / c).iterdir())[:2]]
    x8 = torch.from_numpy(np.stack([inputs.prepare(p)[0] for p in paths]))[:, None]
    return inputs.to_model(x8)


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18"])
def test_sync_batchnorm_keeps_the_model_its_keys_and_its_activations(fixture_dir, name):
    cfg = tiny_config(fixture_dir / "pneumonia", **{"model.name": name})
    cfg.classes = ["NORMAL", "PNEUMONIA"]
    torch.manual_seed(0)
    model = build_model(cfg, weights=False, clinical_features=0).eval()
    x = _real_batch(fixture_dir, cfg)
    with torch.no_grad():
        before = model(x)
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    converted = sync_batchnorm(model).eval()
    bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    assert list(converted.state_dict()) == keys
    assert [id(p) for p in converted.parameters()] == params  # the optimiser built before keeps them
    with torch.no_grad():
        after = converted(x)
    # torch's own converter dropped EfficientNet's BatchNorm+SiLU activations (outputs off by ~90)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.fixture()
def one_rank_group(tmp_path):
    """A gloo process group of one process, so DistributedDataParallel can wrap a CPU model."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_checkpoint_of_a_wrapped_model_has_plain_keys_and_loads_on_cpu(fixture_dir, tmp_path, one_rank_group):
    cfg = tiny_config(fixture_dir / "pneumonia", **{"model.name": "resnet18"})
    cfg.classes = ["NORMAL", "PNEUMONIA"]
    torch.manual_seed(0)
    model = build_model(cfg, weights=False, clinical_features=0)
    keys = list(model.state_dict())
    ddp = DistributedDataParallel(model)
    wrapped = {
        "ddp": ddp,
        "compiled": torch.compile(model),  # wrapping only: nothing is compiled until it is called
        "compiled_ddp": torch.compile(ddp),
    }
    x = _real_batch(fixture_dir, cfg)
    with torch.no_grad():
        want = model.eval()(x)
    for name, net in wrapped.items():
        assert unwrap(net) is model
        path = tmp_path / f"{name}.pt"
        save_checkpoint(path, model=net, config=cfg, epoch=1)
        saved = read_checkpoint(path)["model"]
        assert list(saved) == keys, name
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in saved)
        run = open_run(path, device="cpu")
        with torch.no_grad():
            torch.testing.assert_close(run.model(x), want)
