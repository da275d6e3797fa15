"""The shipped models' recipe: narrow ResNets, the augmentations, the percentile normalisation
(the same in training and prediction) and box-local mask pasting."""
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.layers import ShapeSpec
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.structures import Boxes

from sharp_fpn.d2.augment import RandomRescale, TransposeTransform, recipe_augmentations
from sharp_fpn.d2.engine import get_config
from sharp_fpn.d2.mapper import NucleiDatasetMapper, normalization
from sharp_fpn.d2.predictor import NucleiPredictor
from sharp_fpn.d2.resnet import build_resnet_bottom_up
from sharp_fpn.data.augment import PhotometricAugmentation
from sharp_fpn.predict.image_io import MIN_SPAN_NOISE, percentile_normalise
from sharp_fpn.predict.tiling import InstanceSet, paste_in_boxes, stitch_instances, tile_grid

ROOT = Path(__file__).resolve().parent.parent
ZOO_SHARP = ROOT / "configs" / "zoo" / "mask_rcnn_sharp_R18h.yaml"
ZOO_FPN = ROOT / "configs" / "zoo" / "mask_rcnn_fpn_R18h.yaml"
TINY = ["MODEL.RPN.POST_NMS_TOPK_TEST", "300", "TEST.DETECTIONS_PER_IMAGE", "100"]


# --------------------------------------------------------------------------------------------
# narrow ResNets


