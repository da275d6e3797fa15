"""Which node feeds which: the one connectivity definition of the UNet family.

UNet, UNet++ (``2plus``), UNet3+ (``3plus``) and UNet# (``sharp``) share one grid of nodes
``X[i][j]``: ``i`` is the level (0 = finest resolution, ``L`` = coarsest), ``j`` the column
(0 = encoder). The four schemes differ only in which nodes exist and which node feeds which.
This module states exactly that, as plain data, and nothing else: no tensors, no torch, no
number of spatial dimensions. Every network of the project (the pure-PyTorch UNet family, the
detectron2 necks, pruning) is built by walking this listing and attaching an op to each input's
``role`` and ``scale``. It is also the only place that names nodes: the final ``X[0][L]``, the
top row, the decoder branches, a neck's outputs, the branches of each deep-supervision mode
(``Grid.branches``), module keys (``node_key``), and what the papers fix per scheme
(``SCHEME_FACTS``: nested or not, its own deep supervision, node op, head kernel).

Scale convention of an input: ``+k`` = upsample by ``2**k``, ``-k`` = max-pool down by
``2**k``, ``0`` = same size. For a node ``X[I][J]`` and a source ``X[i][j]`` it is ``i - I``.

Run ``python -m sharp_fpn.grid sharp 4`` to print the paper's Eq. 1 for UNet#.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Optional, Tuple

Position = Tuple[int, int]
"""``(level i, column j)`` of a node ``X[i][j]``."""

DEEP_SUPERVISION_MODES: Tuple[str, ...] = ("top", "decoder", "all")
"""Which branches deep supervision adds beside the final node (``Grid.branches``)."""


@dataclass(frozen=True)
class SchemeFacts:
    """What the papers (and their official code) fix about one scheme, beyond its listing.

    Attributes:
        name: the paper's name (``"UNet#"``).
        nested: the grid holds every ``X[i][j]`` with ``i + j <= L``, so a top row
            ``X[0][1..L-1]`` (heads there, pruning); otherwise only the anti-diagonal.
        deep_supervision: the scheme's own deep supervision, one of ``DEEP_SUPERVISION_MODES``
            (UNet++: the top row; UNet, UNet3+: the decoder branches; UNet#: both).
        project_inputs: every input of a decoder node first goes through its own ``f`` to a
            common width (UNet3+'s CatChannels; ``Node.project_inputs``), so a node is
            ``(number of inputs) x`` that wide (UpChannels).
        node_op: the op on a decoder node's concatenation: ``"f2"`` (two conv3x3-norm-ReLU) or
            ``"f"`` (one: UNet3+'s fusion, after each input's own ``f``).
        top_head_kernel: kernel of the heads on the top row and the final node (UNet3+'s
            official heads are all 3x3; the others' 1x1).
        full_scale_skips: the scheme has UNet#'s full-scale terms ``F(u^k X[i][j])``.
    """

    name: str
    nested: bool
    deep_supervision: str
    project_inputs: bool = False
    node_op: str = "f2"
    top_head_kernel: int = 1
    full_scale_skips: bool = False


SCHEME_FACTS: Dict[str, SchemeFacts] = {
    "unet": SchemeFacts("UNet", nested=False, deep_supervision="decoder"),
    "2plus": SchemeFacts("UNet++", nested=True, deep_supervision="top"),
    "3plus": SchemeFacts(
        "UNet3+",
        nested=False,
        deep_supervision="decoder",
        project_inputs=True,
        node_op="f",
        top_head_kernel=3,
    ),
    "sharp": SchemeFacts("UNet#", nested=True, deep_supervision="all", full_scale_skips=True),
}
SCHEMES: Tuple[str, ...] = tuple(SCHEME_FACTS)
SCHEME_NAMES: Dict[str, str] = {s: f.name for s, f in SCHEME_FACTS.items()}
NESTED_SCHEMES: Tuple[str, ...] = tuple(s for s, f in SCHEME_FACTS.items() if f.nested)
"""The schemes with a top row ``X[0][1..L-1]``: ``("2plus", "sharp")``."""
DEFAULT_DEEP_SUPERVISION: Dict[str, str] = {
    s: f.deep_supervision for s, f in SCHEME_FACTS.items()
}
"""What ``deep_supervision=True`` means per scheme: each paper's own deep supervision."""

# Roles of a node's inputs: builders attach their op to the role.
POOL = "pool"  # encoder: X[I][0] = f2(p(X[I-1][0]))
DENSE = "dense"  # a same-level node X[I][j], j < J, as is
UP = "up"  # u(X[I+1][J-1]): the next level's node of the previous column, upsampled x2
FULL_SCALE = "full_scale"  # UNet#: F(u^k X[i][j]), i + j = I + J, k = i - I >= 2
ENCODER_DOWN = "encoder_down"  # UNet3+: a shallower encoder node X[i][0], i < I, pooled down
DECODER_UP = "decoder_up"  # UNet3+: a deeper decoder node X[i][L-i], i > I, upsampled
ROLES: Tuple[str, ...] = (POOL, DENSE, UP, FULL_SCALE, ENCODER_DOWN, DECODER_UP)


def node_name(position: Position) -> str:
    """``(1, 3)`` -> ``"X[1][3]"``."""
    return f"X[{position[0]}][{position[1]}]"


def node_key(position: Position) -> str:
    """``(1, 3)`` -> ``"1_3"``: the name of a node's modules (``nn.ModuleDict`` keys)."""
    return f"{position[0]}_{position[1]}"


def key_position(key: str) -> Position:
    """``"1_3"`` -> ``(1, 3)``, the inverse of ``node_key``."""
    level, column = key.split("_")
    return (int(level), int(column))


@dataclass(frozen=True)
class Input:
    """One input of a node: where it comes from, how it is resampled, and why it is there.

    Attributes:
        source: position ``(i, j)`` of the node that feeds it.
        scale: resampling to the receiving node's size: ``+k`` upsample by ``2**k``,
            ``-k`` max-pool down by ``2**k``, ``0`` none.
        role: one of ``ROLES``.
    """

    source: Position
    scale: int
    role: str

    def __str__(self) -> str:
        term = node_name(self.source)
        if self.scale:
            op = "u" if self.scale > 0 else "p"
            k = abs(self.scale)
            term = f"{op}({term})" if k == 1 else f"{op}^{k} {term}"
        return f"F({term})" if self.role == FULL_SCALE else term


@dataclass(frozen=True)
class Node:
    """A node ``X[level][column]`` and its inputs, in concatenation order.

    Attributes:
        level: ``i``, 0 = finest resolution.
        column: ``j``, 0 = encoder.
        inputs: the maps concatenated on channels. Empty for ``X[0][0]``, which reads the image.
        project_inputs: UNet3+: each input first goes through its own ``f`` to a common width,
            then the concatenation goes through one ``f``. Otherwise the concatenation goes
            straight into the node's op (``f2`` in the paper).
    """

    level: int
    column: int
    inputs: Tuple[Input, ...]
    project_inputs: bool = False

    @property
    def position(self) -> Position:
        return (self.level, self.column)

    def describe(self, op: str = "f2") -> str:
        """The node as a formula.

        E.g. ``X[0][2] = f2(cat[X[0][0], X[0][1], F(u^2 X[2][0]), u(X[1][1])])``.
        ``op`` names the node's op; UNet3+ nodes are always written ``f(cat[f(...), ...])``.
        """
        if not self.inputs:
            body = f"{op}(image)"
        elif self.project_inputs:
            body = "f(cat[" + ", ".join(f"f({x})" for x in self.inputs) + "])"
        elif len(self.inputs) == 1:
            body = f"{op}({self.inputs[0]})"
        else:
            body = f"{op}(cat[" + ", ".join(str(x) for x in self.inputs) + "])"
        return f"{node_name(self.position)} = {body}"


@dataclass(frozen=True)
class Grid:
    """Every node of one scheme at one depth, in topological order.

    The order is by anti-diagonal ``i + j``, deepest level first within it: every input of a
    node comes before the node (the order the official code computes them in).

    Attributes:
        scheme: one of ``SCHEMES``.
        depth: ``L``; the grid has rows ``0..L``.
        nodes: the nodes, topologically ordered.
    """

    scheme: str
    depth: int
    nodes: Tuple[Node, ...]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, position: object) -> bool:
        return any(node.position == position for node in self.nodes)

    def __getitem__(self, position: Position) -> Node:
        for node in self.nodes:
            if node.position == position:
                return node
        raise KeyError(
            f"{node_name(position)} is not a node of {self.scheme} at depth {self.depth}"
        )

    @property
    def positions(self) -> Tuple[Position, ...]:
        return tuple(node.position for node in self.nodes)

    @property
    def facts(self) -> SchemeFacts:
        """The scheme's ``SchemeFacts`` (node op, own deep supervision, head kernel, ...)."""
        return SCHEME_FACTS[self.scheme]

    @property
    def nested(self) -> bool:
        """Every ``X[i][j]`` with ``i + j <= L`` exists (``2plus``, ``sharp``)."""
        return self.facts.nested

    @property
    def decoder_outputs(self) -> Tuple[Position, ...]:
        """The anti-diagonal ``X[L][0], X[L-1][1], ..., X[0][L]``, coarsest first."""
        return tuple((self.depth - j, j) for j in range(self.depth + 1))

    @property
    def neck_outputs(self) -> Tuple[Position, ...]:
        """The anti-diagonal finest first, ``X[0][L], X[1][L-1], ..., X[L][0]``: an FPN's
        outputs p2, p3, ... (SPEC section 3)."""
        return self.decoder_outputs[::-1]

    @property
    def final(self) -> Position:
        """``X[0][L]``: the network's output node."""
        return (0, self.depth)

    @property
    def top_row(self) -> Tuple[Position, ...]:
        """``X[0][1..L-1]``, the paper's ``L_In`` branches and pruning points; empty for the
        schemes that are not nested."""
        return tuple((0, j) for j in range(1, self.depth) if (0, j) in self)

    @property
    def decoder_branches(self) -> Tuple[Position, ...]:
        """The anti-diagonal below the top row, deepest first: ``X[L][0], ..., X[1][L-1]``
        (the paper's ``L_De`` branches)."""
        return self.decoder_outputs[:-1]

    @property
    def heavy_cgm_branches(self) -> Tuple[Position, ...]:
        """The two deepest decoder branches ``X[L][0], X[L-1][1]``: UNet#'s heavy CGMs."""
        return self.decoder_branches[:2]

    def branches(self, mode: Optional[str]) -> Tuple[Position, ...]:
        """The nodes deep supervision ``mode`` puts a head on; the final ``X[0][L]`` last.

        Args:
            mode: ``None`` (the final node only), ``"top"`` (``top_row``), ``"decoder"``
                (``decoder_branches``) or ``"all"`` (both).

        Returns:
            ``X[0][1..L-1]`` (``"top"``, ``"all"``), then ``X[L][0], ..., X[1][L-1]``
            (``"decoder"``, ``"all"``), then ``X[0][L]``: the official UNet# code's order.

        Raises:
            ValueError: an unknown mode, or ``"top"``/``"all"`` on a scheme with no top row.
        """
        if mode is not None and mode not in DEEP_SUPERVISION_MODES:
            raise ValueError(
                f"deep_supervision must be a bool or one of {DEEP_SUPERVISION_MODES}, got {mode!r}"
            )
        top = mode in ("top", "all")
        if top and len(self.top_row) < self.depth - 1:
            raise ValueError(
                f"deep_supervision={mode!r}: scheme {self.scheme!r} has no top-row nodes "
                f"X[0][1..{self.depth - 1}] (only the nested schemes {NESTED_SCHEMES} have them); "
                "use 'decoder'"
            )
        decoder = mode in ("decoder", "all")
        return (
            (self.top_row if top else ())
            + (self.decoder_branches if decoder else ())
            + (self.final,)
        )

    def needed(self, targets: Iterable[Position]) -> Tuple[Position, ...]:
        """Every node that computing ``targets`` needs (targets included), in topological order."""
        wanted = set()
        stack = list(targets)
        while stack:
            position = stack.pop()
            if position not in wanted:
                wanted.add(position)
                stack.extend(x.source for x in self[position].inputs)
        return tuple(p for p in self.positions if p in wanted)

    def pruned(self, level: int) -> "Grid":
        """The sub-network that ends at ``X[0][level]`` (the paper's pruning level ``L^level``).

        For the nested schemes (``2plus``, ``sharp``) it holds exactly the nodes with
        ``i + j <= level`` and equals ``build_grid(scheme, level)``. ``unet`` and ``3plus`` have
        no ``X[0][k]`` for ``k < L``, so they can only be "pruned" to their full depth.
        """
        if (0, level) not in self:
            raise ValueError(
                f"pruning level {level}: {node_name((0, level))} is not a node of "
                f"{SCHEME_NAMES[self.scheme]} at depth {self.depth}; pruning needs a nested scheme "
                f"{NESTED_SCHEMES} and 1 <= level <= depth"
            )
        keep = set(self.needed([(0, level)]))
        return Grid(self.scheme, level, tuple(n for n in self.nodes if n.position in keep))

    def describe(self, op: str = "f2") -> str:
        """The whole listing, one node a line, preceded by a one-line summary."""
        outputs = ", ".join(node_name(p) for p in self.decoder_outputs)
        head = (
            f"{SCHEME_NAMES[self.scheme]} ({self.scheme}), depth L = {self.depth}: "
            f"{len(self)} nodes; decoder outputs {outputs}"
        )
        return "\n".join([head] + [node.describe(op) for node in self.nodes])

    def __str__(self) -> str:
        return self.describe()


def _inputs(scheme: str, depth: int, I: int, J: int) -> Tuple[Input, ...]:
    """The inputs of decoder node ``X[I][J]`` (``J >= 1``), in concatenation order."""
    if SCHEME_FACTS[scheme].project_inputs:  # UNet3+
        shallower = [Input((i, 0), i - I, ENCODER_DOWN) for i in range(I)]
        deeper = [Input((i, depth - i), i - I, DECODER_UP) for i in range(I + 1, depth + 1)]
        return tuple(shallower + [Input((I, 0), 0, DENSE)] + deeper)
    up = Input((I + 1, J - 1), 1, UP)
    if scheme == "unet":
        return (Input((I, 0), 0, DENSE), up)
    dense = [Input((I, j), 0, DENSE) for j in range(J)]
    if scheme == "2plus":
        return tuple(dense + [up])
    # sharp: the full-scale terms F(u^(i-I) X[i][j]) on the same anti-diagonal, deepest first
    full_scale = [Input((i, I + J - i), i - I, FULL_SCALE) for i in range(I + J, I + 1, -1)]
    return tuple(dense + full_scale + [up])


def build_grid(scheme: str, depth: int) -> Grid:
    """List the nodes of ``scheme`` (one of ``SCHEMES``) with rows ``0..depth``.

    Column 0 (the encoder) is ``X[0][0] = f2(image)``, ``X[i][0] = f2(p(X[i-1][0]))``. The
    decoder nodes (``J >= 1``) are, per scheme (SPEC section 1):

    - ``unet``: the anti-diagonal ``I + J = L``; inputs ``X[I][0], u(X[I+1][J-1])``.
    - ``2plus``: every ``I + J <= L``; inputs ``X[I][0..J-1], u(X[I+1][J-1])``.
    - ``3plus``: the anti-diagonal; inputs ``p^(I-i) X[i][0]`` for ``i < I``, ``X[I][0]``,
      ``u^(i-I) X[i][L-i]`` for ``I < i <= L``, each through its own ``f``.
    - ``sharp``: every ``I + J <= L``; inputs ``X[I][0..J-1]``, the full-scale terms
      ``F(u^(i-I) X[i][j])`` for ``i + j = I + J``, ``i >= I + 2``, deepest first, then
      ``u(X[I+1][J-1])``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1 (rows 0..depth), got {depth!r}")
    facts = SCHEME_FACTS[scheme]
    nodes = []
    for diagonal in range(depth + 1):
        for I in range(diagonal, -1, -1):  # deepest first: same-diagonal inputs come from below
            J = diagonal - I
            if J == 0:
                inputs = () if I == 0 else (Input((I - 1, 0), -1, POOL),)
                nodes.append(Node(I, 0, inputs))
            elif facts.nested or diagonal == depth:
                nodes.append(Node(I, J, _inputs(scheme, depth, I, J), facts.project_inputs))
    return Grid(scheme, depth, tuple(nodes))


def main(argv: "list[str] | None" = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sharp_fpn.grid",
        description="Print which node feeds which (the paper's Eq. 1).",
    )
    parser.add_argument("scheme", choices=SCHEMES)
    parser.add_argument("depth", type=int, nargs="?", default=4, help="L: rows 0..L (default 4)")
    parser.add_argument("--level", type=int, help="print only the sub-network pruned to this level")
    args = parser.parse_args(argv)
    grid = build_grid(args.scheme, args.depth)
    print(grid if args.level is None else grid.pruned(args.level))


if __name__ == "__main__":
    main()
