"""The detectron2 installation: an ordinary distribution, and the fallback's guarantees."""
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _installer():
    spec = importlib.util.spec_from_file_location("install_detectron2", ROOT / "tools" / "install_detectron2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_detectron2_is_an_installed_distribution():
    assert importlib.metadata.version("detectron2").startswith("0.")
    out = subprocess.run([sys.executable, "-m", "pip", "show", "detectron2"], capture_output=True, text=True)
    assert out.returncode == 0 and "Name: detectron2" in out.stdout


def test_compiled_ops_fail_clearly_or_exist():
    from detectron2 import _C

    if not getattr(_C, "IS_STAND_IN", False):
        pytest.skip("detectron2 was built from source with its compiled ops")
    assert _C.has_cuda() is False
    assert "stand-in" in _C.get_compiler_version()
    for op in ("box_iou_rotated", "deform_conv_forward", "COCOevalAccumulate", "nms_rotated"):
        with pytest.raises(RuntimeError, match=rf"detectron2\._C\.{op} .*built from source"):
            getattr(_C, op)()
    with pytest.raises(AttributeError, match="no_such_op"):
        _C.no_such_op  # noqa: B018


def test_rotated_box_iou_names_the_op():
    from detectron2 import _C
    from detectron2.structures import RotatedBoxes, pairwise_iou_rotated
    import torch

    if not getattr(_C, "IS_STAND_IN", False):
        pytest.skip("detectron2 was built from source with its compiled ops")
    boxes = RotatedBoxes(torch.tensor([[10.0, 10.0, 4.0, 4.0, 0.0]]))
    with pytest.raises(RuntimeError, match="box_iou_rotated"):
        pairwise_iou_rotated(boxes, boxes)


def test_collect_env_answers_with_the_stand_in():
    from detectron2.utils.collect_env import collect_env_info

    text = collect_env_info()
    assert "detectron2" in text and "not built correctly" not in text


def test_fallback_refuses_a_wrong_hash(tmp_path, monkeypatch):
    installer = _installer()
    fake = tmp_path / installer.FALLBACK_FILENAME
    fake.write_bytes(b"not the real sdist")
    monkeypatch.setenv("SHARP_FPN_DETECTRON2_SDIST", str(fake))
    with pytest.raises(SystemExit, match="sha256 is .* expected 5d2e9e51"):
        installer.download_fallback(tmp_path)


def test_patch_sources_fixes_pillow_and_adds_the_stand_in(tmp_path):
    installer = _installer()
    src = tmp_path / "pb1-detectron2-0.6"
    transform = src / "detectron2" / "data" / "transforms" / "transform.py"
    transform.parent.mkdir(parents=True)
    transform.write_text("def f(interp=Image.LINEAR):\n    return Image.LINEAR\n")
    (src / "setup.py").write_text("raise SystemExit('the original setup.py builds C++')\n")
    installer.patch_sources(src)
    assert "LINEAR" not in transform.read_text().replace("BILINEAR", "")
    stand_in = (src / "detectron2" / "_C.py").read_text()
    compile(stand_in, "_C.py", "exec")
    setup_text = (src / "setup.py").read_text()
    assert 'name="detectron2"' in setup_text and "ext_modules" not in setup_text
