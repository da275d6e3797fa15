"""DSBEvaluator on tiny hand-made dataset dicts, real pycocotools RLE and detectron2 Instances."""
import csv
import logging

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import Instances

from sharp_fpn.d2.evaluators import CSV_COLUMNS, DSBEvaluator, annotation_mask

H, W = 20, 24  # not square, so that a transposed mask would be caught


def box(top, left, h, w):
    mask = np.zeros((H, W), dtype=bool)
    mask[top : top + h, left : left + w] = True
    return mask


def rle(mask, counts_as_str):
    encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    if counts_as_str:
        encoded["counts"] = encoded["counts"].decode("ascii")
    return encoded


def instances(masks, scores):
    return Instances(
        (H, W),
        pred_masks=torch.as_tensor(np.array(masks, dtype=bool).reshape(-1, H, W)),
        scores=torch.tensor(scores, dtype=torch.float32),
    )


def dataset():
    """Three images: RLE (str and bytes counts), polygons, and no nucleus at all."""
    nucleus_a, nucleus_b = box(2, 2, 10, 10), box(14, 15, 4, 5)  # 100 and 20 pixels
    return [
        {
            "file_name": "img_rle.png",
            "image_id": 1,
            "height": H,
            "width": W,
            "annotations": [
                {"segmentation": rle(nucleus_a, True), "category_id": 0, "iscrowd": 0},
                {"segmentation": rle(nucleus_b, False), "category_id": 0, "iscrowd": 0},
            ],
        },
        {
            "file_name": "img_polygon.png",
            "image_id": 2,
            "height": H,
            "width": W,
            "annotations": [{"segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]], "category_id": 0}],
        },
        {"file_name": "img_empty.png", "image_id": 3, "height": H, "width": W, "annotations": []},
    ]


def predictions():
    return [
        # nucleus A shifted down 2 px (IoU 80/120), B exact, a false positive scoring 0.3
        {"instances": instances([box(4, 2, 10, 10), box(14, 15, 4, 5), box(0, 20, 3, 4)],
                                [0.9, 0.8, 0.3])},
        {"instances": instances([], [])},
        {"instances": instances([], [])},
    ]


def run(evaluator, inputs, outputs):
    evaluator.reset()
    for record, output in zip(inputs, outputs):  # batches of one, as a test loader gives
        evaluator.process([record], [output])
    return evaluator.evaluate()


# Per image, by hand (threshold 0.5 drops the false positive):
# img_rle: t = 0.50..0.65: TP 2 -> 1; t = 0.70..0.95: TP 1 (B), FP 1, FN 1 -> 1/3;
#   DSB (4 + 6/3) / 10 = 0.6. Foreground: 100 shared of 140 in the union -> IoU 5/7,
#   Dice 200/240 = 5/6.
# img_polygon: the polygon covers pixels rows 2..5, cols 2..7 (24 px); nothing predicted
#   -> DSB 0, IoU 0, Dice 0.
# img_empty: nothing either side -> 1, 1, 1.
EXPECTED_DSB = (0.6 + 0.0 + 1.0) / 3
EXPECTED_IOU = 100 * (5 / 7 + 0 + 1) / 3
EXPECTED_DICE = 100 * (5 / 6 + 0 + 1) / 3


def test_annotation_mask_formats():
    mask = box(3, 4, 5, 6)
    assert (annotation_mask(rle(mask, True), H, W) == mask).all()
    assert (annotation_mask(rle(mask, False), H, W) == mask).all()
    assert (annotation_mask([[2, 2, 8, 2, 8, 6, 2, 6]], H, W) == box(2, 2, 4, 6)).all()
    # Uncompressed RLE of a 3x2 image, column-major runs: 1 off, 3 on, 2 off.
    assert annotation_mask({"counts": [1, 3, 2], "size": [3, 2]}, 3, 2).tolist() == [
        [False, True],
        [True, False],
        [True, False],
    ]
    assert not annotation_mask([], H, W).any()
    with pytest.raises(ValueError, match=r"a.png: RLE segmentation has size \[20, 24\]"):
        annotation_mask(rle(mask, True), W, H, "a.png")
    with pytest.raises(ValueError, match="polygons"):
        annotation_mask("oops", H, W)


def test_evaluator_values_and_csv(tmp_path):
    evaluator = DSBEvaluator("dsb_test_unregistered", output_dir=str(tmp_path / "eval"))
    results = run(evaluator, dataset(), predictions())
    assert set(results) == {"dsb"}
    dsb = results["dsb"]
    assert dsb["num_images"] == 3
    assert dsb["score"] == pytest.approx(EXPECTED_DSB)
    assert dsb["fg_IoU"] == pytest.approx(EXPECTED_IOU)
    assert dsb["fg_Dice"] == pytest.approx(EXPECTED_DICE)

    written = list((tmp_path / "eval").iterdir())
    assert [p.name for p in written] == ["dsb_per_image.csv"]
    with open(written[0], newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    by_name = {row["file_name"]: row for row in rows}
    assert sorted(by_name) == ["img_empty.png", "img_polygon.png", "img_rle.png"]
    rle_row = by_name["img_rle.png"]
    assert float(rle_row["dsb_score"]) == pytest.approx(0.6)
    assert float(rle_row["fg_iou"]) == pytest.approx(5 / 7)
    assert float(rle_row["fg_dice"]) == pytest.approx(5 / 6)
    assert (rle_row["n_true"], rle_row["n_pred"]) == ("2", "2")
    assert (by_name["img_polygon.png"]["n_true"], by_name["img_polygon.png"]["n_pred"]) == (
        "1",
        "0",
    )
    assert float(by_name["img_empty.png"]["dsb_score"]) == 1.0


def test_score_threshold_keeps_low_scoring_predictions():
    # With the 0.3 false positive kept, img_rle: t = 0.50..0.65: TP 2, FP 1 -> 2/3;
    # t = 0.70..0.95: TP 1, FP 2, FN 1 -> 1/4; DSB (8/3 + 6/4) / 10 = 5/12.
    # Foreground: 100 shared of 152 in the union, Dice 200/252.
    inputs, outputs = dataset()[:1], predictions()[:1]
    dsb = run(DSBEvaluator("unused", score_threshold=0.2, distributed=False), inputs, outputs)
    assert dsb["dsb"]["score"] == pytest.approx(5 / 12)
    assert dsb["dsb"]["fg_IoU"] == pytest.approx(100 * 100 / 152)
    assert dsb["dsb"]["fg_Dice"] == pytest.approx(100 * 200 / 252)


def test_ground_truth_from_dataset_catalog_when_inputs_lack_annotations():
    # detectron2's test-time DatasetMapper drops "annotations": they come from the catalog.
    name = "sharp_fpn_test_dsb_evaluator"
    DatasetCatalog.register(name, dataset)
    try:
        inputs = [{k: v for k, v in d.items() if k != "annotations"} for d in dataset()]
        results = run(DSBEvaluator(name), inputs, predictions())
        assert results["dsb"]["score"] == pytest.approx(EXPECTED_DSB)
        with pytest.raises(ValueError, match="image_id 99 is not in dataset"):
            DSBEvaluator(name).process([{"file_name": "x.png", "image_id": 99}], predictions())
    finally:
        DatasetCatalog.remove(name)


def test_prediction_size_must_match_the_image():
    small = Instances((H, W - 1), pred_masks=torch.ones(1, H, W - 1, dtype=torch.bool),
                      scores=torch.tensor([0.9]))
    with pytest.raises(ValueError, match=r"img_rle.png: pred_masks are \(20, 23\)"):
        DSBEvaluator("unused").process(dataset()[:1], [{"instances": small}])


def test_empty_evaluation_warns_and_returns_nothing(caplog):
    evaluator = DSBEvaluator("unused")
    evaluator.reset()
    with caplog.at_level(logging.WARNING):
        assert evaluator.evaluate() == {}
    assert "no image was processed" in caplog.text


def test_overlapping_annotations_earlier_keeps_the_pixel():
    # Two 10x10 annotations overlap on columns 7..11: the first keeps them, so the true
    # nuclei are columns 2..11 (100 px) and 12..16 (50 px), which the prediction matches.
    record = {
        "file_name": "overlap.png",
        "height": H,
        "width": W,
        "annotations": [{"segmentation": rle(box(2, 2, 10, 10), True)},
                        {"segmentation": rle(box(2, 7, 10, 10), True)}],
    }
    output = {"instances": instances([box(2, 2, 10, 10), box(2, 12, 10, 5)], [0.9, 0.9])}
    assert run(DSBEvaluator("unused"), [record], [output])["dsb"]["score"] == 1.0
