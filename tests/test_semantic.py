"""The semantic meta-architecture, its mapper, evaluator and configs (tiny, CPU)."""
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import sem_seg_postprocess
from PIL import Image

from detectron2.checkpoint import DetectionCheckpointer

from sharp_fpn.d2.engine import ConfigError, Trainer, build_evaluator, get_config
from sharp_fpn.d2.semantic_evaluator import CSV_NAME, SemanticIoUEvaluator, union_mask
from sharp_fpn.models import (
    GridUNet,
    UpsamplingHead,
    VGGEncoder,
    branch_probabilities,
    count_parameters,
    create_model,
)
from sharp_fpn.d2.semantic import BottomUpEncoder, SemanticNucleiSegmentor
from sharp_fpn.d2.semantic_data import (
    HSVShiftTransform,
    Rot90Transform,
    SemanticNucleiMapper,
)

ROOT = Path(__file__).resolve().parent.parent
SEMANTIC = ROOT / "configs" / "semantic"
# the DSB2018 configs (the medical columns' and Table 3's are checked by test_tables.py,
# test_volume.py and test_reproduce.py)
CONFIGS = sorted(p for p in [*SEMANTIC.glob("*.yaml"), *SEMANTIC.glob("table1/*.yaml")]
                 if not p.name.startswith("Base-"))
TINY = [
    "MODEL.DEVICE", "cpu",
    "INPUT.SEMANTIC.SIZE", [32, 32],
    "MODEL.UNET.WIDTH_MULT", 0.125,  # Table 1 networks: widths 4..64
    "MODEL.UNET.WIDTHS", [8, 8, 8],  # backbone decoders
    "MODEL.UNET.UPSAMPLE_WIDTHS", [4, 4],
    "MODEL.RESNETS.DEPTH", 18,  # the R101 configs' code path, at ResNet-18 cost
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.RESNETS.WIDTH_PER_GROUP", 8,
]


def tiny_cfg(path: Path, *opts):
    return get_config(str(path), TINY + list(opts))


def name(path: Path) -> str:
    return str(path.relative_to(SEMANTIC))


@pytest.fixture(scope="module")
def train_records():
    return DatasetCatalog.get("nuclei_synth_train")[:2]


def test_every_semantic_config_is_listed():
    names = {name(p) for p in CONFIGS}
    table1 = {f"table1/{a}{ds}.yaml" for a in ("unet", "wunet", "unet2plus", "unet3plus",
                                              "unet_sharp") for ds in ("", "_ds")}
    table2 = {f"{m}_{b}.yaml" for m in ("unet", "unet_sharp") for b in ("VGG16", "R101")}
    assert names == table1 | table2


@pytest.mark.parametrize("path", CONFIGS, ids=name)
def test_one_training_step(path, train_records):
    cfg = tiny_cfg(path)
    model = build_model(cfg)
    assert isinstance(model, SemanticNucleiSegmentor)
    optimizer = Trainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.Adam)  # the paper's recipe, from the base config
    batch = [SemanticNucleiMapper(cfg, True)(r) for r in train_records]
    assert batch[0]["image"].shape == (3, 32, 32) and batch[0]["sem_seg"].shape == (32, 32)
    before = [p.detach().clone() for p in model.parameters()]
    losses = model(batch)
    assert set(losses) == {"loss_seg"}
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss > 0
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert changed == len(before)  # every parameter gets a gradient, heads included


def test_paper_width_table1_networks_are_create_models():
    for arch, ds in [("unet_sharp", True), ("wunet", False)]:
        path = SEMANTIC / "table1" / f"{arch}{'_ds' if ds else ''}.yaml"
        model = build_model(get_config(str(path), ["MODEL.DEVICE", "cpu"]))
        assert count_parameters(model) == count_parameters(create_model(arch, deep_supervision=ds))
    # SPEC section 1 / sharp_fpn.models.unet: UNet# with its 8 deep-supervision heads
    assert count_parameters(create_model("unet_sharp", deep_supervision=True)) == 10_757_224


