"""Training runs that must survive: distributed on CPU, killed and resumed, diverging, misconfigured."""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import register_coco_instances

from sharp_fpn.d2.engine import ConfigError, ProcessFailed, Trainer, get_config, launch
from sharp_fpn.utils import atomic_write

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo" / "mask_rcnn_fpn_R18.yaml"
TINY = [
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128",
    "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()",
    "DATASETS.TEST", "()", "MODEL.RESNETS.DEPTH", "18",
]


@pytest.fixture(scope="module")
def synth_json():
    """The synthetic default's training json (generated on first use)."""
    DatasetCatalog.get("nuclei_synth_train")
    root = Path(os.environ["DETECTRON2_DATASETS"]) / "nuclei_synth"
    return root / "annotations" / "stage1_train_train.json", root


# --- distributed training on the CPU ------------------------------------------------------

def _one_image_json(src: Path, dst: Path) -> Path:
    """A dataset holding one image with nuclei, four times over.

    With identical images every process sees the same per-image loss normalisers (sampled
    ROIs, foreground masks), so the mean of the per-process losses equals the one-process loss
    exactly, and the DDP-averaged gradients must equal the one-process gradients.
    """
    coco = json.loads(src.read_text())
    image = next(im for im in coco["images"] if any(a["image_id"] == im["id"] for a in coco["annotations"]))
    anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
    images, annotations = [], []
    for k in range(4):
        images.append({**image, "id": k + 1})
        annotations += [{**a, "id": len(annotations) + i + 1, "image_id": k + 1} for i, a in enumerate(anns)]
    dst.write_text(json.dumps({**coco, "images": images, "annotations": annotations}))
    return dst


def _train_deterministic(json_file: str, image_root: str, output_dir: str) -> None:
    """Two iterations in which nothing is sampled at random: every anchor and proposal is used.

    The bottom-up's norm is FrozenBN: plain BN normalises over each process's own images (its
    running variance's n/(n-1) differs between one batch of 2 and two of 1); SyncBN would be
    the multi-process equivalent.
    """
    if "ddp_probe" not in DatasetCatalog.list():
        register_coco_instances("ddp_probe", {}, json_file, image_root)
    cfg = get_config(str(DEMO), TINY + [
        "DATASETS.TRAIN", "('ddp_probe',)", "OUTPUT_DIR", output_dir,
        "INPUT.RANDOM_FLIP", "none", "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "DATALOADER.ASPECT_RATIO_GROUPING", "False",
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "1000000", "MODEL.RPN.POSITIVE_FRACTION", "1.0",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "1000000", "MODEL.ROI_HEADS.POSITIVE_FRACTION", "1.0",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RESNETS.NORM", "FrozenBN",
    ])
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()


def test_ddp_over_gloo_equals_one_process(synth_json, tmp_path):
    json_file = _one_image_json(synth_json[0], tmp_path / "probe.json")
    args = (str(json_file), str(synth_json[1]))
    _train_deterministic(*args, str(tmp_path / "one"))
    launch(_train_deterministic, 2, args=(*args, str(tmp_path / "two")))

    one = torch.load(tmp_path / "one" / "model_final.pth")["model"]
    two = torch.load(tmp_path / "two" / "model_final.pth")["model"]
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    # And training did move the weights (the comparison is not between two untouched models).
    torch.manual_seed(0)
    cfg = get_config(str(DEMO), TINY + ["MODEL.RESNETS.NORM", "FrozenBN"])
    model = Trainer.build_model(cfg)
    params = {k: p.detach() for k, p in model.named_parameters()}
    moved = [k for k, p in params.items() if not torch.allclose(p, one[k])]
    assert len(moved) > 0.9 * len(params)


def test_images_per_batch_must_divide_by_the_processes(tmp_path):
    # Raised in the processes; the launching process says it in one line, naming the process.
    with pytest.raises(ProcessFailed, match=r"^process [01] of 2 failed: ConfigError: "
                       "SOLVER.IMS_PER_BATCH=3 does not divide by the 2 processes") as failed:
        launch(_bad_batch, 2, args=(str(tmp_path),))
    assert "\n" not in str(failed.value)


