"""DSB2018 score, foreground IoU/Dice and label flattening against hand-computed answers."""
import subprocess
import sys

import numpy as np
import pytest

from sharp_fpn.metrics import (
    DSB_THRESHOLDS,
    dataset_dsb_score,
    dsb_score,
    dsb_threshold_counts,
    foreground_dice,
    foreground_iou,
    labels_from_instances,
)


def square(shape=(24, 24), top=2, left=2, h=10, w=10, label=1, out=None):
    """Paint an ``h x w`` rectangle of ``label`` at (top, left) into ``out`` (new if None)."""
    out = np.zeros(shape, dtype=np.int32) if out is None else out
    out[top : top + h, left : left + w] = label
    return out


def test_thresholds():
    assert DSB_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_perfect_match_with_permuted_labels():
    true = square(label=1)
    square(top=14, left=14, h=6, w=8, label=2, out=true)
    square(top=0, left=16, h=3, w=3, label=3, out=true)
    pred = np.zeros_like(true)
    for old, new in [(1, 3), (2, 1), (3, 2)]:
        pred[true == old] = new
    assert dsb_score(true, pred) == 1.0


def test_empty_images():
    empty = np.zeros((8, 8), dtype=np.int32)
    one = square((8, 8), 1, 1, 3, 3)
    assert dsb_score(empty, empty) == 1.0
    assert dsb_score(empty, one) == 0.0
    assert dsb_score(one, empty) == 0.0
    counts = dsb_threshold_counts(one, empty)
    assert counts.tp.tolist() == [0] * 10 and counts.fn.tolist() == [1] * 10
    assert counts.fp.tolist() == [0] * 10


def test_split_nucleus():
    # One 10x10 nucleus predicted as a 10x7 part (IoU 70/100 = 0.7) and a 10x3 part
    # (IoU 30/100). t = 0.50..0.65: TP 1, FP 1, FN 0 -> 1/2; t = 0.70 (0.7 is not > 0.7)
    # ..0.95: TP 0, FP 2, FN 1 -> 0. Score = 4 * 1/2 / 10 = 0.2.
    true = square()
    pred = square(left=2, w=7, label=1)
    square(left=9, w=3, label=2, out=pred)
    counts = dsb_threshold_counts(true, pred)
    assert counts.tp.tolist() == [1] * 4 + [0] * 6
    assert counts.fp.tolist() == [1] * 4 + [2] * 6
    assert counts.fn.tolist() == [0] * 4 + [1] * 6
    assert dsb_score(true, pred) == pytest.approx(0.2, abs=1e-12)


def test_merged_nuclei_next_to_a_matched_one():
    # A (10x10) and B (10x5) predicted as one 10x15 mask: IoU(A) = 100/150, IoU(B) = 50/150;
    # C is predicted exactly. t = 0.50..0.65: TP 2 (A, C), FP 0, FN 1 -> 2/3;
    # t = 0.70..0.95: TP 1, FP 1, FN 2 -> 1/4. Score = (4 * 2/3 + 6 * 1/4) / 10 = 5/12.
    true = square(left=2, w=10, label=1)
    square(left=12, w=5, label=2, out=true)
    square(top=16, left=16, h=4, w=4, label=3, out=true)
    pred = square(left=2, w=15, label=1)
    square(top=16, left=16, h=4, w=4, label=2, out=pred)
    assert dsb_score(true, pred) == pytest.approx(5 / 12, abs=1e-12)


@pytest.mark.parametrize(
    "dy, dx, expected",
    [
        (2, 0, 0.4),  # IoU 80/120 = 0.667: TP at 0.50..0.65 -> 4/10
        (0, 1, 0.7),  # IoU 90/110 = 0.818: TP at 0.50..0.80 -> 7/10
        (1, 1, 0.4),  # IoU 81/119 = 0.681: TP at 0.50..0.65 -> 4/10
        (0, 5, 0.0),  # IoU 50/150 = 0.333: never
    ],
)
def test_shifted_square(dy, dx, expected):
    true = square()
    pred = square(top=2 + dy, left=2 + dx, label=7)
    assert dsb_score(true, pred) == pytest.approx(expected, abs=1e-12)


