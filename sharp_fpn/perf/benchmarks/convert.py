"""convert: DSB2018 -> COCO conversion time, from mask folders and from the labels CSV, per
worker count, on a synthetic set with DSB2018's size mix (:mod:`sharp_fpn.data.synthetic`).

Every (source, workers) pair is a candidate of the one timing policy (interleaved rounds after
a warm-up, fastest round); a round converts the split and writes the JSON as the CLI does. The
set is generated once into a cache folder and reused while the generator's source and the
arguments are unchanged. Every conversion's JSON must be byte-identical.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ...utils import worker_count, write_text_atomic
from ..measure import cpu_seconds
from ..timing import time_interleaved

SPLIT = "stage1_train"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-images", type=int, default=670, help="images (%(default)s, DSB's)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (%(default)s)")
    parser.add_argument(
        "--cache", type=Path,
        help="folder of the synthetic set, generated once and reused "
        "(default: <out-dir>/cache/dsb_synth_<num-images>_seed<seed>)",
    )
    parser.add_argument("--workers", type=int, nargs="+",
                        help="worker counts to time (default: 1 and every core)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (%(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (%(default)s)")


def synthetic_set(folder: Path, num_images: int, seed: int) -> float:
    """Generate the synthetic DSB2018 set into ``folder`` unless it is there; return seconds.

    The set is reused only if made with the same arguments by the same generator source.
    """
    from ...data import synthetic

    marker = folder / "benchmark_set.json"
    wanted = {
        "num_images": num_images,
        "seed": seed,
        "split": SPLIT,
        "generator_sha256": hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest(),
    }
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return 0.0
    start = time.perf_counter()
    synthetic.write_dataset(folder, num_images, seed, split=SPLIT, overwrite=True)
    seconds = time.perf_counter() - start
    write_text_atomic(marker, json.dumps(wanted))
    return seconds


def _conversion(root: Path, labels_csv: Optional[Path], workers: int, out: Path,
                record: Dict[str, Any]) -> Callable[[], None]:
    """A candidate: convert and write the JSON; appends the round's CPU seconds (all
    processes) and the JSON's sha256 to ``record``."""
    from ...data.dsb2018 import convert_split, write_json_atomic

    def run() -> None:
        cpu_start = cpu_seconds()
        coco = convert_split(root, SPLIT, labels_csv, workers=workers, on_warning=print)
        write_json_atomic(coco, out)
        record["cpu_s"].append(cpu_seconds() - cpu_start)
        record["sha256"].add(hashlib.sha256(out.read_bytes()).hexdigest())
        record["coco"] = coco

    return run


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Seconds per conversion (fastest round), per source and worker count."""
    set_name = f"dsb_synth_{args.num_images}_seed{args.seed}"
    cache = args.cache or Path(args.out_dir) / "cache" / set_name
    generation = synthetic_set(cache, args.num_images, args.seed)
    workers: List[int] = sorted({worker_count(w) for w in (args.workers or [1, worker_count()])})
    sources = {"folders": None, "csv": cache / f"{SPLIT}_labels.csv"}
    records: Dict[str, Dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        candidates = {}
        for name, labels_csv in sources.items():
            for w in workers:
                key = f"{name} {w}"
                records[key] = {"cpu_s": [], "sha256": set()}
                out = Path(scratch) / f"{name}{w}.json"
                candidates[key] = _conversion(cache, labels_csv, w, out, records[key])
        timings = time_interleaved(candidates, rounds=args.rounds, warmup=args.warmup)
    seconds = {name: {str(w): round(timings[f"{name} {w}"].best, 3) for w in workers}
               for name in sources}
    rounds = {name: {str(w): [round(r, 3) for r in timings[f"{name} {w}"].rounds] for w in workers}
              for name in sources}
    cpu = {name: {str(w): round(min(records[f"{name} {w}"]["cpu_s"]), 2) for w in workers}
           for name in sources}
    for key, timing in timings.items():
        print(f"{key:10s} worker(s): {timing.best:6.2f} s (fastest of {len(timing.rounds)})")
    coco = records[next(iter(records))]["coco"]
    masks_per_image = Counter(a["image_id"] for a in coco["annotations"])
    sizes = Counter(f"{im['height']}x{im['width']}" for im in coco["images"])
    lo, hi = str(workers[0]), str(workers[-1])
    return {
        "dataset": str(cache),
        "generation_s": round(generation, 1),  # 0: reused from the cache
        "images": len(coco["images"]),
        "masks": len(coco["annotations"]),
        "masks_per_image": round(len(coco["annotations"]) / max(1, len(coco["images"])), 1),
        "max_masks_per_image": max(masks_per_image.values(), default=0),
        "size_mix": dict(sizes.most_common()),
        "seconds": seconds,  # fastest round: convert + write the JSON
        "rounds_s": rounds,
        "cpu_seconds": cpu,  # least CPU time of a round, all processes
        f"speedup_{hi}_vs_{lo}_workers": {
            name: round(s[lo] / s[hi], 2) for name, s in seconds.items()
        },
        "csv_vs_folders": {w: round(seconds["csv"][w] / seconds["folders"][w], 2)
                           for w in seconds["csv"]},
        "identical_json": len(set().union(*(r["sha256"] for r in records.values()))) == 1,
    }
