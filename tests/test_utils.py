"""Tests for the framework-free helpers in sharp_fpn.utils (CSV, worker count, warnings)."""
import csv
import os

import pytest

from sharp_fpn.utils import available_cpus, worker_count, write_csv_atomic


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_csv_from_mappings_and_sequences(tmp_path):
    path = tmp_path / "sub" / "table.csv"  # the folder is created
    rows = [{"name": "a,b", "value": 1.5}, ("é \"quoted\"", 2), {"name": "missing value"}]
    write_csv_atomic(path, rows, ["name", "value"])
    assert read_rows(path) == [
        ["name", "value"],
        ["a,b", "1.5"],
        ['é "quoted"', "2"],
        ["missing value", ""],
    ]
    # the project's convention: UTF-8, "\n" line ends, quoting only where needed
    assert path.read_bytes().startswith(b'name,value\n"a,b",1.5\n')
    assert b"\r" not in path.read_bytes()
    assert path.read_bytes().decode("utf-8")


def test_csv_header_only_for_no_rows(tmp_path):
    path = tmp_path / "empty.csv"
    write_csv_atomic(path, iter(()), ("ImageId", "EncodedPixels"))
    assert path.read_text(encoding="utf-8") == "ImageId,EncodedPixels\n"


def test_csv_error_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "table.csv"
    write_csv_atomic(path, [{"a": 1}], ["a"])
    old = path.read_bytes()

    def rows():
        yield {"a": 2}
        yield {"a": 3}
        raise RuntimeError("disk full, say")

    with pytest.raises(RuntimeError, match="disk full"):
        write_csv_atomic(path, rows(), ["a"])
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]  # no temporary left


def test_csv_error_mid_write_leaves_no_file_where_there_was_none(tmp_path):
    path = tmp_path / "new.csv"
    with pytest.raises(ValueError, match=r"row 2 has 1 values for 2 columns"):
        write_csv_atomic(path, [(1, 2), (3,)], ["x", "y"])
    assert list(tmp_path.iterdir()) == []


def test_csv_rejects_keys_that_are_not_columns(tmp_path):
    with pytest.raises(ValueError, match=r"row 1 has keys \['typo'\]"):
        write_csv_atomic(tmp_path / "t.csv", [{"typo": 1}], ["a"])
    assert list(tmp_path.iterdir()) == []


def test_worker_count_default_is_the_cores_this_process_may_use():
    count = worker_count()
    assert count == available_cpus()
    assert 1 <= count <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert count == len(os.sched_getaffinity(0))


def test_worker_count_default_without_affinity(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "cannot tell"
    assert worker_count() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert worker_count() == 6


@pytest.mark.parametrize("requested", [1, 2, 64])
def test_worker_count_takes_a_requested_number_as_it_is(requested):
    assert worker_count(requested) == requested


@pytest.mark.parametrize("requested", [0, -1, 1.5, True])
def test_worker_count_rejects_fewer_than_one_or_a_fraction(requested):
    with pytest.raises(ValueError, match="workers"):
        worker_count(requested)
