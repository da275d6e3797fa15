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
* set-up (:func:`setup_run`, for ``default_setup``): the console handlers are added once per
  process and each run logs to its own ``log.txt``, so a process that trains several models
  (``tools/demo.py``) prints each line once;
* on a machine without CUDA, ``--num-gpus N`` starts N CPU processes over gloo
  (:mod:`.compat`: v0.6's ``launch`` requires CUDA and NCCL, and its DDP wrapper passes
  ``device_ids``, which CPU modules reject).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import (
    DatasetCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

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


#: The loggers a run logs to the console and to its ``log.txt``: detectron2's, fvcore's (the
#: checkpointer's) and the project's own.
RUN_LOGGERS = ("detectron2", "fvcore", "sharp_fpn")

_LOG_FORMAT = "[%(asctime)s] %(name)s %(levelname)s: %(message)s"
_LOG_DATE_FORMAT = "%m/%d %H:%M:%S"


class _RunLogFile(logging.FileHandler):
    """The ``log.txt`` handler :func:`setup_logging` adds (and replaces on the next run)."""


def _has_console(logger: logging.Logger) -> bool:
    return any(
        type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.__stdout__)
        for h in logger.handlers
    )


def setup_logging(output_dir: str | None = None) -> None:
    """Console logging set up once per process; the run's ``log.txt`` replaces the last run's.

    detectron2's ``setup_logger`` adds a console handler for every output folder it is given
    (it caches on its arguments), so a process that trains twice (``make demo``) printed every
    line of its second run twice, and went on writing the first run's ``log.txt``. Here each
    of :data:`RUN_LOGGERS` gets detectron2's console handler once (on the main process only,
    as detectron2 does) and one file handler, ``<output_dir>/log.txt`` (``log.txt.rank<N>`` on
    the other processes), which replaces the one of the process's previous run.
    """
    rank = comm.get_rank()
    filename = None
    if output_dir:
        filename = os.path.join(output_dir, "log.txt") + (f".rank{rank}" if rank else "")
        os.makedirs(output_dir, exist_ok=True)
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if rank == 0 and not _has_console(logger):
            setup_logger(None, distributed_rank=rank, name=name)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        for handler in [h for h in logger.handlers if isinstance(h, _RunLogFile)]:
            logger.removeHandler(handler)
            handler.close()
        if filename:
            handler = _RunLogFile(filename, mode="a", encoding="utf-8")
            handler.setLevel(logging.DEBUG)
            handler.setFormatter(logging.Formatter(_LOG_FORMAT, datefmt=_LOG_DATE_FORMAT))
            logger.addHandler(handler)


def setup_run(cfg: CfgNode, args: Any) -> None:
    """What detectron2's ``default_setup`` does, with logging set up by :func:`setup_logging`.

    Logs the rank, environment, command-line arguments and config; writes
    ``OUTPUT_DIR/config.yaml`` (whole or not at all) on the main process; seeds every RNG with
    ``SEED + rank`` (at random when ``SEED`` < 0); cuDNN benchmarking per
    ``CUDNN_BENCHMARK``, except for evaluation only.
    """
    rank = comm.get_rank()
    output_dir = cfg.OUTPUT_DIR
    setup_logging(output_dir)
    logger = logging.getLogger("detectron2")
    logger.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    logger.info("Environment info:\n" + collect_env_info())
    logger.info(f"Command line arguments: {args}")
    config_file = getattr(args, "config_file", "")
    if config_file:
        with open(config_file, encoding="utf-8") as f:
            logger.info(f"Contents of args.config_file={config_file}:\n{f.read()}")
    if comm.is_main_process() and output_dir:
        path = os.path.join(output_dir, "config.yaml")
        logger.info(f"Running with full config:\n{cfg.dump()}")
        write_text_atomic(path, cfg.dump())
        logger.info(f"Full config saved to {path}")
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK


def setup(args: Any) -> CfgNode:
    """Config from ``args.config_file`` and ``args.opts``, frozen, then :func:`setup_run`."""
    cfg = get_config(args.config_file, args.opts)
    cfg.freeze()
    setup_run(cfg, args)
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
    "setup_logging",
    "setup_run",
]
