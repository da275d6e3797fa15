"""sharp_fpn.losses against hand-computed values and a brute-force Lovasz extension."""
import ast
import itertools
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sharp_fpn.losses import (
    cgm_loss,
    deep_supervision_loss,
    focal_loss,
    has_foreground,
    lovasz_hinge,
    mixed_loss,
    soft_dice_loss,
)

ROOT = Path(__file__).resolve().parents[1]
LN3 = math.log(3)


def as_map(values):
    """A 2-D list -> a (1, 1, H, W) float64 tensor."""
    return torch.tensor(values, dtype=torch.float64)[None, None]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ---- focal loss -------------------------------------------------------------------------------

# logits [[0, ln 3], [-ln 3, 2]]: p = [[1/2, 3/4], [1/4, sigmoid(2)]]; target [[1, 1], [0, 0]]
FOCAL_LOGITS = [[0.0, LN3], [-LN3, 2.0]]
FOCAL_TARGET = [[1.0, 1.0], [0.0, 0.0]]


def focal_by_hand(alpha, gamma):
    """-alpha_t (1 - p_t)^gamma log p_t for the four pixels above."""
    p_t = [0.5, 0.75, 0.75, 1 - sigmoid(2.0)]  # foreground: p; background: 1 - p
    a_t = [alpha, alpha, 1 - alpha, 1 - alpha] if alpha is not None else [1.0] * 4
    return [-a * (1 - p) ** gamma * math.log(p) for a, p in zip(a_t, p_t)]


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (None, 2.0), (0.25, 0.0), (0.6, 1.0)])
def test_focal_loss_by_hand(alpha, gamma):
    logits, target = as_map(FOCAL_LOGITS), as_map(FOCAL_TARGET)
    expected = focal_by_hand(alpha, gamma)
    loss = focal_loss(logits, target, alpha=alpha, gamma=gamma)
    assert loss.item() == pytest.approx(sum(expected) / 4, rel=1e-12)
    total = focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="sum")
    assert total.item() == pytest.approx(sum(expected), rel=1e-12)
    each = focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="none")
    assert each.flatten().tolist() == pytest.approx(expected, rel=1e-12)


def test_focal_loss_default_is_alpha_025_gamma_2_mean():
    logits, target = as_map(FOCAL_LOGITS), as_map(FOCAL_TARGET)
    assert focal_loss(logits, target).item() == pytest.approx(
        sum(focal_by_hand(0.25, 2.0)) / 4, rel=1e-12
    )
    # example values: 0.25 * 0.25 * ln 2 for the first pixel
    assert focal_by_hand(0.25, 2.0)[0] == pytest.approx(0.0625 * math.log(2))


def test_focal_loss_large_logits_are_stable():
    logits = as_map([[100.0, -100.0], [100.0, -100.0]])
    target = as_map([[1.0, 0.0], [0.0, 1.0]])  # two confident right, two confident wrong
    each = focal_loss(logits, target, reduction="none").flatten().tolist()
    assert each[:2] == pytest.approx([0.0, 0.0], abs=1e-30)
    assert each[2:] == pytest.approx([0.75 * 100, 0.25 * 100], rel=1e-9)


# ---- soft Dice --------------------------------------------------------------------------------


def test_soft_dice_by_hand():
    # image 1: p = 1/2 everywhere, Y = [[1, 1], [0, 0]]: sum(YP) = 1, sum(Y) = 2, sum(P) = 2
    # image 2: p = 3/4 everywhere, Y = 0:                 sum(YP) = 0, sum(Y) = 0, sum(P) = 3
    logits = torch.cat([as_map([[0.0, 0.0], [0.0, 0.0]]), as_map([[LN3, LN3], [LN3, LN3]])])
    target = torch.cat([as_map([[1.0, 1.0], [0.0, 0.0]]), as_map([[0.0, 0.0], [0.0, 0.0]])])
    image1 = 1 - (2 * 1 + 1) / (2 + 2 + 1)  # 0.4
    image2 = 1 - (0 + 1) / (0 + 3 + 1)  # 0.75
    assert soft_dice_loss(logits, target).item() == pytest.approx((image1 + image2) / 2)
    batch = 1 - (2 * 1 + 1) / (2 + 5 + 1)  # the batch as one set
    assert soft_dice_loss(logits, target, per_image=False).item() == pytest.approx(batch)
    smooth = 1 - (2 * 1 + 0.5) / (2 + 2 + 0.5)
    assert soft_dice_loss(logits[:1], target[:1], smooth=0.5).item() == pytest.approx(smooth)


