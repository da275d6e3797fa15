"""Training under the inputs users give: no finished run replaced unasked, one run per folder, no
evaluation of weights that do not fit, checkpoints that fall back, images read as predict reads
them, and every failure in one line. Real detectron2, real files, tiny models, CPU."""
import importlib.util
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as d2_utils
from detectron2.data.dataset_mapper import DatasetMapper
from detectron2.data import transforms as T
from PIL import Image

from sharp_fpn.cli import run
from sharp_fpn.d2.checkpoint import AtomicCheckpointer, UnreadableCheckpoint, WeightsMismatch
from sharp_fpn.d2.engine import ConfigError, Trainer, get_config
from sharp_fpn.d2.mapper import NucleiDatasetMapper, read_image
from sharp_fpn.d2.run_folder import run_folder
from sharp_fpn.d2.semantic_data import SemanticNucleiMapper
from sharp_fpn.outdir import LOCK_NAME, RECORD_NAME, OutputConflict, OutputDir
from sharp_fpn.predict.image_io import load_image

ROOT = Path(__file__).resolve().parent.parent
UNET = ROOT / "configs" / "semantic" / "table1" / "unet.yaml"
UNET_SHARP = ROOT / "configs" / "semantic" / "table1" / "unet_sharp.yaml"
FPN = ROOT / "configs" / "demo" / "mask_rcnn_fpn_R18.yaml"
SHARP = ROOT / "configs" / "demo" / "mask_rcnn_sharp_R18.yaml"
#: A semantic UNet of widths 4..64 at 32 px: a training step takes milliseconds.
TINY = [
    "MODEL.DEVICE", "cpu", "INPUT.SEMANTIC.SIZE", "[32,32]", "MODEL.UNET.WIDTH_MULT", "0.125",
    "DATASETS.TRAIN", "('nuclei_synth_train',)", "DATASETS.TEST", "()",
    "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
    "SOLVER.CHECKPOINT_PERIOD", "1",
]
VAL = ["DATASETS.TEST", "('nuclei_synth_val',)"]


