"""The small tools never lose a user's file: the DSB2018 converter, the synthetic-set generator,
the exporter, the figures and the torchvision-weights converter refuse an output that is one of
their inputs, replace only what they wrote themselves (the folder's record) unless --overwrite,
and say why in one line naming the file. Real files on disk, the tools' own main()s (and a real
process, killed, for the converter)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sharp_fpn.outdir import RECORD_NAME

ROOT = Path(__file__).resolve().parents[1]
SPLIT = "stage1_train"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The run's error line, checked to be its stderr's only line but a progress bar's."""
    err = capsys.readouterr().err
    lines = [line.split("\r")[-1] for line in err.split("\n") if line.split("\r")[-1]]
    bars = [line for line in lines[:-1] if "image/s]" in line]
    assert lines and ": error: " in lines[-1] and len(lines) == 1 + len(bars), err
    return lines[-1]


def record(folder: Path) -> dict:
    return json.loads((folder / RECORD_NAME).read_text())


# --------------------------------------------------------------------------------------------
# convert_dsb2018


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def tiny_dsb(root: Path, images: int = 2) -> Path:
    """``images`` 8x10 images with two masks each, and a labels CSV of the same nuclei."""
    rows = ["ImageId,EncodedPixels"]
    for k in range(images):
        image_id = f"im{k}"
        write_png(root / SPLIT / image_id / "images" / f"{image_id}.png",
                  np.full((8, 10, 3), 40 * k, np.uint8))
        for m, (r, c) in enumerate([(1, 1), (5, 6)]):
            mask = np.zeros((8, 10), np.uint8)
            mask[r:r + 2, c:c + 3] = 255
            write_png(root / SPLIT / image_id / "masks" / f"{m}.png", mask)
            rows.append(f"{image_id},{c * 8 + r + 1} 2 {(c + 1) * 8 + r + 1} 2 "
                        f"{(c + 2) * 8 + r + 1} 2")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def dsb(tmp_path: Path) -> Path:
    return tiny_dsb(tmp_path / "dsb")


def convert(*args: str) -> int:
    return load_tool("convert_dsb2018").main([*map(str, args), "--workers", "1"])


def test_the_labels_csv_is_never_the_output(dsb: Path, capsys) -> None:
    csv = dsb / "labels.csv"
    before = digest(csv)
    for extra in ([], ["--overwrite"]):
        assert convert(dsb, "--labels-csv", csv, "--out", csv, *extra) == 1
        assert f"{csv}: is one of the inputs; choose another output" in one_error(capsys)
        assert digest(csv) == before
    # the same file by another name, through a symbolic link
    (dsb / "link.csv").symlink_to(csv)
    assert convert(dsb, "--labels-csv", dsb / "link.csv", "--out", csv, "--overwrite") == 1
    assert "is one of the inputs" in one_error(capsys)
    assert digest(csv) == before and not (dsb / RECORD_NAME).exists()


@pytest.mark.parametrize("target", [
    f"{SPLIT}/im0/images/im0.png", f"{SPLIT}/im1/masks/0.png", f"{SPLIT}/im1/masks/new.json",
    f"{SPLIT}/train.json",
])
def test_nothing_is_written_inside_the_split_folder(dsb: Path, capsys, target: str) -> None:
    out = dsb / target
    before = {p: digest(p) for p in (dsb / SPLIT).rglob("*") if p.is_file()}
    assert convert(dsb, "--out", out, "--overwrite") == 1
    err = one_error(capsys)
    assert f"{out}: inside {dsb / SPLIT}, the split's folder of images and masks" in err
    assert {p: digest(p) for p in (dsb / SPLIT).rglob("*") if p.is_file()} == before


