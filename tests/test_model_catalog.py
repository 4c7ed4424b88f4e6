"""The static model catalog: it equals what the families register, it stays torch-free, and the
model package imports in no circle."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import xraylens.models
from xraylens.errors import XraylensError
from xraylens.models import _registry
from xraylens.models.catalog import CATALOG

PKG = Path(xraylens.models.__file__).parent


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _import_every_module() -> None:
    for mod in pkgutil.iter_modules([str(PKG)]):
        importlib.import_module(f"xraylens.models.{mod.name}")


def test_catalog_equals_what_the_families_register() -> None:
    _import_every_module()  # a new family file missing from the catalog shows up here too
    registered = {name: fn for name, fn in _registry._REGISTRY.items() if fn.__module__.startswith("xraylens.models.")}
    assert set(CATALOG) == set(registered)
    for name, info in CATALOG.items():
        assert registered[name].__module__ == f"xraylens.models.{info.family}", name
        # the description's weights claim matches the hub entry beside the constructor
        assert ("no ImageNet weights" in info.description) == (_registry._HUB[name] is None), name
        assert info.description and "\n" not in info.description, name


def test_every_model_is_a_greppable_def() -> None:
    for name, info in CATALOG.items():
        assert f"\ndef {name}(" in (PKG / f"{info.family}.py").read_text(), name


def test_catalog_imports_no_torch() -> None:
    r = _run("import sys, xraylens.models.catalog; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_listing_and_checking_names_import_no_family() -> None:
    code = (
        "import sys\n"
        "from xraylens.models._registry import list_models, model_key\n"
        "assert model_key('SE-ResNet18') == 'se_resnet18' and 'tinyvgg_bn' in list_models()\n"
        "print(sorted(m for m in sys.modules if m in ('torch', 'timm') or m.startswith('xraylens.models.')))\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['xraylens.models._registry', 'xraylens.models.arch', 'xraylens.models.catalog']"


def test_models_command_prints_the_catalog_without_torch() -> None:
    code = (
        "import sys\n"
        "from xraylens.cli import app\n"
        "try:\n"
        "    app(['models'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules)\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    *rows, torch_loaded = r.stdout.strip().splitlines()
    assert torch_loaded == "False"
    assert [row.split()[0] for row in rows] == sorted(CATALOG)
    for row in rows:
        assert row.split(None, 1)[1] == CATALOG[row.split()[0]].description


def test_building_tinyvgg_does_not_import_timm() -> None:
    code = (
        "import sys\n"
        "from xraylens.models import create_model\n"
        "create_model('tinyvgg', num_classes=2, image_size=32)\n"
        "print('timm' in sys.modules, 'xraylens.models.resnet' in sys.modules)\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False False"


def _module_level_imports(path: Path) -> set[str]:
    """xraylens.models.* modules imported by top-level statements (TYPE_CHECKING blocks excluded)."""
    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            if node.module == "xraylens.models":  # `from xraylens.models import heads`
                out |= {f"xraylens.models.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("xraylens.models.")}


def test_no_import_cycle_in_the_model_package() -> None:
    graph = {f"xraylens.models.{p.stem}": _module_level_imports(p) for p in PKG.glob("*.py") if p.stem != "__init__"}
    done: set[str] = set()

    def visit(mod: str, path: tuple[str, ...]) -> None:
        assert mod not in path, "import cycle: " + " -> ".join((*path, mod))
        if mod in done:
            return
        for dep in graph.get(mod, ()):
            visit(dep, (*path, mod))
        done.add(mod)

    for mod in graph:
        visit(mod, ())
    # the heavy parts stay off the light modules
    for light in ("arch", "catalog", "_registry"):
        assert graph[f"xraylens.models.{light}"] <= {"xraylens.models.arch", "xraylens.models.catalog"}, light


def test_registry_keeps_its_public_names() -> None:
    from xraylens.models.registry import Arch, cam_layers, create_model, list_models, model_key, register_model

    assert all(callable(f) for f in (Arch, cam_layers, create_model, list_models, model_key, register_model))
    with pytest.raises(XraylensError, match="unknown model 'nonet'; choose one of: densenet121"):
        model_key("nonet")


def test_a_model_registered_outside_the_catalog_still_works(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    from xraylens.models.arch import Arch
    from xraylens.models.registry import create_model, list_models, register_model

    # private copies so the extra name never leaks into other tests
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    monkeypatch.setattr(_registry, "_HUB", dict(_registry._HUB))

    @register_model
    def my_net(num_classes: int, in_chans: int = 1, drop_rate: float = 0.0, **kw: object) -> tuple[nn.Module, Arch]:
        model = nn.Sequential(nn.Conv2d(in_chans, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))
        return model, Arch(stem="0", stages=(("0",),), head="2", cam=("0",))

    assert "my_net" in list_models()
    m = create_model("My-Net", num_classes=3, image_size=16)
    assert m.xraylens_name == "my_net" and m.default_cam_layers == ["0"]