def test_iou_equal_to_a_threshold_is_not_a_match():
    true = square(h=4, w=10)
    assert dsb_score(true, square(h=3, w=10)) == pytest.approx(0.5)  # IoU 0.75: 0.50..0.70
    assert dsb_score(true, square(h=2, w=10)) == 0.0  # IoU exactly 0.5


def test_non_consecutive_labels_and_dtypes():
    true = square(label=1000).astype(np.uint16)
    square(top=14, left=14, h=6, w=8, label=3, out=true)
    pred = np.zeros(true.shape, dtype=np.int64)
    pred[true == 1000] = 2**40
    square(top=14, left=15, h=6, w=8, label=7, out=pred)  # IoU 42/54 = 0.778
    # t = 0.50..0.75: TP 2 -> 1; t = 0.80..0.95: TP 1, FP 1, FN 1 -> 1/3.
    assert dsb_score(true, pred) == pytest.approx((6 + 4 / 3) / 10, abs=1e-12)


def test_image_without_background():
    # Two halves tile a 10x10 image; the predicted border is one column off:
    # IoU(left) = 50/60, IoU(right) = 40/50 = 0.8. t = 0.50..0.75: TP 2 -> 1;
    # t = 0.80: TP 1, FP 1, FN 1 -> 1/3; t = 0.85..0.95: 0. Score = (6 + 1/3) / 10.
    true = np.full((10, 10), 4, dtype=np.int32)
    true[:, 5:] = 9
    pred = np.full((10, 10), 1, dtype=np.int32)
    pred[:, 6:] = 2
    assert dsb_score(true, pred) == pytest.approx(19 / 30, abs=1e-12)


@pytest.mark.parametrize(
    "true, pred, message",
    [
        (np.zeros((4, 4), np.int32), np.zeros((4, 5), np.int32), "same"),
        (np.zeros((2, 4, 4), np.int32), np.zeros((2, 4, 4), np.int32), "2-D"),
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int32), "integer dtype"),
        (np.zeros((4, 4), bool), np.zeros((4, 4), np.int32), "integer dtype"),
        (np.full((4, 4), -1), np.zeros((4, 4), np.int32), "negative"),
        ([[0, 1]], np.zeros((1, 2), np.int32), "numpy array"),
    ],
)
def test_invalid_inputs(true, pred, message):
    with pytest.raises(ValueError, match=message):
        dsb_score(true, pred)


def random_label_image(rng, shape, n):
    """Up to ``n`` random rectangles, later ones painted over earlier ones."""
    labels = np.zeros(shape, dtype=np.int64)
    for value in rng.choice(10_000, size=n, replace=False) + 1:
        top, left = rng.integers(0, shape[0] - 1), rng.integers(0, shape[1] - 1)
        h, w = rng.integers(1, 8, size=2)
        labels[top : top + h, left : left + w] = value
    return labels


def perturbed(rng, labels):
    """A prediction near ``labels``: each nucleus kept, shifted, grown or dropped, plus noise."""
    pred = np.zeros_like(labels)
    for value in np.unique(labels[labels > 0]):
        mask = labels == value
        action = rng.integers(0, 4)
        if action == 1:
            mask = np.roll(mask, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
        elif action == 2:
            mask = mask | np.roll(mask, 1, axis=int(rng.integers(0, 2)))
        elif action == 3:
            continue
        pred[mask] = rng.integers(1, 2**31)
    extra = random_label_image(rng, labels.shape, int(rng.integers(0, 3)))
    return np.where(extra > 0, extra + 2**32, pred)


def brute_force_score(true, pred):
    """Loops over mask pairs; counts matched true and predicted nuclei separately."""
    true_ids = [v for v in np.unique(true) if v != 0]
    pred_ids = [v for v in np.unique(pred) if v != 0]
    if not true_ids and not pred_ids:
        return 1.0
    iou = np.zeros((len(true_ids), len(pred_ids)))
    for i, a in enumerate(true_ids):
        for j, b in enumerate(pred_ids):
            ma, mb = true == a, pred == b
            iou[i, j] = (ma & mb).sum() / (ma | mb).sum()
    per_threshold = []
    for t in np.arange(0.5, 1.0, 0.05):
        t = round(t, 2)
        matched = iou > t
        tp_true = int(matched.any(axis=1).sum())
        tp_pred = int(matched.any(axis=0).sum())
        assert tp_true == tp_pred  # IoU > 0.5 matches are one-to-one
        fn, fp = len(true_ids) - tp_true, len(pred_ids) - tp_pred
        per_threshold.append(tp_true / (tp_true + fp + fn))
    return float(np.mean(per_threshold))


def test_agrees_with_brute_force_on_random_label_images():
    rng = np.random.default_rng(2018)
    for _ in range(150):
        true = random_label_image(rng, (16, 20), int(rng.integers(0, 7)))
        pred = perturbed(rng, true)
        assert dsb_score(true, pred) == pytest.approx(brute_force_score(true, pred), abs=1e-12)


def test_invariant_to_label_permutation():
    rng = np.random.default_rng(7)
    true = random_label_image(rng, (16, 20), 6)
    pred = perturbed(rng, true)
    reference = dsb_score(true, pred)
    for _ in range(5):
        ids = np.unique(pred[pred > 0])
        mapping = dict(zip(ids, rng.permutation(ids)))
        permuted = np.vectorize(lambda v: mapping.get(v, 0))(pred)
        assert dsb_score(true, permuted) == reference
    assert dsb_score(pred, true) == reference  # TP is symmetric; FP and FN swap


def test_dataset_score_is_the_mean_over_images():
    true = square()
    pairs = [(true, true), (true, square(top=4, label=3))]
    assert dataset_dsb_score(pairs) == pytest.approx(0.7)
    assert dataset_dsb_score(iter(pairs)) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="no"):
        dataset_dsb_score([])


