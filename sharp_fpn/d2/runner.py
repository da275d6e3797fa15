"""The reproducer's detectron2 side: a row's config, training, evaluation and pruning study.

:mod:`sharp_fpn.experiments` holds the tables, the quick recipe and the report writers without
detectron2; this module trains a row through :class:`~.engine.Trainer` (as
``tools/train_net.py``) and evaluates it with the Trainer's evaluator: semantic rows by
``SemanticIoUEvaluator`` (foreground IoU and Dice of the union mask), 3-D rows (the V-Net
family, ``VolumeSegmentor``) by ``VolumeIoUEvaluator`` (the same per volume), Mask R-CNN rows
by ``DSBEvaluator``'s foreground IoU and Dice.
"""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from ..experiments.recipes import quick_overrides
from ..experiments.results import RowResult
from ..experiments.tables import Row
from ..models import count_parameters
from ..perf.measure import images_per_second
from ..utils import write_text_atomic
from .engine import Trainer, get_config
from .evaluators import CSV_NAME as DSB_CSV
from .semantic import is_semantic
from .semantic_evaluator import CSV_NAME as SEMANTIC_CSV
from .volume import is_volume

LOGGER_NAME = "sharp_fpn.experiments"
logger = logging.getLogger(LOGGER_NAME)

__all__ = [
    "LOGGER_NAME",
    "config_parameters",
    "evaluate",
    "pruning_study",
    "row_config",
    "run_row",
    "set_threads",
    "setup_logging",
]


def setup_logging() -> None:
    """detectron2's log format for its own messages and the reproducer's."""
    setup_logger(name="detectron2")
    setup_logger(name=LOGGER_NAME, abbrev_name="reproduce")


def set_threads(threads: int) -> None:
    """torch's intra-op threads for this process (``--threads``), at least 1."""
    if threads < 1:
        raise ValueError(f"--threads: expected at least 1, got {threads}")
    torch.set_num_threads(threads)


def row_config(
    row: Row, quick: bool, iters: Optional[int], opts: Sequence, output: Path
) -> CfgNode:
    """The row's config, frozen: its yaml, then ``--quick``'s recipe (common, then semantic,
    instance or volume, then the row's stand-in data set), ``iters`` as ``SOLVER.MAX_ITER``,
    ``opts``; ``OUTPUT_DIR`` is ``output``."""
    path = str(row.config_path)
    overrides: List = ["OUTPUT_DIR", str(output)]
    if quick:
        own = get_config(path)
        kind = "volume" if is_volume(own) else "semantic" if is_semantic(own) else "instance"
        overrides += quick_overrides(kind=kind, dataset=row.quick_dataset)
    if iters is not None:
        overrides += ["SOLVER.MAX_ITER", iters]
    cfg = get_config(path, overrides + list(opts))
    cfg.freeze()
    return cfg


def _scores(cfg: CfgNode, results: Dict) -> Tuple[float, float, List[float]]:
    """(IoU %, Dice %, per-image IoU %) from ``Trainer.test``'s results and the evaluator CSV."""
    folder = Path(cfg.OUTPUT_DIR) / "inference" / cfg.DATASETS.TEST[0]
    if is_semantic(cfg) or is_volume(cfg):
        iou, dice = results["semantic"]["IoU"], results["semantic"]["Dice"]
        csv_path = folder / SEMANTIC_CSV
        if is_volume(cfg):
            from .volume_data import CSV_NAME as VOLUME_CSV

            csv_path = folder / VOLUME_CSV
        column = "iou"
    else:
        iou, dice = results["dsb"]["fg_IoU"], results["dsb"]["fg_Dice"]
        csv_path, column = folder / DSB_CSV, "fg_iou"
    with open(csv_path, newline="", encoding="utf-8") as f:
        per_image = [100.0 * float(r[column]) for r in csv.DictReader(f)]
    return float(iou), float(dice), per_image


def evaluate(cfg: CfgNode, model: torch.nn.Module) -> Tuple[float, float, List[float]]:
    """(IoU %, Dice %, per-image IoU %) of ``model`` on ``cfg.DATASETS.TEST[0]``."""
    if len(cfg.DATASETS.TEST) != 1:
        raise ValueError(f"{cfg.OUTPUT_DIR}: rows evaluate one dataset, got {cfg.DATASETS.TEST}")
    return _scores(cfg, Trainer.test(cfg, model))


def pruning_study(
    cfg: CfgNode, model: torch.nn.Module, output: Path, speed_seconds: float
) -> List[Dict[str, float]]:
    """Figure 7 for a trained UNet# with top-row heads: per level k = 1..depth, the pruned
    sub-network's parameters, its images per second here (the project's timing policy,
    :func:`~sharp_fpn.perf.measure.images_per_second`, over about ``speed_seconds``), and IoU
    / Dice of pruned inference (``MODEL.UNET.PRUNE_LEVEL = k``) with the trained weights."""
    depth = model.network.depth
    size = cfg.INPUT.SEMANTIC.SIZE or [96, 96]
    levels = []
    for k in range(1, depth + 1):
        cfg_k = cfg.clone()
        cfg_k.defrost()
        cfg_k.MODEL.UNET.PRUNE_LEVEL = k
        cfg_k.OUTPUT_DIR = str(Path(output) / f"prune_L{k}")
        cfg_k.freeze()
        pruned_model = Trainer.build_model(cfg_k)
        pruned_model.load_state_dict(model.state_dict())
        iou, dice, _ = evaluate(cfg_k, pruned_model)
        sub_network = model.network.prune(k)
        speed, _ = images_per_second(sub_network, size, cfg.MODEL.DEVICE, seconds=speed_seconds)
        levels.append({"level": k, "params": count_parameters(sub_network),
                       "images_per_second": speed, "iou": iou, "dice": dice})
        logger.info(f"pruned L{k}: {levels[-1]}")
    return levels


def config_parameters(row: Row) -> int:
    """Parameters of the network the row's yaml describes, as is (the paper's widths); the 3-D
    rows' (27M to 37M parameters) are counted on the meta device, without memory or init."""
    cfg = get_config(str(row.config_path), ["MODEL.DEVICE", "cpu"])
    if is_volume(cfg):
        with torch.device("meta"):
            return count_parameters(META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg))
    return count_parameters(Trainer.build_model(cfg))


def run_row(row: Row, cfg: CfgNode, output: Path, pruning: bool, speed_seconds: float
            ) -> RowResult:
    """Train ``row`` with the Trainer, evaluate it (and its pruned levels if ``pruning``);
    write ``config.yaml`` and ``result.json`` into ``output``.

    Raises:
        FloatingPointError: training diverged (detectron2's loss check).
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output / "config.yaml", cfg.dump())
    seed_all_rng(cfg.SEED if cfg.SEED >= 0 else None)
    train_cfg = cfg.clone()
    train_cfg.defrost()
    train_cfg.DATASETS.TEST = ()  # evaluated once, below
    train_cfg.freeze()
    start = time.perf_counter()
    trainer = Trainer(train_cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    train_seconds = time.perf_counter() - start
    model = trainer.model
    start = time.perf_counter()
    iou, dice, per_image = evaluate(cfg, model)
    result = RowResult(
        row.key, "done", iou=iou, dice=dice, params=count_parameters(model),
        config_params=config_parameters(row), train_seconds=train_seconds,
        eval_seconds=time.perf_counter() - start, per_image_iou=per_image,
    )
    if pruning:
        result.pruning = pruning_study(cfg, model, output, speed_seconds)
    result.save(output)
    return result
