"""Real detectron2 training and inference on the synthetic nuclei set, on the CPU."""
import json
from pathlib import Path

import numpy as np
import tifffile
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor

from sharp_fpn.d2.engine import Trainer, get_config
from sharp_fpn.predict.image_io import load_image

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo" / "mask_rcnn_fpn_R18.yaml"
UNET = ROOT / "configs" / "semantic" / "table1" / "unet.yaml"


def tiny_cfg(output_dir: Path, *opts):
    """The demo config, made smaller still: one process, 96-128 px images, 2 iterations."""
    cfg = get_config(
        str(DEMO),
        [
            "OUTPUT_DIR", str(output_dir),
            "INPUT.MIN_SIZE_TRAIN", (96,), "INPUT.MAX_SIZE_TRAIN", 128,
            "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 128,
            "DATALOADER.NUM_WORKERS", 0,
            "SOLVER.MAX_ITER", 2, "SOLVER.WARMUP_ITERS", 0, "SOLVER.STEPS", (),
            "SOLVER.CHECKPOINT_PERIOD", 1000, "SOLVER.IMS_PER_BATCH", 2,
            "DATASETS.TEST", (),
            *opts,
        ],
    )
    return cfg


def test_one_training_iteration_and_one_inference(tmp_path):
    cfg = tiny_cfg(tmp_path, "SOLVER.MAX_ITER", 1)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("backbone.bottom_up" in k for k in changed)
    assert any("roi_heads.mask_head" in k for k in changed)
    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 1 and np.isfinite(losses[0][0])
    assert (tmp_path / "model_final.pth").is_file()

    cfg = cfg.clone()
    cfg.MODEL.WEIGHTS = str(tmp_path / "model_final.pth")
    predictor = DefaultPredictor(cfg)
    record = DatasetCatalog.get("nuclei_synth_val")[0]
    image = read_image(record["file_name"], format=cfg.INPUT.FORMAT)
    instances = predictor(image)["instances"]
    assert instances.image_size == (record["height"], record["width"])
    for field in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        assert instances.has(field)
    assert instances.pred_masks.shape[1:] == (record["height"], record["width"])
    assert len(instances) <= cfg.TEST.DETECTIONS_PER_IMAGE


def _sixteen_bit_dataset(folder: Path) -> str:
    """A registered one-image dataset: a 16-bit TIFF (a 12-bit camera's range) with a nucleus."""
    name = "sixteen_bit_probe"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    rng = np.random.default_rng(12)
    pixels = rng.normal(300, 20, (72, 96)).clip(0, 4095)
    pixels[20:40, 30:52] += 3000
    tifffile.imwrite(folder / "cells.tif", pixels.astype(np.uint16))
    coco = {
        "images": [{"id": 1, "file_name": "cells.tif", "height": 72, "width": 96}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 440,
                         "bbox": [30, 20, 22, 20],
                         "segmentation": [[30, 20, 52, 20, 52, 40, 30, 40]]}],
        "categories": [{"id": 1, "name": "nucleus"}],
    }
    (folder / "coco.json").write_text(json.dumps(coco))
    register_coco_instances(name, {}, str(folder / "coco.json"), str(folder))
    return name


def test_the_trainers_loaders_read_a_16bit_image_as_predict_does(tmp_path):
    name = _sixteen_bit_dataset(tmp_path)
    seen_by_predict = load_image(tmp_path / "cells.tif").rgb  # stretched, not clipped
    assert seen_by_predict.max() == 255 and (seen_by_predict == 255).mean() < 0.5
    try:
        # Mask R-CNN (BGR): at its own size (shortest edge 72), no flip.
        cfg = tiny_cfg(tmp_path, "DATASETS.TRAIN", (name,), "SOLVER.IMS_PER_BATCH", 1,
                       "INPUT.MIN_SIZE_TRAIN", (72,), "INPUT.MAX_SIZE_TRAIN", 1000,
                       "INPUT.MIN_SIZE_TEST", 72, "INPUT.MAX_SIZE_TEST", 1000,
                       "INPUT.RANDOM_FLIP", "none")
        train = next(iter(Trainer.build_train_loader(cfg)))[0]
        test = next(iter(Trainer.build_test_loader(cfg, name)))[0]
        for record in (train, test):
            image = record["image"].numpy().transpose(1, 2, 0)[:, :, ::-1]
            assert np.array_equal(image, seen_by_predict)
        assert len(train["instances"]) == 1
        # The semantic models (RGB): no resize, no augmentation.
        cfg = get_config(str(UNET), [
            "DATASETS.TRAIN", (name,), "SOLVER.IMS_PER_BATCH", 1, "DATALOADER.NUM_WORKERS", 0,
            "INPUT.SEMANTIC.SIZE", [], "INPUT.SEMANTIC.ROTATE90", False,
            "INPUT.SEMANTIC.FLIP", False, "INPUT.SEMANTIC.COLOR_JITTER", False,
        ])
        train = next(iter(Trainer.build_train_loader(cfg)))[0]
        assert np.array_equal(train["image"].numpy().transpose(1, 2, 0), seen_by_predict)
        assert train["sem_seg"].sum() == 22 * 20
    finally:
        DatasetCatalog.remove(name)
