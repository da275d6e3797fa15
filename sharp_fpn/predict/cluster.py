"""predict on a dask.distributed cluster (``tools/predict.py --dask [ADDRESS]``).

The images of a run are segmented by the cluster's workers, one task per image, and written by
the run itself, in the process that holds the output folder's lock:

* **What runs where**: a worker runs :func:`~.run.segment_image` (read, rescale, predict,
  measure; it writes nothing) and returns its events: per plane the label image, the overlay,
  the per-nucleus table and outlines. The client hands each to the run's
  :class:`~.run.RunWriter` as the task completes, which writes the files through
  :class:`~sharp_fpn.outdir.OutputDir` and rewrites ``summary.csv`` exactly as the serial run
  does. So the lock, the claims and the atomic writes stay in one process, the workers need no
  access to the output folder (a remote cluster may not even see it), and a worker that dies
  leaves nothing half-written. Their cost: each image's outputs cross the network once (about
  7 bytes per pixel per plane); images larger than memory go tile by tile instead (below).
* **Large images** (``task.large``, :func:`~.run.route_of`): segmented by
  :meth:`~.run.RunWriter.run_large` in the client, which holds the lock and writes the
  OME-Zarr labels and tables as the tiles come; each tile is a task (:func:`tile_mapper`, a
  bounded number in flight), run by the worker's model, so one slide's tiles spread over the
  cluster. The client builds one model of its own too (the large path reads its
  normalisation and thresholds from it; it predicts nothing). Large images are done after
  the others, one at a time.
* **The model**: never pickled. Each task carries a small picklable factory
  (:class:`PredictorSpec`: config, weights path, device, thresholds) and the run's key; a
  worker builds the model on its first task of a run and keeps it for the next ones
  (:func:`worker_predictor`). The weights must be a file every worker can read (a shared path
  on a remote cluster; the same file for a LocalCluster).
* **The same results**: the same body, the same settings and the same weights give the same
  files as the serial run, in any order of completion (the summary keeps the inputs' order;
  the report's results are put back in it). The ``seconds`` column is each image's own time.
* **A worker lost**: a worker process that dies (killed, out of memory) has its tasks
  rescheduled on the others by the scheduler (its nanny restarts it); a task that keeps killing
  workers is given up after ``distributed.scheduler.allowed-failures`` (dask's setting, 3 by
  default) and that image fails (``KilledWorker``), naming it; the batch goes on. An exception
  escaping a task (not an image's failure, which is an event) is retried ``retries`` times.
* **Interrupted**: the summary is rewritten after each image, so a run stopped at any moment
  (the client killed, the cluster gone) is resumed by running it again (``skipped (done)``).
  A write failure (a full disk) cancels the tasks not yet done and ends the run as the serial
  one does.
* **The cluster**: a scheduler address (``tcp://host:8786``) connects to a running cluster;
  no address starts a ``LocalCluster`` of worker processes (one thread each, torch given the
  cores shared among them), closed when the run ends, whatever happens.

dask.distributed is imported only when a run asks for it.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence

from tqdm import tqdm

from ..utils import available_cpus, release_free_memory, silence_warnings, worker_count

__all__ = [
    "DEFAULT_RETRIES",
    "PredictorSpec",
    "open_client",
    "predict_on_cluster",
    "segment_on_worker",
    "tile_mapper",
    "worker_predictor",
]

#: Retries of a task whose function raised (not an image's failure, which is a failed row).
DEFAULT_RETRIES = 2

_CACHE_LOCK = threading.Lock()
_CACHED: dict = {}  # the worker's model: {"key": run key, "predictor": model}


@dataclass(frozen=True)
class PredictorSpec:
    """What a worker builds its :class:`~sharp_fpn.d2.predictor.NucleiPredictor` from
    (picklable: the config and the weights' path, never the model).

    Attributes:
        cfg: the model's config (a ``CfgNode``, or a yaml path).
        weights: the checkpoint file, readable by every worker.
        device: torch device; None: the config's ``MODEL.DEVICE``.
        score_threshold, min_kept_fraction: the predictor's thresholds.
        torch_threads: torch's intra-op threads in the worker; None leaves torch's default.
    """

    cfg: Any
    weights: Optional[str]
    device: Optional[str] = None
    score_threshold: float = 0.5
    min_kept_fraction: float = 0.5
    torch_threads: Optional[int] = None

    def __call__(self):
        silence_warnings()  # a worker process starts with fresh warning filters
        from ..d2.predictor import NucleiPredictor

        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)
        return NucleiPredictor(self.cfg, self.weights, device=self.device,
                               score_threshold=self.score_threshold,
                               min_kept_fraction=self.min_kept_fraction)


def worker_predictor(factory: Callable[[], Any], key: str):
    """This process's model for the run ``key``: built by ``factory`` on its first task, kept
    for the next ones (a new run's key replaces it)."""
    with _CACHE_LOCK:
        if _CACHED.get("key") != key:
            _CACHED.clear()
            _CACHED.update(key=key, predictor=factory())
        return _CACHED["predictor"]


def segment_on_worker(task, settings, factory: Callable[[], Any], key: str) -> list:
    """A task: :func:`~.run.segment_image` of one input with this worker's model, all its
    events (nothing written)."""
    from .run import segment_image

    return list(segment_image(task, settings, worker_predictor(factory, key)))


def tile_on_worker(factory: Callable[[], Any], key: str, reader, tile):
    """A task: one tile of a large image (:class:`~.large.TileRunner` with this worker's
    model; ``reader`` opens the file and reads the tile's window here)."""
    from .large import PredictorModel, TileRunner

    model = worker_predictor(factory, key)
    if hasattr(model, "run_model"):  # a NucleiPredictor: the large path's tile model of it
        model = PredictorModel(model)
    try:
        return TileRunner(model, reader)(tile)
    finally:
        release_free_memory()  # the model's freed activations, before the next tile


def tile_mapper(client, factory: Callable[[], Any], key: Optional[str] = None,
                retries: int = DEFAULT_RETRIES, in_flight: Optional[int] = None) -> Callable:
    """``map_tiles`` for :func:`~.large.segment_large`: each tile a task on the cluster, run by
    the worker's own model (built once per worker by ``factory``, as
    :func:`worker_predictor`), the results yielded in the order of the tiles. At most
    ``in_flight`` tiles are submitted and not yet handed over (default: twice the cluster's
    threads), a new one submitted as each is handed over, so the workers stay busy and what
    waits in this process stays bounded whatever the image. Only the tile's reader (the
    file's path and layout, the image's stretch) travels; the stitching and the writing stay
    in this process. A worker lost is rescheduled by the scheduler; a tile's failure is the
    :class:`~.tiling.TileError` it raised (the tiles still in flight are cancelled)."""
    key = key or uuid.uuid4().hex

    def map_tiles(fn, tiles):
        limit = in_flight or max(2, 2 * sum(client.nthreads().values()))
        todo = iter(tiles)
        waiting: collections.deque = collections.deque()

        def submit(tile) -> None:
            waiting.append(client.submit(tile_on_worker, factory, key, fn.reader, tile,
                                         retries=retries, pure=False))

        for tile in itertools.islice(todo, limit):
            submit(tile)
        try:
            while waiting:
                future = waiting.popleft()
                result = future.result()
                future.release()
                for tile in itertools.islice(todo, 1):
                    submit(tile)
                yield result
        finally:
            if waiting:  # a failure, or the stitch stopped: drop what is left
                client.cancel(list(waiting))

    return map_tiles


@contextlib.contextmanager
def open_client(dask: Any = None, workers: Optional[int] = None,
                todo: Optional[int] = None) -> Iterator[tuple]:
    """A ``distributed.Client`` for ``dask`` and the torch threads each worker should use.

    Args:
        dask: a ``Client`` (used, left open), a scheduler address, or ``""``/None/True for a
            ``LocalCluster`` of ``workers`` processes with one thread each (closed on exit).
        workers: the LocalCluster's processes (default :func:`~sharp_fpn.utils.available_cpus`,
            and no more than ``todo``, the images to segment).

    Yields:
        ``(client, torch_threads)``: for a LocalCluster, the available cores shared among
        its workers; None for a cluster run elsewhere (torch's default there).

    Raises:
        OSError: the scheduler at the address cannot be reached (one line naming it).
    """
    from distributed import Client, LocalCluster

    if isinstance(dask, Client):
        yield dask, None
        return
    if isinstance(dask, str) and dask:
        try:
            client = Client(dask, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise OSError(f"--dask {dask}: no Dask scheduler reached there ({e})") from None
        try:
            yield client, None
        finally:
            client.close()
        return
    n = worker_count(workers)
    if workers is None and todo:
        n = min(n, todo)
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        yield client, max(1, available_cpus() // n)


def predict_on_cluster(tasks: Sequence, settings, factory: Callable[[], Any], writer, *,
                       dask: Any = None, workers: Optional[int] = None,
                       progress: bool = True, retries: int = DEFAULT_RETRIES,
                       large_progress: bool = False) -> None:
    """Segment ``tasks`` (:class:`~.run.ImageTask`) on a cluster and hand each image's events to
    ``writer`` (:class:`~.run.RunWriter`) as it completes (module docstring).

    Args:
        tasks: the images to segment (those not skipped as done); those with ``large`` go
            tile by tile (module docstring).
        settings: the run's :class:`~.run.ImageSettings`.
        factory: builds the model in a worker (:class:`PredictorSpec`, or any picklable
            callable); a :class:`PredictorSpec` without ``torch_threads`` gets the
            LocalCluster's share of the cores.
        writer: writes each image's outputs and the summary, in this process.
        dask, workers: the cluster (:func:`open_client`).
        progress: a tqdm bar over the images.
        retries: of a task whose function raised.
        large_progress: a tqdm bar over the tiles of each large image.

    Raises:
        OSError: an output could not be written (the tasks left are cancelled), or the
            scheduler cannot be reached.
    """
    from distributed import as_completed

    key = uuid.uuid4().hex
    large = [task for task in tasks if getattr(task, "large", False)]
    tasks = [task for task in tasks if not getattr(task, "large", False)]
    with open_client(dask, workers, None if large else len(tasks)) as (client, threads):
        here = factory() if large else None  # before the threads are set: this process's
        if isinstance(factory, PredictorSpec) and factory.torch_threads is None and threads:
            factory = PredictorSpec(factory.cfg, factory.weights, factory.device,
                                    factory.score_threshold, factory.min_kept_fraction, threads)
        futures = {  # the factory travels with each task (a few kB): a worker that
            # restarts needs nothing that died with another
            client.submit(segment_on_worker, task, settings, factory, key,
                          key=f"sharp-fpn-predict-{key}-{task.index}", retries=retries,
                          pure=False): task
            for task in tasks
        }
        bar = tqdm(total=len(futures), desc="nuclei", unit="image", disable=not progress)
        try:
            for future in as_completed(list(futures)):
                task = futures.pop(future)
                try:
                    events: List = future.result()
                except Exception as e:  # noqa: BLE001  KilledWorker, a task that kept raising
                    writer.fail(task, f"{task.path}: not segmented on the cluster "
                                      f"({type(e).__name__}: {' '.join(str(e).split())})")
                else:
                    for event in events:
                        if not writer.accept(event):
                            break
                finally:
                    future.release()
                    bar.update()
        finally:
            bar.close()
            if futures:  # a write failure (or an interrupt) ends the run: drop what is left
                client.cancel(list(futures))
        if large:
            tiles = tile_mapper(client, factory, key, retries)
            for task in large:
                writer.run_large(task, here, map_tiles=tiles, progress=large_progress)
