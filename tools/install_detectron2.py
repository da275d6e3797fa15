#!/usr/bin/env python
"""Install detectron2 into the running Python environment.

detectron2 is not published on PyPI. Its official install builds it from its git repository,
which needs network access to GitHub. This script tries that first; where the repository cannot
be reached it falls back to the Python sources of detectron2 v0.6 as published on PyPI in the
source distribution ``pb1-detectron2==0.6`` (file for file upstream's v0.6 tag, without the C++
sources of the compiled ops), checked against a pinned sha256, and:

* replaces ``Image.LINEAR`` with ``Image.BILINEAR`` (upstream's own later fix, for Pillow >= 10);
* adds ``detectron2/_C.py``, a pure-Python stand-in for the compiled module. It answers
  ``get_compiler_version``/``get_cuda_version``/``has_cuda`` honestly (nothing compiled, no CUDA);
  every compiled op (rotated boxes, deformable convolution, the fast COCO evaluator) raises an
  error naming the op and saying that it needs detectron2 built from source;
* installs it as an ordinary distribution named ``detectron2`` (``pip show detectron2``,
  ``pip uninstall detectron2`` work as usual).

Only the standard library is used: this runs before anything else is installed.

Environment:
    SHARP_FPN_DETECTRON2   ``auto`` (default), ``official`` or ``fallback``.
    SHARP_FPN_DETECTRON2_REF   git ref of the official source (default ``main``).
"""
from __future__ import annotations

import argparse
import hashlib
import html.parser
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

OFFICIAL_REPO = "https://github.com/facebookresearch/detectron2.git"
FALLBACK_NAME = "pb1-detectron2"
FALLBACK_VERSION = "0.6"
FALLBACK_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
FALLBACK_FILENAME = f"{FALLBACK_NAME}-{FALLBACK_VERSION}.tar.gz"
DEFAULT_INDEX = "https://pypi.org/simple"

# Pure-Python runtime dependencies of detectron2 v0.6 (its setup.py, minus the code formatter
# ``black``, which only LazyConfig.save uses, inside a try block).
FALLBACK_REQUIRES = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]

# Every attribute that detectron2 v0.6's Python code reads from its compiled module, with what
# it is for (grep "_C\." over detectron2/).
COMPILED_OPS = {
    "box_iou_rotated": "IoU of rotated boxes",
    "roi_align_rotated_forward": "ROIAlignRotated",
    "roi_align_rotated_backward": "ROIAlignRotated",
    "nms_rotated": "NMS of rotated boxes",
    "deform_conv_forward": "deformable convolution",
    "deform_conv_backward_input": "deformable convolution",
    "deform_conv_backward_filter": "deformable convolution",
    "modulated_deform_conv_forward": "modulated deformable convolution",
    "modulated_deform_conv_backward": "modulated deformable convolution",
    "InstanceAnnotation": "the fast COCO evaluator (COCOEvaluator(use_fast_impl=True))",
    "ImageEvaluation": "the fast COCO evaluator (COCOEvaluator(use_fast_impl=True))",
    "COCOevalEvaluateImages": "the fast COCO evaluator (COCOEvaluator(use_fast_impl=True))",
    "COCOevalAccumulate": "the fast COCO evaluator (COCOEvaluator(use_fast_impl=True))",
}

STAND_IN_TEMPLATE = '''"""Stand-in for detectron2's compiled extension ``detectron2._C``.

Written by sharp-fpn's tools/install_detectron2.py: this detectron2 was installed from the
Python sources of v0.6 (PyPI ``pb1-detectron2==0.6``) because the official source could not be
reached, and those sources carry no C++/CUDA code. Nothing here is compiled. Every compiled op
raises an error naming itself; the three queries detectron2's collect_env makes answer honestly.
"""

IS_STAND_IN = True

_OPS = {ops!r}


class CompiledOpUnavailable(RuntimeError):
    """A compiled detectron2 op was called, but this detectron2 has no compiled ops."""


def _message(name):
    what = _OPS.get(name, "a compiled op")
    return (
        "detectron2._C.%s (%s) is a compiled op, and this detectron2 was installed without its "
        "compiled ops (sharp-fpn's Python-only fallback of detectron2 v0.6). It needs detectron2 "
        "built from source: https://github.com/facebookresearch/detectron2 (see "
        "INSTALL.md there)." % (name, what)
    )


def _unavailable(name):
    def op(*args, **kwargs):
        raise CompiledOpUnavailable(_message(name))

    op.__name__ = name
    op.__qualname__ = name
    op.__doc__ = _message(name)
    return op


for _name in _OPS:
    globals()[_name] = _unavailable(_name)
del _name


def get_compiler_version():
    return "none (detectron2._C is a pure-Python stand-in: nothing was compiled)"


def get_cuda_version():
    return "none (detectron2._C is a pure-Python stand-in: no CUDA ops)"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(_message(name))
'''

FALLBACK_SETUP = '''# Written by sharp-fpn's tools/install_detectron2.py for the Python-only fallback.
from setuptools import find_packages, setup

PROJECTS = {{
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}}

setup(
    name="detectron2",
    version="{version}",
    author="FAIR",
    url="https://github.com/facebookresearch/detectron2",
    description="detectron2 v0.6 Python sources without compiled ops "
    "(from PyPI pb1-detectron2==0.6, sha256-checked; installed by sharp-fpn)",
    packages=find_packages(exclude=("configs", "tests*")) + list(PROJECTS.keys()),
    package_dir=PROJECTS,
    package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
    include_package_data=False,
    python_requires=">=3.6",
    install_requires={requires!r},
)
'''


