"""CAMs in bf16 (autocast) stay within the stated tolerance of fp32 on real radiographs."""

import numpy as np
import pytest
import torch

from xraylens.data.cache import load_split
from xraylens.data.loader import to_model_input
from xraylens.data.sources import load_source
from xraylens.errors import XraylensError
from xraylens.explain.engine import BF16_TOLERANCE, BF16_TOLERANCE_P99, CamEngine, check_precision
from xraylens.models.registry import create_model

GRADIENT_FREE_OF_DIVISION = [
    "gradcam",
    "gradcam++",
    "layercam",
    "hirescam",
    "eigencam",
    "normgrad-scaling",
    "normgrad-conv1x1",
    "normgrad-conv3x3",
]


@pytest.mark.parametrize("model_name", ["resnet18", "densenet121"])
def test_bf16_maps_within_tolerance_of_fp32(fixture_dir, tmp_path, model_name):
    for ds in ("pneumonia", "knee_kl"):
        src = load_source(fixture_dir / ds)
        c = load_split(src, "train", 160, cache_dir=tmp_path)
        x = to_model_input(torch.from_numpy(np.array(c.images[:6]))[:, None])
        torch.manual_seed(0)
        model = create_model(model_name, num_classes=len(src.classes), in_chans=1, image_size=160).eval()
        methods = [*GRADIENT_FREE_OF_DIVISION, *(["xgradcam"] if model_name == "resnet18" else [])]
        with CamEngine(model) as engine:
            ref = engine(x, methods, targets="pred")
            low = engine(x, methods, targets=ref.targets, precision="bf16")
        assert low.logits.dtype == torch.float32 and torch.equal(low.targets, ref.targets)
        for m in methods:
            assert low.maps[m].dtype == torch.float32
            d = (ref.maps[m] - low.maps[m]).abs()
            worst = float(d.mean(dim=(1, 2, 3)).max())
            p99 = float(torch.quantile(d.flatten(), 0.99))
            assert worst <= BF16_TOLERANCE and p99 <= BF16_TOLERANCE_P99, (ds, m, worst, p99)
            assert not torch.equal(ref.maps[m], low.maps[m])  # it did run in bf16


def test_precision_option_is_checked():
    check_precision("bf16")
    model = create_model("resnet18", num_classes=2, in_chans=1, image_size=32).eval()
    with pytest.raises(XraylensError, match="precision='fp16' is not one of fp32, bf16"):
        CamEngine(model)(torch.zeros(1, 1, 32, 32), precision="fp16")