def test_a_users_file_is_replaced_only_with_overwrite(dsb: Path, capsys) -> None:
    out = dsb / "annotations" / "train.json"
    out.parent.mkdir()
    out.write_text('{"mine": "hand-curated"}')
    assert convert(dsb, "--out", out) == 1
    err = one_error(capsys)
    assert f"{out}: exists (not written by sharp-fpn); choose another output folder, or pass " \
           "--overwrite to replace it" in err
    assert out.read_text() == '{"mine": "hand-curated"}'
    assert convert(dsb, "--out", out, "--overwrite") == 0
    assert len(json.loads(out.read_text())["annotations"]) == 4
    assert record(out.parent) == {"convert_dsb2018": ["train.json"]}


def test_its_own_output_is_replaced_and_the_csv_gives_the_same_bytes(dsb: Path, capsys) -> None:
    out = dsb / "annotations" / "train.json"
    assert convert(dsb, "--out", out) == 0
    first = out.read_bytes()
    assert convert(dsb, "--labels-csv", dsb / "labels.csv", "--out", out) == 0  # no --overwrite
    assert out.read_bytes() == first
    assert sorted(p.name for p in out.parent.iterdir()) == [RECORD_NAME, "train.json"]
    assert "wrote" in capsys.readouterr().out


def test_another_tools_output_is_not_replaced(dsb: Path, capsys) -> None:
    out = dsb / "results" / "summary.csv"
    out.parent.mkdir()
    out.write_text("image,nuclei\n")
    (out.parent / RECORD_NAME).write_text(json.dumps({"predict": ["summary.csv"]}))
    assert convert(dsb, "--out", out) == 1
    assert f"{out}: exists (written by predict)" in one_error(capsys)
    assert out.read_text() == "image,nuclei\n"


def test_an_output_that_is_a_folder_or_under_a_file(dsb: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "out.json").mkdir()
    assert convert(dsb, "--out", tmp_path / "out.json", "--overwrite") == 1
    assert f"{tmp_path / 'out.json'}: a folder is in the way of an output file" in one_error(capsys)
    (tmp_path / "notes").write_text("a file")
    assert convert(dsb, "--out", tmp_path / "notes" / "sub" / "out.json") == 1
    assert f"{tmp_path / 'notes'}: is a file, not a folder for " in one_error(capsys)
    assert (tmp_path / "notes").read_text() == "a file"


def test_bad_input_writes_nothing_and_debug_shows_the_traceback(dsb: Path, tmp_path: Path,
                                                                 capsys) -> None:
    (dsb / SPLIT / "im1" / "masks" / "2.jpg").write_bytes(b"\xff\xd8\xff")
    out = tmp_path / "new" / "train.json"
    assert convert(dsb, "--out", out) == 1
    assert "im1/masks/2.jpg: a JPG mask, which is lossy" in one_error(capsys)
    assert not out.parent.exists()
    from sharp_fpn.data.dsb2018 import DSBFormatError

    with pytest.raises(DSBFormatError, match="lossy"):
        convert(dsb, "--out", out, "--debug")


def test_a_killed_conversion_leaves_the_old_output(tmp_path: Path) -> None:
    """The rerun is stopped for good mid-way (a mask that is a FIFO nobody writes blocks its
    reader), then killed with SIGKILL: the first run's json is intact, no temporary file."""
    dsb = tiny_dsb(tmp_path / "dsb", images=4)
    out = tmp_path / "out" / "train.json"
    assert convert(dsb, "--out", out) == 0
    before = out.read_bytes()
    os.mkfifo(dsb / SPLIT / "im2" / "masks" / "9.png")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "convert_dsb2018.py"), str(dsb), "--out", str(out),
         "--workers", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        # the progress bar has started: the output is checked, the conversion under way
        printed, deadline = b"", time.monotonic() + 60
        while b"stage1_train" not in printed:
            assert time.monotonic() < deadline and proc.poll() is None, printed.decode()
            if select.select([proc.stderr], [], [], 1.0)[0]:
                printed += os.read(proc.stderr.fileno(), 4096)
        time.sleep(0.5)
        assert proc.poll() is None, "the converter finished although one mask never arrives"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == [RECORD_NAME, "train.json"]


