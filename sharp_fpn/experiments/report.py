"""The reproducer's outputs: ``table{N}.md`` / ``.csv`` (Table 1 also laid out as the paper
prints it: models down, data sets across), the per-image IoU box plot (Figure 5), the pruning
figure and ``pruning.csv`` (Figure 7). Framework-free (matplotlib, no torch).

Every file is written whole or not at all (:mod:`sharp_fpn.utils`, :func:`~sharp_fpn.figures.
save_figure`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from ..perf.timing import machine
from ..utils import write_csv_atomic, write_text_atomic
from .recipes import QUICK_MODELS
from .results import RowResult
from .tables import DATASET_NAMES, NOT_IMPLEMENTED, PAPER_PRUNED_PARAMS, Row

#: Column -> header, in table order; a table has the columns its records have.
HEADERS: Dict[str, str] = {
    "row": "Row", "dataset": "Data set", "model": "Model", "DS": "DS", "backbone": "Backbone",
    "params_M": "Params (M)", "paper_params_M": "Params, paper (M)",
    "trained_params_M": "Params trained (M)", "iou": "IoU %",
    "paper_iou": "IoU %, paper", "dice": "Dice %", "paper_dice": "Dice %, paper",
    "train_s": "Train (s)", "status": "Status",
}
PRUNING_COLUMNS = ("level", "params", "images_per_second", "iou", "dice")


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _millions(params: Optional[int]) -> Optional[float]:
    return None if params is None else params / 1e6


def table_rows(
    table: int, rows: Sequence[Row], results: Mapping[str, RowResult], quick: bool
) -> List[Dict]:
    """One dict per row: the table's columns (None where there is no value). ``params_M`` is
    the config's own network; with ``quick``, ``trained_params_M`` the tiny one trained."""
    records = []
    for row in rows:
        r = results[row.key]
        record = {"row": row.key}
        if table in (1, 3):
            record["dataset"] = DATASET_NAMES[row.dataset]
        record["model"] = row.model
        if table == 1:
            record["DS"] = "yes" if row.deep_supervision else "no"
        elif table == 2:
            record["backbone"] = row.backbone
        record["params_M"] = _millions(r.config_params)
        if table == 1:
            record["paper_params_M"] = row.paper_params
        if quick:
            record["trained_params_M"] = _millions(r.params)
        record.update(iou=r.iou, paper_iou=row.paper_iou, dice=r.dice,
                      paper_dice=row.paper_dice, train_s=r.train_seconds, status=r.status)
        records.append(record)
    return records


def machine_load() -> str:
    """The load average beside the CPU count (the machine may be shared)."""
    info = machine()
    if not info["load_average_1_5_15"]:
        return "unknown"
    one, five, fifteen = info["load_average_1_5_15"]
    return (f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on "
            f"{info['cpu_count']} CPUs")


def _data_lines(data: Mapping[str, str]) -> str:
    """``{"DSB2018": "nuclei_synth_train -> nuclei_synth_val", ...}`` as one sentence."""
    return "; ".join(f"{column}: {sets}" for column, sets in data.items()) or "—"


def header_note(table: int, quick: bool, iters: Mapping[str, int], load: str,
                data: Optional[Mapping[str, str]] = None) -> str:
    """What the numbers are: a smoke run, or the experiment. ``data``: per data set (column),
    what its rows trained and were evaluated on (``"train -> test"``)."""
    what = {
        1: "Table 1: semantic segmentation, IoU % (2-D: DSB2018, BraTS19, LiTS17, LIDC-IDRI; "
           "3-D: LUNA16)",
        2: "Table 2: semantic (upper) and instance (lower) segmentation on DSB2018, IoU/Dice %",
        3: "Table 3: UNet# and UNet# with CGM beside eight other models on BraTS19 and LiTS17, "
           "IoU/Dice %",
    }[table]
    counts = ", ".join(sorted({str(n) for n in iters.values()}, key=int)) or "—"
    if data is None:
        data = {"DSB2018": "nuclei_synth_train -> nuclei_synth_val" if quick
                else "dsb2018_train -> dsb2018_val"}
    if quick:
        note = (
            f"**Smoke run (`--quick`), not a reproduction** (quick: tests the pipeline, does "
            f"not reproduce the paper). Every row trained {counts} iterations from scratch, on "
            f"the CPU, on small synthetic stand-ins of its data set written in the data set's "
            f"own format (train -> evaluated on) — {_data_lines(data)} — with small models: "
            f"{QUICK_MODELS[table]}. These numbers check that the pipeline runs end to end; "
            "they say nothing about the paper's claims. Params (M) counts the configs' own "
            "networks (the paper's widths), Params trained (M) the small ones trained here."
        )
    else:
        note = (
            f"Trained {counts} iterations per row on its config's DATASETS.TRAIN, evaluated on "
            f"DATASETS.TEST ({_data_lines(data)}); 2-D semantic rows against the union mask at "
            "the original image size, 3-D rows per volume, Mask R-CNN rows by the union of "
            "their instances scoring >= TEST.DSB.SCORE_THRESHOLD."
        )
    if table == 1:
        note += (
            " The 3-D rows' Params (M) are this project's V-Net family (5x5x5 nodes; "
            "sharp_fpn.models.unet.VNET_PARAMETER_TABLE, with the deep supervision heads where "
            "DS is yes): no node definition reproduces the paper's five counts (the gaps are "
            "explained in sharp_fpn/models/unet.py)."
        )
    if table == 3:
        note += f" Rows marked '{NOT_IMPLEMENTED}' carry the paper's numbers alone."
    return f"# {what}\n\n{note}\n\nMachine load when the run ended: {load}.\n"


