"""Training in several processes on several machines: the two ways to start one, how the
processes find each other, and what they check together.

``tools/train_net.py`` is started one of two ways:

* **detectron2's flags**: one command per machine, each with the same ``--num-machines M``
  and ``--dist-url tcp://HOST:PORT`` (HOST an address of machine 0 that every machine can
  reach, PORT free there) and its own ``--machine-rank`` (0 to M-1); ``--num-gpus N`` processes
  are started on each (CPU processes over gloo where there is no CUDA). Process ``r`` of
  machine ``m`` has rank ``m * N + r``.
* **torchrun**: ``torchrun --nnodes M --nproc-per-node N --node-rank m --master-addr HOST
  --master-port PORT tools/train_net.py ...`` (or ``--standalone --nproc-per-node N`` on one
  machine): torchrun starts the processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT``; each process joins the group
  itself (:func:`join_torchrun`) and trains, nothing is spawned. detectron2's launch flags
  (``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url``, ``--dist-timeout``)
  are refused beside torchrun, naming both: torchrun decides what they would.

The rules both ways keep:

* every check is made before any process trains, each failure one line: a
  ``--machine-rank`` outside ``0..M-1``, a multi-machine ``--dist-url`` that is not
  ``tcp://HOST:PORT``, a machine 0 that cannot listen at the address, a rendezvous that the
  other machines do not join within ``--dist-timeout`` seconds (:func:`rendezvous`), each
  naming the address;
* detectron2's per-machine group (``comm.get_local_rank()``) is made as detectron2's launch
  makes it, every process creating every machine's group in the same order
  (:func:`create_local_groups`);
* only rank 0 (machine 0's first process) writes OUTPUT_DIR's run files and holds its lock;
  the other processes write only their own ``log.txt.rank<N>`` there, so machines that share a
  filesystem never write the same file. Resuming needs OUTPUT_DIR's checkpoints on every
  machine (a shared filesystem): processes that would start from different iterations are
  refused (:func:`check_same_start`);
* after training, the processes compare their parameters (DDP keeps them equal; a digest of
  each process's own copy, :func:`parameter_digest`) and what each trained on (the images of
  every step, recorded as the model sees them, :class:`BatchLedger`); rank 0 writes both to
  ``OUTPUT_DIR/distributed.json`` (:func:`check_replicas`), and replicas that differ are an
  error.

torch's threads: where ``OMP_NUM_THREADS`` is set it decides; otherwise a CPU process takes
its machine's cores divided among the machine's processes.
"""
from __future__ import annotations

import argparse
import datetime
import errno
import hashlib
import json
import logging
import os
import re
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterable, Iterator, List, Mapping, \
    Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from detectron2.utils import comm

from ..cli import UserError, one_line
from ..utils import available_cpus, write_text_atomic
from .run_folder import DISTRIBUTED_REPORT

__all__ = [
    "COLLECTIVE_TIMEOUT",
    "DEFAULT_JOIN_TIMEOUT_S",
    "LAUNCH_FLAGS",
    "REPORT",
    "TORCHRUN_VARIABLES",
    "BatchLedger",
    "DistributedError",
    "Plan",
    "check_replicas",
    "check_same_start",
    "create_local_groups",
    "held_by_main",
    "join_torchrun",
    "leave",
    "parameter_digest",
    "parse_tcp_url",
    "plan_launch",
    "rendezvous",
    "set_threads",
    "torchrun_environment",
]

logger = logging.getLogger(__name__)

#: How long (seconds) a process waits for the others at ``--dist-url`` by default.
DEFAULT_JOIN_TIMEOUT_S = 600.0
#: The timeout of every collective after the rendezvous (detectron2's launch: 30 minutes).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
#: What rank 0 writes after a multi-process training, in OUTPUT_DIR (a run file of
#: :mod:`.run_folder`: replaced by the next run, removed when one starts anew).
REPORT = DISTRIBUTED_REPORT
#: detectron2's launch flags, which torchrun's environment replaces.
LAUNCH_FLAGS = ("--num-gpus", "--num-machines", "--machine-rank", "--dist-url", "--dist-timeout")
#: The variables torchrun (torch.distributed.elastic) sets for each process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                      "MASTER_ADDR", "MASTER_PORT")


class DistributedError(UserError):
    """A launch that cannot work as given, or processes that do not agree (one line)."""


