"""Training on two "machines" of this host: tools/train_net.py started as separate OS
processes, over gloo on the CPU, by detectron2's --num-machines / --machine-rank / --dist-url
and by torchrun; and the launch errors, each one line naming what is wrong."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sharp_fpn.cli import run
from sharp_fpn.d2 import distributed
from sharp_fpn.d2.engine import Trainer, get_config

ROOT = Path(__file__).resolve().parent.parent
TRAIN_NET = ROOT / "tools" / "train_net.py"
DEMO = ROOT / "configs" / "demo" / "mask_rcnn_fpn_R18.yaml"
TORCHRUN = Path(sys.executable).with_name("torchrun")
ITERATIONS, BATCH = 3, 4
# A narrow ResNet-18 Mask R-CNN on 64 px images: a step takes well under a second.
TINY = [
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.RANDOM_FLIP", "none",
    "MODEL.RESNETS.STAGE_WIDTHS", "[16, 32, 64, 128]", "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
    "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()",
    "DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "1000", "SEED", "0",
    "SOLVER.MAX_ITER", str(ITERATIONS), "SOLVER.IMS_PER_BATCH", str(BATCH),
]
WAIT_S = 240  # a hung rendezvous fails the test after this, every process killed


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """A datasets root whose nuclei_synth set is 10 synthetic 64 x 64 images (the project's
    own writer; converted and split on first use by the training processes)."""
    from sharp_fpn.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("datasets")
    write_dataset(root / "nuclei_synth", 10, 3, sizes=((64, 64),), workers=1, progress=False)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(datasets: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in distributed.TORCHRUN_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", "DETECTRON2_DATASETS": str(datasets),
            "PYTHONPATH": str(ROOT)}


def _run_together(commands, env, logs: Path):
    """Start every command as its own OS process (its own session), wait for all; past
    WAIT_S, kill every process of every one and fail. Returns their exit codes."""
    logs.mkdir()
    procs = []
    try:
        for k, cmd in enumerate(commands):
            out = open(logs / f"{k}.log", "wb")
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            out.close()
        deadline = time.monotonic() + WAIT_S
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running after {WAIT_S} s: {proc.args}\n" + _tails(logs))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    codes = [p.returncode for p in procs]
    assert codes == [0] * len(procs), _tails(logs)
    return codes


def _tails(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-2500:]
                     for p in sorted(logs.glob("*.log")))


def _check_run_folder(out: Path, world: int, machines: int) -> None:
    """The folder holds one run, written by rank 0 alone; every rank's replica is equal to the
    checkpoint; each step's batch was split evenly among the ranks."""
    logs = {f"log.txt.rank{r}" for r in range(1, world)}
    assert {p.name for p in out.iterdir()} - {p.name for p in out.glob("events.out.tfevents.*")} \
        == {"config.yaml", "model_final.pth", "last_checkpoint", "metrics.json", "log.txt",
            "distributed.json", ".sharp-fpn-outputs.json", *logs}
    assert len(list(out.glob("events.out.tfevents.*"))) == 1  # one writer: rank 0
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    record = json.loads((out / ".sharp-fpn-outputs.json").read_text())
    assert "distributed.json" in record["train"]
    for r in range(1, world):
        log = (out / f"log.txt.rank{r}").read_text()
        assert f"Rank of current process: {r}. World size: {world}" in log
        assert "Saving checkpoint" not in log and "Full config saved" not in log
    assert (out / "log.txt").read_text().count("Rank of current process: 0.") == 1
    iterations = [json.loads(line)["iteration"] for line in
                  (out / "metrics.json").read_text().splitlines()]
    assert iterations[-1] == ITERATIONS - 1

    report = json.loads((out / "distributed.json").read_text())
    processes = report["processes"]
    assert report["world_size"] == world and [p["rank"] for p in processes] == list(range(world))
    assert [p["local_rank"] for p in processes] == [r % (world // machines) for r in range(world)]
    # The replicas: every rank's own digest, and that of the checkpoint rank 0 wrote.
    digests = {p["parameters_sha256"] for p in processes}
    assert report["parameters_identical"] and len(digests) == 1
    cfg = get_config(str(DEMO), TINY + ["MODEL.DEVICE", "cpu"])
    names = [name for name, _ in Trainer.build_model(cfg).named_parameters()]
    saved = torch.load(out / "model_final.pth")["model"]
    assert digests == {distributed.parameter_digest((n, saved[n]) for n in names)}
    # Training moved them: the digest of a model at its start is another.
    fresh = Trainer.build_model(cfg)
    assert distributed.parameter_digest(fresh.named_parameters()) not in digests
    # The batch: BATCH images a step, BATCH / world on each rank, different images per rank.
    for p in processes:
        assert p["steps"] == ITERATIONS and p["images_per_step"] == [BATCH // world]
        assert all(len(step) == BATCH // world for step in p["image_ids"])
    sequences = [json.dumps(p["image_ids"]) for p in processes]
    assert len(set(sequences)) == world


def _cmd(*words):
    return [str(w) for w in words]


def test_two_machines_by_detectron2_flags(datasets, tmp_path):
    out, port = tmp_path / "run", _free_port()
    commands = [
        _cmd(sys.executable, TRAIN_NET, "--num-machines", 2, "--machine-rank", m, "--num-gpus",
             1, "--dist-url", f"tcp://127.0.0.1:{port}", "--dist-timeout", 120,
             "--config-file", DEMO, *TINY, "OUTPUT_DIR", out)
        for m in (1, 0)  # machine 1 first: it waits for machine 0
    ]
    _run_together(commands, _env(datasets), tmp_path / "logs")
    _check_run_folder(out, world=2, machines=2)


def test_two_machines_by_torchrun(datasets, tmp_path):
    out, port = tmp_path / "run", _free_port()
    commands = [
        _cmd(TORCHRUN, "--nnodes", 2, "--nproc-per-node", 1, "--node-rank", node,
             "--master-addr", "127.0.0.1", "--master-port", port, TRAIN_NET,
             "--config-file", DEMO, *TINY, "OUTPUT_DIR", out)
        for node in (0, 1)
    ]
    _run_together(commands, _env(datasets), tmp_path / "logs")
    _check_run_folder(out, world=2, machines=2)


# --- errors: one line, naming what is wrong --------------------------------------------------

def _train_net():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_net_cli", TRAIN_NET)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fails(argv, capsys):
    status = run(_train_net().main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 1, err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("flags, message", [
    (["--num-machines", 2, "--machine-rank", 2],
     "--machine-rank 2 with --num-machines 2: machines are numbered 0 to 1"),
    (["--num-machines", 2, "--machine-rank", 1, "--dist-url", "file:///tmp/rendezvous"],
     "--dist-url file:///tmp/rendezvous: with --num-machines 2 the machines meet at machine 0's "
     "tcp://HOST:PORT"),
    (["--num-machines", 2, "--dist-url", "auto"], "--dist-url auto picks a free port on one "
     "machine"),
    (["--num-machines", 2, "--dist-url", "tcp://127.0.0.1"], "--dist-url tcp://127.0.0.1: "
     "expected tcp://HOST:PORT"),
])
def test_a_launch_that_cannot_work_is_refused_before_anything_starts(flags, message, tmp_path,
                                                                     capsys):
    out = tmp_path / "run"
    err = _fails([*flags, "--config-file", DEMO, "OUTPUT_DIR", out], capsys)
    assert f"error: {message}" in err
    assert not out.exists()


def test_launch_flags_beside_torchrun_are_refused_naming_both(monkeypatch, tmp_path, capsys):
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    err = _fails(["--num-gpus", 2, "--dist-url=tcp://127.0.0.1:1234", "--config-file", DEMO,
                  "OUTPUT_DIR", tmp_path], capsys)
    assert ("error: --num-gpus and --dist-url given, and torchrun started this process "
            "(RANK=0, WORLD_SIZE=2)") in err


def test_machine_1_waits_for_machine_0_then_names_the_url(datasets, monkeypatch, tmp_path,
                                                          capsys):
    # OUTPUT_DIR holds a finished run: machine 0 would refuse it; machine 1 neither checks nor
    # locks the folder (nor writes in it before the processes meet): it only waits.
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}}, out / "model_final.pth")
    url = f"tcp://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    err = _fails(["--num-machines", 2, "--machine-rank", 1, "--dist-url", url,
                  "--dist-timeout", 1, "--config-file", DEMO, *TINY, "OUTPUT_DIR", out], capsys)
    assert f"error: --dist-url {url}: machine 0 did not answer there within 1 s" in err
    assert time.monotonic() - start < 30
    assert [p.name for p in out.iterdir()] == ["model_final.pth"]