def _image_input(size=(32, 32), height=45, width=37):
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8)
    return {"image": image, "height": height, "width": width}


def test_inference_output_is_probabilities_at_the_original_size():
    model = build_model(tiny_cfg(SEMANTIC / "unet_sharp_R101.yaml")).eval()
    with torch.no_grad():
        outputs = model([_image_input(), _image_input(height=20, width=64)])
    assert outputs[0]["sem_seg"].shape == (1, 45, 37)
    assert outputs[1]["sem_seg"].shape == (1, 20, 64)
    for out in outputs:
        assert 0 <= out["sem_seg"].min() and out["sem_seg"].max() <= 1


def _force_cgm(model, has_object: bool) -> None:
    """Make every CGM answer ``has_object`` for any input."""
    for cgm in model.network.cgms.values():
        with torch.no_grad():
            cgm.classifier.weight.zero_()
            cgm.classifier.bias.copy_(torch.tensor([0.0, 5.0] if has_object else [5.0, 0.0]))


def test_cgm_gates_the_prediction():
    cfg = tiny_cfg(SEMANTIC / "table1" / "unet_sharp_ds.yaml", "MODEL.UNET.CGM", True)
    model = build_model(cfg).eval()
    x = _image_input()
    with torch.no_grad():
        normalized = (x["image"].float() - model.pixel_mean) / model.pixel_std
        logits = model.network(normalized[None]).logits[-1][0]
        ungated = sem_seg_postprocess(torch.sigmoid(logits), (32, 32), 45, 37)
        _force_cgm(model, has_object=True)
        kept = model([x])[0]["sem_seg"]
        _force_cgm(model, has_object=False)
        dropped = model([x])[0]["sem_seg"]
    assert torch.allclose(kept, ungated, atol=1e-6) and kept.max() > 0
    assert dropped.shape == (1, 45, 37) and torch.count_nonzero(dropped) == 0


def test_cgm_training_adds_its_loss(train_records):
    cfg = tiny_cfg(SEMANTIC / "table1" / "unet_sharp_ds.yaml", "MODEL.UNET.CGM", True,
                   "MODEL.UNET.CGM_LOSS_WEIGHT", 0.5)
    model = build_model(cfg)
    losses = model([SemanticNucleiMapper(cfg, True)(r) for r in train_records])
    assert set(losses) == {"loss_seg", "loss_cgm"}
    # both images hold nuclei: cross-entropy of class 1, averaged over the 8 branches, x 0.5
    assert 0 < losses["loss_cgm"] < 0.5 * 5


def test_pruned_inference_is_the_sub_network():
    path = SEMANTIC / "table1" / "unet_sharp_ds.yaml"
    full = build_model(tiny_cfg(path)).eval()
    pruned = build_model(tiny_cfg(path, "MODEL.UNET.PRUNE_LEVEL", 2)).eval()
    pruned.load_state_dict(full.state_dict())
    x = _image_input()
    with torch.no_grad():
        normalized = ((x["image"].float() - full.pixel_mean) / full.pixel_std)[None]
        expected = torch.sigmoid(full.network.prune(2)(normalized)[0])
        out = pruned([x])[0]["sem_seg"]
    assert torch.allclose(out, sem_seg_postprocess(expected, (32, 32), 45, 37), atol=1e-6)


