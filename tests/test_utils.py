"""Tests for the framework-free helpers in sharp_fpn.utils (CSV, worker count, warnings)."""
import csv
import os
import warnings

import pytest

from sharp_fpn.utils import available_cpus, silence_warnings, worker_count, write_csv_atomic


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


# --- the project's one list of third-party warnings ----------------------------------------

#: A real message of each silenced warning, and the module that emits it.
THIRD_PARTY = [
    ("`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`.",
     FutureWarning, "torch.jit._script"),
    ("torch.meshgrid: in an upcoming release, it will be required to pass the indexing "
     "argument.", UserWarning, "torch.functional"),
    ("The given NumPy array is not writable, and PyTorch does not support non-writable "
     "tensors.", UserWarning, "detectron2.data.detection_utils"),
    ("__array__ implementation doesn't accept a copy keyword, so passing copy=False failed.",
     DeprecationWarning, "pycocotools.mask"),
]


def _emitted(message, category, module):
    """The warnings recorded when ``module`` warns, under the project's filters."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_warnings()
        warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module)
    return caught


@pytest.mark.parametrize("message, category, module", THIRD_PARTY)
def test_known_third_party_warnings_are_silenced(message, category, module):
    assert _emitted(message, category, module) == []


@pytest.mark.parametrize("message, category, module", THIRD_PARTY)
def test_the_same_warning_from_the_project_stays_on(message, category, module):
    caught = _emitted(message, category, "sharp_fpn.models.blocks")
    assert [str(w.message) for w in caught] == [message]


def test_other_warnings_stay_on():
    caught = _emitted("`torch.jit.trace` is deprecated.", FutureWarning, "torch.jit._trace")
    assert len(caught) == 1


def test_silence_warnings_adds_each_filter_once():
    with warnings.catch_warnings():
        silence_warnings()
        count = len(warnings.filters)
        silence_warnings()
        assert len(warnings.filters) == count


PROJECT_WARNINGS_FAIL = "error::Warning:sharp_fpn"


@pytest.mark.filterwarnings(PROJECT_WARNINGS_FAIL)  # what pytest.ini sets, whatever -W says
def test_a_warning_from_the_project_fails_the_tests(pytestconfig):
    assert PROJECT_WARNINGS_FAIL in pytestconfig.getini("filterwarnings")
    with pytest.raises(UserWarning, match="from the project"):
        warnings.warn_explicit("from the project", UserWarning, "x.py", 1, "sharp_fpn.metrics")
    with warnings.catch_warnings(record=True) as caught:  # a third party's is only shown
        warnings.warn_explicit("elsewhere", UserWarning, "y.py", 1, "somebody.else")
    assert [str(w.message) for w in caught] == ["elsewhere"]


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def test_free_heap_memory_is_given_back_to_the_os():
    import numpy as np

    from sharp_fpn.utils import release_free_memory

    if not release_free_memory():
        pytest.skip("no glibc malloc_trim here")
    warm = np.ones(2 ** 20 // 8)
    del warm  # freed from mmap: glibc serves blocks of this size from its heap from now on
    big, small = [], []
    for _ in range(200):  # 200 x 800 kB on the heap, each pinned by a 64 kB block after it
        big.append(np.ones(100_000))
        small.append(np.ones(8192))
    del big  # freed, but between live blocks: glibc keeps it mapped
    before = _resident_mb()
    assert release_free_memory()
    after = _resident_mb()
    assert after < before - 100, (before, after)  # most of the 160 MB freed goes back
    assert len(small) == 200