def _bad_batch(output_dir: str) -> None:
    get_config(str(DEMO), ["SOLVER.IMS_PER_BATCH", "3", "OUTPUT_DIR", output_dir])


# --- killed and resumed ---------------------------------------------------------------------

def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, str(ROOT / "tools" / "train_net.py"), "--config-file", str(DEMO),
        *TINY, "SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "2",
        "SOLVER.IMS_PER_BATCH", "1", "OUTPUT_DIR", str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        # last_checkpoint is tagged after its file is renamed into place: wait for the tag
        # (names sort by iteration; model_final.pth after them all).
        while _tagged(out) < "model_0000003.pth":
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert not (out / "model_final.pth").exists()
    last = (out / "last_checkpoint").read_text()
    reached = torch.load(out / last)["iteration"]
    assert reached >= 3

    done = subprocess.run([*cmd[:4], "--resume", *cmd[4:]], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (out / "log.txt").read_text()
    assert f"Loading from {out / last}" in log
    assert f"Starting training from iteration {reached + 1}" in log
    final = torch.load(out / "model_final.pth")
    assert final["iteration"] == 7
    iterations = [json.loads(line)["iteration"] for line in (out / "metrics.json").read_text().splitlines()]
    assert iterations[-1] == 7
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def _tagged(out: Path) -> str:
    """The checkpoint ``last_checkpoint`` names ("" before the first)."""
    try:
        return (out / "last_checkpoint").read_text()
    except FileNotFoundError:
        return ""


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "model.pth"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "wb") as f:
            f.write(b"half of the new")
            raise RuntimeError("killed while writing")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_checkpoints_load_under_torch_load_defaults(synth_json, tmp_path):
    cfg = get_config(str(DEMO), TINY + ["SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "1",
                                         "OUTPUT_DIR", str(tmp_path)])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    checkpoint = torch.load(tmp_path / "model_final.pth")  # weights_only=True by default
    assert checkpoint["iteration"] == 0
    assert "backbone.fpn_output2.weight" in checkpoint["model"]


# --- diverging, misconfigured ---------------------------------------------------------------

def _trainer(tmp_path, *opts):
    cfg = get_config(str(DEMO), TINY + ["SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "1",
                                         "OUTPUT_DIR", str(tmp_path), *opts])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def test_a_non_finite_loss_stops_the_run_naming_iteration_and_terms(synth_json, tmp_path):
    trainer = _trainer(tmp_path, "MODEL.RPN.LOSS_WEIGHT", "1e400")  # yaml reads it as inf
    before = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
    with pytest.raises(FloatingPointError, match="iteration=0") as err:
        trainer.train()
    for term in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"):
        assert term in str(err.value)
    # The step was not taken: no weight was touched by the non-finite gradients.
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_divergence_inside_the_model_names_the_iteration(synth_json, tmp_path):
    # A zero pixel std makes the normalised image infinite: the box head sees non-finite values.
    trainer = _trainer(tmp_path, "MODEL.PIXEL_STD", "[0.0, 0.0, 0.0]")
    with pytest.raises(FloatingPointError, match=r"diverged at iteration=0: .*Inf/NaN"):
        trainer.train()


def test_an_unknown_config_key_fails_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{DEMO}"\nMODEL:\n  SHARP_FNP:\n    SCHEME: "sharp"\n')
    with pytest.raises(ConfigError, match=f"{bad}: Non-existent config key: MODEL.SHARP_FNP"):
        get_config(str(bad))
    with pytest.raises(ConfigError, match="command-line options: Non-existent key: SOLVER.MAX_ITERS"):
        get_config(str(DEMO), ["SOLVER.MAX_ITERS", "3"])


# --- logging: each line once, each run its own log.txt ---------------------------------------