def test_stage_widths_build_a_narrow_basic_block_resnet():
    cfg = get_config(ZOO_FPN)
    net = build_resnet_bottom_up(cfg, ShapeSpec(channels=3))
    shapes = net.output_shape()
    assert [shapes[f].channels for f in ("res2", "res3", "res4", "res5")] == [32, 64, 128, 256]
    assert [shapes[f].stride for f in ("res2", "res3", "res4", "res5")] == [4, 8, 16, 32]
    out = net(torch.zeros(1, 3, 64, 96))
    assert out["res5"].shape == (1, 256, 2, 3)
    # the same network at detectron2's widths has detectron2's ResNet-18 parameter count
    cfg.MODEL.RESNETS.STAGE_WIDTHS = [64, 128, 256, 512]
    mine = build_resnet_bottom_up(cfg, ShapeSpec(channels=3))
    cfg.MODEL.RESNETS.STAGE_WIDTHS = []
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    theirs = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    assert sum(p.numel() for p in mine.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert {k for k, _ in mine.named_parameters()} == {k for k, _ in theirs.named_parameters()}


def test_stage_widths_are_checked():
    cfg = get_config(ZOO_FPN, ["MODEL.RESNETS.DEPTH", "50"])
    with pytest.raises(ValueError, match="MODEL.RESNETS.DEPTH"):
        build_resnet_bottom_up(cfg, ShapeSpec(channels=3))
    cfg = get_config(ZOO_FPN, ["MODEL.RESNETS.STAGE_WIDTHS", "[32, 64, 128]"])
    with pytest.raises(ValueError, match="MODEL.RESNETS.STAGE_WIDTHS: expected four"):
        build_resnet_bottom_up(cfg, ShapeSpec(channels=3))


# --------------------------------------------------------------------------------------------
# augmentations


def test_transpose_moves_pixels_boxes_and_masks_together():
    image = np.zeros((20, 30, 3), np.uint8)
    image[2:5, 10:18] = 255
    t = TransposeTransform()
    out = t.apply_image(image)
    assert out.shape == (30, 20, 3)
    ys, xs = np.nonzero(out[:, :, 0])
    box = t.apply_box(np.array([[10, 2, 18, 5]], dtype=np.float64))[0]  # x0 y0 x1 y1
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(box)
    np.testing.assert_array_equal(t.apply_segmentation(image[:, :, 0]), out[:, :, 0])


def test_rescale_stays_in_its_range():
    image = np.zeros((100, 50, 3), np.uint8)
    sizes = {RandomRescale(0.5, 2.0).get_transform(image).new_h for _ in range(200)}
    assert min(sizes) >= 50 and max(sizes) <= 200 and len(sizes) > 20


def test_recipe_augmentations_replace_detectrons_resize():
    cfg = get_config(ZOO_FPN)
    names = [type(a).__name__ for a in recipe_augmentations(cfg, is_train=True)]
    assert names == ["RandomRescale", "RandomCrop", "RandomFlip", "RandomFlip", "RandomTranspose"]
    test = recipe_augmentations(cfg, is_train=False)
    assert isinstance(test[0].get_transform(np.zeros((77, 91, 3), np.uint8)), T.NoOpTransform)


def test_photometric_augmentation_keeps_gray_images_gray():
    rng = np.random.default_rng(0)
    gray = np.repeat(rng.integers(0, 255, (64, 64, 1), dtype=np.uint8), 3, axis=2)
    augment = PhotometricAugmentation()
    changed = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out = augment(gray, np.random.default_rng(seed))
        assert out.shape == gray.shape and out.dtype == np.uint8
        assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()
        changed += int(not np.array_equal(out, gray))
    assert changed >= 8


# --------------------------------------------------------------------------------------------
# normalisation


def test_percentile_normalise_maps_the_percentiles_and_keeps_an_empty_field_dim():
    rng = np.random.default_rng(1)
    dim = np.clip(rng.normal(20, 1.0, (128, 128)), 0, 255).astype(np.uint8)
    dim[40:60, 40:60] = 60  # a nucleus
    image = np.repeat(dim[:, :, None], 3, axis=2)
    out, how = percentile_normalise(image, (1.0, 99.8))
    assert how.mode == "percentile" and out[50, 50, 0] == 255 and np.percentile(out, 1) == 0
    empty = np.repeat(np.clip(rng.normal(20, 1.0, (128, 128)), 0, 255).astype(np.uint8)[:, :, None],
                      3, axis=2)
    out, how = percentile_normalise(empty, (1.0, 99.8))
    assert how.mode == "limited" and how.high - how.low == pytest.approx(MIN_SPAN_NOISE * how.noise)
    assert out.max() < 80  # noise stays noise, not full-contrast "nuclei"


def test_normalization_key_is_checked():
    cfg = get_config(ZOO_FPN)
    assert normalization(cfg) == (1.0, 99.8)
    cfg.INPUT.NORMALIZE = "zscore"
    with pytest.raises(ValueError, match="INPUT.NORMALIZE"):
        normalization(cfg)


def test_training_and_prediction_see_the_same_normalised_image(tmp_path):
    import cv2

    rng = np.random.default_rng(2)
    pixels = np.clip(rng.normal(30, 3, (64, 80)), 0, 255).astype(np.uint8)
    pixels[10:30, 20:40] = 90
    cv2.imwrite(str(tmp_path / "a.png"), pixels)
    cfg = get_config(ZOO_FPN)
    mapper = NucleiDatasetMapper(cfg, is_train=False)
    record = mapper({"file_name": str(tmp_path / "a.png"), "height": 64, "width": 80,
                     "image_id": 0})
    predictor = NucleiPredictor(cfg, None)
    rgb = np.repeat(pixels[:, :, None], 3, axis=2)
    expected = predictor.model_input(predictor.prepare(rgb))
    torch.testing.assert_close(record["image"].float(), expected)
    # 1st percentile -> 0; the nucleus (67 levels over it, noise 3) at the noise-guarded top
    assert record["image"].min() == 0 and record["image"][:, 15:25, 25:35].float().mean() > 120


# --------------------------------------------------------------------------------------------
# pasting masks in their boxes


def test_paste_in_boxes_gives_detectrons_pixels():
    rng = np.random.default_rng(3)
    n, shape = 40, (97, 131)
    x0 = rng.uniform(-5, 120, n)
    y0 = rng.uniform(-5, 90, n)
    boxes = np.stack([x0, y0, x0 + rng.uniform(0.5, 40, n), y0 + rng.uniform(0.5, 40, n)], 1)
    yy, xx = np.mgrid[0:20, 0:20]
    blobs = [np.exp(-((yy - rng.uniform(4, 16)) ** 2 + (xx - rng.uniform(4, 16)) ** 2)
                    / rng.uniform(10, 60)) for _ in range(n)]
    probabilities = np.stack(blobs).astype(np.float32)
    theirs = paste_masks_in_image(torch.from_numpy(probabilities), Boxes(torch.from_numpy(boxes)),
                                  shape, threshold=0.5).numpy()
    pasted = paste_in_boxes(boxes, probabilities, shape)
    differing = total = 0
    for k, (box, crop) in enumerate(pasted):
        mine = np.zeros(shape, bool)
        if box is not None:
            mine[box[0]:box[2], box[1]:box[3]] = crop
        differing += int((mine != theirs[k]).sum())
        total += int(theirs[k].sum())
    assert total > 2000
    assert differing <= 0.002 * total  # cv2.remap's 1/32-pixel weights against grid_sample's


def test_predictor_labels_equal_the_full_mask_path():
    cfg = get_config(ZOO_FPN, TINY + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    torch.manual_seed(0)
    predictor = NucleiPredictor(cfg, None, score_threshold=0.0)
    rgb = np.random.default_rng(4).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    fast = predictor.predict(rgb, tile=0)
    assert fast.count > 5
    # detectron2's own post-processing: full-image masks pasted by paste_masks_in_image
    image = predictor.model_input(predictor.prepare(rgb))
    with torch.no_grad():
        out = predictor.model([{"image": image, "height": 96, "width": 128}])[0]["instances"]
    found = InstanceSet.from_masks(out.pred_masks.numpy(), out.scores.numpy())
    slow = stitch_instances((96, 128), tile_grid(96, 128, 0, 0), [found],
                            predictor.min_kept_fraction).labels
    agree = (fast.labels > 0) == (slow > 0)
    assert agree.mean() > 0.995


# --------------------------------------------------------------------------------------------
# prediction defaults, held-out sets and the ablation's runs


def test_native_models_get_whole_megapixel_tiles():
    from sharp_fpn.predict.run import DEFAULT_TILE, NATIVE_TILE, default_tile

    assert default_tile(get_config(ZOO_SHARP)) == NATIVE_TILE
    demo = get_config(ROOT / "configs" / "demo" / "mask_rcnn_fpn_R18.yaml")
    assert default_tile(demo) == DEFAULT_TILE  # it resizes images to 288..512 px


def test_registered_heldout_images_are_read_with_their_nuclei(tmp_path, monkeypatch):
    from sharp_fpn.data import catalog
    from sharp_fpn.perf.zoo import registered_images

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    small = catalog.SyntheticParams(3, catalog.SYNTH2_TEST_SEED + 1, ((64, 80),), "he", 2)
    spec = catalog.DATASETS["nuclei_synth2_test_he"]
    monkeypatch.setitem(catalog.DATASETS, "nuclei_synth2_test_he",
                        type(spec)(spec.folder, spec.split, synthetic=True, generate=small))
    pairs = registered_images(["he"])["he"]
    assert len(pairs) == 3
    for rgb, labels in pairs:
        assert rgb.shape == (64, 80, 3) and labels.shape == (64, 80)
    assert sum(int(labels.max()) for _, labels in pairs) >= 2
    # the labels are the generator's nuclei: the stained pixels are darker inside them
    rgb, labels = max(pairs, key=lambda p: p[1].max())
    assert rgb[labels > 0].mean() < rgb[labels == 0].mean()
    with pytest.raises(ValueError, match="no registered held-out set"):
        registered_images(["phase_contrast"])


def test_ablation_variants_train_on_the_set_without_brightfield(tmp_path):
    from sharp_fpn.experiments.zoo_ablation import VARIANTS, variant_options

    for iters in (4, 500):
        for name in VARIANTS:
            opts = variant_options(name, iters, tmp_path)
            cfg = get_config(ZOO_FPN, opts)
            steps = list(cfg.SOLVER.STEPS)
            assert steps == sorted(set(steps)) and all(0 < s < iters for s in steps)
            assert cfg.OUTPUT_DIR == str(tmp_path / name)
            expected = "nuclei_synth_train" if name == "v1_data" else "nuclei_synth2_nobf_train"
            assert tuple(cfg.DATASETS.TRAIN) == (expected,)
    assert get_config(ZOO_FPN, variant_options("no_normalisation", 8, tmp_path)).INPUT.NORMALIZE == ""
    with pytest.raises(ValueError, match="unknown variant"):
        variant_options("no_such", 8, tmp_path)
