"""The package's layers: which sub-package may import what.

``sharp_fpn.d2`` is the only place that imports detectron2; ``import sharp_fpn`` loads neither
detectron2 nor OpenCV nor torch; the framework-free layers reach ``sharp_fpn.d2`` only from
inside a function that needs it (a run that builds a detectron2 predictor, say).
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sharp_fpn"
D2 = PACKAGE / "d2"
# Application layers built on top of everything, detectron2 glue included.
ON_TOP = (PACKAGE / "experiments",)


def _imports(tree: ast.AST, top_level_only: bool):
    """Absolute module names imported by ``tree`` (relative ones resolved by the caller)."""
    body = tree.body if top_level_only else list(ast.walk(tree))
    for node in body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", node.lineno


def _absolute(path: Path, level: int, module: str) -> str:
    if not level:
        return module
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)[:-level]
    return ".".join(package + ([module] if module else []))


def _offenders(forbidden, skip, top_level_only):
    """``file:line imports X`` for every import of a module ``forbidden(X)`` holds, in the
    package's modules that ``skip(path)`` does not leave out."""
    found = []
    for path in sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts):
        if skip(path):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for level, module, line in _imports(tree, top_level_only):
            name = _absolute(path, level, module)
            if forbidden(name):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    return found


def _within(name, package):
    return name == package or name.startswith(package + ".")


def test_only_the_d2_package_imports_detectron2():
    offenders = _offenders(
        lambda name: _within(name, "detectron2"),
        skip=lambda path: D2 in path.parents,
        top_level_only=False,
    )
    assert not offenders, "\n".join(offenders)


def test_framework_free_layers_import_d2_only_inside_functions():
    offenders = _offenders(
        lambda name: _within(name, "sharp_fpn.d2"),
        skip=lambda path: any(layer in path.parents for layer in (D2, *ON_TOP)),
        top_level_only=True,
    )
    assert not offenders, "\n".join(offenders)


def _loaded_after(statement: str) -> dict:
    """Which heavy frameworks a fresh interpreter holds after running ``statement``."""
    code = (
        f"{statement}\nimport json, sys\n"
        "print(json.dumps({m: m in sys.modules for m in ('torch', 'detectron2', 'cv2')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_sharp_fpn_loads_no_framework():
    assert _loaded_after("import sharp_fpn") == {"torch": False, "detectron2": False, "cv2": False}


def test_grid_needs_no_torch():
    loaded = _loaded_after("import sharp_fpn.grid; sharp_fpn.grid.build_grid('sharp', 4)")
    assert loaded == {"torch": False, "detectron2": False, "cv2": False}


@pytest.mark.parametrize(
    "statement",
    [
        "import sharp_fpn.models; sharp_fpn.create_model('unet_sharp')",
        "import sharp_fpn.losses, sharp_fpn.metrics",
        "import sharp_fpn.data.catalog, sharp_fpn.data.dsb2018, sharp_fpn.data.rle",
        "import sharp_fpn.predict",
        "import sharp_fpn.export",
    ],
)
def test_framework_free_layers_load_no_detectron2(statement):
    assert not _loaded_after(statement)["detectron2"]


def test_importing_d2_registers_everything():
    code = (
        "import sharp_fpn.d2\n"
        "from detectron2.data import DatasetCatalog\n"
        "from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY\n"
        "import json\n"
        "print(json.dumps([sorted(n for n, _ in BACKBONE_REGISTRY),"
        " sorted(n for n, _ in META_ARCH_REGISTRY), DatasetCatalog.list()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    backbones, meta, datasets = json.loads(out.stdout.strip().splitlines()[-1])
    for name in (
        "build_vgg_backbone",
        "build_resnet_grid_fpn_backbone",
        "build_vgg16_grid_fpn_backbone",
        "build_vgg16_fpn_backbone",
    ):
        assert name in backbones
    assert "SemanticNucleiSegmentor" in meta
    for name in ("nuclei_synth_train", "nuclei_synth_val", "dsb2018_train", "dsb2018_val"):
        assert name in datasets
