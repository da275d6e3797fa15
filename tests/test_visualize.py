"""Figures: training curves from a real detectron2 metrics.json, and the prediction figure."""
import importlib.util
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage, JSONWriter
from PIL import Image

from sharp_fpn.data.synthetic import generate_image
from sharp_fpn.d2.engine import get_config
from sharp_fpn.figures import read_metrics, true_labels

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo" / "mask_rcnn_fpn_R18.yaml"


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_metrics(folder, iterations, eval_every, start=0):
    """metrics.json as detectron2's own JSONWriter writes it during training."""
    with EventStorage(start) as storage:
        writer = JSONWriter(str(folder / "metrics.json"))
        for it in range(start, iterations):
            storage.iter = it
            # unsmoothed (detectron2 logs losses as medians over 20 iterations otherwise)
            storage.put_scalars(total_loss=3.0 / (it + 1), loss_cls=1.0 / (it + 1),
                                loss_mask=0.5 + 0.01 * it, smoothing_hint=False)
            storage.put_scalars(**{"fast_rcnn/cls_accuracy": 0.5 + it / 100})
            storage.put_scalar("lr", 0.01, smoothing_hint=False)
            if (it + 1) % eval_every == 0:
                storage.put_scalars(**{"bbox/AP": float(it), "segm/AP": float(it) / 2,
                                       "dsb/score": it / 100}, smoothing_hint=False)
            writer.write()
        writer.close()


def test_curves_from_a_resumed_run(tmp_path, capsys):
    write_metrics(tmp_path, 30, eval_every=10)
    write_metrics(tmp_path, 40, eval_every=10, start=20)  # resumed: iterations 20..29 again
    with open(tmp_path / "metrics.json", "a") as f:
        f.write('{"iteration": 40, "total_lo')  # cut by a crash
    series = read_metrics(tmp_path / "metrics.json")
    iterations, values = series["total_loss"]
    np.testing.assert_array_equal(iterations, np.arange(40))
    np.testing.assert_allclose(values, 3.0 / (np.arange(40) + 1))
    np.testing.assert_array_equal(series["bbox/AP"][0], [9, 19, 29, 39])

    assert load_tool("visualize").main(["curves", "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for name in ("losses.png", "metrics.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and min(image.size) > 200
        assert f"wrote {tmp_path / name}" in printed


def test_curves_of_a_missing_folder(tmp_path, capsys):
    assert load_tool("visualize").main(["curves", "--output-dir", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.json: no such file" in err
    assert not (tmp_path / "none").exists()  # nothing made for a run that could not start


@pytest.fixture
def tiny_dataset(tmp_path):
    """Two synthetic images with RLE annotations, registered as a detectron2 dataset."""
    rng = np.random.default_rng(0)
    records = []
    for i, style in enumerate(("fluorescence", "he")):
        rgba, labels = generate_image(rng, 72, 96, style)
        path = tmp_path / f"image{i}.png"
        Image.fromarray(rgba).save(path)
        annotations = []
        for k in range(1, labels.max() + 1):
            rle = mask_util.encode(np.asfortranarray(labels == k, dtype=np.uint8))
            annotations.append({"segmentation": rle, "category_id": 0, "iscrowd": 0,
                                "bbox": list(mask_util.toBbox(rle)), "bbox_mode": 1})
        records.append({"file_name": str(path), "image_id": i, "height": 72, "width": 96,
                        "annotations": annotations, "labels": labels})
    name = f"viz_tiny_{tmp_path.name}"
    DatasetCatalog.register(name, lambda: records)
    yield name, records
    DatasetCatalog.remove(name)


def test_true_labels_of_a_dataset_record(tiny_dataset):
    _, records = tiny_dataset
    for record in records:
        np.testing.assert_array_equal(true_labels(record), record["labels"])


def test_predictions_figure(tmp_path, tiny_dataset):
    name, _ = tiny_dataset
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(get_config(str(DEMO))), save_dir=str(tmp_path)).save("w")
    out = tmp_path / "figure.png"
    code = load_tool("visualize").main([
        "predictions", "--config-file", str(DEMO), "--weights", str(tmp_path / "w.pth"),
        "--dataset", name, "--num", "2", "--output", str(out), "--score-threshold", "0.05",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
    ])
    assert code == 0
    with Image.open(out) as image:
        width, height = image.size
        assert image.format == "PNG" and height > width * 0.5  # two rows of three panels
