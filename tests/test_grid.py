"""The connectivity listing of sharp_fpn.grid against SPEC section 1 (pure Python, no torch)."""
import ast
import runpy
import sys
from pathlib import Path

import pytest

from sharp_fpn import grid as grid_module
from sharp_fpn.grid import (
    DECODER_UP,
    DEFAULT_DEEP_SUPERVISION,
    DENSE,
    ENCODER_DOWN,
    FULL_SCALE,
    NESTED_SCHEMES,
    POOL,
    SCHEME_FACTS,
    SCHEME_NAMES,
    SCHEMES,
    UP,
    Input,
    build_grid,
    key_position,
    node_key,
)

ROOT = Path(__file__).resolve().parents[1]
DEPTHS = range(1, 7)


def inputs(scheme, depth, position):
    """Inputs of a node as (source, scale, role) triples."""
    return [(x.source, x.scale, x.role) for x in build_grid(scheme, depth)[position].inputs]


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_nodes_that_exist(scheme, depth):
    grid = build_grid(scheme, depth)
    column0 = {(i, 0) for i in range(depth + 1)}
    if scheme in ("unet", "3plus"):
        expected = column0 | {(depth - j, j) for j in range(1, depth + 1)}
        assert len(grid) == (depth + 1) + depth
    else:
        expected = {(i, j) for i in range(depth + 1) for j in range(depth + 1) if i + j <= depth}
        assert len(grid) == (depth + 1) * (depth + 2) // 2
    assert set(grid.positions) == expected
    assert len(set(grid.positions)) == len(grid)
    assert grid.decoder_outputs == tuple((depth - j, j) for j in range(depth + 1))


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_topological_order_and_scales(scheme, depth):
    grid = build_grid(scheme, depth)
    seen = set()
    for node in grid:
        for x in node.inputs:
            assert x.source in seen, f"{x.source} must come before {node.position}"
            assert x.scale == x.source[0] - node.level
        seen.add(node.position)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_encoder_column(scheme):
    grid = build_grid(scheme, 4)
    assert grid[(0, 0)].inputs == ()
    for i in range(1, 5):
        assert inputs(scheme, 4, (i, 0)) == [((i - 1, 0), -1, POOL)]


@pytest.mark.parametrize("depth", DEPTHS)
def test_unet_inputs(depth):
    for j in range(1, depth + 1):
        i = depth - j
        assert inputs("unet", depth, (i, j)) == [((i, 0), 0, DENSE), ((i + 1, j - 1), 1, UP)]


@pytest.mark.parametrize("depth", DEPTHS)
def test_unet2plus_inputs(depth):
    grid = build_grid("2plus", depth)
    for node in grid:
        I, J = node.position
        if J:
            expected = [((I, j), 0, DENSE) for j in range(J)] + [((I + 1, J - 1), 1, UP)]
            assert inputs("2plus", depth, (I, J)) == expected


@pytest.mark.parametrize("depth", DEPTHS)
def test_sharp_inputs_follow_eq1(depth):
    grid = build_grid("sharp", depth)
    for node in grid:
        I, J = node.position
        if J == 0:
            continue
        full_scale = [((i, I + J - i), i - I, FULL_SCALE) for i in range(I + J, I + 1, -1)]
        expected = [((I, j), 0, DENSE) for j in range(J)] + full_scale + [((I + 1, J - 1), 1, UP)]
        assert inputs("sharp", depth, (I, J)) == expected
        assert len(node.inputs) == J + 1 + max(J - 1, 0)
        assert not node.project_inputs


def test_sharp_paper_examples():
    assert inputs("sharp", 4, (0, 2)) == [
        ((0, 0), 0, DENSE),
        ((0, 1), 0, DENSE),
        ((2, 0), 2, FULL_SCALE),
        ((1, 1), 1, UP),
    ]
    assert inputs("sharp", 4, (0, 4)) == [
        ((0, 0), 0, DENSE),
        ((0, 1), 0, DENSE),
        ((0, 2), 0, DENSE),
        ((0, 3), 0, DENSE),
        ((4, 0), 4, FULL_SCALE),
        ((3, 1), 3, FULL_SCALE),
        ((2, 2), 2, FULL_SCALE),
        ((1, 3), 1, UP),
    ]
    assert inputs("sharp", 4, (0, 1)) == [((0, 0), 0, DENSE), ((1, 0), 1, UP)]
    # the six source nodes of full-scale terms at L = 4 (one shared conv each in F = conv)
    sources = {x.source for n in build_grid("sharp", 4) for x in n.inputs if x.role == FULL_SCALE}
    assert sources == {(2, 0), (3, 0), (2, 1), (4, 0), (3, 1), (2, 2)}


