"""The timing policy (fake clocks, counting callables) and each benchmark at tiny sizes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sharp_fpn.perf.benchmarks import (
    BENCHMARKS,
    Benchmark,
    benchmark_parser,
    imports,
    run_benchmark,
    run_suite,
)
from sharp_fpn.perf.measure import images_per_second
from sharp_fpn.perf.timing import (
    Timing,
    calls_per_round,
    machine,
    ratio,
    time_interleaved,
    time_one,
)


class FakeClock:
    """A clock that each candidate advances by its own (scripted) duration."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rounds_are_interleaved_after_the_warmup():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    timings = time_interleaved(candidates, rounds=3, warmup=2)
    assert calls == list("ABC") * 2 + list("ABC") * 3
    assert list(timings) == ["A", "B", "C"]
    assert all(len(t.rounds) == 3 for t in timings.values())


def test_best_is_the_fastest_round_and_ratios_use_it():
    clock = FakeClock()
    durations = {"slow": iter([5.0, 3.0, 4.0]), "fast": iter([2.0, 1.0, 1.5])}

    def run(name):
        clock.now += next(durations[name])

    timings = time_interleaved({n: (lambda n=n: run(n)) for n in durations}, rounds=3, warmup=0,
                               clock=clock)
    assert timings["slow"] == Timing(best=3.0, rounds=(5.0, 3.0, 4.0))
    assert timings["fast"].best == 1.0
    assert ratio(timings, "slow", "fast") == 3.0
    assert timings["fast"].per_second(10) == 10.0


def test_number_divides_a_round_into_seconds_per_call():
    clock = FakeClock()

    def tick():
        clock.now += 0.5

    timing = time_one(tick, rounds=2, warmup=1, number=4, clock=clock)
    assert timing.rounds == (0.5, 0.5)
    assert timing.as_dict() == {"best_s": 0.5, "rounds_s": [0.5, 0.5]}


def test_calls_per_round_scales_from_one_call():
    clock = FakeClock()
    calls = []

    def tick():
        calls.append(1)
        clock.now += 0.01

    assert calls_per_round(tick, 0.05, clock=clock) == 5 and len(calls) == 1
    assert calls_per_round(tick, 0.001, clock=clock) == 1  # one call already lasts a round