def log(msg: str) -> None:
    print(f"[install_detectron2] {msg}", flush=True)


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log("$ " + " ".join(cmd))
    subprocess.check_call(cmd)


def official_reachable(timeout: float = 20.0) -> bool:
    """Whether the official git repository answers (``git ls-remote``)."""
    if shutil.which("git") is None:
        return False
    try:
        subprocess.run(
            ["git", "ls-remote", "--heads", OFFICIAL_REPO],
            check=True,
            capture_output=True,
            timeout=timeout,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def install_official(ref: str) -> None:
    pip("install", "--no-build-isolation", f"git+{OFFICIAL_REPO}@{ref}")


class _LinkParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: D401 - HTMLParser API
        if tag == "a":
            for key, value in attrs:
                if key == "href" and value:
                    self.links.append(value)


def index_url() -> str:
    """The package index pip is configured with (PEP 503 simple API)."""
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        try:
            out = subprocess.run(
                [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            url = out.stdout.strip() if out.returncode == 0 else ""
        except (subprocess.SubprocessError, OSError):
            url = ""
    return (url or DEFAULT_INDEX).rstrip("/")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_fallback(dest: Path) -> Path:
    """Download the pinned sdist from the package index into ``dest`` and verify its sha256."""
    local = os.environ.get("SHARP_FPN_DETECTRON2_SDIST")
    if local:
        path = Path(local)
    else:
        page_url = f"{index_url()}/{FALLBACK_NAME}/"
        log(f"looking up {FALLBACK_FILENAME} at {page_url}")
        with urllib.request.urlopen(page_url, timeout=120) as resp:
            parser = _LinkParser()
            parser.feed(resp.read().decode("utf-8", "replace"))
        hrefs = [h for h in parser.links if urllib.parse.urlsplit(h).path.endswith(FALLBACK_FILENAME)]
        if not hrefs:
            raise SystemExit(f"{page_url} lists no {FALLBACK_FILENAME}")
        url = urllib.parse.urljoin(page_url, hrefs[0]).split("#", 1)[0]
        path = dest / FALLBACK_FILENAME
        log(f"downloading {url}")
        with urllib.request.urlopen(url, timeout=300) as resp, open(path, "wb") as out:
            shutil.copyfileobj(resp, out)
    got = sha256_of(path)
    if got != FALLBACK_SHA256:
        raise SystemExit(
            f"{path}: sha256 is {got}, expected {FALLBACK_SHA256}; refusing to install it"
        )
    log(f"{path.name}: sha256 verified ({FALLBACK_SHA256})")
    return path


def _safe_extract(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        root = dest.resolve()
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            if root not in target.parents and target != root:
                raise SystemExit(f"{archive}: member {member.name!r} escapes the archive")
            if member.issym() or member.islnk():
                raise SystemExit(f"{archive}: member {member.name!r} is a link; refusing it")
        tar.extractall(dest)
    (src,) = [p for p in dest.iterdir() if p.is_dir()]
    return src


def patch_sources(src: Path) -> None:
    """Apply the Pillow fix, add the ``_C`` stand-in and replace setup.py."""
    transform = src / "detectron2" / "data" / "transforms" / "transform.py"
    text = transform.read_text()
    if "Image.LINEAR" not in text:
        raise SystemExit(f"{transform}: expected Image.LINEAR to patch; the sources changed?")
    transform.write_text(text.replace("Image.LINEAR", "Image.BILINEAR"))
    (src / "detectron2" / "_C.py").write_text(STAND_IN_TEMPLATE.format(ops=COMPILED_OPS))
    shutil.rmtree(src / "pb1_detectron2.egg-info", ignore_errors=True)
    (src / "setup.py").write_text(
        FALLBACK_SETUP.format(version=FALLBACK_VERSION, requires=FALLBACK_REQUIRES)
    )


def install_fallback() -> None:
    with tempfile.TemporaryDirectory(prefix="d2-fallback-") as tmp:
        tmp_path = Path(tmp)
        archive = download_fallback(tmp_path)
        extract_dir = tmp_path / "src"
        extract_dir.mkdir()
        src = _safe_extract(archive, extract_dir)
        patch_sources(src)
        pip("install", "--no-build-isolation", str(src))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        choices=("auto", "official", "fallback"),
        default=os.environ.get("SHARP_FPN_DETECTRON2", "auto"),
        help="where detectron2 comes from (default: $SHARP_FPN_DETECTRON2 or auto)",
    )
    parser.add_argument("--ref", default=os.environ.get("SHARP_FPN_DETECTRON2_REF", "main"))
    args = parser.parse_args(argv)

    source = args.source
    if source == "auto":
        log(f"checking whether {OFFICIAL_REPO} can be reached ...")
        source = "official" if official_reachable() else "fallback"
    if source == "official":
        log(f"installing detectron2 from the official source ({OFFICIAL_REPO}@{args.ref})")
        try:
            install_official(args.ref)
            log("installed detectron2 from the official source (with its compiled ops)")
            return 0
        except subprocess.CalledProcessError as e:
            if args.source == "official":
                raise SystemExit(f"official detectron2 build failed: {e}")
            log(f"official build failed ({e}); using the Python-only fallback")
    log(
        f"installing detectron2 {FALLBACK_VERSION} from the Python-only fallback "
        f"({FALLBACK_NAME}=={FALLBACK_VERSION}, sha256-checked, no compiled ops)"
    )
    install_fallback()
    log(
        "installed detectron2 0.6 (Python-only fallback): rotated boxes, deformable convolution "
        "and the fast COCO evaluator are unavailable and raise a clear error when used"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