def test_machine_0_alone_names_the_url_and_how_many_joined(datasets, monkeypatch, tmp_path,
                                                           capsys):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    url = f"tcp://127.0.0.1:{_free_port()}"
    err = _fails(["--num-machines", 2, "--machine-rank", 0, "--dist-url", url,
                  "--dist-timeout", 1, "--config-file", DEMO, *TINY,
                  "OUTPUT_DIR", tmp_path / "run"], capsys)
    assert f"error: --dist-url {url}: 1 of 2 processes joined within 1 s" in err
    assert not (tmp_path / "run" / ".sharp-fpn.lock").exists()  # released


def test_machine_0_cannot_listen_at_an_address_not_its_own(datasets, monkeypatch, tmp_path,
                                                           capsys):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    url = "tcp://192.0.2.1:29500"  # TEST-NET-1 (RFC 5737): no machine's address
    err = _fails(["--num-machines", 2, "--dist-url", url, "--config-file", DEMO, *TINY,
                  "OUTPUT_DIR", tmp_path / "run"], capsys)
    assert (f"error: --dist-url {url}: machine 0 cannot listen there (192.0.2.1 is not an "
            "address of this machine)") in err


def test_torchrun_environment_is_read_whole_or_refused():
    env = dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="10.0.0.1", MASTER_PORT="29500", GROUP_RANK="1")
    assert distributed.torchrun_environment(env) == {
        "rank": 3, "world_size": 4, "local_rank": 1, "local_world_size": 2, "node_rank": 1}
    assert distributed.torchrun_environment({}) is None
    with pytest.raises(distributed.DistributedError,
                       match="torchrun's environment is incomplete: RANK, WORLD_SIZE set but "
                       "not LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT"):
        distributed.torchrun_environment(dict(RANK="0", WORLD_SIZE="2"))
    with pytest.raises(distributed.DistributedError, match="RANK=4, WORLD_SIZE=4"):
        distributed.torchrun_environment({**env, "RANK": "4"})


def test_parameter_digest_sees_one_bit():
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert distributed.parameter_digest(a.named_parameters()) == \
        distributed.parameter_digest(b.named_parameters())
    with torch.no_grad():
        flat = b.weight.view(-1)
        flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf")))
    assert distributed.parameter_digest(a.named_parameters()) != \
        distributed.parameter_digest(b.named_parameters())