def test_unet3plus_inputs():
    assert inputs("3plus", 4, (1, 3)) == [
        ((0, 0), -1, ENCODER_DOWN),
        ((1, 0), 0, DENSE),
        ((2, 2), 1, DECODER_UP),
        ((3, 1), 2, DECODER_UP),
        ((4, 0), 3, DECODER_UP),
    ]
    assert inputs("3plus", 4, (3, 1)) == [
        ((0, 0), -3, ENCODER_DOWN),
        ((1, 0), -2, ENCODER_DOWN),
        ((2, 0), -1, ENCODER_DOWN),
        ((3, 0), 0, DENSE),
        ((4, 0), 1, DECODER_UP),
    ]
    for node in build_grid("3plus", 4):
        if node.column:
            assert node.project_inputs and len(node.inputs) == 5


@pytest.mark.parametrize("scheme", ["2plus", "sharp"])
def test_pruned_nested(scheme):
    full = build_grid(scheme, 4)
    for k in range(1, 5):
        pruned = full.pruned(k)
        assert set(pruned.positions) == {p for p in full.positions if sum(p) <= k}
        assert pruned == build_grid(scheme, k)
    assert full.needed([(1, 1)]) == ((0, 0), (1, 0), (2, 0), (1, 1))


@pytest.mark.parametrize("scheme", ["unet", "3plus"])
def test_pruned_flat_schemes(scheme):
    full = build_grid(scheme, 4)
    assert full.pruned(4) == full
    with pytest.raises(ValueError, match="X\\[0\\]\\[2\\] is not a node"):
        full.pruned(2)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="unknown scheme"):
        build_grid("unet4plus", 4)
    with pytest.raises(ValueError, match="depth must be"):
        build_grid("sharp", 0)
    with pytest.raises(KeyError, match="X\\[1\\]\\[1\\] is not a node"):
        build_grid("unet", 4)[(1, 1)]


def test_describe():
    assert str(Input((4, 0), 4, FULL_SCALE)) == "F(u^4 X[4][0])"
    assert str(Input((1, 3), 1, UP)) == "u(X[1][3])"
    assert str(Input((0, 0), -2, ENCODER_DOWN)) == "p^2 X[0][0]"
    assert build_grid("3plus", 4)[(0, 4)].describe() == (
        "X[0][4] = f(cat[f(X[0][0]), f(u(X[1][3])), f(u^2 X[2][2]), "
        "f(u^3 X[3][1]), f(u^4 X[4][0])])"
    )


SHARP_X02 = "X[0][2] = f2(cat[X[0][0], X[0][1], F(u^2 X[2][0]), u(X[1][1])])"
SHARP_X04 = (
    "X[0][4] = f2(cat[X[0][0], X[0][1], X[0][2], X[0][3], "
    "F(u^4 X[4][0]), F(u^3 X[3][1]), F(u^2 X[2][2]), u(X[1][3])])"
)