# --- what to launch -------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How a run's processes are organised.

    ``world_size`` processes in all, ``num_machines`` machines of ``processes_per_machine``
    each; this command runs machine ``machine_rank``. ``torchrun``: the processes are
    torchrun's (this one is ``rank``); otherwise ``dist_url`` and ``timeout`` (seconds) are
    where and how long they meet.
    """

    world_size: int
    num_machines: int
    processes_per_machine: int
    machine_rank: int
    dist_url: str = ""
    timeout: float = DEFAULT_JOIN_TIMEOUT_S
    torchrun: bool = False
    rank: int = 0  # torchrun: this process's rank; detectron2's flags: its machine's first

    @property
    def writes_run_folder(self) -> bool:
        """Whether this command holds OUTPUT_DIR (rank 0's machine, or torchrun's rank 0)."""
        return self.rank == 0 if self.torchrun else self.machine_rank == 0


def torchrun_environment(environ: Mapping[str, str] = os.environ) -> Optional[Dict[str, int]]:
    """torchrun's variables for this process (``rank``, ``world_size``, ``local_rank``,
    ``local_world_size``, ``node_rank``), or None where torchrun did not start it.

    Raises:
        DistributedError: some of torchrun's variables set and not others, or not numbers.
    """
    given = [v for v in TORCHRUN_VARIABLES if environ.get(v, "") != ""]
    elastic = bool(environ.get("TORCHELASTIC_RUN_ID"))
    if not given and not elastic:
        return None
    missing = [v for v in TORCHRUN_VARIABLES if v not in given]
    if missing:
        raise DistributedError(
            f"torchrun's environment is incomplete: {', '.join(given) or 'TORCHELASTIC_RUN_ID'} "
            f"set but not {', '.join(missing)}; start the command with torchrun, or unset them"
        )
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        try:
            values[name] = int(environ[name])
        except ValueError:
            raise DistributedError(f"{name}={environ[name]!r}: not a whole number") from None
    rank, world = values["RANK"], values["WORLD_SIZE"]
    local, local_world = values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"]
    if not (0 <= rank < world and 0 <= local < local_world <= world):
        raise DistributedError(f"torchrun's environment does not add up: RANK={rank}, "
                               f"WORLD_SIZE={world}, LOCAL_RANK={local}, "
                               f"LOCAL_WORLD_SIZE={local_world}")
    node = environ.get("GROUP_RANK", "")
    return {
        "rank": rank, "world_size": world, "local_rank": local, "local_world_size": local_world,
        "node_rank": int(node) if node.isdigit() else rank // local_world,
    }


def parse_tcp_url(dist_url: str) -> Tuple[str, int]:
    """``tcp://HOST:PORT`` as (HOST, PORT); an IPv6 HOST in brackets.

    Raises:
        DistributedError: naming the url and the form expected.
    """
    match = re.fullmatch(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^:/\[\]]+):(\d+)/?", dist_url or "")
    port = int(match.group(2)) if match else 0
    if not match or not 0 < port < 65536:
        raise DistributedError(
            f"--dist-url {dist_url}: expected tcp://HOST:PORT (HOST an address of machine 0 "
            "that every machine reaches, PORT a free port there from 1 to 65535)"
        )
    return match.group(1).strip("[]"), port


def _given(flag: str, argv: Sequence[str]) -> bool:
    return any(word == flag or word.startswith(flag + "=") for word in argv)


def plan_launch(args: argparse.Namespace, argv: Sequence[str],
                environ: Mapping[str, str] = os.environ) -> Plan:
    """The :class:`Plan` of a ``tools/train_net.py`` command: torchrun's environment where
    torchrun started it, else detectron2's flags (``args.num_gpus``, ``args.num_machines``,
    ``args.machine_rank``, ``args.dist_url``, ``args.dist_timeout``).

    ``argv`` is the command line as given (the flags, not their defaults, clash with
    torchrun).

    Raises:
        DistributedError: one line naming the flags (or variables) and what was expected.
    """
    if args.opts:  # the config overrides (KEY VALUE ...) come last and hold no flags
        argv = list(argv)[: len(argv) - len(args.opts)]
    # Given on the command line, or (an abbreviation argparse took) away from its default.
    changed = {"--num-gpus": args.num_gpus != 1, "--num-machines": args.num_machines != 1,
               "--machine-rank": args.machine_rank != 0,
               "--dist-timeout": getattr(args, "dist_timeout", None) is not None}
    flags = [flag for flag in LAUNCH_FLAGS if _given(flag, argv) or changed.get(flag)]
    env = torchrun_environment(environ)
    if env is not None:
        if flags:
            raise DistributedError(
                f"{' and '.join(flags)} given, and torchrun started this process "
                f"(RANK={env['rank']}, WORLD_SIZE={env['world_size']}): torchrun decides the "
                "processes and where they meet; drop the flags, or start without torchrun"
            )
        world, local = env["world_size"], env["local_world_size"]
        return Plan(
            world_size=world, num_machines=max(1, world // local),
            processes_per_machine=local, machine_rank=env["node_rank"],
            dist_url=f"tcp://{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}",
            torchrun=True, rank=env["rank"],
        )
    machines, processes, machine = args.num_machines, args.num_gpus, args.machine_rank
    if processes < 1:
        raise DistributedError(f"--num-gpus {processes}: give at least 1 (processes per "
                               "machine)")
    if machines < 1:
        raise DistributedError(f"--num-machines {machines}: give at least 1")
    if not 0 <= machine < machines:
        raise DistributedError(
            f"--machine-rank {machine} with --num-machines {machines}: machines are numbered "
            f"0 to {machines - 1}"
        )
    timeout = getattr(args, "dist_timeout", None)
    timeout = DEFAULT_JOIN_TIMEOUT_S if timeout is None else float(timeout)
    if not timeout > 0:
        raise DistributedError(f"--dist-timeout {timeout:g}: give a number of seconds above 0")
    url = args.dist_url
    if machines > 1:
        if url == "auto":
            raise DistributedError(
                f"--dist-url auto picks a free port on one machine; with --num-machines "
                f"{machines} give every machine machine 0's tcp://HOST:PORT"
            )
        if not (url or "").startswith("tcp://"):
            raise DistributedError(
                f"--dist-url {url}: with --num-machines {machines} the machines meet at machine "
                "0's tcp://HOST:PORT (every machine gives the same one)"
            )
        parse_tcp_url(url)
    return Plan(world_size=machines * processes, num_machines=machines,
                processes_per_machine=processes, machine_rank=machine, dist_url=url,
                timeout=timeout, rank=machine * processes)


# --- meeting --------------------------------------------------------------------------------

def _check_can_listen(host: str, port: int, dist_url: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            why = e.strerror or str(e)
            if e.errno == errno.EADDRNOTAVAIL:
                why = f"{host} is not an address of this machine"
            raise DistributedError(
                f"--dist-url {dist_url}: machine 0 cannot listen there ({why}); give an address "
                "of machine 0 and a port free on it"
            ) from None


def rendezvous(dist_url: str, rank: int, world_size: int, *, backend: str = "gloo",
               timeout: float = DEFAULT_JOIN_TIMEOUT_S) -> None:
    """Join the default process group at ``dist_url`` as process ``rank`` of ``world_size``.

    ``tcp://HOST:PORT``: rank 0 listens there and waits for the others; every other rank waits
    for it to answer; either gives up after ``timeout`` seconds, in one line naming the url.
    Collectives afterwards time out after :data:`COLLECTIVE_TIMEOUT`. Any other url (``file://``,
    ``env://``) goes to ``torch.distributed.init_process_group`` as it is.

    Raises:
        DistributedError: machine 0 cannot listen at the url, or the processes did not all
            join within ``timeout``.
    """
    if not (dist_url or "").startswith("tcp://"):
        dist.init_process_group(backend, init_method=dist_url, world_size=world_size, rank=rank,
                                timeout=COLLECTIVE_TIMEOUT)
        return
    host, port = parse_tcp_url(dist_url)
    wait = datetime.timedelta(seconds=timeout)
    if rank == 0:
        _check_can_listen(host, port, dist_url)
        try:
            store = dist.TCPStore(host, port, world_size, True, timeout=wait,
                                  wait_for_workers=True)
        except dist.DistStoreError as e:  # "Timed out after 5 seconds ... 1/2 clients joined."
            joined = re.search(r"(\d+)/(\d+) clients joined", str(e))
            count = f"{joined.group(1)} of {world_size}" if joined else f"not all {world_size}"
            raise DistributedError(
                f"--dist-url {dist_url}: {count} processes joined within {timeout:g} s; start "
                "every machine with the same --num-machines and --dist-url and its own "
                "--machine-rank"
            ) from None
        except dist.DistError as e:
            raise DistributedError(f"--dist-url {dist_url}: machine 0 cannot listen there "
                                   f"({one_line(e).splitlines()[0]})") from None
    else:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((host, port), timeout=1.0):
                    break
            except OSError:
                if time.monotonic() >= deadline:
                    raise DistributedError(
                        f"--dist-url {dist_url}: machine 0 did not answer there within "
                        f"{timeout:g} s; start machine 0 (--machine-rank 0) with the same "
                        "--dist-url, an address of it that this machine reaches"
                    ) from None
                time.sleep(0.2)
        left = datetime.timedelta(seconds=max(1.0, deadline - time.monotonic()))
        try:
            store = dist.TCPStore(host, port, world_size, False, timeout=left)
        except dist.DistError as e:
            raise DistributedError(f"--dist-url {dist_url}: cannot join the processes there "
                                   f"({one_line(e).splitlines()[0]})") from None
    store.set_timeout(COLLECTIVE_TIMEOUT)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)


def create_local_groups(machine_of_rank: Sequence[int]) -> Any:
    """detectron2's per-machine process group (``comm._LOCAL_PROCESS_GROUP``) for this process.

    ``machine_of_rank[r]`` is the machine of rank ``r``. Every process creates every machine's
    group, in the machines' order (``new_group`` is a collective), as detectron2's launch
    does; this process's machine's group becomes ``comm``'s. Returns it.
    """
    rank = dist.get_rank()
    mine = None
    for machine in sorted(set(machine_of_rank)):
        ranks = [r for r, m in enumerate(machine_of_rank) if m == machine]
        group = dist.new_group(ranks)
        if machine == machine_of_rank[rank]:
            mine = group
    comm._LOCAL_PROCESS_GROUP = mine
    return mine


def set_threads(processes_on_machine: int) -> None:
    """torch's CPU threads: ``OMP_NUM_THREADS`` where it is set, else the machine's cores
    divided among its ``processes_on_machine`` processes."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, available_cpus() // max(1, processes_on_machine)))


def leave() -> None:
    """Leave the process group (and forget detectron2's per-machine group)."""
    comm._LOCAL_PROCESS_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def join_torchrun(plan: Plan, device: str = "cpu") -> Iterator[None]:
    """Join the processes torchrun started (``env://``), set detectron2's per-machine group
    and, on a GPU, this process's device; leave the group at the end.

    The backend is NCCL for a CUDA model (``device`` from ``MODEL.DEVICE``), else gloo.
    """
    env = torchrun_environment()
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env["local_rank"])
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        create_local_groups(_gather(env["node_rank"]))  # machines may differ in processes
        if not cuda:
            set_threads(env["local_world_size"])
        comm.synchronize()
        yield
    finally:
        leave()


