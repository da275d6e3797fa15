#!/usr/bin/env python
"""Reproduce the paper's Table 1 or Table 2 (with Figures 5 and 7): train every row, evaluate,
and write the table beside the paper's numbers.

    python tools/reproduce.py --table 1                 # the real experiment (DSB2018, a GPU)
    python tools/reproduce.py --table 2 --quick         # smoke run: synthetic set, CPU, minutes
    python tools/reproduce.py --table 1 --quick --rows unet unet_sharp_ds --iters 20

Each row trains through ``sharp_fpn.d2.engine.Trainer`` (as ``tools/train_net.py``) from its
config, then is evaluated on ``DATASETS.TEST``: semantic rows by ``SemanticIoUEvaluator``
(foreground IoU and Dice of the union mask), Mask R-CNN rows by ``DSBEvaluator``'s foreground
IoU and Dice. Written under ``--output`` (atomically):

- ``table{N}.md``, ``table{N}.csv``: ours beside the paper's (SPEC section 2);
- ``table{N}_iou_boxplot.png``: per-image IoU of every row (the paper's Figure 5);
- Table 1, when the UNet# row with deep supervision ran: ``fig7_pruning.png`` and
  ``pruning.csv``, the sub-networks L1..L4 pruned from it: parameters, images per second
  measured here, IoU (the paper's Figure 7);
- ``rows/<row>/``: each row's training output, config and ``result.json`` (``--resume``
  reuses finished rows).

``--quick`` runs every row on the embedded synthetic set (``nuclei_synth_train``/``_val``) on
the CPU with tiny widths, small inputs and few iterations: it tests the pipeline, it does not
reproduce the paper, and the table says so. Rows run one after the other in this process (one
GPU, or the CPU); for multi-GPU training of a row use ``tools/train_net.py`` with its config.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.config import CfgNode  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from sharp_fpn.d2.engine import Trainer, get_config  # noqa: E402
from sharp_fpn.d2.semantic_evaluator import CSV_NAME as SEMANTIC_CSV  # noqa: E402
from sharp_fpn.d2.semantic import is_semantic  # noqa: E402
from sharp_fpn.models import count_parameters  # noqa: E402
from sharp_fpn.utils import atomic_write, write_text_atomic  # noqa: E402

logger = logging.getLogger("reproduce")


@dataclass(frozen=True)
class Row:
    """One row of a table: what to train and what the paper reports for it.

    Attributes:
        key: short name, used by ``--rows`` and for the row's output folder.
        model: the model's name in the table.
        config: yaml path, relative to the repository root.
        paper_iou, paper_dice: the paper's numbers (%), None where it gives none.
        paper_params: the paper's parameter count (millions), Table 1 only.
        deep_supervision: Table 1's DS column.
        backbone: Table 2's backbone column.
    """

    key: str
    model: str
    config: str
    paper_iou: Optional[float] = None
    paper_dice: Optional[float] = None
    paper_params: Optional[float] = None
    deep_supervision: bool = False
    backbone: str = ""


def _table1_row(arch: str, model: str, ds: bool, iou: Optional[float], params: Optional[float]):
    key = f"{arch}_ds" if ds else arch
    return Row(key, model, f"configs/semantic/table1/{key}.yaml", iou, None, params, ds)


# Table 1 (DSB2018 column, IoU %) in the paper's order; unet_ds and wunet_ds are extras.
TABLE1 = [
    _table1_row("unet", "UNet", False, 90.15, 7.85),
    _table1_row("wunet", "WUNet", False, 90.27, 9.39),
    _table1_row("unet2plus", "UNet++", False, 92.02, 9.16),
    _table1_row("unet2plus", "UNet++", True, 91.98, 9.16),
    _table1_row("unet3plus", "UNet3+", False, 91.96, 9.79),
    _table1_row("unet3plus", "UNet3+", True, 92.15, 9.79),
    _table1_row("unet_sharp", "UNet#", False, 92.53, 9.71),
    _table1_row("unet_sharp", "UNet#", True, 92.67, 9.71),
]
TABLE1_EXTRAS = [
    _table1_row("unet", "UNet", True, None, None),
    _table1_row("wunet", "WUNet", True, None, None),
]
PRUNING_ROW = "unet_sharp_ds"  # UNet# with heads on the top row: prunable to L1..L3
PAPER_PRUNED_PARAMS = {1: 0.1, 2: 0.56, 3: 2.53, 4: 9.71}  # millions (Figure 7, the text)

# Table 2 (IoU %, Dice %): semantic rows (upper half), then Mask R-CNN rows (lower half).
_TABLE2_PAPER = {
    ("UNet", "VGG16"): (90.12, 86.94), ("UNet", "R101"): (91.52, 89.43),
    ("UNet#", "VGG16"): (92.82, 89.60), ("UNet#", "R101"): (93.56, 90.78),
    ("Mask R-CNN", "VGG16"): (92.34, 87.68), ("Mask R-CNN", "R101"): (93.45, 89.34),
    ("Mask R-CNN2+", "VGG16"): (93.47, 88.14), ("Mask R-CNN2+", "R101"): (94.96, 90.16),
    ("Mask R-CNN3+", "VGG16"): (94.28, 90.51), ("Mask R-CNN3+", "R101"): (95.26, 91.38),
    ("Mask R-CNN#", "VGG16"): (94.89, 91.37), ("Mask R-CNN#", "R101"): (95.87, 92.25),
}
_TABLE2_CONFIGS = {
    "UNet": "configs/semantic/unet_{}.yaml",
    "UNet#": "configs/semantic/unet_sharp_{}.yaml",
    "Mask R-CNN": "configs/mask_rcnn_fpn_{}.yaml",
    "Mask R-CNN2+": "configs/mask_rcnn_2plus_{}.yaml",
    "Mask R-CNN3+": "configs/mask_rcnn_3plus_{}.yaml",
    "Mask R-CNN#": "configs/mask_rcnn_sharp_{}.yaml",
}
TABLE2 = [
    Row(
        Path(_TABLE2_CONFIGS[model].format(backbone)).stem,
        model,
        _TABLE2_CONFIGS[model].format(backbone),
        iou,
        dice,
        backbone=backbone,
    )
    for (model, backbone), (iou, dice) in _TABLE2_PAPER.items()
]

# --quick: what every row gets (smoke run on 2 CPU cores), then per kind of row.
QUICK_COMMON = [
    "MODEL.DEVICE", "cpu",
    "DATASETS.TRAIN", ("nuclei_synth_train",),
    "DATASETS.TEST", ("nuclei_synth_val",),
    "DATALOADER.NUM_WORKERS", 0,
    "SOLVER.CHECKPOINT_PERIOD", 1000000,
    "SEED", 0,
]
QUICK_SEMANTIC = [
    "SOLVER.IMS_PER_BATCH", 8,
    "INPUT.SEMANTIC.SIZE", [64, 64],
    "MODEL.UNET.WIDTH_MULT", 0.25,  # Table 1 networks: UNet [8..128], WUNet [9..140]
    "MODEL.UNET.WIDTHS", [16, 32, 64],  # Table 2 backbone decoders
    "MODEL.UNET.UPSAMPLE_WIDTHS", [8, 8],
    "MODEL.RESNETS.WIDTH_PER_GROUP", 16,  # ResNet-101 at a quarter of its width
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
]
QUICK_INSTANCE = [
    "SOLVER.IMS_PER_BATCH", 2,
    "SOLVER.BASE_LR", 0.01,
    "SOLVER.STEPS", (),
    # from scratch (as configs/demo): trainable norms, no frozen stages, clipped gradients
    "MODEL.BACKBONE.FREEZE_AT", 0,
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.VGG.NORM", "BN",
    "SOLVER.CLIP_GRADIENTS.ENABLED", True,
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 5.0,
    "INPUT.MIN_SIZE_TRAIN", (128,),
    "INPUT.MAX_SIZE_TRAIN", 192,
    "INPUT.MIN_SIZE_TEST", 128,
    "INPUT.MAX_SIZE_TEST", 192,
    "MODEL.RESNETS.WIDTH_PER_GROUP", 16,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.FPN.OUT_CHANNELS", 64,
    "MODEL.SHARP_FPN.WIDTHS", [16, 32, 64, 64],
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 500,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", 200,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 500,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 200,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 256,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 64,
    "TEST.DETECTIONS_PER_IMAGE", 100,  # pasting masks of untrained detections dominates
]
QUICK_ITERS = {1: 50, 2: 16}  # per row: each table within 30 minutes on a shared 2-core CPU


@dataclass
class RowResult:
    """What a row produced (``result.json``); IoU and Dice in %, None if not run."""

    key: str
    status: str  # "done", or why the row did not run or failed
    iou: Optional[float] = None
    dice: Optional[float] = None
    params: Optional[int] = None  # the trained network (tiny with --quick)
    config_params: Optional[int] = None  # the yaml's own network (the paper's widths)
    train_seconds: Optional[float] = None
    eval_seconds: Optional[float] = None
    per_image_iou: Optional[List[float]] = None
    pruning: Optional[List[Dict[str, float]]] = None


def rows_of(table: int) -> Tuple[List[Row], List[Row]]:
    """(the table's rows, extra rows selectable with ``--rows``)."""
    return (TABLE1, TABLE1_EXTRAS) if table == 1 else (TABLE2, [])


def select_rows(table: int, keys: Optional[Sequence[str]]) -> List[Row]:
    """The rows named by ``keys`` (all of the table's rows when None), in table order."""
    rows, extras = rows_of(table)
    if keys is None:
        return rows
    known = {row.key: row for row in rows + extras}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise SystemExit(
            f"--rows: unknown row(s) {unknown} for table {table}; known: {list(known)}"
        )
    return [row for row in rows + extras if row.key in keys]


def row_config(row: Row, quick: bool, iters: Optional[int], opts: Sequence[str], output: Path):
    """The row's config: its yaml, then ``--quick``'s overrides, ``--iters``, ``--opts``."""
    base = get_config(str(ROOT / row.config))
    overrides: List = ["OUTPUT_DIR", str(output)]
    if quick:
        overrides += QUICK_COMMON + (QUICK_SEMANTIC if is_semantic(base) else QUICK_INSTANCE)
    if quick:  # a few iterations: no warm-up (the semantic configs have none anyway)
        overrides += ["SOLVER.WARMUP_ITERS", 0]
    if iters is not None:
        overrides += ["SOLVER.MAX_ITER", iters]
    cfg = get_config(str(ROOT / row.config), overrides + list(opts))
    cfg.freeze()
    return cfg


def _scores(cfg: CfgNode, results: Dict) -> Tuple[float, float, List[float]]:
    """(IoU %, Dice %, per-image IoU %) from ``Trainer.test``'s results and the evaluator CSV."""
    folder = Path(cfg.OUTPUT_DIR) / "inference" / cfg.DATASETS.TEST[0]
    if is_semantic(cfg):
        iou, dice = results["semantic"]["IoU"], results["semantic"]["Dice"]
        csv_path, column = folder / SEMANTIC_CSV, "iou"
    else:
        iou, dice = results["dsb"]["fg_IoU"], results["dsb"]["fg_Dice"]
        csv_path, column = folder / "dsb_per_image.csv", "fg_iou"
    with open(csv_path, newline="", encoding="utf-8") as f:
        per_image = [100.0 * float(r[column]) for r in csv.DictReader(f)]
    return float(iou), float(dice), per_image


def evaluate(cfg: CfgNode, model: torch.nn.Module) -> Tuple[float, float, List[float]]:
    """Evaluate ``model`` on ``cfg.DATASETS.TEST[0]`` with the Trainer's evaluator."""
    if len(cfg.DATASETS.TEST) != 1:
        raise ValueError(f"{cfg.OUTPUT_DIR}: rows evaluate one dataset, got {cfg.DATASETS.TEST}")
    return _scores(cfg, Trainer.test(cfg, model))


def images_per_second(
    network: torch.nn.Module, size: Sequence[int], device: str, batch: int = 8,
    min_seconds: float = 1.0, rounds: int = 5,
) -> float:
    """Inference throughput of ``network`` on random ``(batch, 3, *size)`` inputs, measured here.

    After two warm-up batches, ``rounds`` rounds of at least ``min_seconds / rounds`` each; the
    fastest round counts (as ``timeit`` advises: on a shared machine the slower rounds measure
    the other processes).
    """
    network = network.eval()
    x = torch.randn(batch, 3, *size, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = 0.0
    with torch.inference_mode():
        for _ in range(2):
            network(x)
        sync()
        for _ in range(rounds):
            runs, start = 0, time.perf_counter()
            while True:
                network(x)
                runs += 1
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds / rounds:
                    break
            best = max(best, runs * batch / elapsed)
    return best


def pruning_study(
    cfg: CfgNode, model: torch.nn.Module, output: Path, min_seconds: float
) -> List[Dict[str, float]]:
    """Figure 7 for a trained UNet# with top-row heads: per level k = 1..4, the pruned
    sub-network's parameters, its images per second here, and IoU/Dice of pruned inference."""
    depth = model.network.depth
    size = cfg.INPUT.SEMANTIC.SIZE or [96, 96]
    levels = []
    for k in range(1, depth + 1):
        level_dir = output / f"prune_L{k}"
        cfg_k = cfg.clone()
        cfg_k.defrost()
        cfg_k.MODEL.UNET.PRUNE_LEVEL = k
        cfg_k.OUTPUT_DIR = str(level_dir)
        cfg_k.freeze()
        pruned_model = Trainer.build_model(cfg_k)
        pruned_model.load_state_dict(model.state_dict())
        iou, dice, _ = evaluate(cfg_k, pruned_model)
        sub_network = model.network.prune(k)
        levels.append(
            {
                "level": k,
                "params": count_parameters(sub_network),
                "images_per_second": images_per_second(
                    sub_network, size, cfg.MODEL.DEVICE, min_seconds=min_seconds
                ),
                "iou": iou,
                "dice": dice,
            }
        )
        logger.info(f"pruned L{k}: {levels[-1]}")
    return levels


def config_parameters(row: Row) -> int:
    """Parameters of the network the row's yaml describes, as is (the paper's widths)."""
    cfg = get_config(str(ROOT / row.config), ["MODEL.DEVICE", "cpu"])
    return count_parameters(Trainer.build_model(cfg))


def run_row(
    row: Row, cfg: CfgNode, output: Path, pruning: bool, speed_seconds: float
) -> RowResult:
    """Train ``row`` with the Trainer, evaluate it (and its pruned levels if ``pruning``);
    write ``result.json``."""
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
        row.key,
        "done",
        iou=iou,
        dice=dice,
        params=count_parameters(model),
        config_params=config_parameters(row),
        train_seconds=train_seconds,
        eval_seconds=time.perf_counter() - start,
        per_image_iou=per_image,
    )
    if pruning:
        result.pruning = pruning_study(cfg, model, output, speed_seconds)
    write_text_atomic(output / "result.json", json.dumps(asdict(result), indent=1))
    return result


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _millions(params: Optional[int]) -> Optional[float]:
    return None if params is None else params / 1e6


def table_rows(
    table: int, rows: Sequence[Row], results: Dict[str, RowResult], quick: bool
) -> List[Dict]:
    """One dict per row: the table's columns (None where there is no value). ``params_M`` is
    the config's own network; with ``quick``, ``trained_params_M`` the tiny one trained."""
    records = []
    for row in rows:
        r = results[row.key]
        record = {"row": row.key, "model": row.model}
        if table == 1:
            record["DS"] = "yes" if row.deep_supervision else "no"
        else:
            record["backbone"] = row.backbone
        record["params_M"] = _millions(r.config_params)
        if table == 1:
            record["paper_params_M"] = row.paper_params
        if quick:
            record["trained_params_M"] = _millions(r.params)
        record.update(
            iou=r.iou,
            paper_iou=row.paper_iou,
            dice=r.dice,
            paper_dice=row.paper_dice,
            train_s=r.train_seconds,
            status=r.status,
        )
        records.append(record)
    return records


HEADERS = {
    "row": "Row", "model": "Model", "DS": "DS", "backbone": "Backbone",
    "params_M": "Params (M)", "paper_params_M": "Params, paper (M)",
    "trained_params_M": "Params trained (M)", "iou": "IoU %",
    "paper_iou": "IoU %, paper", "dice": "Dice %", "paper_dice": "Dice %, paper",
    "train_s": "Train (s)", "status": "Status",
}


QUICK_MODELS = {
    1: "Table 1 networks at 1/4 of the paper's widths (UNet 8..128), 64x64 inputs",
    2: "the semantic decoders at widths 16/32/64 on ResNet-101 at 1/4 width or on the full "
    "VGG16, 64x64 inputs; Mask R-CNN on the same bottom-ups with 64-channel FPNs (grid widths "
    "16..64) at 128 px",
}


def header_note(table: int, quick: bool, iters: Dict[str, int], load: str) -> str:
    """What the numbers are: a smoke run, or the experiment."""
    what = (
        "Table 1: semantic segmentation on DSB2018, IoU %"
        if table == 1
        else "Table 2: semantic (upper) and instance (lower) segmentation on DSB2018, IoU/Dice %"
    )
    counts = ", ".join(sorted({str(n) for n in iters.values()})) or "—"
    if quick:
        note = (
            f"**Smoke run (`--quick`), not a reproduction.** Every row trained {counts} "
            "iterations from scratch, on the CPU, on the embedded synthetic nuclei set "
            "(nuclei_synth_train; evaluated on nuclei_synth_val), with small models: "
            f"{QUICK_MODELS[table]}. These numbers check that the pipeline runs end to end; "
            "they say nothing about the paper's claims. Params (M) counts the configs' own "
            "networks (the paper's widths), Params trained (M) the small ones trained here."
        )
    else:
        note = (
            f"Trained {counts} iterations per row on its config's DATASETS.TRAIN "
            "(dsb2018_train: the paper's 80 %), evaluated on DATASETS.TEST (dsb2018_val); "
            "semantic rows against the union mask at the original image size, Mask R-CNN rows "
            "by the union of their instances scoring >= TEST.DSB.SCORE_THRESHOLD."
        )
    return f"# {what}\n\n{note}\n\nMachine load when the run ended: {load}.\n"


def write_tables(
    output: Path, table: int, records: List[Dict], note: str, pruning: Optional[List[Dict]]
) -> None:
    """``table{N}.md`` and ``table{N}.csv`` (atomically)."""
    columns = [c for c in HEADERS if c in records[0]]
    lines = [
        "| " + " | ".join(HEADERS[c] for c in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for record in records:
        cells = []
        for c in columns:
            value = record[c]
            if isinstance(value, float):
                cells.append(_fmt(value, 0 if c == "train_s" else 2))
            else:
                cells.append("—" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    text = note + "\n" + "\n".join(lines) + "\n"
    if pruning:
        text += (
            "\n## Figure 7: UNet# pruned to L1..L4 (embedded training, from the DS row)\n\n"
            "| Level | Params (M) | Params, paper (M) | Images/s (here) | IoU % | Dice % |\n"
            "|---|---|---|---|---|---|\n"
        )
        for p in pruning:
            text += (
                f"| L{p['level']} | {p['params'] / 1e6:.3f} | "
                f"{_fmt(PAPER_PRUNED_PARAMS.get(p['level']))} | {p['images_per_second']:.1f} | "
                f"{p['iou']:.2f} | {p['dice']:.2f} |\n"
            )
    write_text_atomic(output / f"table{table}.md", text)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(records)
    write_text_atomic(output / f"table{table}.csv", buffer.getvalue())


def _save_figure(fig, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_boxplot(path: Path, labels: List[str], values: List[List[float]], title: str) -> None:
    """Figure 5: per-image IoU (%) of every row, one box each."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels)), 4.5))
    ax.boxplot(values)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right")
    ax.set_ylabel("IoU per image (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    _save_figure(fig, path)


def plot_pruning(path: Path, pruning: List[Dict], title: str) -> None:
    """Figure 7: parameters, images per second and IoU of the pruned levels L1..L4."""
    levels = [f"L{p['level']}" for p in pruning]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.0), constrained_layout=True)
    panels = [
        ("Parameters (M)", [p["params"] / 1e6 for p in pruning]),
        ("Images per second (this machine)", [p["images_per_second"] for p in pruning]),
        ("IoU (%)", [p["iou"] for p in pruning]),
    ]
    for ax, (label, values) in zip(axes, panels):
        ax.bar(levels, values, color="tab:blue")
        for x, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(label)
    paper = [PAPER_PRUNED_PARAMS.get(p["level"]) for p in pruning]
    axes[0].plot(levels, paper, "o--", color="tab:orange", label="paper (full width)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    _save_figure(fig, path)


def machine_load() -> str:
    """The load average beside the CPU count (the machine may be shared)."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    cpus = os.cpu_count()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {cpus} CPUs"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=int, choices=(1, 2), required=True)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: synthetic set, CPU, tiny widths, few iterations")
    parser.add_argument("--output", type=Path,
                        help="output folder (default output/reproduce/table<N>[_quick])")
    parser.add_argument("--rows", nargs="+", metavar="ROW",
                        help="only these rows (default: all of the table's)")
    parser.add_argument("--iters", type=int,
                        help="SOLVER.MAX_ITER of every row (default: --quick's or the configs')")
    parser.add_argument("--resume", action="store_true",
                        help="reuse rows whose result.json exists in the output folder")
    parser.add_argument("--speed-seconds", type=float, default=2.0,
                        help="time spent measuring each pruned level's images per second")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides for every row, KEY VALUE pairs (last option)")
    return parser.parse_args(argv)


def run_rows(
    args: argparse.Namespace, output: Path
) -> Tuple[Dict[str, RowResult], Dict[str, int]]:
    """Every selected row: trained and evaluated, reused (``--resume``), or listed as not run
    (no config yet) or failed (training diverged).

    Returns the results by row key and the iterations each row trained.
    """
    iters = args.iters
    if iters is None and args.quick:
        iters = QUICK_ITERS[args.table]
    rows = select_rows(args.table, args.rows)
    results: Dict[str, RowResult] = {}
    used_iters: Dict[str, int] = {}
    for n, row in enumerate(rows, 1):
        where = f"[{n}/{len(rows)}] {row.key}"
        row_dir = output / "rows" / row.key
        if not (ROOT / row.config).is_file():
            results[row.key] = RowResult(row.key, f"not run: {row.config} does not exist yet")
            logger.warning(f"{where}: {results[row.key].status}")
            continue
        cfg = row_config(row, args.quick, iters, args.opts, row_dir)
        used_iters[row.key] = cfg.SOLVER.MAX_ITER
        done = row_dir / "result.json"
        if args.resume and done.is_file():
            results[row.key] = RowResult(**json.loads(done.read_text()))
            logger.info(f"{where}: reused {done}")
            continue
        logger.info(f"{where}: training {cfg.SOLVER.MAX_ITER} iterations ({row.config})")
        pruning = args.table == 1 and row.key == PRUNING_ROW
        try:
            r = results[row.key] = run_row(row, cfg, row_dir, pruning, args.speed_seconds)
        except FloatingPointError as e:  # a diverged row is a result too; go on with the rest
            results[row.key] = RowResult(row.key, f"failed: {e}")
            logger.error(f"{where}: {results[row.key].status}")
            continue
        logger.info(f"{where}: IoU {r.iou:.2f}%, Dice {r.dice:.2f}%, "
                    f"{r.train_seconds:.0f} s training, {r.eval_seconds:.0f} s evaluation")
    return results, used_iters


def write_figures(
    output: Path, table: int, quick: bool, rows: Sequence[Row], results: Dict[str, RowResult]
) -> Optional[List[Dict]]:
    """The boxplot of the rows that ran; Table 1's pruning figure and CSV. Returns the pruning
    levels, if any row measured them."""
    finished = [(row, results[row.key]) for row in rows if results[row.key].status == "done"]
    smoke = " (smoke run)" if quick else ""
    if finished:
        labels = [
            f"{row.model}{'_DS' if row.deep_supervision else ''}"
            + (f" {row.backbone}" if row.backbone else "")
            for row, _ in finished
        ]
        values = [r.per_image_iou for _, r in finished]
        title = f"Table {table}: IoU per image{smoke}"
        plot_boxplot(output / f"table{table}_iou_boxplot.png", labels, values, title)
    pruning = next((r.pruning for _, r in finished if r.pruning), None)
    if pruning:
        plot_pruning(output / "fig7_pruning.png", pruning, f"UNet# pruned to L1..L4{smoke}")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(pruning[0]))
        writer.writeheader()
        writer.writerows(pruning)
        write_text_atomic(output / "pruning.csv", buffer.getvalue())
    return pruning


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Run the reproducer; return the output folder."""
    args = parse_args(argv)
    setup_logger(name="detectron2")
    setup_logger(name="reproduce")
    output = args.output or ROOT / "output" / "reproduce" / (
        f"table{args.table}" + ("_quick" if args.quick else "")
    )
    started = time.perf_counter()
    results, used_iters = run_rows(args, output)
    rows = select_rows(args.table, args.rows)
    pruning = write_figures(output, args.table, args.quick, rows, results)
    note = header_note(args.table, args.quick, used_iters, machine_load())
    note += f"Total wall time: {time.perf_counter() - started:.0f} s.\n"
    records = table_rows(args.table, rows, results, args.quick)
    write_tables(output, args.table, records, note, pruning)
    logger.info(f"wrote {output / f'table{args.table}.md'}")
    return output


if __name__ == "__main__":
    main()
