"""Training and evaluation glue for detectron2: the trainer, its evaluators, set-up and launch.

``tools/train_net.py`` is a thin command line over this module.

What differs from detectron2's ``DefaultTrainer``:

* evaluators: COCO box/mask AP (with maxDets raised to ``TEST.DETECTIONS_PER_IMAGE``, and
  detectron2's fast C++ COCOeval only where the compiled ops exist) plus the DSB2018 score and
  foreground IoU/Dice (:class:`~sharp_fpn.d2.evaluators.DSBEvaluator`); semantic
  models (``SemanticNucleiSegmentor``) get foreground IoU/Dice
  (:class:`~sharp_fpn.d2.semantic_evaluator.SemanticIoUEvaluator`) and their own data mapper;
* ``SOLVER.OPTIMIZER`` picks SGD (detectron2's), Adam or AdamW;
* checkpoints are written to a temporary name and renamed when whole, ``last_checkpoint`` too,
  so a run killed at any moment resumes from its last complete checkpoint;
* on a machine without CUDA, ``--num-gpus N`` starts N CPU processes over gloo
  (:mod:`.compat`: v0.6's ``launch`` requires CUDA and NCCL, and its DDP wrapper passes
  ``device_ids``, which CPU modules reject).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import (
    DatasetCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import default_setup
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.utils import comm

from .compat import DefaultTrainer, has_compiled_ops, launch, names_iteration
from .config import add_sharp_fpn_config, check_value
from ..data.catalog import DATASETS
from .evaluators import DSBEvaluator
from .semantic_evaluator import SemanticIoUEvaluator
from .semantic import is_semantic
from .semantic_data import SemanticNucleiMapper
from ..utils import atomic_write, write_text_atomic


class AtomicCheckpointer(DetectionCheckpointer):
    """A :class:`DetectionCheckpointer` whose files are written whole or not at all."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        target = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {target}")
        with atomic_write(target, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        write_text_atomic(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with nuclei evaluators, atomic checkpoints and CPU DDP."""

    checkpointer_class = AtomicCheckpointer

    def run_step(self) -> None:
        # detectron2 checks the losses after each step and names the iteration and every loss
        # term; a divergence caught inside the model (non-finite boxes) names neither.
        try:
            super().run_step()
        except FloatingPointError as e:
            if names_iteration(e):
                raise
            raise FloatingPointError(f"training diverged at iteration={self.iter}: {e}") from e

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """detectron2's loader; semantic models map through ``SemanticNucleiMapper``."""
        if is_semantic(cfg):
            return build_detection_train_loader(cfg, mapper=SemanticNucleiMapper(cfg, True))
        return super().build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        if is_semantic(cfg):
            mapper = SemanticNucleiMapper(cfg, False)
            return build_detection_test_loader(cfg, dataset_name, mapper=mapper)
        return super().build_test_loader(cfg, dataset_name)


OPTIMIZERS = {"SGD": torch.optim.SGD, "Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER``: detectron2's SGD, or torch's Adam/AdamW (the paper's recipe: Adam,
    lr 1e-3, weight decay 1e-4), with detectron2's parameter groups and gradient clipping."""
    name = cfg.SOLVER.OPTIMIZER
    check_value("SOLVER.OPTIMIZER", name, name in OPTIMIZERS, f"one of {sorted(OPTIMIZERS)}")
    if name == "SGD":
        return DefaultTrainer.build_optimizer(cfg, model)
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    optimizer = maybe_add_gradient_clipping(cfg, OPTIMIZERS[name])
    return optimizer(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)


def build_evaluator(cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
    """COCO AP (bbox, and segm when masks are on) and the DSB2018 score, IoU and Dice; for the
    semantic models, foreground IoU and Dice of the thresholded probabilities."""
    if dataset_name in DATASETS:
        DatasetCatalog.get(dataset_name)  # converts on first use: COCOEvaluator reads the json
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    if is_semantic(cfg):
        return SemanticIoUEvaluator(
            dataset_name, threshold=cfg.TEST.SEMANTIC.THRESHOLD, output_dir=output_folder
        )
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    evaluators = [
        COCOEvaluator(
            dataset_name,
            tasks=tasks,
            distributed=True,
            output_dir=output_folder,
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
            use_fast_impl=has_compiled_ops(),
        )
    ]
    if cfg.MODEL.MASK_ON:
        evaluators.append(
            DSBEvaluator(
                dataset_name,
                score_threshold=cfg.TEST.DSB.SCORE_THRESHOLD,
                distributed=True,
                output_dir=output_folder,
            )
        )
    return DatasetEvaluators(evaluators)


class ConfigError(ValueError):
    """A config file or command-line option that does not fit the config (names both)."""


def get_config(config_file: str | None = None, opts: Sequence[str] = ()) -> CfgNode:
    """detectron2's defaults + sharp-fpn's keys, then ``config_file`` and ``opts`` merged in.

    An unknown key in either raises :class:`ConfigError` naming the key and where it was.
    """
    cfg = get_cfg()
    add_sharp_fpn_config(cfg)
    if config_file:
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:  # yacs: "Non-existent config key: MODEL.X"
            raise ConfigError(f"{config_file}: {e.args[0]}") from None
    try:
        cfg.merge_from_list(list(opts))
    except AssertionError as e:  # yacs: "Non-existent key: MODEL.X", odd-length lists
        raise ConfigError(f"command-line options: {e}") from None
    if cfg.SOLVER.IMS_PER_BATCH % max(comm.get_world_size(), 1):
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} does not divide by the "
            f"{comm.get_world_size()} processes"
        )
    return cfg


def setup(args: Any) -> CfgNode:
    """Config from ``args.config_file`` and ``args.opts``, frozen; detectron2's default set-up."""
    cfg = get_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


__all__ = [
    "AtomicCheckpointer",
    "ConfigError",
    "Trainer",
    "build_evaluator",
    "build_optimizer",
    "get_config",
    "launch",
    "setup",
]