def test_images_per_second_follows_the_policy():
    import torch

    network = torch.nn.Conv2d(3, 2, 3, padding=1)
    clock = FakeClock()
    calls = []

    def forward_hook(module, inputs, output):
        calls.append(inputs[0].shape)
        clock.now += 0.25  # each batch "takes" 0.25 s

    network.register_forward_hook(forward_hook)
    speed, timing = images_per_second(network, (8, 8), batch=4, seconds=2.5, rounds=5,
                                      clock=clock)
    # one warm-up, one sizing call, then 5 rounds of 2 calls (0.5 s each)
    assert len(calls) == 2 + 5 * 2 and calls[0] == (4, 3, 8, 8)
    assert timing.rounds == (0.25,) * 5 and speed == 16.0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rounds=0"):
        time_interleaved({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="no rounds"):
        Timing.of([])


def test_machine_reports_cores_and_load():
    info = machine()
    assert info["cpu_count"] >= 1 and info["usable_cores"] >= 1
    assert "python" in info


# --------------------------------------------------------------------------------------------
# the registry, and each benchmark at tiny sizes

ROOT = Path(__file__).resolve().parent.parent
RECORD_KEYS = {"benchmark", "finished", "wall_s", "machine", "arguments", "figures"}


def _run(name: str, tmp_path: Path, *argv: str) -> dict:
    args = benchmark_parser(name).parse_args(["--out-dir", str(tmp_path), *argv])
    path = run_benchmark(name, args)
    assert path == tmp_path / f"{name}.json"
    record = json.loads(path.read_text())
    assert set(record) == RECORD_KEYS and record["benchmark"] == name
    assert record["machine"]["usable_cores"] >= 1 and record["wall_s"] >= 0
    return record["figures"]


def test_every_benchmark_is_registered_with_suite_options_that_parse():
    assert {"imports", "convert", "predict", "necks", "export"} <= set(BENCHMARKS)
    for name, benchmark in BENCHMARKS.items():
        args = benchmark_parser(name).parse_args(list(benchmark.suite))
        assert args.out_dir == Path("output/benchmarks")


def test_a_new_benchmark_is_one_entry_and_a_failing_one_does_not_stop_the_suite(
        tmp_path, monkeypatch):
    def add_arguments(parser):
        parser.add_argument("--n", type=int, default=1)

    def fails(args):
        raise RuntimeError("broken on purpose")

    toy = Benchmark("a toy", add_arguments, lambda args: {"n": args.n}, suite=("--n", "3"))
    monkeypatch.setitem(BENCHMARKS, "toy", toy)
    monkeypatch.setitem(BENCHMARKS, "broken", Benchmark("fails", add_arguments, fails))
    lines = []
    written = run_suite(tmp_path, names=["broken", "toy"], echo=lines.append)
    assert written == {"broken": None, "toy": tmp_path / "toy.json"}
    assert json.loads((tmp_path / "toy.json").read_text())["figures"] == {"n": 3}
    assert any("broken on purpose" in line for line in lines)


def test_imports_benchmark(tmp_path):
    figures = _run("imports", tmp_path, "--modules", "sharp_fpn", "sharp_fpn.grid",
                   "--rounds", "2", "--warmup", "0")
    assert figures["interpreter_s"] > 0
    row = figures["modules"]["sharp_fpn"]
    assert len(row["rounds_s"]) == 2 and row["process_s"] == min(row["rounds_s"])
    assert row["process_s"] > 0 and row["import_s"] >= 0
    assert row["loads"] == {"torch": False, "detectron2": False, "cv2": False}
    assert figures["target"]["sharp_fpn_loads"] == [] and figures["target"]["met"] is True


def test_imports_target_is_judged_from_the_rows():
    loads = {"torch": True, "detectron2": False, "cv2": False}
    rows = {"sharp_fpn": {"import_s": 2.4, "over_torch_s": 0.7, "loads": loads},
            "sharp_fpn.models": {"import_s": 2.5, "over_torch_s": 0.2, "loads": loads}}
    verdict = imports.target(rows)
    assert verdict["sharp_fpn_added_to_torch_s"] == 0.7 and verdict["met"] is False
    assert verdict["sharp_fpn_models_added_to_torch_s"] == 0.2
    light = {"sharp_fpn": {"import_s": 0.01, "loads": dict(loads, torch=False, cv2=True)}}
    assert imports.target(light)["sharp_fpn_loads"] == ["cv2"]
    assert imports.target(light)["met"] is False


def test_convert_benchmark(tmp_path):
    figures = _run("convert", tmp_path, "--num-images", "2", "--workers", "1", "2",
                   "--rounds", "2", "--warmup", "0", "--cache", str(tmp_path / "set"))
    assert figures["images"] == 2 and figures["masks"] > 0 and figures["identical_json"]
    for source in ("folders", "csv"):
        for workers in ("1", "2"):
            assert figures["seconds"][source][workers] > 0
            assert figures["seconds"][source][workers] == min(figures["rounds_s"][source][workers])
    assert figures["speedup_2_vs_1_workers"]["csv"] > 0
    assert figures["generation_s"] > 0
    again = _run("convert", tmp_path, "--num-images", "2", "--workers", "1", "--rounds", "1",
                 "--warmup", "0", "--cache", str(tmp_path / "set"))
    assert again["generation_s"] == 0  # the cached set is reused


def test_predict_benchmark(tmp_path):
    figures = _run("predict", tmp_path, "--size", "96", "128", "--tile", "64", "--overlap", "16",
                   "--repeat", "2")
    assert figures["image"] == [96, 128]
    (result,) = figures["results"].values()
    assert result["weights"] == "random"
    assert result["whole_image"]["tiles"] == 1 and result["tiled"]["tiles"] > 1
    for mode in ("whole_image", "tiled"):
        assert result[mode]["megapixels_per_s"] > 0 and len(result[mode]["rounds_s"]) == 2
    assert result["tiled_vs_whole_image_time"] > 0


def test_necks_benchmark(tmp_path):
    figures = _run("necks", tmp_path, "--size", "64", "--backbones", "VGG16", "--necks", "fpn",
                   "sharp", "--repeat", "2", "--detections", "5",
                   "--opts", "MODEL.RPN.POST_NMS_TOPK_TEST", "50")
    rows = figures["rows"]
    assert list(rows) == ["VGG16 fpn", "VGG16 sharp"]
    for row in rows.values():
        assert row["params_total_M"] > row["params_neck_M"] > 0
        assert row["gflops_total"] > row["gflops_neck"] > 0
        assert row["latency_ms"] == min(row["rounds_ms"]) > 0
        assert row["peak_rss_mib"] > 0 and row["detections"] == 5
    assert rows["VGG16 fpn"]["latency_ms_vs_fpn"] == 1.0
    assert rows["VGG16 sharp"]["params_total_M_vs_fpn"] > 0
    table = (tmp_path / "necks.md").read_text()
    assert "| VGG16 sharp |" in table and "fastest of 2 interleaved rounds" in table


def test_export_benchmark(tmp_path):
    pytest.importorskip("onnxruntime")
    figures = _run("export", tmp_path, "--sizes", "32", "--width", "0.125", "--levels", "1",
                   "--rounds", "1")
    (row,) = figures["rows"]
    assert row["level"] == 1 and row["size"] == [32, 32]
    assert all(seconds > 0 for seconds in row["seconds"].values())
    assert all(check["ok"] for check in figures["exports"])


def test_command_line_lists_every_benchmark_and_takes_the_folder_on_either_side(tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "benchmark.py")]
    done = subprocess.run(tool + ["--help"], capture_output=True, text=True, timeout=60,
                          check=True)
    assert all(name in done.stdout for name in list(BENCHMARKS) + ["all"])
    quick = ["imports", "--modules", "sharp_fpn", "--rounds", "1", "--warmup", "0"]
    for argv, folder in (([*quick, "--out-dir", str(tmp_path / "a")], "a"),
                         (["--out-dir", str(tmp_path / "b"), *quick], "b")):
        subprocess.run(tool + argv, capture_output=True, text=True, timeout=60, check=True)
        record = json.loads((tmp_path / folder / "imports.json").read_text())
        assert record["arguments"]["out_dir"] == str(tmp_path / folder)
