"""DSB2018 run-length encoding: round trips, the shape of encoded runs, malformed strings."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sharp_fpn.data.rle import EMPTY_IMAGE_RUN, RLEError, decode, encode, parse_runs

masks = st.tuples(st.integers(1, 12), st.integers(1, 12)).flatmap(
    lambda shape: arrays(np.bool_, shape)
)


def test_encode_known_mask() -> None:
    # 3x4, column-major numbering 1..12: column 0 is pixels 1-3, column 1 is 4-6, ...
    mask = np.zeros((3, 4), dtype=np.uint8)
    mask[1:, 0] = 255  # pixels 2, 3
    mask[0, 1] = 255  # pixel 4, touching the run above: one run "2 3"
    mask[2, 3] = 1  # pixel 12, the last one
    assert encode(mask) == "2 3 12 1"
    assert decode("2 3 12 1", (3, 4)).tolist() == [
        [False, True, False, False],
        [True, False, False, False],
        [True, False, False, True],
    ]


def test_empty_and_marker() -> None:
    assert encode(np.zeros((4, 5), dtype=bool)) == ""
    assert not decode("", (4, 5)).any()
    marker = decode(EMPTY_IMAGE_RUN, (4, 5))  # "1 1" itself is just the top-left pixel
    assert marker.sum() == 1 and marker[0, 0]


@settings(max_examples=200, deadline=None)
@given(masks)
def test_decode_inverts_encode(mask: np.ndarray) -> None:
    decoded = decode(encode(mask), mask.shape)
    assert decoded.dtype == bool and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)


@settings(max_examples=200, deadline=None)
@given(masks)
def test_encode_writes_sorted_separate_runs(mask: np.ndarray) -> None:
    values = [int(v) for v in encode(mask).split()]
    starts, lengths = values[0::2], values[1::2]
    assert len(starts) == len(lengths)
    assert all(n >= 1 for n in lengths)
    assert all(s >= 1 for s in starts)
    if starts:
        assert starts[-1] + lengths[-1] - 1 <= mask.size
    # strictly increasing, neither overlapping nor touching (touching runs are merged)
    assert all(nxt > s + n for s, n, nxt in zip(starts, lengths, starts[1:]))
    assert sum(lengths) == int(mask.sum())


@pytest.mark.parametrize(
    "rle, message",
    [
        ("1", "odd number of values (1)"),
        ("1 2 5", "odd number of values (3)"),
        ("0 3", "run 1 starts at 0; pixels are numbered from 1"),
        ("-2 3", "run 1 starts at -2"),
        ("3 0", "run 1 (start 3) has length 0"),
        ("1 2 5 -1", "run 2 (start 5) has length -1"),
        ("11 3", "run 1 (11 3) ends at pixel 13, past the image's 12 pixels (3x4)"),
        ("13 1", "past the image's 12 pixels"),
        ("7 2 1 2", "run 2 (1 2) is out of order with run 1 (7 2)"),
        ("1 4 3 2", "run 2 (3 2) is overlapping with run 1 (1 4)"),
        ("1 a", "token 'a' is not an integer"),
        ("1.5 2", "token '1.5' is not an integer"),
        ("--5 1", "token '--5' is not an integer"),
        ("1_0 2", "token '1_0' is not an integer"),
        ("\u00b2 1", "is not an integer"),  # a superscript two: str.isdigit() says yes
        ("\u0663 1", "is not an integer"),  # an Arabic-Indic three: int() takes it
        ("99999999999999999999 1", "run-length value 99999999999999999999 is too large"),
        ("1 9223372036854775807", "too large"),  # would wrap int64 when added to its start
    ],
)
def test_malformed_runs_raise(rle: str, message: str) -> None:
    with pytest.raises(RLEError) as err:
        decode(rle, (3, 4))
    assert message in str(err.value)


def test_touching_runs_are_accepted() -> None:
    starts, lengths = parse_runs("1 2 3 1", (3, 4))
    assert starts.tolist() == [0, 2] and lengths.tolist() == [2, 1]
    assert decode("1 2 3 1", (3, 4)).ravel(order="F").tolist() == [True] * 3 + [False] * 9


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789 -+_.x\u00b2\u0663\t", max_size=24))
def test_any_string_parses_or_raises_rleerror(rle: str) -> None:
    shape = (3, 4)
    try:
        starts, lengths = parse_runs(rle, shape)
    except RLEError:
        return
    assert (starts >= 0).all() and (lengths >= 1).all()
    assert (starts + lengths <= 12).all()
    assert (starts[1:] >= (starts + lengths)[:-1]).all()
    assert decode(rle, shape).sum() == lengths.sum()
