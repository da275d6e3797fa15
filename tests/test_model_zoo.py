"""The model zoo: publishing a run, the registry, sha256 checks, predict with nothing else given,
and --diameter's rescaling (a tiny random Mask R-CNN; no training)."""
import csv
import importlib.util
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
import yaml

from sharp_fpn import model_zoo
from sharp_fpn.d2.engine import get_config
from sharp_fpn.d2.predictor import NucleiPredictor, load_config
from sharp_fpn.model_zoo import publish as zoo_publish
from sharp_fpn.predict import scale as scaling
from sharp_fpn.predict.run import _settings

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo" / "mask_rcnn_fpn_R18.yaml"
DIAMETER = 10.0  # the tiny model's INPUT.NUCLEUS_DIAMETER
# small and fast: no test-time resize (so --diameter's scale is the model's), few proposals
RUN_OPTS = ["INPUT.NUCLEUS_DIAMETER", str(DIAMETER), "INPUT.MIN_SIZE_TEST", "0",
            "MODEL.RPN.POST_NMS_TOPK_TEST", "100", "TEST.DETECTIONS_PER_IMAGE", "100"]
FACTS = {
    "training_data": "none (a randomly initialised test model)", "seed": 0, "iterations": 0,
    "recipe": ["the demo config"], "heldout": "synthetic nuclei, seed 1",
    "scores": {"fluorescence": {"model": 0.01, "baseline": 0.3},
               "he": {"model": 0.0, "baseline": 0.17}},
    "throughput": 1.5, "command": "python tests/test_model_zoo.py",
    "selection": {"winner": "tiny", "runner_up": "nothing", "margin": "+0.00"},
}


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def disks(shape, diameter, count, seed):
    """A gray image of ``count`` bright disks of ``diameter`` px, not touching."""
    rng = np.random.default_rng(seed)
    image = np.full(shape + (3,), 30, np.uint8)
    labels = np.zeros(shape, np.int32)
    radius = diameter / 2
    for _ in range(count * 50):
        if labels.max() == count:
            break
        y, x = rng.uniform(radius + 1, np.array(shape) - radius - 1)
        disk = np.zeros(shape, np.uint8)
        cv2.circle(disk, (round(x), round(y)), round(radius), 1, -1)
        grown = cv2.dilate(disk, np.ones((5, 5), np.uint8)).astype(bool)
        if labels[grown].any():
            continue
        labels[disk.astype(bool)] = labels.max() + 1
    image[labels > 0] = 200
    return image, labels


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run as tools/train_net.py leaves one: config.yaml and model_final.pth."""
    folder = tmp_path_factory.mktemp("run")
    cfg = get_config(str(DEMO), RUN_OPTS)
    (folder / "config.yaml").write_text(cfg.dump())
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(cfg), save_dir=str(folder)).save("model_final",
                                                                      iteration=3)
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, run_dir):
    root = tmp_path_factory.mktemp("zoo")
    facts = run_dir / "facts.json"
    facts.write_text(json.dumps(FACTS))
    code = load_tool("publish_model").main([
        "--run", str(run_dir), "--name", "tiny", "--description", "a random test model",
        "--modalities", "fluorescence", "he", "--facts", str(facts), "--default",
        "--zoo", str(root)])
    assert code == 0
    return root


@pytest.fixture
def use_zoo(zoo, monkeypatch):
    monkeypatch.setenv(model_zoo.ZOO_ENV, str(zoo))
    return zoo


def test_the_shipped_registry_is_packaged():
    here = Path(model_zoo.__file__).parent
    index = json.loads((here / "index.json").read_text())  # its models: test_shipped_model.py
    assert set(index) == {"models", "default"}
    setup = (ROOT / "setup.py").read_text()
    for pattern in ("index.json", "*/config.yaml", "*/model.pth", "*/MODEL_CARD.md"):
        assert f'"{pattern}"' in setup


def test_published_entry(use_zoo, run_dir):
    assert [m.name for m in model_zoo.list_models()] == ["tiny"]
    assert model_zoo.default_model_name() == "tiny"
    entry = model_zoo.get_model("tiny")
    assert entry.is_default and entry.modalities == ("fluorescence", "he")
    assert entry.nucleus_diameter == DIAMETER and entry.description == "a random test model"
    assert entry.size_bytes == os.path.getsize(entry.weights_path) <= model_zoo.MAX_WEIGHTS_BYTES
    assert entry.sha256 == model_zoo.file_sha256(entry.weights_path)

    config, weights = model_zoo.resolve()
    assert (config, weights) == (use_zoo / "tiny" / "config.yaml", use_zoo / "tiny" / "model.pth")
    assert model_zoo.resolve("tiny") == (config, weights)
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    assert list(saved) == ["model"]  # no optimizer, scheduler, iteration
    dtypes = {v.dtype for v in saved["model"].values()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    assert any(not v.is_floating_point() for v in saved["model"].values())  # BN counters kept
    dumped = yaml.safe_load(config.read_text())
    assert "_BASE_" not in dumped
    assert dumped["MODEL"]["WEIGHTS"] == "" and dumped["MODEL"]["DEVICE"] == "cpu"

    card = entry.card_path.read_text()
    assert "Trained on synthetic data only" in card
    assert "no licence of anyone's images" in card
    for fact in ("python tests/test_model_zoo.py", "0.300", "0.170", "1.50 megapixels/s",
                 "tiny won over nothing", "seed 1"):
        assert fact in card


def test_fp16_weights_predict_as_the_fp32_checkpoint(use_zoo, run_dir):
    image, _ = disks((96, 96), 10, 12, seed=0)
    image = cv2.GaussianBlur(image, (5, 5), 1.5)
    full = NucleiPredictor(str(run_dir / "config.yaml"), str(run_dir / "model_final.pth"),
                           score_threshold=0.0)
    half = NucleiPredictor(*map(str, model_zoo.resolve()), score_threshold=0.0)
    a, b = full.run_model(image)["instances"], half.run_model(image)["instances"]
    n = min(len(a), len(b), 20)
    assert n > 0
    # the same detections (near-tied scores may swap places): each of the fp32 model's best
    # boxes has one of the fp16 model's within a pixel, with nearly its score
    boxes_a, boxes_b = a.pred_boxes.tensor[:n].numpy(), b.pred_boxes.tensor.numpy()
    distance = np.abs(boxes_a[:, None] - boxes_b[None]).max(axis=2)
    nearest = distance.argmin(axis=1)
    assert distance.min(axis=1).max() < 1.0
    np.testing.assert_allclose(a.scores[:n].numpy(), b.scores.numpy()[nearest], atol=1e-2)
    la, lb = full.predict(image, tile=0).labels, half.predict(image, tile=0).labels
    assert ((la > 0) == (lb > 0)).mean() > 0.98


def test_tampered_weights_are_refused_by_name(zoo, tmp_path):
    copy = tmp_path / "zoo"
    shutil.copytree(zoo, copy)
    weights = copy / "tiny" / "model.pth"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    entry = model_zoo.get_model("tiny", copy)
    with pytest.raises(model_zoo.WeightsMismatch) as e:
        model_zoo.resolve("tiny", copy)
    message = str(e.value)
    assert str(weights) in message and entry.sha256 in message
    assert model_zoo.file_sha256(weights) in message


def test_weights_over_30_mb_are_refused(zoo, run_dir, tmp_path, monkeypatch):
    copy = tmp_path / "zoo"
    shutil.copytree(zoo, copy)
    with open(copy / "tiny" / "model.pth", "r+b") as f:
        f.truncate(model_zoo.MAX_WEIGHTS_BYTES + 1)
    with pytest.raises(model_zoo.ZooError, match="more than"):
        model_zoo.resolve("tiny", copy)
    # publishing: the tiny model is under 30 MB, so lower the limit to see the refusal
    monkeypatch.setattr(zoo_publish, "MAX_WEIGHTS_BYTES", 1_000_000)
    with pytest.raises(model_zoo.ZooError, match="more than a zoo model's 1000000"):
        zoo_publish.publish(run_dir, "big", "too big", ["he"], FACTS, zoo=tmp_path / "other",
                            check=False)
    assert not (tmp_path / "other" / "big").exists()


def test_publish_refuses_incomplete_facts_and_existing_names(zoo, run_dir):
    with pytest.raises(model_zoo.ZooError, match="missing command"):
        zoo_publish.publish(run_dir, "x", "d", ["he"], {k: v for k, v in FACTS.items()
                                                        if k != "command"}, zoo=zoo)
    with pytest.raises(model_zoo.ZooError, match="already has a model 'tiny'"):
        zoo_publish.publish(run_dir, "tiny", "d", ["he"], FACTS, zoo=zoo)


def test_list_models_and_unknown_model(use_zoo, tmp_path, capsys):
    predict = load_tool("predict")
    assert predict.main(["--list-models"]) == 0
    line = [row for row in capsys.readouterr().out.splitlines() if row.startswith("tiny")][0]
    assert "*" in line and "fluorescence,he" in line and "MB" in line
    assert "a random test model" in line
    with pytest.raises(model_zoo.UnknownModelError, match="known models: tiny"):
        predict.main(["--model", "nope", "--input", str(tmp_path), "--output",
                      str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        predict.main(["--model", "tiny", "--config-file", str(DEMO), "--input", str(tmp_path),
                      "--output", str(tmp_path / "out")])
    capsys.readouterr()


def test_an_empty_zoo_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(model_zoo.ZOO_ENV, str(tmp_path / "empty"))
    with pytest.raises(model_zoo.NoModelError,
                       match="no nuclei model is shipped in this install yet; give "
                             "--config-file and --weights"):
        load_tool("predict").main(["--input", str(tmp_path), "--output", str(tmp_path / "o")])
    assert model_zoo.list_models() == [] and model_zoo.default_model_name() is None


def test_predict_with_nothing_given_and_with_diameter(use_zoo, tmp_path, capsys):
    image, _ = disks((64, 80), DIAMETER, 8, seed=1)
    big = cv2.resize(image, (160, 128), interpolation=cv2.INTER_NEAREST)  # nuclei 2x larger
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "cells.png"), image)
    cv2.imwrite(str(folder / "big.png"), big)
    predict = load_tool("predict")

    out = tmp_path / "auto"
    assert predict.main(["--input", str(folder / "cells.png"), "--output", str(out),
                         "--tile", "0", "--score-threshold", "0.05"]) == 0
    [row] = read_csv(out / "summary.csv")
    assert row["status"] == "ok"
    assert row["diameter_source"] in ("estimated", scaling.TOO_FEW)
    if row["diameter_source"] == "estimated":
        needed = DIAMETER / float(row["diameter"])
        expected = (1.0 if scaling.KEEP_RANGE[0] <= needed <= scaling.KEEP_RANGE[1]
                    else scaling.clamp_scale(needed))
        assert float(row["scale"]) == pytest.approx(expected, abs=1e-3)
    else:
        assert row["diameter"] == "" and float(row["scale"]) == 1.0
    assert tifffile.imread(out / "cells_labels.tif").shape == (64, 80)

    out = tmp_path / "given"
    assert predict.main(["--input", str(folder / "big.png"), "--output", str(out), "--tile", "0",
                         "--score-threshold", "0.05", "--diameter", str(2 * DIAMETER)]) == 0
    [row] = read_csv(out / "summary.csv")
    assert row["status"] == "ok" and row["diameter_source"] == "given"
    assert float(row["diameter"]) == 2 * DIAMETER and float(row["scale"]) == 0.5
    labels = tifffile.imread(out / "big_labels.tif")
    assert labels.shape == (128, 160) and int(row["height"]) == 128
    table = read_csv(out / "big_nuclei.csv")
    assert len(table) == int(row["nuclei"]) == len(np.unique(labels[labels > 0]))
    capsys.readouterr()


def test_diameter_needs_a_model_that_knows_its_own(run_dir, tmp_path):
    predict = load_tool("predict")
    with pytest.raises(ValueError, match="INPUT.NUCLEUS_DIAMETER is 0"):
        predict.main(["--config-file", str(DEMO), "--weights",
                      str(run_dir / "model_final.pth"), "--input", str(tmp_path),
                      "--output", str(tmp_path / "o"), "--diameter", "12"])
    with pytest.raises(SystemExit):
        predict.main(["--input", str(tmp_path), "--output", str(tmp_path / "o"),
                      "--diameter", "0"])


def test_the_resume_fingerprint_includes_the_diameter(use_zoo):
    cfg = load_config(str(model_zoo.resolve()[0]))
    settings = [_settings(cfg, None, 0, 16, 0.5, 0.5, True, d) for d in (None, 12.0, 24.0)]
    assert len(set(settings)) == 3


class Thresholder:
    """A stand-in model: the 8-connected bright components, at whatever size it is given."""

    def __init__(self):
        self.shapes = []

    def __call__(self, rgb):
        from types import SimpleNamespace

        self.shapes.append(rgb.shape[:2])
        count, labels = cv2.connectedComponents((rgb[..., 0] > 100).astype(np.uint8), 8)
        return SimpleNamespace(labels=labels.astype(np.int32),
                               scores=np.linspace(1, 0.5, count - 1), tiles=1)


def test_estimated_diameter_rescales_only_when_needed():
    image, truth = disks((120, 150), 20, 10, seed=2)
    model = Thresholder()
    result = scaling.predict_at_scale(model, image, model_diameter=10.0)
    assert result.choice.source == "estimated" and result.choice.passes == 2
    assert result.choice.diameter == pytest.approx(20, abs=1.5)
    assert result.choice.scale == pytest.approx(10 / result.choice.diameter)
    assert model.shapes == [(120, 150), (round(120 * result.choice.scale),
                                         round(150 * result.choice.scale))]
    assert result.labels.shape == (120, 150) and result.labels.max() == result.scores.size == 10
    assert ((result.labels > 0) == (truth > 0)).mean() > 0.97

    model = Thresholder()  # the nuclei already have the model's size: one pass
    result = scaling.predict_at_scale(model, image, model_diameter=21.0)
    assert result.choice.scale == 1.0 and result.choice.passes == 1 and len(model.shapes) == 1

    blank = np.zeros((50, 50, 3), np.uint8)  # too few nuclei to estimate: scale 1
    result = scaling.predict_at_scale(Thresholder(), blank, model_diameter=10.0)
    assert result.choice == scaling.ScaleChoice(None, scaling.TOO_FEW, 1.0)
    tiny, _ = disks((200, 200), 4, 6, seed=3)  # 10 / 4 = 2.5x, and clamped at 4x
    assert scaling.predict_at_scale(Thresholder(), tiny, 10.0).choice.scale == pytest.approx(
        10 / scaling.median_diameter(cv2.connectedComponents(
            (tiny[..., 0] > 100).astype(np.uint8), 8)[1]), rel=1e-6)
    assert scaling.predict_at_scale(Thresholder(), tiny, 40.0, diameter=4.0).choice.scale == 4.0


def test_resize_labels_and_compact():
    labels = np.array([[1, 1, 2, 2], [3, 3, 0, 0]], np.int32)
    np.testing.assert_array_equal(scaling.resize_labels(labels, (4, 8)),
                                  np.repeat(np.repeat(labels, 2, 0), 2, 1))
    small = scaling.resize_labels(np.repeat(np.repeat(labels, 2, 0), 2, 1), (2, 4))
    np.testing.assert_array_equal(small, labels)
    compact, scores = scaling.compact_labels(np.array([[0, 3], [3, 1]]), np.array([.9, .8, .7]))
    np.testing.assert_array_equal(compact, [[0, 2], [2, 1]])
    np.testing.assert_allclose(scores, [.9, .7])