def test_one_network_class_for_both_encoders():
    vgg_blocks = build_model(tiny_cfg(SEMANTIC / "table1" / "unet_sharp_ds.yaml"))
    backbone = build_model(tiny_cfg(SEMANTIC / "unet_sharp_R101.yaml"))
    assert type(vgg_blocks.network) is GridUNet and type(backbone.network) is GridUNet
    assert isinstance(vgg_blocks.network.encoder, VGGEncoder)
    encoder = backbone.network.encoder
    assert isinstance(encoder, BottomUpEncoder) and type(encoder.bottom_up).__name__ == "ResNet"
    assert encoder.stride == 4 and encoder.in_features == ("res2", "res3", "res4", "res5")
    assert (vgg_blocks.size_divisibility, backbone.size_divisibility) == (16, 32)
    # UNet#'s branches (L = 3 on res2..res5); the final node upsamples from stride 4 to full
    # resolution, the top row and the decoder branches stay at their own stride
    network = backbone.network
    assert network.branches == ((0, 1), (0, 2), (3, 0), (2, 1), (1, 2), (0, 3))
    assert {k for k, h in network.heads.items() if isinstance(h, UpsamplingHead)} == {"0_3"}
    with torch.no_grad():
        out = network.eval()(torch.randn(1, 3, 64, 64))
    assert [tuple(t.shape[-2:]) for t in out] == [(16, 16), (16, 16), (2, 2), (4, 4), (8, 8),
                                                 (64, 64)]


def _trained_bn(network, x):
    """One train-mode forward, so BatchNorm running statistics differ from their init."""
    with torch.no_grad():
        network.train().forward_branches(x)
    return network.eval()


def test_backbone_predict_probabilities_is_the_gated_final_branch():
    cfg = tiny_cfg(SEMANTIC / "unet_sharp_R101.yaml", "MODEL.UNET.CGM", True)
    model = build_model(cfg)
    x = _image_input(size=(64, 64), height=64, width=64)
    normalized = ((x["image"].float() - model.pixel_mean) / model.pixel_std)[None]
    network = _trained_bn(model.network, torch.cat([normalized, normalized.flip(-1)]))
    model.eval()
    for has_object in (True, False):
        _force_cgm(model, has_object)
        with torch.no_grad():
            out = network(normalized)
            probabilities = network.predict_probabilities(normalized)
            segmented = model([x])[0]["sem_seg"]
        expected = torch.sigmoid(out.logits[-1]) * float(has_object)
        assert probabilities.shape == (1, 1, 64, 64)
        torch.testing.assert_close(probabilities, expected)
        torch.testing.assert_close(
            probabilities, branch_probabilities(out.logits[-1], out.has_object[-1])
        )
        torch.testing.assert_close(segmented, probabilities[0])
    assert torch.count_nonzero(probabilities) == 0


@pytest.mark.parametrize("level", [1, 2])
def test_pruned_backbone_network_equals_the_full_ones_branch(level):
    path = SEMANTIC / "unet_sharp_R101.yaml"
    model = build_model(tiny_cfg(path))
    x = torch.randn(2, 3, 64, 64)
    network = _trained_bn(model.network, x)
    with torch.no_grad():
        full = network(x)
        pruned = network.prune(level)
        out = pruned(x)
        assert torch.equal(out, full[network.branches.index((0, level))])
        assert torch.equal(pruned.predict_probabilities(x), network.predict_probabilities(x, level))
    assert pruned.branches == ((0, level),) and not pruned.training
    assert set(pruned.decoder.grid.positions) == {
        (i, j) for i in range(level + 1) for j in range(level + 1) if i + j <= level
    }
    # exactly the full network's weights of the nodes it computes, X[0][level]'s own head
    full_state, pruned_state = network.state_dict(), pruned.state_dict()
    assert set(pruned_state) < set(full_state)
    assert all(torch.equal(t, full_state[k]) for k, t in pruned_state.items())
    assert type(pruned.heads[f"0_{level}"]) is type(network.heads[f"0_{level}"])
    assert pruned.predict_probabilities(x).shape == (2, 1, 64, 64)
    # a copy: the full network's bottom-up is not shared
    assert pruned.encoder.bottom_up is not network.encoder.bottom_up