def test_soft_dice_edge_cases():
    background = torch.zeros(2, 1, 3, 3)
    # all background, predicted background: (0 + 1) / (0 + ~0 + 1) -> loss ~0
    assert soft_dice_loss(torch.full((2, 1, 3, 3), -50.0), background).item() == pytest.approx(
        0.0, abs=1e-12
    )
    # all foreground, predicted foreground: (2 * 9 + 1) / (9 + 9 + 1) = 1 -> loss 0
    foreground = torch.ones(2, 1, 3, 3)
    assert soft_dice_loss(torch.full((2, 1, 3, 3), 50.0), foreground).item() == pytest.approx(
        0.0, abs=1e-6
    )
    # all foreground, predicted background: 1 - 1 / (9 + 0 + 1) = 0.9
    assert soft_dice_loss(torch.full((2, 1, 3, 3), -50.0), foreground).item() == pytest.approx(
        0.9
    )


# ---- Lovasz hinge -----------------------------------------------------------------------------


def jaccard_loss(mispredicted, foreground):
    """1 - |G ∩ P| / |G ∪ P|, with P = G xor M the prediction that gets exactly M wrong.

    Empty G and empty P: a perfect prediction, loss 0."""
    predicted = foreground ^ mispredicted
    union = foreground | predicted
    return 1 - len(foreground & predicted) / len(union) if union else 0.0


def lovasz_extension_brute_force(errors, labels):
    """The Lovasz extension of the Jaccard loss at m = max(errors, 0), by its integral form

    integral over t > 0 of J({i : m_i >= t}) dt,

    which needs no sorting of pixels: J is piecewise constant in t between the distinct values
    of m, so the integral is a finite sum over those values."""
    m = [max(e, 0.0) for e in errors]
    foreground = {i for i, y in enumerate(labels) if y == 1}
    levels = sorted(set(v for v in m if v > 0), reverse=True) + [0.0]
    total = 0.0
    for upper, lower in zip(levels, levels[1:]):
        above = {i for i, v in enumerate(m) if v >= upper}
        total += (upper - lower) * jaccard_loss(above, foreground)
    return total


def lovasz_reference(logits, labels):
    errors = [1 - x * (2 * y - 1) for x, y in zip(logits, labels)]
    return lovasz_extension_brute_force(errors, labels)


def test_lovasz_extension_reference_is_the_jaccard_loss_on_vertices():
    """Sanity of the reference: on 0/1 vectors the extension equals the set function."""
    labels = [1, 0, 1, 0, 0]
    for bits in itertools.product([0.0, 1.0], repeat=5):
        mispredicted = {i for i, b in enumerate(bits) if b}
        assert lovasz_extension_brute_force(list(bits), labels) == pytest.approx(
            jaccard_loss(mispredicted, {0, 2})
        )


