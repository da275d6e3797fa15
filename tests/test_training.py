"""Real detectron2 training and inference on the synthetic nuclei set, on the CPU."""
from pathlib import Path

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor

from sharp_fpn.d2.engine import Trainer, get_config

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo" / "mask_rcnn_fpn_R18.yaml"


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