def paper_layout(rows: Sequence[Row], results: Mapping[str, RowResult]) -> str:
    """Table 1 as the paper prints it: one line per model and DS, one column per data set,
    each cell ``ours (paper)`` IoU %."""
    datasets = list(dict.fromkeys(row.dataset for row in rows))
    lines: Dict[tuple, Dict[str, str]] = {}
    for row in rows:
        position = sum(1 for r in rows[: rows.index(row)] if r.dataset == row.dataset)
        line = lines.setdefault((position, row.deep_supervision), {})
        line.setdefault("model", "")
        names = [n for n in line["model"].split(" / ") if n]
        if row.model not in names:
            line["model"] = " / ".join(names + [row.model])
        line[row.dataset] = f"{_fmt(results[row.key].iou)} ({_fmt(row.paper_iou)})"
    text = ("\n## Table 1 as the paper lays it out: IoU % ours (paper's)\n\n"
            "| Model | DS | " + " | ".join(DATASET_NAMES[d] for d in datasets) + " |\n"
            "|" + "---|" * (len(datasets) + 2) + "\n")
    for (_, ds), line in sorted(lines.items()):
        text += (f"| {line['model']} | {'yes' if ds else 'no'} | "
                 + " | ".join(line.get(d, "—") for d in datasets) + " |\n")
    return text


def markdown_table(records: Sequence[Mapping]) -> str:
    """The records as a markdown table (floats with 2 decimals, training seconds with none)."""
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
    return "\n".join(lines) + "\n"


def pruning_markdown(pruning: Sequence[Mapping]) -> str:
    """Figure 7 as a markdown section: each level beside the paper's parameter count."""
    text = (
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
    return text


def write_tables(
    output: Path, table: int, records: List[Dict], note: str, pruning: Optional[List[Dict]],
    layout: str = "",
) -> None:
    """``table{N}.md`` (note, table, ``layout`` (Table 1 as the paper prints it), Figure 7's
    section if pruned) and ``table{N}.csv``."""
    columns = [c for c in HEADERS if c in records[0]]
    text = (note + "\n" + markdown_table(records) + layout
            + (pruning_markdown(pruning) if pruning else ""))
    write_text_atomic(Path(output) / f"table{table}.md", text)
    write_csv_atomic(Path(output) / f"table{table}.csv", records, columns)


def plot_boxplot(path: Path, labels: List[str], values: List[List[float]], title: str) -> None:
    """Figure 5: per-image IoU (%) of every row, one box each."""
    from ..figures import save_figure  # first: it selects the Agg backend

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels)), 4.5))
    ax.boxplot(values)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right")
    ax.set_ylabel("IoU per image (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def plot_pruning(path: Path, pruning: List[Dict], title: str) -> None:
    """Figure 7: parameters, images per second and IoU of the pruned levels L1..L4."""
    from ..figures import save_figure  # first: it selects the Agg backend

    import matplotlib.pyplot as plt

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
    save_figure(fig, path)


def write_figures(
    output: Path, table: int, quick: bool, rows: Sequence[Row], results: Mapping[str, RowResult]
) -> Optional[List[Dict]]:
    """The box plot of the rows that ran; Table 1's pruning figure and ``pruning.csv``.

    Returns the pruning levels, if a finished row measured them.
    """
    output = Path(output)
    finished = [(row, results[row.key]) for row in rows if results[row.key].done]
    smoke = " (smoke run)" if quick else ""
    if finished:
        plot_boxplot(output / f"table{table}_iou_boxplot.png",
                     [row.label for row, _ in finished],
                     [r.per_image_iou for _, r in finished],
                     f"Table {table}: IoU per image{smoke}")
    pruning = next((r.pruning for _, r in finished if r.pruning), None)
    if pruning:
        plot_pruning(output / "fig7_pruning.png", pruning, f"UNet# pruned to L1..L4{smoke}")
        write_csv_atomic(output / "pruning.csv", pruning, PRUNING_COLUMNS)
    return pruning
