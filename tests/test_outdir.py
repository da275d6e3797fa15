"""OutputDir: a tool replaces only what it wrote itself; inputs and users' files are safe."""
import json
import os
import subprocess
import sys

import pytest

from sharp_fpn.outdir import (
    LOCK_NAME,
    RECORD_NAME,
    OutputConflict,
    OutputDir,
    is_recorded_output,
    recorded_outputs,
)


def _write(out: OutputDir, name: str, text: str) -> None:
    with out.open(name) as f:
        f.write(text)


def test_a_rerun_of_the_same_tool_replaces_its_own_outputs(tmp_path):
    _write(OutputDir(tmp_path, "predict"), "a_labels.tif", "first")
    _write(OutputDir(tmp_path, "predict"), "a_labels.tif", "second")
    assert (tmp_path / "a_labels.tif").read_text() == "second"
    assert recorded_outputs(tmp_path) == {"a_labels.tif"}
    assert json.loads((tmp_path / RECORD_NAME).read_text()) == {"predict": ["a_labels.tif"]}


def test_a_users_file_is_refused_by_name_and_kept(tmp_path):
    (tmp_path / "a_labels.tif").write_text("ground truth")
    with pytest.raises(OutputConflict, match=r"a_labels\.tif: exists \(not written by sharp-fpn\)"):
        _write(OutputDir(tmp_path, "predict"), "a_labels.tif", "prediction")
    assert (tmp_path / "a_labels.tif").read_text() == "ground truth"
    assert "a_labels.tif" not in recorded_outputs(tmp_path)


def test_overwrite_replaces_a_users_file(tmp_path):
    (tmp_path / "a.csv").write_text("old")
    _write(OutputDir(tmp_path, "predict", overwrite=True), "a.csv", "new")
    assert (tmp_path / "a.csv").read_text() == "new"


def test_another_tools_output_is_refused_naming_the_tool(tmp_path):
    _write(OutputDir(tmp_path, "convert_dsb2018"), "train.json", "{}")
    with pytest.raises(OutputConflict, match="written by convert_dsb2018"):
        OutputDir(tmp_path, "predict").claim("train.json")


def test_an_input_is_never_an_output_even_with_overwrite(tmp_path):
    source = tmp_path / "labels.csv"
    source.write_text("ImageId,EncodedPixels\n")
    out = OutputDir(tmp_path, "convert_dsb2018", overwrite=True, inputs=[source])
    with pytest.raises(OutputConflict, match="labels.csv: is one of the inputs"):
        out.claim("labels.csv")
    assert source.read_text() == "ImageId,EncodedPixels\n"


def test_claim_all_claims_nothing_when_one_name_conflicts(tmp_path):
    (tmp_path / "b.txt").write_text("mine")
    out = OutputDir(tmp_path, "predict")
    with pytest.raises(OutputConflict, match="b.txt"):
        out.claim_all(["a.txt", "b.txt"])
    assert recorded_outputs(tmp_path) == set()


def test_a_file_as_output_folder_is_refused(tmp_path):
    path = tmp_path / "out"
    path.write_text("x")
    with pytest.raises(OutputConflict, match="out: is a file, not a folder"):
        OutputDir(path, "predict")


def test_an_unreadable_record_is_refused_not_replaced(tmp_path):
    (tmp_path / RECORD_NAME).write_text("{not json")
    with pytest.raises(OutputConflict, match="unreadable record"):
        OutputDir(tmp_path, "predict")
    assert (tmp_path / RECORD_NAME).read_text() == "{not json"


def test_recorded_outputs_are_recognised_as_outputs(tmp_path):
    (tmp_path / "cells.png").write_text("image")
    _write(OutputDir(tmp_path, "predict"), "cells_overlay.png", "overlay")
    assert is_recorded_output(tmp_path / "cells_overlay.png")
    assert is_recorded_output(tmp_path / RECORD_NAME)
    assert not is_recorded_output(tmp_path / "cells.png")


def test_lock_refuses_a_second_run_and_is_released(tmp_path):
    first, second = OutputDir(tmp_path, "train"), OutputDir(tmp_path, "train")
    with first.lock():
        with pytest.raises(OutputConflict, match=rf"in use by train \(pid {os.getpid()}"):
            with second.lock():
                pass
    assert not (tmp_path / LOCK_NAME).exists()
    with second.lock():  # free again
        assert (tmp_path / LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    import socket

    (tmp_path / LOCK_NAME).write_text(
        json.dumps({"pid": pid, "host": socket.gethostname(), "tool": "train"})
    )
    with OutputDir(tmp_path, "train").lock():
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()


def test_recorded_outputs_of_one_tool(tmp_path):
    _write(OutputDir(tmp_path, "predict"), "a_overlay.png", "overlay")
    _write(OutputDir(tmp_path, "make_synthetic_nuclei"), "labels.csv", "csv")
    assert recorded_outputs(tmp_path, "predict") == {"a_overlay.png"}
    assert recorded_outputs(tmp_path) == {"a_overlay.png", "labels.csv"}
    assert recorded_outputs(tmp_path, "train") == set()


def test_a_zarr_folder_the_tool_wrote_may_be_replaced_any_other_folder_is_in_the_way(tmp_path):
    out = OutputDir(tmp_path, "predict")
    zarr_path = out.claim("big_labels.ome.zarr")  # recorded as predict's before it is written
    zarr_path.mkdir()
    (zarr_path / "zarr.json").write_text("{}")
    assert OutputDir(tmp_path, "predict").check("big_labels.ome.zarr") == zarr_path
    (tmp_path / "users.ome.zarr").mkdir()  # a user's Zarr: refused unless --overwrite
    with pytest.raises(OutputConflict, match=r"users\.ome\.zarr: a folder is in the way"):
        OutputDir(tmp_path, "predict").check("users.ome.zarr")
    assert OutputDir(tmp_path, "predict", overwrite=True).check("users.ome.zarr")
    (tmp_path / "a_labels.tif").mkdir()  # a folder where a file goes: always in the way
    with pytest.raises(OutputConflict, match=r"a_labels\.tif: a folder is in the way"):
        OutputDir(tmp_path, "predict", overwrite=True).check("a_labels.tif")
