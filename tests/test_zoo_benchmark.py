"""The zoo benchmark: the classical baseline, the metric helpers, the report and the command."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from sharp_fpn import classical
from sharp_fpn.data.synthetic import generate_image
from sharp_fpn.metrics import dsb_score
from sharp_fpn.perf import zoo
from sharp_fpn.perf.benchmarks import BENCHMARKS, benchmark_parser, run_benchmark
from sharp_fpn.predict.image_io import normalise

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo" / "mask_rcnn_fpn_R18.yaml"


def synthetic(seed, style, size=192):
    """A version-1 image (the positional call every generator version accepts)."""
    image, labels = generate_image(np.random.default_rng(seed), size, size, style, False)
    return normalise(image)[0], labels


# --------------------------------------------------------------------------------------------
# the classical pipeline


@pytest.mark.parametrize("style,seed,floor", [("fluorescence", 7, 0.5), ("fluorescence", 8, 0.55),
                                              ("he", 7, 0.55), ("he", 8, 0.7)])
def test_classical_finds_about_the_right_nuclei(style, seed, floor):
    # measured at the tuned constants: 0.60, 0.64 (fluorescence), 0.65, 0.81 (H&E)
    rgb, labels = synthetic(seed, style)
    found = classical.segment(rgb)
    assert found.dtype == np.int32 and found.shape == labels.shape
    true = int(labels.max())
    assert 0.8 * true <= int(found.max()) <= 1.2 * true
    assert dsb_score(labels, found) > floor
    assert set(np.unique(found)) == set(range(int(found.max()) + 1))  # consecutive ids


def test_classical_reads_each_modality_from_the_image():
    fluorescence, labels = synthetic(8, "fluorescence")
    he, _ = synthetic(8, "he")
    assert classical.modality(fluorescence) == "fluorescence"
    assert classical.modality(he) == "stained"
    brightfield = 255 - fluorescence  # dark nuclei on a light gray background
    assert classical.modality(brightfield) == "brightfield"
    assert dsb_score(labels, classical.segment(brightfield)) > 0.55
    assert classical.segment(fluorescence[..., 0]).max() > 0  # gray input too


def test_classical_on_a_blank_image_and_a_given_diameter():
    assert classical.segment(np.zeros((64, 64, 3), np.uint8)).max() == 0
    rgb, labels = synthetic(8, "fluorescence")
    assert classical.segment(rgb, diameter=18).max() > 0.5 * labels.max()
    with pytest.raises(ValueError, match="diameter"):
        classical.segment(rgb, diameter=0)


# --------------------------------------------------------------------------------------------
# the metric helpers


def two_discs():
    labels = np.zeros((40, 40), np.int32)
    yy, xx = np.mgrid[:40, :40]
    labels[(yy - 10) ** 2 + (xx - 10) ** 2 < 36] = 1
    labels[(yy - 28) ** 2 + (xx - 26) ** 2 < 49] = 2
    return labels


def test_metrics_of_a_perfect_and_an_empty_prediction():
    truth = two_discs()
    relabelled = np.where(truth > 0, 3 - truth, 0)  # same nuclei, other ids
    perfect = zoo.dsb_and_mask_ap([(truth, relabelled, {1: 0.9, 2: 0.8})])
    assert perfect["dsb_score"] == 1.0 and perfect["mask_ap"] == 1.0
    assert perfect["true_nuclei"] == perfect["predicted_nuclei"] == 2
    empty = zoo.dsb_and_mask_ap([(truth, np.zeros_like(truth), None)])
    assert empty["dsb_score"] == 0.0 and empty["mask_ap"] == 0.0
    assert zoo.mask_ap([(np.zeros_like(truth), truth, None)]) is None  # no true nucleus


def test_mask_ap_by_hand():
    # one of two nuclei found exactly, plus a false positive scored below it: precision 1 up
    # to recall 0.5 at every IoU threshold, recall never beyond: AP = 51/101 (COCO's 101 points)
    truth = two_discs()
    found = np.zeros_like(truth)
    found[truth == 1] = 1
    found[35:39, 0:4] = 2
    ap = zoo.mask_ap([(truth, found, {1: 0.9, 2: 0.1})])
    assert ap == pytest.approx(51 / 101, abs=1e-6)


def test_candidates_are_parsed_and_a_missing_zoo_is_a_note(monkeypatch):
    assert zoo.parse_candidate("a=c.yaml:w.pth") == zoo.Candidate("a", "c.yaml", "w.pth")
    assert zoo.parse_candidate("b=c.yaml:random").weights is None
    for bad in ("nothing", "a=c.yaml", f"{zoo.CLASSICAL}=c.yaml:w.pth"):
        with pytest.raises(ValueError, match="--candidate"):
            zoo.parse_candidate(bad)

    def empty_zoo():
        raise ValueError("no nuclei model is shipped in this install yet")

    fake = types.ModuleType("sharp_fpn.model_zoo")
    fake.resolve = empty_zoo
    fake.default_model_name = lambda: None
    monkeypatch.setitem(sys.modules, "sharp_fpn.model_zoo", fake)
    monkeypatch.setattr("sharp_fpn.model_zoo", fake, raising=False)
    candidates, notes = zoo.default_candidates()
    assert candidates == [] and "no nuclei model is shipped" in notes[0]


# --------------------------------------------------------------------------------------------
# the benchmark with a random tiny Mask R-CNN


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch
    from detectron2.modeling import build_model

    from sharp_fpn.d2.engine import get_config

    folder = tmp_path_factory.mktemp("tiny")
    cfg = get_config(str(DEMO))
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.save({"model": model.state_dict()}, folder / "random.pth")
    (folder / "config.yaml").write_text(cfg.dump())
    return folder / "config.yaml", folder / "random.pth"


def test_evaluate_writes_json_and_markdown_with_every_style(tiny_model, tmp_path):
    config, weights = tiny_model
    images = {style: [synthetic(seed, style, size=64) for seed in (1, 2)]
              for style in ("fluorescence", "he")}
    results = zoo.evaluate([("tiny", str(config), str(weights))], images=images,
                           throughput_size=128, throughput_nuclei=20, rounds=1, tile=0,
                           notes=["a test"])
    assert results["methods"] == ["tiny", zoo.CLASSICAL]
    for style in images:
        for method in results["methods"]:
            row = results["styles"][style][method]
            assert 0.0 <= row["dsb_score"] <= 1.0 and row["images"] == 2
            assert row["mask_ap"] is None or 0.0 <= row["mask_ap"] <= 1.0
        assert results["styles"][style][zoo.CLASSICAL]["dsb_score"] > 0.3
    speed = results["throughput"]
    assert speed["image"]["size"] == [128, 128] and speed["image"]["nuclei"] > 0
    assert all(row["megapixels_per_s"] > 0 for row in speed["methods"].values())
    json_path, md_path = zoo.write_report(results, tmp_path / "report.json")
    assert json.loads(json_path.read_text())["styles"].keys() == images.keys()
    table = md_path.read_text()
    assert md_path == tmp_path / "report.md"
    for text in ("| fluorescence |", "| he |", "classical", "tiny", "MP/s", "Note: a test"):
        assert text in table


def test_zoo_command_writes_its_record_and_table(tiny_model, tmp_path):
    config, weights = tiny_model
    assert "zoo" in BENCHMARKS
    args = benchmark_parser("zoo").parse_args([
        "--out-dir", str(tmp_path), "--no-default", "--candidate", f"tiny={config}:{weights}",
        "--styles", "fluorescence", "--images-per-style", "1", "--size", "64", "64",
        "--no-throughput",
    ])
    path = run_benchmark("zoo", args)
    figures = json.loads(path.read_text())["figures"]
    assert figures["methods"] == ["tiny", zoo.CLASSICAL] and figures["throughput"] is None
    assert "--no-default" in figures["notes"][0]
    assert "| fluorescence |" in (tmp_path / "zoo.md").read_text()