def test_lovasz_hinge_by_hand():
    # two pixels, labels [1, 0], logits [0, 0]: errors [1, 1], both mispredicted at t <= 1,
    # J({0, 1}) = |M| / |G ∪ M| = 2 / 2 = 1, so the loss is 1 * 1
    loss = lovasz_hinge(as_map([[0.0, 0.0]]), as_map([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(1.0)
    # logits [2, -0.5]: errors [-1, 0.5]: only the background pixel, J({1}) = 1 / 2
    loss = lovasz_hinge(as_map([[2.0, -0.5]]), as_map([[1.0, 0.0]]))
    assert loss.item() == pytest.approx(0.5 * 0.5)


@pytest.mark.parametrize("n_pixels", range(1, 7))
def test_lovasz_hinge_against_brute_force(n_pixels):
    rng = random.Random(n_pixels)
    for _ in range(40):
        images = 3
        labels = [[rng.randint(0, 1) for _ in range(n_pixels)] for _ in range(images)]
        labels[0] = [0] * n_pixels  # an all-background image
        labels[1] = [1] * n_pixels if rng.random() < 0.5 else labels[1]  # often all foreground
        logits = [[rng.gauss(0, 2) for _ in range(n_pixels)] for _ in range(images)]
        x = torch.tensor(logits, dtype=torch.float64).view(images, 1, 1, n_pixels)
        y = torch.tensor(labels, dtype=torch.float64).view(images, 1, 1, n_pixels)
        per_image = [lovasz_reference(a, b) for a, b in zip(logits, labels)]
        assert lovasz_hinge(x, y).item() == pytest.approx(sum(per_image) / images, abs=1e-12)
        whole = lovasz_reference(sum(logits, []), sum(labels, []))
        assert lovasz_hinge(x, y, per_image=False).item() == pytest.approx(whole, abs=1e-12)


def test_lovasz_hinge_edge_cases_and_gradients():
    torch.manual_seed(0)
    for target in (torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)):
        logits = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
        loss = lovasz_hinge(logits, target)
        errors = 1 - logits.detach() * (2 * target - 1)
        # no foreground: J(M) = 1 for any non-empty M; all foreground: J(M) = |M| / 16
        if target.sum() == 0:
            expected = errors.flatten(1).amax(1).clamp(min=0).mean()
        else:
            expected = (errors.flatten(1).clamp(min=0).sum(1) / 16).mean()
        assert loss.item() == pytest.approx(expected.item())
        loss.backward()
        assert torch.isfinite(logits.grad).all()
    # a confident, right prediction costs nothing
    target = torch.ones(1, 1, 2, 2)
    assert lovasz_hinge(torch.full((1, 1, 2, 2), 3.0), target).item() == 0.0


# ---- mixed loss, deep supervision, CGM --------------------------------------------------------


def test_mixed_loss_is_the_weighted_sum():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.6).double()
    parts = (focal_loss(logits, target), soft_dice_loss(logits, target),
             lovasz_hinge(logits, target))
    expected = 0.5 * parts[0] + 1.0 * parts[1] + 0.5 * parts[2]
    torch.testing.assert_close(mixed_loss(logits, target), expected)
    custom = mixed_loss(logits, target, focal_weight=2.0, dice_weight=0.0, lovasz_weight=1.0)
    torch.testing.assert_close(custom, 2.0 * parts[0] + parts[2])
    mixed_loss(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_mixed_loss_all_background_or_foreground(fill):
    logits = torch.randn(2, 1, 4, 4, requires_grad=True)
    loss = mixed_loss(logits, torch.full((2, 1, 4, 4), fill))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


class Recorder:
    """A per-branch loss that remembers what it was given and returns a known value."""

    def __init__(self):
        self.calls = []

    def __call__(self, logits, target):
        self.calls.append((logits, target))
        return torch.tensor(float(len(self.calls)))


def test_deep_supervision_loss_pools_the_target():
    target = torch.zeros(1, 1, 8, 8)
    target[0, 0, 3, 5] = 1  # falls in the 2x2 cell (1, 2) and the 4x4 cell (0, 1)
    branches = [torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)]
    loss = Recorder()
    value = deep_supervision_loss(branches, target, mode="pool", loss=loss)
    assert value.item() == pytest.approx((1 + 2 + 3) / 3)  # the average over branches
    assert torch.equal(loss.calls[0][1], target)
    expected4 = torch.zeros(1, 1, 4, 4)
    expected4[0, 0, 1, 2] = 1
    expected2 = torch.zeros(1, 1, 2, 2)
    expected2[0, 0, 0, 1] = 1
    assert torch.equal(loss.calls[1][1], expected4)
    assert torch.equal(loss.calls[2][1], expected2)
    assert all(logits is branch for (logits, _), branch in zip(loss.calls, branches))


def test_deep_supervision_loss_upsamples_the_logits():
    target = torch.zeros(1, 1, 4, 4)
    coarse = torch.tensor([[[[0.0, 3.0], [6.0, 9.0]]]])
    loss = Recorder()
    deep_supervision_loss([coarse, torch.zeros(1, 1, 4, 4)], target, "upsample", loss)
    upsampled, seen_target = loss.calls[0]
    assert seen_target is target
    # bilinear with align_corners=True: corners kept, steps of 1 along rows, 2 down columns
    expected = torch.tensor([[0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 4.0, 5.0],
                             [4.0, 5.0, 6.0, 7.0], [6.0, 7.0, 8.0, 9.0]])
    torch.testing.assert_close(upsampled[0, 0], expected)


def test_deep_supervision_loss_with_the_mixed_loss():
    torch.manual_seed(0)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    logits = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(deep_supervision_loss(logits, target), mixed_loss(logits, target))
    coarse = torch.randn(2, 1, 4, 4)
    both = deep_supervision_loss([coarse, logits], target)
    expected = (mixed_loss(coarse, F.max_pool2d(target, 2)) + mixed_loss(logits, target)) / 2
    torch.testing.assert_close(both, expected)


def test_cgm_loss_by_hand():
    target = torch.zeros(2, 1, 3, 3)
    target[0, 0, 1, 1] = 1  # image 0 has an object, image 1 has none
    assert has_foreground(target).tolist() == [1, 0]
    # image 0: logits (0, 0), class 1: -log(1/2); image 1: logits (0, ln 3), class 0: -log(1/4)
    logits = torch.tensor([[0.0, 0.0], [0.0, LN3]], dtype=torch.float64)
    expected = (math.log(2) + math.log(4)) / 2
    assert cgm_loss(logits, target).item() == pytest.approx(expected)
    assert cgm_loss(logits, torch.tensor([1, 0])).item() == pytest.approx(expected)
    # the paper's BCE on the softmax's "has object" probability is the same number
    bce = F.binary_cross_entropy(logits.softmax(1)[:, 1], torch.tensor([1.0, 0.0]).double())
    assert bce.item() == pytest.approx(expected)
    # several branches: averaged
    other = torch.tensor([[0.0, LN3], [0.0, 0.0]], dtype=torch.float64)  # -log(3/4), -log(1/2)
    both = (expected + (-math.log(0.75) + math.log(2)) / 2) / 2
    assert cgm_loss([logits, other], target).item() == pytest.approx(both)


def test_loss_errors():
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="soft_dice_loss: logits \\(1, 1, 4, 4\\) and target"):
        soft_dice_loss(x, torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="reduction must be one of"):
        focal_loss(x, x, reduction="max")
    with pytest.raises(ValueError, match="mode must be one of"):
        deep_supervision_loss([x], x, mode="nearest")
    with pytest.raises(ValueError, match="no branch logits"):
        deep_supervision_loss([], x)
    with pytest.raises(ValueError, match="no class logits"):
        cgm_loss([], x)


def test_bool_targets_are_accepted():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 4, 4)
    target = torch.rand(2, 1, 4, 4) > 0.5
    torch.testing.assert_close(mixed_loss(logits, target), mixed_loss(logits, target.float()))


def test_losses_do_not_import_detectron2():
    tree = ast.parse((ROOT / "sharp_fpn" / "losses.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        assert not any(n.startswith("detectron2") for n in names)