def test_foreground_iou_and_dice():
    true = square()
    pred = square(top=4, label=5)  # 80 shared pixels, 120 in the union
    assert foreground_iou(true, pred) == pytest.approx(80 / 120)
    assert foreground_dice(true, pred) == pytest.approx(160 / 200)
    # Instances are merged: two predicted halves cover the true square exactly.
    halves = square(w=5, label=1)
    square(left=7, w=5, label=2, out=halves)
    assert foreground_iou(true, halves) == 1.0 and foreground_dice(true, halves) == 1.0
    empty = np.zeros_like(true)
    assert foreground_iou(empty, empty) == 1.0 and foreground_dice(empty, empty) == 1.0
    assert foreground_iou(true, empty) == 0.0 and foreground_dice(empty, true) == 0.0
    with pytest.raises(ValueError, match="shape"):
        foreground_iou(true, true[:5])


def test_labels_from_instances_highest_score_wins():
    masks = np.zeros((3, 4, 6), dtype=bool)
    masks[0, :, 0:4] = True  # score 0.2
    masks[1, :, 2:6] = True  # score 0.9
    masks[2, 1:3, 3:5] = True  # score 0.5, entirely under instance 1: vanishes
    labels = labels_from_instances(masks, np.array([0.2, 0.9, 0.5]))
    assert labels.dtype == np.int32 and labels.shape == (4, 6)
    assert labels.tolist() == [[3, 3, 1, 1, 1, 1]] * 4
    # Without scores, the given order ranks them: instance 0 is label 1 and wins overlaps.
    assert labels_from_instances(masks).tolist() == [[1, 1, 1, 1, 2, 2]] * 4


def test_labels_from_instances_ties_and_edge_cases():
    masks = np.zeros((2, 2, 3), dtype=np.uint8)
    masks[0, :, :2] = 1
    masks[1, :, 1:] = 1
    assert labels_from_instances(masks, np.array([0.5, 0.5])).tolist() == [[1, 1, 2]] * 2
    empty = labels_from_instances(np.zeros((0, 5, 7), dtype=bool), np.zeros(0))
    assert empty.shape == (5, 7) and empty.dtype == np.int32 and not empty.any()
    with pytest.raises(ValueError, match="threshold"):
        labels_from_instances(masks.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(2,\)"):
        labels_from_instances(masks, np.array([0.5]))
    with pytest.raises(ValueError, match="NaN"):
        labels_from_instances(masks, np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        labels_from_instances(masks[0])


def test_metrics_work_without_torch_or_detectron2():
    # None in sys.modules makes "import torch" / "import detectron2" raise ImportError.
    code = (
        "import sys; sys.modules['torch'] = sys.modules['detectron2'] = None; "
        "import numpy as np, sharp_fpn.metrics as e; "
        "assert e.dsb_score(np.ones((3, 3), np.int32), np.ones((3, 3), np.int32)) == 1.0"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