@contextmanager
def held_by_main(enter: Callable[[], ContextManager]) -> Iterator[None]:
    """Rank 0 enters ``enter()`` (OUTPUT_DIR's run folder, say) while every process works.

    Rank 0 tells the others whether it could: when it could not, it raises its own error and
    every other process a :class:`DistributedError` that quotes it, so that no process is left
    waiting for one that stopped.
    """
    held = None
    problem = ""
    if comm.get_rank() == 0:
        try:
            held = enter()
            held.__enter__()
        except Exception as e:  # noqa: BLE001  (said to the others, then raised here)
            problem, error = one_line(e), e
    if comm.get_world_size() > 1:
        said = [problem]
        dist.broadcast_object_list(said, src=0)
        problem = said[0]
    if problem:
        if comm.get_rank() == 0:
            raise error
        raise DistributedError(f"process 0 stopped the run: {problem}")
    if held is None:
        yield
        return
    with _exiting(held):
        yield


@contextmanager
def _exiting(held: ContextManager) -> Iterator[None]:
    try:
        yield
    except BaseException as e:
        if not held.__exit__(type(e), e, e.__traceback__):
            raise
    else:
        held.__exit__(None, None, None)


# --- checking together ----------------------------------------------------------------------

def _gather(value: Any) -> List[Any]:
    """Every process's ``value``, by rank (the default group)."""
    values: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def check_same_start(iteration: int) -> None:
    """Every process starts training from the same ``iteration`` (after ``--resume``).

    Raises:
        DistributedError: naming the processes and their iterations: those that did not see
            OUTPUT_DIR's checkpoints start elsewhere (the machines need a shared filesystem).
    """
    if comm.get_world_size() == 1:
        return
    starts = _gather(int(iteration))
    if len(set(starts)) > 1:
        differ = ", ".join(f"process {r}: {s}" for r, s in enumerate(starts))
        raise DistributedError(
            f"the processes would start from different iterations ({differ}): resuming needs "
            "OUTPUT_DIR's checkpoints on every machine (a shared filesystem)"
        )


