"""Training and evaluation glue for detectron2: the trainer, its evaluators, set-up and launch.

``tools/train_net.py`` is a thin command line over this module.

What differs from detectron2's ``DefaultTrainer``:

* evaluators: COCO box/mask AP (with maxDets raised to ``TEST.DETECTIONS_PER_IMAGE``, and
  detectron2's fast C++ COCOeval only where the compiled ops exist) plus the DSB2018 score and
  foreground IoU/Dice (:class:`~sharp_fpn.d2.evaluators.DSBEvaluator`); semantic
  models (``SemanticNucleiSegmentor``) get foreground IoU/Dice
  (:class:`~sharp_fpn.d2.semantic_evaluator.SemanticIoUEvaluator`) and their own data mapper;
  the 3-D ``VolumeSegmentor`` (the V-Net family) gets TorchIO's patch queue for training,
  whole volumes for testing and per-volume IoU/Dice (:mod:`.volume_data`);
* ``SOLVER.OPTIMIZER`` picks SGD (detectron2's), Adam or AdamW;
* images are read as prediction reads them (:mod:`.mapper`: a 16-bit image is stretched to 8
  bits as ``tools/predict.py`` does, where detectron2's reader clipped it to white), by
  :class:`~.mapper.NucleiDatasetMapper` for Mask R-CNN and ``SemanticNucleiMapper``;
* checkpoints (:mod:`.checkpoint`) are written to a temporary name and renamed when whole,
  ``last_checkpoint`` too, so a run killed at any moment resumes from its last complete
  checkpoint; an unreadable last checkpoint falls back to the newest readable one, with a
  warning; a checkpoint resumed must fit the model;
* checks before any work (:func:`get_config`, :func:`check_run`), each failure one line that
  names the key or file: config files that cannot be read, ``SOLVER.IMS_PER_BATCH`` not
  dividing by the processes, datasets nobody registered, ``--eval-only`` without weights or
  with a missing ``MODEL.WEIGHTS``; the OUTPUT_DIR rules are :mod:`.run_folder`'s;
* :func:`launch`: a failure in one of several processes is re-raised in the launching process
  as one line, the process's own error;
* set-up (:func:`setup_run`, for ``default_setup``): the console handlers are added once per
  process and each run logs to its own ``log.txt``, so a process that trains several models
  (``tools/demo.py``) prints each line once; an evaluation writes its config to
  ``inference/config.yaml``, never over the trained model's ``config.yaml``;
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
import torch.multiprocessing as mp
import yaml
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

from . import compat
from .checkpoint import AtomicCheckpointer, holds_checkpoint
from .compat import DefaultTrainer, has_compiled_ops, names_iteration
from .config import add_sharp_fpn_config, check_value
from ..data.catalog import DATASETS, prepare, unknown_dataset_message
from .evaluators import DSBEvaluator
from .mapper import NucleiDatasetMapper
from .run_folder import EVAL_CONFIG
from .semantic_evaluator import SemanticIoUEvaluator
from .semantic import is_semantic
from .semantic_data import SemanticNucleiMapper
from .volume import is_volume
from ..utils import write_text_atomic


def describe_model(cfg: CfgNode) -> str:
    """The model a config builds, in a few words: meta-architecture and backbone."""
    return f"{cfg.MODEL.META_ARCHITECTURE}, {cfg.MODEL.BACKBONE.NAME}"


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with nuclei evaluators, predict's image reader, atomic and
    checked checkpoints, and CPU DDP."""

    checkpointer_class = AtomicCheckpointer

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__(cfg)
        self.checkpointer.model_name = describe_model(cfg)

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
        """detectron2's loader, mapping through ``SemanticNucleiMapper`` (semantic models) or
        :class:`~.mapper.NucleiDatasetMapper` (Mask R-CNN): images read as predict reads them;
        for the 3-D ``VolumeSegmentor``, TorchIO's patch queue
        (:func:`~.volume_data.build_volume_train_loader`)."""
        check_datasets(cfg, train=True, test=False)
        if is_volume(cfg):  # TorchIO is imported by the 3-D path only (~2 s)
            from .volume_data import build_volume_train_loader

            return build_volume_train_loader(cfg)
        if is_semantic(cfg):
            return build_detection_train_loader(cfg, mapper=SemanticNucleiMapper(cfg, True))
        return build_detection_train_loader(cfg, mapper=NucleiDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        _check_dataset("DATASETS.TEST", dataset_name)
        if is_volume(cfg):
            from .volume_data import build_volume_test_loader

            return build_volume_test_loader(cfg, dataset_name)
        mapper_class = SemanticNucleiMapper if is_semantic(cfg) else NucleiDatasetMapper
        mapper = mapper_class(cfg, False)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)


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
    semantic models, foreground IoU and Dice of the thresholded probabilities; for the 3-D
    models the same per volume (:class:`~.volume_data.VolumeIoUEvaluator`)."""
    if dataset_name in DATASETS:
        DatasetCatalog.get(dataset_name)  # converts on first use: COCOEvaluator reads the json
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    if is_volume(cfg):
        from .volume_data import VolumeIoUEvaluator

        return VolumeIoUEvaluator(
            dataset_name, threshold=cfg.TEST.SEMANTIC.THRESHOLD, output_dir=output_folder
        )
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


def get_config(
    config_file: str | None = None, opts: Sequence[str] = (), world_size: int | None = None
) -> CfgNode:
    """detectron2's defaults + sharp-fpn's keys, then ``config_file`` and ``opts`` merged in.

    ``world_size``: the processes the run will have (default: this one's process group);
    ``SOLVER.IMS_PER_BATCH`` must divide by it.

    Raises:
        ConfigError: naming the file (or the command line) and the problem: an unknown key, a
            value of the wrong type, a config (or its ``_BASE_``) that is missing or not YAML,
            a batch that does not divide by the processes.
    """
    cfg = get_cfg()
    add_sharp_fpn_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            if os.path.isdir(config_file):
                raise ConfigError(f"{config_file}: a folder, not a config file")
            raise ConfigError(f"{config_file}: no such config file")
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:  # yacs: "Non-existent config key: MODEL.X"
            raise ConfigError(f"{config_file}: {e.args[0]}") from None
        except OSError as e:  # the file or one of its _BASE_s
            missing = e.filename or config_file
            within = ""
            if os.fspath(missing) != os.fspath(config_file):
                within = f"its _BASE_ {missing}: "
            raise ConfigError(f"{config_file}: {within}{e.strerror or e}") from None
        except yaml.YAMLError as e:
            problem = " ".join(str(e).split())
            raise ConfigError(f"{config_file}: not valid YAML ({problem})") from None
        except (AttributeError, TypeError):  # a YAML list, a number, a string...
            raise ConfigError(
                f"{config_file}: not a config (expected YAML 'KEY: value' lines)"
            ) from None
        except (ValueError, AssertionError) as e:  # yacs: type mismatches
            raise ConfigError(f"{config_file}: {e}") from None
    try:
        cfg.merge_from_list(list(opts))
    except AssertionError as e:  # yacs: "Non-existent key: MODEL.X", odd-length lists
        raise ConfigError(f"command-line options: {e}") from None
    except (ValueError, TypeError) as e:  # yacs: type mismatches
        raise ConfigError(f"command-line options: {e}") from None
    world = comm.get_world_size() if world_size is None else world_size
    if cfg.SOLVER.IMS_PER_BATCH % max(world, 1):
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} does not divide by the "
            f"{world} processes (--num-gpus x --num-machines); give a multiple of {world}"
        )
    return cfg


def _check_dataset(key: str, name: str) -> None:
    registered = DatasetCatalog.list()
    if name not in registered:
        raise ConfigError(unknown_dataset_message(key, name, registered))


def check_datasets(cfg: CfgNode, *, train: bool = True, test: bool = True,
                   prepare_data: bool = False) -> None:
    """``DATASETS.TRAIN`` (when ``train``) and ``DATASETS.TEST`` (when ``test``) name
    registered datasets, and training has one; with ``prepare_data``, sharp-fpn's own datasets
    (the nuclei sets and the medical ones, ``sharp_fpn.data.medical``) are converted now (first
    use: the quick stand-ins) and a missing one says where its data go, before any model is
    built.

    Raises:
        ConfigError: an empty or unknown name (:func:`~sharp_fpn.data.catalog.
            unknown_dataset_message`).
        FileNotFoundError: a sharp-fpn dataset whose files are not there.
    """
    names = []
    if train:
        if not cfg.DATASETS.TRAIN:
            raise ConfigError("DATASETS.TRAIN is empty: name the datasets to train on, e.g. "
                              "DATASETS.TRAIN \"('nuclei_synth_train',)\"")
        names += [("DATASETS.TRAIN", n) for n in cfg.DATASETS.TRAIN]
    if test:
        names += [("DATASETS.TEST", n) for n in cfg.DATASETS.TEST]
    for key, name in names:
        _check_dataset(key, name)
    if prepare_data:
        from ..data.medical.registry import MEDICAL_DATASETS, prepare_medical

        for _, name in names:
            if name in DATASETS:
                prepare(name)
            elif name in MEDICAL_DATASETS:  # BraTS19, LiTS17, LIDC-IDRI, LUNA16 (and stand-ins)
                prepare_medical(name)


def check_run(cfg: CfgNode, *, eval_only: bool = False, resume: bool = False) -> None:
    """What ``tools/train_net.py`` checks before it starts any process, each failure in one
    line: the datasets (:func:`check_datasets`, converted on first use), and the weights: an
    evaluation needs some (``MODEL.WEIGHTS``, or ``resume`` and a checkpoint in OUTPUT_DIR)
    and a test set; ``MODEL.WEIGHTS``, where it will be loaded, must exist.

    Whether the weights can be read and fit the model is checked where they are loaded
    (:class:`~.checkpoint.AtomicCheckpointer`): weights to evaluate must fit exactly.
    """
    check_datasets(cfg, train=not eval_only, test=True, prepare_data=True)
    resuming = resume and holds_checkpoint(cfg.OUTPUT_DIR)
    weights = cfg.MODEL.WEIGHTS
    if eval_only:
        if not cfg.DATASETS.TEST:
            raise ConfigError("--eval-only: DATASETS.TEST is empty, nothing to evaluate")
        if not weights and not resuming:
            where = (f"{cfg.OUTPUT_DIR} holds no checkpoint for --resume" if resume else
                     "or --resume to evaluate OUTPUT_DIR's last checkpoint")
            raise ConfigError(
                "--eval-only needs the weights to evaluate: MODEL.WEIGHTS path/to/model_final.pth "
                f"(trained with this config), {where}; without weights the numbers would be "
                "those of a random model"
            )
    if weights and not resuming and "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS: {weights}: no such file")


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
    ``OUTPUT_DIR/config.yaml`` (an evaluation: ``OUTPUT_DIR/inference/config.yaml``), whole or
    not at all, on the main process; seeds every RNG with
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
        name = EVAL_CONFIG if getattr(args, "eval_only", False) else "config.yaml"
        path = os.path.join(output_dir, name)
        logger.info(f"Running with full config:\n{cfg.dump()}")
        write_text_atomic(path, cfg.dump())
        logger.info(f"Full config saved to {path}")
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK


class ProcessFailed(RuntimeError):
    """One process of a multi-process run failed; the message is that process's error."""


def _last_error(traceback_text: str) -> str:
    """The final ``Kind: message`` of a formatted traceback (its last exception), one line."""
    lines = traceback_text.rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i]
        if line and not line[0].isspace() and ":" in line and not line.startswith("Traceback"):
            kind, _, rest = line.partition(":")
            if kind.replace(".", "").replace("_", "").isalnum():
                message = " ".join([rest.strip(), *(l.strip() for l in lines[i + 1:])]).strip()
                return f"{kind.rsplit('.', 1)[-1]}: {message}"
    return lines[-1].strip() if lines else "no error message"