def test_backbone_prune_level_inference():
    path = SEMANTIC / "unet_sharp_R101.yaml"
    full = build_model(tiny_cfg(path)).eval()
    pruned = build_model(tiny_cfg(path, "MODEL.UNET.PRUNE_LEVEL", 1)).eval()
    pruned.load_state_dict(full.state_dict())
    x = _image_input()
    with torch.no_grad():
        normalized = ((x["image"].float() - full.pixel_mean) / full.pixel_std)[None]
        expected = full.network.prune(1).predict_probabilities(normalized)[0]
        out = pruned([x])[0]["sem_seg"]
    torch.testing.assert_close(out, sem_seg_postprocess(expected, (32, 32), 45, 37))


def test_weights_named_network_bottom_up_still_load(tmp_path):
    """Converted ImageNet weights (``--prefix network.bottom_up.``) and older checkpoints name
    the bottom-up ``network.bottom_up.*``; it is ``network.encoder.bottom_up.*`` now."""
    model = build_model(tiny_cfg(SEMANTIC / "unet_R101.yaml"))
    bottom_up = model.network.encoder.bottom_up
    assert all(k.startswith("network.encoder.bottom_up.") for k in model.state_dict()
               if "bottom_up" in k)
    weights = {f"network.bottom_up.{k}": v + 1 for k, v in bottom_up.state_dict().items()
               if v.is_floating_point()}
    torch.save({"model": weights}, tmp_path / "converted.pth")
    DetectionCheckpointer(model).load(str(tmp_path / "converted.pth"))
    loaded = bottom_up.state_dict()
    for name, value in weights.items():
        assert torch.equal(loaded[name[len("network.bottom_up."):]], value), name


