"""Every workaround for detectron2 v0.6 (the Python-only fallback) on PyTorch 2.x, in one place.

sharp-fpn runs on detectron2 as ``tools/install_detectron2.py`` installs it: the official
source where it can be reached, else v0.6's Python files. Each workaround below names the
behaviour of v0.6 it stands in for and what upstream changed (or did not), so that it can be
dropped once the install no longer needs it. Nothing else in the project patches, copies or
reaches into detectron2's internals.

============================  ==============================================================
workaround                    v0.6 behaviour it stands in for
============================  ==============================================================
:func:`silence_warnings`      import-time ``torch.jit.script`` of a few helpers (torch 2.14
                              deprecates TorchScript: a FutureWarning each) and
                              ``torch.meshgrid`` without ``indexing=`` in the anchor generator
                              (the list is :data:`sharp_fpn.utils.THIRD_PARTY_WARNINGS`)
:func:`has_compiled_ops`      the fallback's ``detectron2._C`` is a stand-in (``IS_STAND_IN``)
:func:`load_tracing_adapter`  ``detectron2/export/__init__.py`` imports caffe2, removed from
                              PyTorch in 2.0; upstream dropped caffe2 after v0.6 (also what
                              FLOP counts use: ``detectron2.utils.analysis`` imports it)
:class:`DefaultTrainer`       ``DefaultTrainer.__init__`` wraps the model in DDP with
                              ``device_ids=[local_rank]``, which CPU modules reject
:func:`launch`                ``launch`` needs CUDA and NCCL for more than one process; on CPU
                              the workers run over gloo, on one machine or several, and set
                              ``comm``'s per-machine process groups as v0.6's launch does
                              (upstream later added ``comm.create_local_process_group``); the
                              rendezvous and its errors are :mod:`.distributed`'s
:func:`names_iteration`       the trainer's loss check is the only ``FloatingPointError``
                              that names its iteration
============================  ==============================================================
"""
from __future__ import annotations

import importlib
import logging
import socket
import sys
import types
import weakref
from pathlib import Path
from typing import Callable

# The project's one list of silenced third-party warnings (sharp_fpn.utils), set before
# detectron2 is first imported: its import-time jit.script calls emit the first ones.
from ..utils import THIRD_PARTY_WARNINGS, silence_warnings

silence_warnings()

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from detectron2.engine import AMPTrainer, SimpleTrainer  # noqa: E402
from detectron2.engine import DefaultTrainer as _D2DefaultTrainer  # noqa: E402
from detectron2.engine import launch as _d2_launch  # noqa: E402
from detectron2.engine.defaults import create_ddp_model  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from . import distributed  # noqa: E402

__all__ = [
    "THIRD_PARTY_WARNINGS",
    "DefaultTrainer",
    "has_compiled_ops",
    "launch",
    "load_tracing_adapter",
    "names_iteration",
    "silence_warnings",
]


def has_compiled_ops() -> bool:
    """Whether detectron2's compiled ops exist (False for the Python-only fallback install)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "IS_STAND_IN", False)


def load_tracing_adapter() -> type:
    """detectron2's ``TracingAdapter``, also where ``import detectron2.export`` fails.

    On detectron2 v0.6 with PyTorch >= 2.0, ``detectron2/export/__init__.py`` dies on
    ``from caffe2.proto import caffe2_pb2`` (caffe2 left PyTorch in 2.0). ``export/flatten.py``,
    which defines ``TracingAdapter``, needs none of that: it is imported under a bare stand-in
    for the package (its ``__path__`` only), and the stand-in is removed again, so that a later
    ``import detectron2.export`` fails or succeeds exactly as it would have.
    """
    try:
        from detectron2.export import TracingAdapter

        return TracingAdapter
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("caffe2"):
            raise
    import detectron2

    package = "detectron2.export"
    stand_in = types.ModuleType(package)
    stand_in.__path__ = [str(Path(detectron2.__file__).parent / "export")]
    sys.modules[package] = stand_in
    try:
        return importlib.import_module(f"{package}.flatten").TracingAdapter
    finally:
        if sys.modules.get(package) is stand_in:
            del sys.modules[package]


def names_iteration(error: FloatingPointError) -> bool:
    """Whether ``error`` is detectron2's own loss check (it names the iteration and every loss
    term; a divergence caught inside the model, e.g. non-finite boxes, names neither)."""
    return "iteration" in str(error)


class DefaultTrainer(_D2DefaultTrainer):
    """detectron2's ``DefaultTrainer`` that also trains CPU models in several processes.

    ``__init__`` is v0.6's, with two hooks: DDP gets no ``device_ids`` for a CPU model (v0.6
    passes ``[local_rank]``, which a CPU module rejects), and the checkpointer is
    ``checkpointer_class`` (a subclass of ``DetectionCheckpointer``).
    """

    checkpointer_class: type = None  # DetectionCheckpointer unless a subclass says otherwise

    def __init__(self, cfg) -> None:
        from detectron2.checkpoint import DetectionCheckpointer

        super(_D2DefaultTrainer, self).__init__()  # TrainerBase: the hook list
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = _D2DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        ddp_kwargs = {"device_ids": None} if cfg.MODEL.DEVICE == "cpu" else {}
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_kwargs)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        checkpointer = self.checkpointer_class or DetectionCheckpointer
        self.checkpointer = checkpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_worker(local_rank: int, main_func: Callable, num_processes: int, num_machines: int,
                machine_rank: int, dist_url: str, timeout: float, args: tuple) -> None:
    silence_warnings()  # a spawned process starts with fresh filters
    rank = machine_rank * num_processes + local_rank
    distributed.rendezvous(dist_url, rank, num_processes * num_machines, backend="gloo",
                           timeout=timeout)
    try:
        distributed.create_local_groups(
            [r // num_processes for r in range(num_processes * num_machines)]
        )
        distributed.set_threads(num_processes)
        comm.synchronize()
        main_func(*args)
    finally:
        distributed.leave()


def launch(
    main_func: Callable,
    num_processes: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    timeout: float | None = None,
) -> None:
    """detectron2's ``launch`` with GPUs; without CUDA, ``num_processes`` CPU workers over gloo
    on each of ``num_machines`` machines (this one ``machine_rank``).

    On the CPU the processes meet at ``dist_url`` (:func:`.distributed.rendezvous`: a
    ``tcp://`` url, where they wait ``timeout`` seconds for each other, default
    :data:`.distributed.DEFAULT_JOIN_TIMEOUT_S`; ``auto`` or None: a free local port, one
    machine only). One process per machine runs in the calling process; more are spawned.
    """
    world_size = num_processes * num_machines
    if torch.cuda.is_available() or world_size <= 1:
        _d2_launch(main_func, num_processes, num_machines, machine_rank, dist_url, args=args)
        return
    if not dist_url or dist_url == "auto":
        if num_machines != 1:
            raise distributed.DistributedError(
                f"--dist-url {dist_url or 'auto'}: with {num_machines} machines give machine "
                "0's tcp://HOST:PORT to every machine"
            )
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    timeout = distributed.DEFAULT_JOIN_TIMEOUT_S if timeout is None else timeout
    worker_args = (main_func, num_processes, num_machines, machine_rank, dist_url, timeout, args)
    if num_processes == 1:
        _cpu_worker(0, *worker_args)
        return
    mp.spawn(_cpu_worker, nprocs=num_processes, args=worker_args)