def launch(
    main_func: Any,
    num_processes: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    timeout: float | None = None,
) -> None:
    """:func:`.compat.launch` (detectron2's, and CPU processes over gloo, meeting within
    ``timeout`` seconds); an error in one of several processes is raised here as
    :class:`ProcessFailed`, one line that names the process and its error (the whole traceback
    is chained, for ``--debug``)."""
    try:
        compat.launch(main_func, num_processes, num_machines, machine_rank, dist_url, args=args,
                      timeout=timeout)
    except mp.ProcessRaisedException as e:
        rank = machine_rank * num_processes + e.error_index
        raise ProcessFailed(
            f"process {rank} of {num_processes * num_machines} failed: {_last_error(str(e))}"
        ) from e


def setup(args: Any) -> CfgNode:
    """Config from ``args.config_file`` and ``args.opts``, frozen, then :func:`setup_run`."""
    cfg = get_config(args.config_file, args.opts)
    cfg.freeze()
    setup_run(cfg, args)
    return cfg


__all__ = [
    "AtomicCheckpointer",
    "ConfigError",
    "ProcessFailed",
    "Trainer",
    "build_evaluator",
    "build_optimizer",
    "check_datasets",
    "check_run",
    "describe_model",
    "get_config",
    "launch",
    "setup",
    "setup_logging",
    "setup_run",
]