# --------------------------------------------------------------------------------------------
# make_synthetic_nuclei


def synth(out: Path, *extra: str) -> int:
    return load_tool("make_synthetic_nuclei").main(
        ["--out", str(out), "--num-images", "1", "--seed", "1", "--sizes", "32x32",
         "--no-progress", *extra])


def test_synthetic_refuses_a_folder_of_other_files(tmp_path: Path, capsys) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    assert synth(tmp_path) == 1
    err = one_error(capsys)
    assert f"{tmp_path}: holds files that make_synthetic_nuclei did not write (photos)" in err
    assert sorted(os.listdir(tmp_path)) == ["photos"]
    assert synth(tmp_path, "--overwrite") == 0  # beside them, which stay
    assert sorted(os.listdir(tmp_path)) == [RECORD_NAME, "photos", f"{SPLIT}",
                                            f"{SPLIT}_labels.csv"]
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"\xff\xd8"
    assert synth(tmp_path, "--split", "stage1_test") == 0  # a folder it wrote into


def test_synthetic_output_that_is_a_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "data").write_text("not a folder")
    assert synth(tmp_path / "data", "--overwrite") == 1
    assert f"{tmp_path / 'data'}: is a file, not a folder for the outputs" in one_error(capsys)
    assert (tmp_path / "data").read_text() == "not a folder"


# --------------------------------------------------------------------------------------------
# convert_torchvision_weights


@pytest.fixture
def vgg_source(tmp_path: Path) -> Path:
    import torch
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["A"], batch_norm=False)
    source = tmp_path / "vgg11.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, source)
    return source


def weights(*args) -> int:
    return load_tool("convert_torchvision_weights").main([str(a) for a in args])


def test_weights_output_equal_to_the_input_is_refused(vgg_source: Path, capsys) -> None:
    before = digest(vgg_source)
    assert weights(vgg_source, vgg_source, "--overwrite") == 1
    assert f"{vgg_source}: is one of the inputs; choose another output" in one_error(capsys)
    assert digest(vgg_source) == before