def parameter_digest(named: Iterable[Tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of named tensors (their names, dtypes, shapes and bytes, in the given order).

    Equal for two models exactly when every tensor is bit for bit equal. ``named`` is
    ``model.named_parameters()`` or the matching items of a checkpoint's ``model`` dict.
    """
    h = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class BatchLedger:
    """Which images each training step gave this process's model.

    A forward pre-hook on ``model`` (the module under DDP) records, for each training call,
    the ``image_id`` of every input (its ``file_name`` where no id), as detectron2's loader
    gave them. ``steps``: one list per call.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.steps: List[List[Any]] = []
        module = getattr(model, "module", model)
        self._handle = module.register_forward_pre_hook(self._record)

    def _record(self, module: torch.nn.Module, inputs: tuple) -> None:
        if not module.training or not inputs or not isinstance(inputs[0], (list, tuple)):
            return
        self.steps.append([
            d.get("image_id", d.get("file_name")) if isinstance(d, dict) else None
            for d in inputs[0]
        ])

    def close(self) -> None:
        self._handle.remove()


def check_replicas(model: torch.nn.Module, ledger: BatchLedger, output_dir: str,
                   images_per_batch: int) -> Optional[dict]:
    """After a multi-process training: every process's parameters, and what it trained on.

    Each process digests its own parameters (:func:`parameter_digest`) and sends them with
    its ledger to rank 0, which writes ``output_dir/distributed.json`` (whole or not at all):
    per process its rank, machine (``comm``'s per-machine group), parameter digest, steps,
    images per step and image ids; and logs a one-line summary. Does nothing in a
    one-process run (returns None); else returns the report (on every process).

    Raises:
        DistributedError: the processes' parameters differ (naming the processes), or a
            process's steps did not each hold ``images_per_batch / world size`` images.
    """
    world = comm.get_world_size()
    if world == 1:
        return None
    module = getattr(model, "module", model)
    own = {
        "rank": comm.get_rank(),
        "local_rank": comm.get_local_rank(),
        "host": socket.gethostname(),
        "parameters_sha256": parameter_digest(module.named_parameters()),
        "steps": len(ledger.steps),
        "images_per_step": sorted({len(s) for s in ledger.steps}),
        "image_ids": ledger.steps,
    }
    processes = _gather(own)
    digests = {p["parameters_sha256"] for p in processes}
    report = {
        "world_size": world,
        "images_per_batch": images_per_batch,
        "parameters_identical": len(digests) == 1,
        "processes": processes,
    }
    if comm.is_main_process() and output_dir:
        # One line per process: a long run's image ids stay one line each.
        head = json.dumps({k: v for k, v in report.items() if k != "processes"})
        text = (head[:-1] + ', "processes": [\n' + ",\n".join(json.dumps(p) for p in processes)
                + "\n]}\n")
        write_text_atomic(Path(output_dir) / REPORT, text)
    if len(digests) > 1:
        first = processes[0]["parameters_sha256"]
        differ = [str(p["rank"]) for p in processes if p["parameters_sha256"] != first]
        raise DistributedError(
            f"after training, the parameters of process {', '.join(differ)} differ from process "
            f"0's (see {Path(output_dir) / REPORT}): the replicas did not stay in step"
        )
    share = images_per_batch // world
    uneven = [p["rank"] for p in processes if p["images_per_step"] not in ([share], [])]
    if uneven:
        raise DistributedError(
            f"SOLVER.IMS_PER_BATCH={images_per_batch} over {world} processes should give each "
            f"{share} images a step; process {uneven[0]} had "
            f"{processes[uneven[0]]['images_per_step']}"
        )
    logger.info(
        f"{world} processes: parameters identical after training (sha256 "
        f"{digests.pop()[:16]}...), {share} of the {images_per_batch} images of each step on "
        f"each; details in {REPORT}"
    )
    return report