def test_cli_main(capsys):
    grid_module.main(["sharp", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("UNet# (sharp), depth L = 4: 15 nodes")
    assert len(lines) == 1 + 15
    assert SHARP_X02 in lines and SHARP_X04 in lines
    assert lines[1] == "X[0][0] = f2(image)" and lines[-1] == SHARP_X04

    grid_module.main(["sharp", "4", "--level", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 6 and lines[-1] == SHARP_X02


def test_cli_as_main(capsys, monkeypatch):
    """What ``python -m sharp_fpn.grid sharp 4`` runs, in-process (a new interpreter is slow)."""
    monkeypatch.setattr(sys, "argv", ["grid.py", "sharp", "4"])
    runpy.run_path(str(ROOT / "sharp_fpn" / "grid.py"), run_name="__main__")
    assert SHARP_X04 in capsys.readouterr().out.splitlines()


def test_grid_is_pure_python():
    tree = ast.parse((ROOT / "sharp_fpn" / "grid.py").read_text())
    imported = {
        name.split(".")[0]
        for node in ast.walk(tree)
        for name in (
            [a.name for a in node.names] if isinstance(node, ast.Import)
            else [node.module] if isinstance(node, ast.ImportFrom) else []
        )
    }
    assert imported <= {"__future__", "argparse", "dataclasses", "typing"}


# ---- facts of each scheme, and the nodes that other modules ask for by role -------------------


def test_scheme_facts():
    assert SCHEMES == ("unet", "2plus", "3plus", "sharp")
    assert NESTED_SCHEMES == ("2plus", "sharp")
    assert SCHEME_NAMES == {"unet": "UNet", "2plus": "UNet++", "3plus": "UNet3+", "sharp": "UNet#"}
    # each paper's own deep supervision: UNet++ the top row, UNet#'s 8 branches both
    assert DEFAULT_DEEP_SUPERVISION == {
        "unet": "decoder", "2plus": "top", "3plus": "decoder", "sharp": "all",
    }
    # UNet3+'s official design: each input through its own f, one f fusion, 3x3 heads
    assert [s for s, f in SCHEME_FACTS.items() if f.project_inputs] == ["3plus"]
    assert {s: f.node_op for s, f in SCHEME_FACTS.items()} == {
        "unet": "f2", "2plus": "f2", "3plus": "f", "sharp": "f2",
    }
    assert {s: f.top_head_kernel for s, f in SCHEME_FACTS.items()} == {
        "unet": 1, "2plus": 1, "3plus": 3, "sharp": 1,
    }
    assert [s for s, f in SCHEME_FACTS.items() if f.full_scale_skips] == ["sharp"]


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_named_nodes(scheme, depth):
    grid = build_grid(scheme, depth)
    nested = scheme in ("2plus", "sharp")
    assert grid.nested is nested and grid.facts is SCHEME_FACTS[scheme]
    assert grid.final == (0, depth) and grid.final in grid
    assert grid.top_row == (tuple((0, j) for j in range(1, depth)) if nested else ())
    assert grid.decoder_branches == tuple((depth - j, j) for j in range(depth))
    assert grid.decoder_outputs == grid.decoder_branches + (grid.final,)
    assert grid.neck_outputs == tuple((i, depth - i) for i in range(depth + 1))  # p2, p3, ...
    assert grid.heavy_cgm_branches == tuple((depth - j, j) for j in range(min(2, depth)))
    assert all(p in grid for p in grid.top_row + grid.decoder_outputs)
    # every decoder node projects its inputs exactly when the scheme does (UNet3+)
    assert {n.project_inputs for n in grid if n.column} == {grid.facts.project_inputs}


@pytest.mark.parametrize("depth", [1, 2, 4])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_branches_per_mode(scheme, depth):
    grid = build_grid(scheme, depth)
    assert grid.branches(None) == ((0, depth),)
    assert grid.branches("decoder") == grid.decoder_branches + ((0, depth),)
    if grid.nested or depth == 1:  # depth 1: no top row to miss
        assert grid.branches("top") == grid.top_row + ((0, depth),)
        assert grid.branches("all") == grid.top_row + grid.decoder_branches + ((0, depth),)
    else:
        for mode in ("top", "all"):
            with pytest.raises(ValueError, match="has no top-row nodes"):
                grid.branches(mode)
    with pytest.raises(ValueError, match="deep_supervision must be a bool or one of"):
        grid.branches("middle")


def test_unet_sharp_branches_are_the_papers_eight():
    grid = build_grid("sharp", 4)
    assert grid.branches(DEFAULT_DEEP_SUPERVISION["sharp"]) == (
        (0, 1), (0, 2), (0, 3), (4, 0), (3, 1), (2, 2), (1, 3), (0, 4),
    )
    assert grid.heavy_cgm_branches == ((4, 0), (3, 1))
    pruned = grid.pruned(2)
    assert pruned.final == (0, 2) and pruned.top_row == ((0, 1),)
    assert pruned.decoder_branches == ((2, 0), (1, 1))


def test_node_keys():
    assert node_key((1, 3)) == "1_3" and key_position("1_3") == (1, 3)
    for position in build_grid("sharp", 6).positions:
        assert key_position(node_key(position)) == position