def test_weights_replace_their_own_output_a_users_file_only_with_overwrite(
        vgg_source: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "weights" / "VGG11-tv.pth"
    target.parent.mkdir()
    target.write_bytes(b"my fine-tuned checkpoint")
    assert weights(vgg_source, target) == 1
    assert f"{target}: exists (not written by sharp-fpn)" in one_error(capsys)
    assert target.read_bytes() == b"my fine-tuned checkpoint"
    assert weights(vgg_source, target, "--overwrite") == 0
    first = digest(target)
    assert weights(vgg_source, target) == 0  # its own now
    assert digest(target) == first
    assert sorted(os.listdir(target.parent)) == [RECORD_NAME, "VGG11-tv.pth"]


def test_weights_errors_name_the_file_and_leave_nothing(tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a zip, not a pickle")
    out = tmp_path / "out"
    assert weights(broken, out / "x.pth") == 1
    assert f"{broken}: not a state-dict file that torch.load reads safely" in one_error(capsys)
    assert os.listdir(out) == []  # neither the output, a temporary file nor a record
    (tmp_path / "folder.pth").mkdir()
    assert weights(broken, tmp_path / "folder.pth", "--overwrite") == 1
    assert "folder.pth: a folder is in the way of an output file" in one_error(capsys)
    assert weights(tmp_path / "missing.pth", out / "x.pth") == 1
    assert f"{tmp_path / 'missing.pth'}: no such file" in one_error(capsys)


# --------------------------------------------------------------------------------------------
# visualize


def write_metrics(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"iteration": i, "total_loss": 1.0 / (i + 1), "lr": 0.01} for i in range(5)]
    lines.append({"iteration": 4, "dsb/score": 0.5})
    (folder / "metrics.json").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_curves_never_replace_a_users_figure(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    write_metrics(run)
    (run / "metrics.png").write_bytes(b"my own plot")
    tool = load_tool("visualize")
    assert tool.main(["curves", "--output-dir", str(run)]) == 1
    assert f"{run / 'metrics.png'}: exists (not written by sharp-fpn)" in one_error(capsys)
    assert not (run / "losses.png").exists()  # neither figure is drawn
    assert (run / "metrics.png").read_bytes() == b"my own plot"
    assert tool.main(["curves", "--output-dir", str(run), "--overwrite"]) == 0
    assert tool.main(["curves", "--output-dir", str(run)]) == 0  # its own now
    assert record(run) == {"visualize": ["losses.png", "metrics.png"]}
    (tmp_path / "figs").write_text("a file")
    assert tool.main(["curves", "--output-dir", str(run), "--save-dir",
                      str(tmp_path / "figs")]) == 1
    assert "figs: is a file, not a folder for the outputs" in one_error(capsys)


def test_prediction_figure_is_never_an_input(tmp_path: Path, capsys) -> None:
    """Refused before any model is built: the dataset's image, the config, the weights."""
    from detectron2.data import DatasetCatalog

    image = tmp_path / "cells.png"
    write_png(image, np.zeros((16, 16, 3), np.uint8))
    config, weights_file = tmp_path / "config.yaml", tmp_path / "model.pth"
    config.write_text("MODEL: {}\n")
    weights_file.write_bytes(b"weights")
    name = f"tool_outputs_{tmp_path.name}"
    DatasetCatalog.register(name, lambda: [{"file_name": str(image), "height": 16, "width": 16,
                                            "image_id": 0}])
    try:
        tool = load_tool("visualize")
        for output in (image, config, weights_file):
            before = digest(output)
            assert tool.main(["predictions", "--config-file", str(config), "--weights",
                              str(weights_file), "--dataset", name, "--output", str(output),
                              "--overwrite"]) == 1
            assert f"{output}: is one of the inputs; choose another output" in one_error(capsys)
            assert digest(output) == before
        mine = tmp_path / "figure.png"
        mine.write_bytes(b"a figure of mine")
        assert tool.main(["predictions", "--config-file", str(config), "--weights",
                          str(weights_file), "--dataset", name, "--output", str(mine)]) == 1
        assert f"{mine}: exists (not written by sharp-fpn)" in one_error(capsys)
    finally:
        DatasetCatalog.remove(name)


# --------------------------------------------------------------------------------------------
# export


def export(*args) -> int:
    return load_tool("export").main(["unet", "--arch", "unet_sharp", "--levels", "1", "--size",
                                     "32", "--no-onnx", *map(str, args)])


def test_export_refuses_before_the_work_and_replaces_only_with_overwrite(tmp_path: Path,
                                                                         capsys) -> None:
    (tmp_path / "file").write_text("x")
    assert export("--output", tmp_path / "file") == 1
    assert f"{tmp_path / 'file'}: is a file, not a folder for the outputs" in one_error(capsys)

    out = tmp_path / "deploy"
    out.mkdir()
    (out / "export_report.json").write_text("[]")
    assert export("--output", out) == 1
    assert f"{out / 'export_report.json'}: exists (not written by sharp-fpn)" in one_error(capsys)
    (out / "export_report.json").unlink()
    (out / "unet_sharp_L1.pt2").write_bytes(b"the model we ship")
    assert export("--output", out) == 1
    assert f"{out / 'unet_sharp_L1.pt2'}: exists (not written by sharp-fpn)" in one_error(capsys)
    assert (out / "unet_sharp_L1.pt2").read_bytes() == b"the model we ship"
    assert not (out / RECORD_NAME).exists()  # nothing claimed by the refused runs

    assert export("--output", out, "--levels", "2", "9") == 1
    assert "--levels 2 9: unet_sharp has pruning levels 1 2 3 4 only" in one_error(capsys)

    assert export("--output", out, "--overwrite") == 0
    assert (out / "unet_sharp_L1.pt2").stat().st_size > 1000
    assert record(out) == {"export": ["unet_sharp_L1.pt2", "export_report.json"]}
