#!/usr/bin/env python
"""``make demo``: train and evaluate Mask R-CNN on the embedded synthetic nuclei, on the CPU.

The first run generates the synthetic set (DSB2018's layout) under ``$DETECTRON2_DATASETS``
(default ``./datasets``) and converts it to COCO json. Each model is then trained from scratch
with a small budget, evaluated on the held-out fifth (COCO box/mask AP, DSB2018 score,
foreground IoU and Dice), and the results are printed side by side and saved to
``output/demo/results.json``. Last, the shipped nuclei model (the model zoo's default, which
needs no training) segments one held-out image of each synthetic v2 style into
``output/demo/shipped_model``.

    python tools/demo.py [--iters N] [--output output/demo] [--overwrite]

The output folder is the demo's own: a rerun replaces what an earlier demo run wrote there (its
models, checkpoints and results; the folders' record, ``.sharp-fpn-outputs.json``, tells which)
and nothing else. A model folder holding a run some other tool made (``tools/train_net.py``
into ``output/demo``, say) or files of a user's is refused, naming them, unless
``--overwrite``; two demos into one folder at once are refused (a lock, as for training).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from sharp_fpn.utils import silence_warnings, write_text_atomic

silence_warnings()  # the project's third-party filters, before detectron2 is imported

from detectron2.data import DatasetCatalog  # noqa: E402

from sharp_fpn.cli import add_debug_argument, run  # noqa: E402
from sharp_fpn.d2.engine import Trainer, setup  # noqa: E402
from sharp_fpn.d2.run_folder import run_folder  # noqa: E402
from sharp_fpn.predict import predict_images  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

#: (label, config, output subfolder) of the models the demo trains, in the order they are
#: printed: the UNet# neck, then detectron2's own FPN with the same budget as its baseline.
MODELS = (
    ("Mask R-CNN# (sharp)", "configs/demo/mask_rcnn_sharp_R18.yaml", ""),
    ("Mask R-CNN (FPN)", "configs/demo/mask_rcnn_fpn_R18.yaml", "fpn_baseline"),
)


def train_and_evaluate(config: Path, output_dir: Path, iters: int | None) -> dict:
    opts = ["OUTPUT_DIR", str(output_dir)]
    if iters is not None:
        # the learning-rate drops at 3/4 and 9/10 of the run, those that fall inside it
        steps = tuple(sorted({s for s in (int(iters * 0.75), int(iters * 0.9)) if 0 < s < iters}))
        opts += ["SOLVER.MAX_ITER", iters, "SOLVER.STEPS", steps,
                 "SOLVER.WARMUP_ITERS", min(100, iters)]
    # Logs the environment, writes output_dir/config.yaml; this run's log.txt replaces the
    # previous run's, and the console gets each line once.
    cfg = setup(argparse.Namespace(config_file=str(config), eval_only=False, opts=opts))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    start = time.perf_counter()
    trainer.train()
    minutes = (time.perf_counter() - start) / 60
    # EvalHook evaluates the test sets after the last iteration.
    results = dict(trainer._last_eval_results)  # noqa: SLF001 (detectron2 keeps them there)
    return {"config": str(config), "output_dir": str(output_dir), "minutes": minutes,
            "iterations": cfg.SOLVER.MAX_ITER, "results": results}


def summary_rows(runs: list[tuple[str, dict]]) -> list[str]:
    header = f"{'model':<20} {'box AP':>7} {'mask AP':>8} {'DSB score':>10} {'fg IoU %':>9} {'fg Dice %':>10} {'train min':>10}"
    lines = [header, "-" * len(header)]
    for label, trained in runs:
        r = trained["results"]
        lines.append(
            f"{label:<20} {r['bbox']['AP']:>7.2f} {r['segm']['AP']:>8.2f} "
            f"{r['dsb']['score']:>10.3f} {r['dsb']['fg_IoU']:>9.2f} {r['dsb']['fg_Dice']:>10.2f} "
            f"{trained['minutes']:>10.1f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=None, help="training iterations per model")
    parser.add_argument("--output", type=Path, default=ROOT / "output" / "demo")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace runs and files in --output that the demo did not write")
    add_debug_argument(parser)
    args = parser.parse_args(argv)
    if args.iters is not None and args.iters < 1:
        parser.error(f"--iters must be at least 1, got {args.iters}")

    with ExitStack() as held:
        # Every folder checked and locked before the first model trains (a conflict is found
        # in a second, not after minutes of training), and held until the predictions are in.
        folders = [
            held.enter_context(run_folder(args.output / subfolder, tool="demo",
                                          overwrite=args.overwrite, replace_own=True,
                                          config_file=ROOT / config))
            for _, config, subfolder in MODELS
        ]
        results_file = folders[0].claim("results.json")
        runs = []
        for i, (label, config, subfolder) in enumerate(MODELS):
            out = args.output / subfolder
            print(f"\n=== [{i + 1}/{len(MODELS)}] training {label}: {config} -> {out}\n",
                  flush=True)
            runs.append((label, train_and_evaluate(ROOT / config, out, args.iters)))
        write_text_atomic(results_file, json.dumps(dict(runs), indent=2))

        lines = summary_rows(runs)
        print("\n".join(["", "Results on nuclei_synth_val (held-out synthetic images):", *lines,
                         ""]))
        for label, trained in runs:
            out = Path(trained["output_dir"])
            print(f"{label}: weights {out / 'model_final.pth'}, config {out / 'config.yaml'}")
        print(f"all figures: {results_file}")

        # What a biologist gets (tools/predict.py): labels, overlay and table of held-out images.
        first = Path(runs[0][1]["output_dir"])
        images = [r["file_name"] for r in DatasetCatalog.get("nuclei_synth_val")[:3]]
        report = predict_images(first / "config.yaml", first / "model_final.pth", images,
                                args.output / "predictions", progress=False)
        print(f"\nPredictions of {runs[0][0]} on held-out images, in {report.out_dir}:")
        for r in report.results:
            print(f"  {r.image.name}: {r.nuclei} nuclei -> {r.labels.name}, {r.overlay.name}, "
                  f"{r.table.name}")
        print(f"  summary: {report.summary}")
        shipped_model(args.output / "shipped_model")
    return 0


def shipped_model(out: Path) -> None:
    """What a biologist gets with no training at all: the zoo's default nuclei model
    (``tools/predict.py`` with nothing but --input and --output) on one held-out image of each
    synthetic v2 style."""
    from sharp_fpn import model_zoo

    try:
        config, weights = model_zoo.resolve()
    except (LookupError, ValueError, OSError) as e:
        print(f"\nThe shipped model: none to apply ({e})")
        return
    name = model_zoo.default_model_name()
    images = [DatasetCatalog.get(f"nuclei_synth2_test_{style}")[1]["file_name"]
              for style in ("fluorescence", "he", "brightfield")]
    report = predict_images(config, weights, images, out, progress=False)
    print(f"\nThe shipped model {name!r} (trained on synthetic data only; "
          f"tools/predict.py --input DIR --output DIR) on held-out v2 images, in {report.out_dir}:")
    for r in report.results:
        print(f"  {r.image.name}: {r.nuclei} nuclei -> {r.labels.name}, {r.overlay.name}, "
              f"{r.table.name}")
    print(f"  summary: {report.summary}")


if __name__ == "__main__":
    sys.exit(run(main))