@pytest.mark.parametrize(
    "path, opts, key",
    [
        ("table1/unet.yaml", ["MODEL.UNET.PRUNE_LEVEL", 2], "MODEL.UNET.PRUNE_LEVEL"),
        ("unet_R101.yaml", ["MODEL.UNET.PRUNE_LEVEL", 2], "MODEL.UNET.PRUNE_LEVEL"),
        ("table1/unet.yaml", ["MODEL.UNET.ARCH", "unet4"], "MODEL.UNET.ARCH"),
        ("table1/unet.yaml", ["MODEL.UNET.FULL_SCALE", "conv"], "MODEL.UNET.FULL_SCALE"),
        ("table1/unet.yaml", ["MODEL.UNET.DS_BRANCHES", "middle"], "MODEL.UNET.DS_BRANCHES"),
        ("table1/unet3plus.yaml", ["MODEL.UNET.DS_BRANCHES", "top"], "MODEL.UNET.DS_BRANCHES"),
        ("unet_R101.yaml", ["MODEL.UNET.WIDTHS", [8, 8]], "MODEL.UNET.WIDTHS"),
        ("unet_R101.yaml", ["MODEL.UNET.UPSAMPLE_WIDTHS", [4]], "MODEL.UNET.UPSAMPLE_WIDTHS"),
        ("unet_R101.yaml", ["MODEL.UNET.IN_FEATURES", ["res2", "res3", "res4", "p5"]],
         "MODEL.UNET.IN_FEATURES"),
    ],
)
def test_bad_values_name_their_key(path, opts, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_model(tiny_cfg(SEMANTIC / path, *opts))


def test_unknown_key_and_optimizer_fail_naming_them():
    with pytest.raises(ConfigError, match=r"MODEL\.UNET\.DEPTH"):
        get_config(str(SEMANTIC / "table1" / "unet.yaml"), ["MODEL.UNET.DEPTH", 5])
    cfg = tiny_cfg(SEMANTIC / "table1" / "unet.yaml", "SOLVER.OPTIMIZER", "Lion")
    with pytest.raises(ValueError, match=r"SOLVER\.OPTIMIZER"):
        Trainer.build_optimizer(cfg, build_model(cfg))


def test_sgd_stays_detectron2s_and_adamw_is_available():
    cfg = tiny_cfg(SEMANTIC / "table1" / "unet.yaml", "SOLVER.OPTIMIZER", "SGD")
    assert type(Trainer.build_optimizer(cfg, build_model(cfg))).__name__.endswith("SGD")
    cfg = tiny_cfg(SEMANTIC / "table1" / "unet.yaml", "SOLVER.OPTIMIZER", "AdamW")
    optimizer = Trainer.build_optimizer(cfg, build_model(cfg))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 1e-4


def test_union_mask_is_the_or_of_the_instance_masks(train_records):
    record = train_records[0]
    h, w = record["height"], record["width"]
    rles = [a["segmentation"] for a in record["annotations"]]
    instances = mask_util.decode(rles).astype(bool)  # (h, w, n)
    assert instances.shape[2] >= 2
    expected = instances.any(axis=2)
    assert np.array_equal(union_mask(record["annotations"], h, w), expected)

    cfg = tiny_cfg(SEMANTIC / "table1" / "unet.yaml", "INPUT.SEMANTIC.SIZE", [])
    mapped = SemanticNucleiMapper(cfg, True)
    mapped.augmentations = T.AugmentationList([])  # no augmentation: the image's own grid
    out = mapped(record)
    assert np.array_equal(out["sem_seg"].numpy(), expected.astype(np.int64))
    assert "annotations" not in out and "annotations" in record  # the dataset dict is intact


def test_union_mask_of_polygons_and_empty_images():
    square = [[1.0, 1.0, 3.0, 1.0, 3.0, 3.0, 1.0, 3.0]]
    mask = union_mask([{"segmentation": square}], 5, 5)
    assert mask.sum() > 0 and not mask[4].any()
    assert not union_mask([], 4, 6).any() and union_mask([], 4, 6).shape == (4, 6)
    with pytest.raises(ValueError, match="annotation 0 has no 'segmentation'"):
        union_mask([{"bbox": [0, 0, 1, 1]}], 4, 4, "img.png")


def test_rot90_moves_pixels_and_points_alike():
    image = np.zeros((4, 6), dtype=np.uint8)
    image[1, 4] = 1  # row 1, column 4: its centre is (x, y) = (4.5, 1.5)
    for k in range(4):
        t = Rot90Transform(k, 4, 6)
        rotated = t.apply_image(image)
        assert np.array_equal(rotated, np.rot90(image, k))
        (x, y), = t.apply_coords(np.array([[4.5, 1.5]]))
        assert rotated[int(y), int(x)] == 1


def test_training_augmentation_keeps_image_and_mask_aligned(tmp_path):
    mask = np.zeros((40, 30), dtype=np.uint8)
    mask[5:15, 3:12] = 1
    mask[25:38, 20:28] = 1
    Image.fromarray(np.repeat(mask[..., None] * 255, 3, axis=2)).save(tmp_path / "im.png")
    rle = mask_util.encode(np.asfortranarray(mask))
    record = {"file_name": str(tmp_path / "im.png"), "height": 40, "width": 30, "image_id": 0,
              "annotations": [{"segmentation": rle}]}
    cfg = tiny_cfg(SEMANTIC / "table1" / "unet.yaml", "INPUT.SEMANTIC.SIZE", [],
                   "INPUT.SEMANTIC.COLOR_JITTER", False)
    mapper = SemanticNucleiMapper(cfg, True)
    shapes = set()
    for seed in range(12):
        np.random.seed(seed)
        out = mapper(record)
        shapes.add(tuple(out["sem_seg"].shape))
        assert torch.equal(out["image"][0] > 127, out["sem_seg"] > 0)
    assert shapes == {(40, 30), (30, 40)}  # quarter turns happened


def test_hsv_shift_changes_colour_not_geometry():
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[..., 2] = 200  # BGR red
    shifted = HSVShiftTransform(60, 0, 0, "BGR").apply_image(image)  # +120 degrees: green
    assert shifted.shape == image.shape and shifted[0, 0, 1] > 150 and shifted[0, 0, 2] < 50
    seg = np.arange(4).reshape(2, 2)
    assert np.array_equal(HSVShiftTransform(5, 5, 5).apply_segmentation(seg), seg)


def _square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_evaluator_on_hand_made_cases(tmp_path):
    # image 1: truth = two 2x2 nuclei (8 px); prediction = one of them plus 4 other pixels
    truth = np.zeros((6, 6), bool)
    truth[0:2, 0:2] = truth[3:5, 3:5] = True
    rles = [mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            for m in (truth & (np.arange(6)[:, None] < 3), truth & (np.arange(6)[:, None] >= 3))]
    prob = torch.zeros(1, 6, 6)
    prob[0, 0:2, 0:2] = 0.9
    prob[0, 0:2, 4:6] = 0.6
    prob[0, 3:5, 3:5] = 0.5  # not above the 0.5 threshold
    inputs = [
        {"file_name": "a.png", "image_id": 1, "height": 6, "width": 6,
         "annotations": [{"segmentation": r} for r in rles]},
        {"file_name": "b.png", "image_id": 2, "height": 6, "width": 6, "annotations": []},
    ]
    outputs = [{"sem_seg": prob}, {"sem_seg": torch.zeros(1, 6, 6)}]
    evaluator = SemanticIoUEvaluator("unused", threshold=0.5, output_dir=str(tmp_path),
                                     distributed=False)
    evaluator.reset()
    evaluator.process(inputs, outputs)
    result = evaluator.evaluate()["semantic"]
    # image 1: |T & P| = 4, |T| = 8, |P| = 8 -> IoU 4/12, Dice 8/16; image 2: both empty -> 1
    assert result["IoU"] == pytest.approx(100 * (4 / 12 + 1) / 2)
    assert result["Dice"] == pytest.approx(100 * (0.5 + 1) / 2)
    assert result["num_images"] == 2
    rows = (tmp_path / CSV_NAME).read_text().splitlines()
    assert rows[0] == "file_name,image_id,iou,dice" and rows[1].startswith("a.png,1,0.333")
    with pytest.raises(ValueError, match=r"a\.png: sem_seg has shape \(1, 5, 6\)"):
        evaluator.process(inputs[:1], [{"sem_seg": torch.zeros(1, 5, 6)}])


def test_evaluator_reads_ground_truth_from_the_catalog():
    name = "semantic_test_catalog"
    record = {"file_name": "c.png", "image_id": 7, "height": 4, "width": 4,
              "annotations": [{"segmentation": _square(0, 0, 2, 2)}]}
    DatasetCatalog.register(name, lambda: [record])
    MetadataCatalog.get(name).set(thing_classes=["nucleus"])
    try:
        evaluator = SemanticIoUEvaluator(name, distributed=False)
        evaluator.reset()
        truth = union_mask(record["annotations"], 4, 4)
        evaluator.process([{"image_id": 7, "file_name": "c.png"}],
                          [{"sem_seg": torch.from_numpy(truth[None].astype(np.float32))}])
        assert evaluator.evaluate()["semantic"]["IoU"] == 100.0
        with pytest.raises(ValueError, match="image_id 8 is not in dataset"):
            evaluator.process([{"image_id": 8}], [{"sem_seg": torch.zeros(1, 4, 4)}])
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_build_evaluator_switches_on_the_meta_architecture(tmp_path):
    cfg = tiny_cfg(SEMANTIC / "table1" / "unet.yaml", "TEST.SEMANTIC.THRESHOLD", 0.3,
                   "OUTPUT_DIR", str(tmp_path))
    evaluator = build_evaluator(cfg, "nuclei_synth_val")
    assert isinstance(evaluator, SemanticIoUEvaluator) and evaluator._threshold == 0.3