STAMP = re.compile(r"\[\d\d/\d\d \d\d:\d\d:\d\d ")  # detectron2's console records

TWO_RUNS = """
import argparse, sys
from sharp_fpn.d2.engine import Trainer, setup

config, first, second, *tiny = sys.argv[1:]
for i, out in enumerate((first, second)):
    print(f"=== run {i}", flush=True)
    opts = [*tiny, "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "1", "OUTPUT_DIR", out]
    cfg = setup(argparse.Namespace(config_file=config, eval_only=False, opts=opts))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
"""


def test_two_trainings_in_one_process_log_each_line_once(synth_json, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    done = subprocess.run(
        [sys.executable, "-c", TWO_RUNS, str(DEMO), str(first), str(second), *TINY],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = done.stdout.split("=== run 1\n")
    assert len(runs) == 2
    for console, out in zip(runs, (first, second)):
        # the log records' first lines (a record's later lines, e.g. the config, may repeat)
        lines = [line for line in console.splitlines() if STAMP.search(line)]
        assert len(lines) > 10
        doubled = [a for a, b in zip(lines, lines[1:]) if a == b]
        assert not doubled, doubled[:3]
        assert sum("Starting training from iteration 0" in line for line in lines) == 1
        assert sum(f"Full config saved to {out / 'config.yaml'}" in line for line in lines) == 1
        log = (out / "log.txt").read_text()
        assert log.count("Starting training from iteration 0") == 1
        assert log.count("Full config saved to") == 1  # its own run's, not the other's
        assert (out / "config.yaml").is_file()


def test_setup_logging_replaces_the_run_log_and_adds_no_console(tmp_path):
    import logging

    from sharp_fpn.d2.engine import RUN_LOGGERS, setup_logging

    def handlers(name):
        return list(logging.getLogger(name).handlers)

    setup_logging(str(tmp_path / "a"))
    consoles = {name: [h for h in handlers(name) if type(h) is logging.StreamHandler]
                for name in RUN_LOGGERS}
    try:
        setup_logging(str(tmp_path / "b"))
        for name in RUN_LOGGERS:
            files = [h for h in handlers(name) if isinstance(h, logging.FileHandler)]
            assert [h.baseFilename for h in files] == [str(tmp_path / "b" / "log.txt")]
            assert [h for h in handlers(name) if type(h) is logging.StreamHandler] == consoles[name]
        logging.getLogger("sharp_fpn.test").info("only in b")
        assert "only in b" in (tmp_path / "b" / "log.txt").read_text()
        assert "only in b" not in (tmp_path / "a" / "log.txt").read_text()
    finally:
        setup_logging(None)  # no run log left open for the tests after this one
    assert not any(isinstance(h, logging.FileHandler) for n in RUN_LOGGERS for h in handlers(n))


# --- tools/train_net.py's command line -------------------------------------------------------

def _train_net():
    spec = importlib.util.spec_from_file_location("train_net", ROOT / "tools" / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flag", ["--resume", "--eval-only", "--num-gpus", "--num-gpus=2"])
def test_a_flag_after_the_overrides_is_named(flag, capsys):
    argv = ["--config-file", str(DEMO), "SOLVER.MAX_ITER", "8", flag]
    if flag == "--num-gpus":
        argv.append("2")  # an even-length list: yacs would read --num-gpus as a config key
    with pytest.raises(SystemExit) as stop:
        _train_net().parse_args(argv)
    assert stop.value.code == 2
    name = flag.split("=")[0]
    err = capsys.readouterr().err  # one line: "<prog>: error: put --resume before ..."
    assert err.endswith(f": error: put {name} before the config overrides\n")
    assert err.count("\n") == 1


def test_flags_before_the_overrides_parse():
    args = _train_net().parse_args(
        ["--config-file", str(DEMO), "--resume", "--num-gpus", "2", "SOLVER.MAX_ITER", "8"]
    )
    assert args.resume and args.num_gpus == 2 and args.opts == ["SOLVER.MAX_ITER", "8"]