def _load_train_net():
    spec = importlib.util.spec_from_file_location("train_net", ROOT / "tools" / "train_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN_NET = _load_train_net()


def _run_train_net(argv) -> tuple:
    err = io.StringIO()
    with redirect_stderr(err):  # only stderr: the run's console log keeps pytest's stdout
        status = run(TRAIN_NET.main, [str(a) for a in argv])
    return status, err.getvalue()


def train_net(*argv) -> int:
    """tools/train_net.py in this process, as its command line runs it (sharp_fpn.cli.run)."""
    return _run_train_net(argv)[0]


def refused(*argv) -> str:
    """The one error line of a train_net run that fails (exit 1, no traceback on stderr)."""
    status, err = _run_train_net(argv)
    assert status == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err[-2000:]
    return lines[0].split(": error: ", 1)[1]


@contextmanager
def logged(name: str):
    """The messages logger ``name`` (and its children) emits inside the block."""
    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger = logging.getLogger(name)
    handler, level = Keep(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run made by train_net: model_0000000.pth, model_0000001.pth,
    model_final.pth, last_checkpoint -> model_final.pth, config.yaml, the folder's record."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_net("--config-file", UNET, *TINY, "OUTPUT_DIR", out) == 0
    yield out
    from sharp_fpn.d2.engine import setup_logging

    setup_logging(None)  # no run log left open


@pytest.fixture
def run_dir(finished, tmp_path):
    """A copy of the finished run, for a test to change."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def _iteration(path: Path) -> int:
    return torch.load(path)["iteration"]


# --- OUTPUT_DIR: a finished or interrupted run is kept ----------------------------------------

def test_a_finished_run_is_refused_and_left_as_it_was(run_dir):
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    message = refused("--config-file", UNET, *TINY, "OUTPUT_DIR", run_dir)
    assert message == (
        f"{run_dir}: holds a finished run (model_final.pth); pass --resume to continue it, "
        "--overwrite to start anew (its checkpoints are removed), or choose another OUTPUT_DIR"
    )
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # log.txt too


def test_an_interrupted_run_is_refused_naming_its_last_checkpoint(run_dir):
    (run_dir / "model_final.pth").unlink()
    (run_dir / "last_checkpoint").write_text("model_0000001.pth")
    message = refused("--config-file", UNET, *TINY, "OUTPUT_DIR", run_dir)
    assert "holds an interrupted run (last checkpoint model_0000001.pth, no model_final.pth)" \
        in message
    assert (run_dir / "model_0000001.pth").is_file()


def test_checkpoints_without_last_checkpoint_are_a_run_too(run_dir):
    (run_dir / "model_final.pth").unlink()
    (run_dir / "last_checkpoint").unlink()
    message = refused("--config-file", UNET, *TINY, "OUTPUT_DIR", run_dir)
    assert "holds an interrupted run (model_0000001.pth, no model_final.pth)" in message


def test_overwrite_starts_anew_and_says_what_it_removed(run_dir):
    with logged("sharp_fpn.d2.run_folder") as messages:
        assert train_net("--config-file", UNET, "--overwrite", *TINY, "OUTPUT_DIR", run_dir,
                         "SOLVER.MAX_ITER", "1") == 0
    assert len(messages) == 1
    assert messages[0].startswith(f"{run_dir}: --overwrite: starting anew; removed the files of "
                                  "a finished run (model_final.pth): model_final.pth, "
                                  "model_0000001.pth, model_0000000.pth, last_checkpoint")
    # Only the new run's files: no checkpoint of the old run left to be mistaken for one of it.
    assert not (run_dir / "model_0000001.pth").exists()
    assert _iteration(run_dir / "model_final.pth") == 0
    iterations = [json.loads(line)["iteration"]
                  for line in (run_dir / "metrics.json").read_text().splitlines()]
    assert iterations == [0]


def test_resume_continues_a_finished_run(run_dir):
    assert train_net("--config-file", UNET, "--resume", *TINY, "OUTPUT_DIR", run_dir,
                     "SOLVER.MAX_ITER", "3") == 0
    assert _iteration(run_dir / "model_final.pth") == 2
    assert "Starting training from iteration 2" in (run_dir / "log.txt").read_text()


def test_resume_and_overwrite_exclude_each_other(run_dir):
    message = refused("--config-file", UNET, "--resume", "--overwrite", *TINY,
                      "OUTPUT_DIR", run_dir)
    assert message == (f"{run_dir}: --resume continues the run there, --overwrite starts it "
                       "anew; give one of them")


def test_a_users_file_in_output_dir_is_not_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("# my notes\n")
    message = refused("--config-file", UNET, *TINY, "OUTPUT_DIR", out)
    assert message == (
        f"{out / 'config.yaml'}: exists (not written by sharp-fpn); choose another output "
        "folder, or pass --overwrite to replace it"
    )
    assert (out / "config.yaml").read_text() == "# my notes\n"


def test_a_runs_own_config_yaml_may_be_its_config_file(run_dir):
    # Resuming with the run's own dumped config (a file train_net wrote) is allowed.
    assert train_net("--config-file", run_dir / "config.yaml", "--resume", "SOLVER.MAX_ITER",
                     "3", "OUTPUT_DIR", run_dir) == 0
    assert _iteration(run_dir / "model_final.pth") == 2


def test_weights_of_the_run_that_overwrite_would_remove_are_refused(run_dir):
    weights = run_dir / "model_final.pth"
    before = weights.read_bytes()
    message = refused("--config-file", UNET, "--overwrite", *TINY, "OUTPUT_DIR", run_dir,
                      "MODEL.WEIGHTS", weights)
    assert message.startswith(f"{weights}: is one of the run's inputs and would be removed "
                              "with the earlier run")
    assert weights.read_bytes() == before


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in (root writes anywhere a mode allows: /sys)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        return folder
    folder = Path("/sys/kernel")
    try:
        os.close(os.open(folder / ".sharp-fpn-probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except OSError:
        return folder
    os.unlink(folder / ".sharp-fpn-probe")
    pytest.skip("no folder here is read-only to this process")


@pytest.mark.parametrize("kind", ["file", "inside a file", "read-only"])
def test_an_output_dir_that_cannot_be_written_is_one_line(kind, tmp_path):
    if kind == "read-only":
        out, expected = _unwritable_folder(tmp_path), "cannot write in the output folder"
        if os.geteuid() != 0:
            expected = "the output folder is not writable"
    else:
        (tmp_path / "a_file").write_text("x")
        out = tmp_path / "a_file" if kind == "file" else tmp_path / "a_file" / "run"
        expected = {"file": "is a file, not a folder",
                    "inside a file": "cannot create the output folder"}[kind]
    message = refused("--config-file", UNET, *TINY, "OUTPUT_DIR", out)
    assert message.startswith(f"{out}: ") and expected in message


def test_a_second_run_into_a_busy_folder_is_refused_until_the_first_dies(finished, tmp_path):
    out = tmp_path / "busy"
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "train_net.py"), "--config-file", str(UNET), *TINY,
         "SOLVER.MAX_ITER", "1000000", "SOLVER.CHECKPOINT_PERIOD", "1000000", "OUTPUT_DIR",
         str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_NAME).is_file():
            assert first.poll() is None, "the first run ended early"
            assert time.monotonic() < deadline, "the first run took no lock in 120 s"
            time.sleep(0.2)
        weights = ["MODEL.WEIGHTS", finished / "model_final.pth"]
        for flags, opts in (([], []), (["--resume"], []), (["--overwrite"], []),
                            (["--eval-only"], VAL + weights)):
            message = refused("--config-file", UNET, *flags, *TINY, *opts, "OUTPUT_DIR", out)
            assert message.startswith(f"{out}: in use by train (pid {first.pid} on "), flags
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # Killed: its lock is stale, and the next run takes it over.
    assert (out / LOCK_NAME).is_file()
    assert train_net("--config-file", UNET, "--overwrite", *TINY, "OUTPUT_DIR", out,
                     "SOLVER.MAX_ITER", "1") == 0
    assert (out / "model_final.pth").is_file() and not (out / LOCK_NAME).exists()


def test_a_two_process_run_fails_in_one_line_and_releases_its_one_lock(tmp_path):
    # The launching process holds the lock; a failure in a process comes back as one line.
    (tmp_path / "empty.pth").write_bytes(b"")
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_net.py"), "--num-gpus", "2",
         "--config-file", str(UNET), *TINY, "MODEL.WEIGHTS", str(tmp_path / "empty.pth"),
         "OUTPUT_DIR", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"of 2 failed: UnreadableCheckpoint: MODEL.WEIGHTS: {tmp_path / 'empty.pth'}: not a " \
        "readable checkpoint (EOFError)" in errors[0]
    assert not (out / LOCK_NAME).exists()


# --- --eval-only: no numbers from weights that do not fit ----------------------------------

def test_eval_only_without_weights_is_refused(tmp_path):
    out = tmp_path / "eval"
    message = refused("--config-file", UNET, "--eval-only", *TINY, *VAL, "OUTPUT_DIR", out)
    assert message.startswith("--eval-only needs the weights to evaluate: MODEL.WEIGHTS")
    assert not (out / "inference").exists()


def test_eval_only_without_a_test_set_is_refused(finished, tmp_path):
    message = refused("--config-file", UNET, "--eval-only", *TINY, "MODEL.WEIGHTS",
                      finished / "model_final.pth", "OUTPUT_DIR", tmp_path / "eval")
    assert message == "--eval-only: DATASETS.TEST is empty, nothing to evaluate"


def _weights_of(config: Path, folder: Path, *opts) -> Path:
    """A checkpoint of the (untrained) model ``config`` builds, as a run saves one."""
    cfg = get_config(str(config), list(opts))
    AtomicCheckpointer(Trainer.build_model(cfg), str(folder)).save("model_final")
    return folder / "model_final.pth"


@pytest.mark.parametrize("case", ["another network", "other widths"])
def test_eval_only_with_weights_of_another_config_is_refused(case, tmp_path):
    if case == "another network":
        weights = _weights_of(UNET_SHARP, tmp_path, *TINY)
        expected = "parameters missing, "
    else:
        weights = _weights_of(UNET, tmp_path, *TINY, "MODEL.UNET.WIDTH_MULT", "0.25")
        expected = "0 parameters missing, 0 unexpected, "
    out = tmp_path / "eval"
    message = refused("--config-file", UNET, "--eval-only", *TINY, *VAL, "MODEL.WEIGHTS", weights,
                      "OUTPUT_DIR", out)
    assert message.startswith(f"{weights} does not fit the model of this config "
                              "(SemanticNucleiSegmentor, ")
    assert expected in message and message.endswith("were the weights trained with this config?")
    if case == "other widths":
        assert " of another shape (e.g. " in message and "0 of another shape" not in message
    assert not (out / "inference" / "nuclei_synth_val").exists()  # no numbers were made


def test_eval_only_refuses_the_other_necks_mask_rcnn_weights(tmp_path):
    weights = _weights_of(SHARP, tmp_path)
    message = refused("--config-file", FPN, "--eval-only", "MODEL.WEIGHTS", weights,
                      "OUTPUT_DIR", tmp_path / "eval")
    assert "does not fit the model of this config (GeneralizedRCNN, build_resnet_fpn_backbone)" \
        in message
    assert "0 unexpected" not in message  # the UNet# neck's own nodes


def test_a_mask_rcnn_checkpoint_fits_its_own_model_exactly(tmp_path):
    weights = _weights_of(FPN, tmp_path)
    model = Trainer.build_model(get_config(str(FPN)))
    AtomicCheckpointer(model).resume_or_load(str(weights), resume=False, strict=True)


def test_eval_only_with_the_runs_own_weights_reports_numbers(run_dir):
    config_before = (run_dir / "config.yaml").read_bytes()
    assert train_net("--config-file", UNET, "--eval-only", *TINY, *VAL, "MODEL.WEIGHTS",
                     run_dir / "model_final.pth", "OUTPUT_DIR", run_dir) == 0
    assert (run_dir / "inference" / "nuclei_synth_val").is_dir()
    # The evaluation's config goes beside its results, not over the trained model's.
    assert (run_dir / "config.yaml").read_bytes() == config_before
    assert "nuclei_synth_val" in (run_dir / "inference" / "config.yaml").read_text()
    # --resume: OUTPUT_DIR's last checkpoint, no MODEL.WEIGHTS needed.
    assert train_net("--config-file", UNET, "--eval-only", "--resume", *TINY, *VAL,
                     "OUTPUT_DIR", run_dir) == 0


# --- checkpoints: fall back to the newest readable one ---------------------------------------

def _resumed(run_dir: Path, *opts) -> Trainer:
    cfg = get_config(str(UNET), TINY + ["OUTPUT_DIR", str(run_dir), *opts])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    return trainer


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_one(run_dir):
    final = run_dir / "model_final.pth"
    final.write_bytes(final.read_bytes()[:1000])  # truncated
    with logged("sharp_fpn.d2.checkpoint") as messages:
        trainer = _resumed(run_dir)
    assert trainer.start_iter == 2  # model_0000001.pth holds iteration 1
    assert len(messages) == 1
    assert messages[0].startswith(f"{final}: not a readable checkpoint (")
    assert f"resumed from {run_dir / 'model_0000001.pth'}, the newest readable checkpoint" \
        in messages[0]


def test_last_checkpoint_naming_a_deleted_file_falls_back(run_dir):
    (run_dir / "model_final.pth").unlink()
    with logged("sharp_fpn.d2.checkpoint") as messages:
        trainer = _resumed(run_dir)
    assert trainer.start_iter == 2
    assert messages == [
        f"{run_dir / 'last_checkpoint'} names model_final.pth, which does not exist; resumed "
        f"from {run_dir / 'model_0000001.pth'}, the newest readable checkpoint"
    ]


def test_checkpoints_without_last_checkpoint_resume_from_the_newest(run_dir):
    (run_dir / "last_checkpoint").unlink()
    with logged("sharp_fpn.d2.checkpoint") as messages:
        trainer = _resumed(run_dir)
    assert trainer.start_iter == 2 and messages == []  # model_final.pth, iteration 1


def test_no_readable_checkpoint_is_one_line(run_dir):
    for path in run_dir.glob("model_*.pth"):
        path.write_bytes(b"")
    message = refused("--config-file", UNET, "--resume", *TINY, "OUTPUT_DIR", run_dir)
    assert message.startswith(f"{run_dir}: no checkpoint to resume from can be read (")
    assert f"{run_dir / 'model_0000000.pth'}: not a readable checkpoint (EOFError" in message
    assert not (run_dir / LOCK_NAME).exists()  # released by the failed run


def test_resuming_with_another_config_is_refused(run_dir):
    with pytest.raises(WeightsMismatch, match=r"model_final\.pth does not fit the model"):
        _resumed(run_dir, "MODEL.UNET.WIDTH_MULT", "0.25")


@pytest.mark.parametrize("case", ["missing", "empty", "not a checkpoint"])
def test_model_weights_that_cannot_be_read_are_one_line(case, tmp_path):
    weights = tmp_path / "weights.pth"
    if case == "empty":
        weights.write_bytes(b"")
    elif case == "not a checkpoint":
        weights.write_text("this is a README, not weights\n")
    out = tmp_path / "run"
    message = refused("--config-file", UNET, *TINY, "MODEL.WEIGHTS", weights, "OUTPUT_DIR",
                      out)
    if case == "missing":
        assert message == f"MODEL.WEIGHTS: {weights}: no such file"
    else:
        assert message.startswith(f"MODEL.WEIGHTS: {weights}: not a readable checkpoint (")
    assert not (out / LOCK_NAME).exists()


def test_weights_of_which_nothing_fits_are_refused_and_a_part_is_enough(tmp_path):
    torch.save({"model": {"fc.weight": torch.zeros(10, 4)}}, tmp_path / "other.pth")
    message = refused("--config-file", UNET, *TINY, "MODEL.WEIGHTS", tmp_path / "other.pth",
                      "OUTPUT_DIR", tmp_path / "a")
    assert message.startswith(f"{tmp_path / 'other.pth'}: none of its 1 tensors fits a "
                              "parameter of this model (SemanticNucleiSegmentor, ")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    message = refused("--config-file", UNET, *TINY, "MODEL.WEIGHTS", tmp_path / "list.pth",
                      "OUTPUT_DIR", tmp_path / "b")
    assert message == (f"MODEL.WEIGHTS: {tmp_path / 'list.pth'}: not a checkpoint (it holds no "
                       "model parameters)")
    # Starting from a part of a model (an encoder, say) is what MODEL.WEIGHTS is for.
    full = Trainer.build_model(get_config(str(UNET), TINY)).state_dict()
    encoder = {k: v for k, v in full.items() if ".encoder." in k}
    assert 0 < len(encoder) < len(full)
    torch.save({"model": encoder}, tmp_path / "encoder.pth")
    assert train_net("--config-file", UNET, *TINY, "MODEL.WEIGHTS", tmp_path / "encoder.pth",
                     "OUTPUT_DIR", tmp_path / "c", "SOLVER.MAX_ITER", "1") == 0


def test_strict_loading_of_nothing_is_refused():
    model = Trainer.build_model(get_config(str(UNET), TINY))
    with pytest.raises(UnreadableCheckpoint, match="MODEL.WEIGHTS is empty"):
        AtomicCheckpointer(model).resume_or_load("", resume=False, strict=True)


# --- failures in one line --------------------------------------------------------------------

@pytest.mark.parametrize("key", ["DATASETS.TRAIN", "DATASETS.TEST"])
def test_an_unknown_dataset_is_one_line_naming_the_registered_ones(key, tmp_path):
    message = refused("--config-file", UNET, *TINY, key, "('nuclei_synth_trian',)",
                      "OUTPUT_DIR", tmp_path / "run")
    assert message.startswith(f"{key}: no dataset named 'nuclei_synth_trian' is registered; "
                              "did you mean 'nuclei_synth_train'? sharp-fpn registers ")
    assert "nuclei_synth_val" in message and "datasets/README.md" in message
    assert "coco_2017" not in message
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_empty_training_set_is_one_line(tmp_path):
    message = refused("--config-file", UNET, *TINY, "DATASETS.TRAIN", "()",
                      "OUTPUT_DIR", tmp_path / "run")
    assert message.startswith("DATASETS.TRAIN is empty")


def test_a_batch_that_does_not_divide_is_refused_before_any_process_starts(tmp_path):
    start = time.monotonic()
    message = refused("--config-file", UNET, "--num-gpus", "2", *TINY, "SOLVER.IMS_PER_BATCH", "3",
                      "OUTPUT_DIR", tmp_path / "run")
    assert message == ("SOLVER.IMS_PER_BATCH=3 does not divide by the 2 processes "
                       "(--num-gpus x --num-machines); give a multiple of 2")
    assert time.monotonic() - start < 5 and not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="no dataset named"):
        train_net("--config-file", UNET, "--debug", *TINY, "DATASETS.TRAIN", "('nope',)",
                  "OUTPUT_DIR", tmp_path / "run")


@pytest.mark.parametrize("case", ["missing", "folder", "not yaml", "a list", "missing base",
                                  "wrong type"])
def test_config_files_that_cannot_be_read_name_the_file(case, tmp_path):
    config = tmp_path / "config.yaml"
    expected = {
        "missing": f"{config}: no such config file",
        "folder": f"{tmp_path}: a folder, not a config file",
        "not yaml": f"{config}: not valid YAML (",
        "a list": f"{config}: not a config (expected YAML 'KEY: value' lines)",
        "missing base": f"{config}: its _BASE_ {tmp_path / 'Base.yaml'}: No such file or directory",
        "wrong type": f"{config}: Type mismatch",
    }[case]
    if case == "folder":
        config = tmp_path
    elif case == "not yaml":
        config.write_text("MODEL: [1\n")
    elif case == "a list":
        config.write_text("- 1\n- 2\n")
    elif case == "missing base":
        config.write_text('_BASE_: "Base.yaml"\n')
    elif case == "wrong type":
        config.write_text("SOLVER:\n  MAX_ITER: many\n")
    with pytest.raises(ConfigError) as error:
        get_config(str(config))
    assert str(error.value).startswith(expected)
    message = refused("--config-file", config, "OUTPUT_DIR", tmp_path / "run")
    assert message.startswith(expected)


# --- images: training reads them as predict does ----------------------------------------------

def _16bit_images(folder: Path) -> list:
    """16-bit images as microscopes write them: a 12-bit range, far above 255, with nuclei."""
    rng = np.random.default_rng(7)
    gray = rng.normal(400, 30, (48, 64)).clip(0, 4095)
    gray[10:20, 12:26] += 2500
    gray = gray.astype(np.uint16)
    rgb = np.stack([gray, gray // 2, (gray * 0.8).astype(np.uint16)], axis=2)
    paths = [folder / "gray16.png", folder / "gray16.tif", folder / "rgb16.tif"]
    cv2.imwrite(str(paths[0]), gray)
    tifffile.imwrite(paths[1], gray)
    tifffile.imwrite(paths[2], rgb, photometric="rgb")
    return paths


def _8bit_images(folder: Path) -> list:
    rng = np.random.default_rng(8)
    rgb = cv2.GaussianBlur((rng.random((48, 64, 3)) * 255).astype(np.uint8), (5, 5), 2)
    rgba = np.concatenate([rgb, np.full((48, 64, 1), 255, np.uint8)], axis=2)
    paths = {"rgba.png": rgba, "rgb.png": rgb, "gray.png": rgb[:, :, 0], "rgb.jpg": rgb}
    for name, pixels in paths.items():
        Image.fromarray(pixels).save(folder / name)
    return [folder / name for name in paths]


def _record(path: Path) -> dict:
    h, w = load_image(path).shape
    square = [[4.0, 4.0, 20.0, 4.0, 20.0, 16.0, 4.0, 16.0]]
    return {"file_name": str(path), "height": h, "width": w, "image_id": 1,
            "annotations": [{"bbox": [4.0, 4.0, 16.0, 12.0], "bbox_mode": 1, "category_id": 0,
                             "segmentation": square, "iscrowd": 0}]}


def _unaugmented_mapper(cls, image_format: str):
    return cls(is_train=True, augmentations=[], image_format=image_format,
               use_instance_mask=True)


def _semantic_mapper(image_format: str) -> SemanticNucleiMapper:
    return SemanticNucleiMapper(True, augmentations=[], image_format=image_format)


def _as_rgb(tensor: torch.Tensor, image_format: str) -> np.ndarray:
    image = tensor.numpy().transpose(1, 2, 0)
    return image[:, :, ::-1] if image_format == "BGR" else image


def test_a_16bit_image_trains_as_predict_sees_it(tmp_path):
    for path in _16bit_images(tmp_path):
        seen_by_predict = load_image(path).rgb
        assert seen_by_predict.min() == 0 and seen_by_predict.max() == 255  # stretched
        for image_format in ("BGR", "RGB"):
            mask_rcnn = _unaugmented_mapper(NucleiDatasetMapper, image_format)(_record(path))
            assert np.array_equal(_as_rgb(mask_rcnn["image"], image_format), seen_by_predict), path
            assert len(mask_rcnn["instances"]) == 1
            semantic = _semantic_mapper(image_format)(_record(path))
            assert np.array_equal(_as_rgb(semantic["image"], image_format), seen_by_predict), path
    # detectron2's own reader, which training used before, clips the 16-bit PNG to white.
    clipped = d2_utils.read_image(str(tmp_path / "gray16.png"), format="BGR")
    assert (clipped == 255).mean() > 0.99


def test_an_8bit_image_trains_as_before(tmp_path):
    for path in _8bit_images(tmp_path):
        for image_format in ("BGR", "RGB"):
            before = d2_utils.read_image(str(path), format=image_format)
            assert np.array_equal(read_image(str(path), image_format), before), path
            ours = _unaugmented_mapper(NucleiDatasetMapper, image_format)(_record(path))
            theirs = _unaugmented_mapper(DatasetMapper, image_format)(_record(path))
            assert torch.equal(ours["image"], theirs["image"]), path
            assert torch.equal(ours["instances"].gt_boxes.tensor,
                               theirs["instances"].gt_boxes.tensor)
            semantic = _semantic_mapper(image_format)(_record(path))
            assert np.array_equal(semantic["image"].numpy().transpose(1, 2, 0), before), path


def test_the_mask_rcnn_mapper_keeps_detectron2s_augmentations():
    cfg = get_config(str(FPN))
    ours, theirs = NucleiDatasetMapper(cfg, True), DatasetMapper(cfg, True)
    assert repr(ours.augmentations) == repr(theirs.augmentations)
    assert ours.use_instance_mask and ours.instance_mask_format == theirs.instance_mask_format
    record = DatasetCatalog.get("nuclei_synth_train")[0]
    np.random.seed(3)
    a = ours(record)
    np.random.seed(3)
    b = theirs(record)
    assert torch.equal(a["image"], b["image"])
    assert torch.equal(a["instances"].gt_masks.tensor, b["instances"].gt_masks.tensor)


def test_a_format_the_readers_do_not_support_is_refused():
    with pytest.raises(ValueError, match="INPUT.FORMAT: sharp-fpn reads images as BGR or RGB"):
        NucleiDatasetMapper(is_train=True, augmentations=[], image_format="YUV-BT.601")
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        SemanticNucleiMapper(True, augmentations=[], image_format="L")


# --- run_folder: the demo replaces its own runs, and nothing else ----------------------------

def _a_run(folder: Path, tool: str = None) -> None:
    """Run files as a training run leaves them; put on record as ``tool``'s (None: nobody's)."""
    folder.mkdir(parents=True, exist_ok=True)
    if tool:
        OutputDir(folder, tool).claim_all(["config.yaml", "last_checkpoint", "model_final.pth"])
    for name in ("model_0000099.pth", "model_final.pth", "metrics.json"):
        (folder / name).write_bytes(b"old")
    (folder / "last_checkpoint").write_text("model_final.pth")


def test_the_demo_replaces_its_own_earlier_run(tmp_path):
    _a_run(tmp_path, "demo")
    with logged("sharp_fpn.d2.run_folder") as messages:
        with run_folder(tmp_path, tool="demo", replace_own=True) as out:
            assert out.owns("model_final.pth")
            assert not any((tmp_path / n).exists() for n in
                           ("model_0000099.pth", "model_final.pth", "last_checkpoint",
                            "metrics.json"))
            assert (tmp_path / LOCK_NAME).is_file()
    assert "replacing demo's own earlier run: starting anew" in messages[0]
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("tool, made_by", [("train", "written by train"),
                                           (None, "not written by sharp-fpn")])
def test_the_demo_refuses_a_run_it_did_not_make(tool, made_by, tmp_path):
    _a_run(tmp_path, tool)
    with pytest.raises(OutputConflict, match=made_by + r".*pass --overwrite"):
        with run_folder(tmp_path, tool="demo", replace_own=True):
            pass
    assert (tmp_path / "model_final.pth").read_bytes() == b"old"
    with run_folder(tmp_path, tool="demo", replace_own=True, overwrite=True):
        assert not (tmp_path / "model_final.pth").exists()


def test_a_user_config_yaml_given_as_the_config_file_is_never_replaced(tmp_path):
    (tmp_path / "config.yaml").write_text("_BASE_: x.yaml\n")
    for overwrite in (False, True):
        with pytest.raises(OutputConflict, match="config.yaml: is one of the inputs"):
            with run_folder(tmp_path, overwrite=overwrite, config_file=tmp_path / "config.yaml"):
                pass
    assert (tmp_path / "config.yaml").read_text() == "_BASE_: x.yaml\n"


def test_an_evaluation_may_use_a_finished_runs_folder(tmp_path):
    _a_run(tmp_path, "train")
    with run_folder(tmp_path, eval_only=True) as out:
        assert out.owns("inference/config.yaml")
    assert (tmp_path / "model_final.pth").read_bytes() == b"old"
    assert json.loads((tmp_path / RECORD_NAME).read_text())["train"][-1] == "inference/config.yaml"


def test_a_failing_run_releases_the_lock(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with run_folder(tmp_path):
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()
