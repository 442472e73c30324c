"""Repeated blocks: the layer structure of a model, read from ``nn_module_stack`` paths.

Layer-wise checkpointing (the uniform solver, :mod:`ckptfx.solvers.uniform`) needs to know
which forward nodes belong to which transformer block / residual layer. Dynamo records, for
every node, the path of the module that ran it (``NodeFacts.module_path``), e.g.
``"L['self'].transformer.h.3.attn.c_attn"``. A *repeated block* is a child of a container
module addressed by an integer index (``nn.ModuleList``/``nn.Sequential``): here block
``"L['self'].transformer.h.3"`` of container ``"L['self'].transformer.h"``.

Call tree::

    find_blocks(table)                     forward nodes -> blocks (NodeTable rows)
    └── blocks_from_paths(pairs)           pure: (node name, module path) pairs -> blocks
        ├── _indexed_prefixes(path)        every (container, index) along one path
        └── _top_level_containers(...)     containers with >= 2 indices, not nested in another

Note [Which containers are layers]
    A container counts when at least two distinct indices of it run forward nodes. Of
    nested containers (``layers.0.experts.3``) only the outermost counts, so experts or
    heads inside a block never split it. Several unrelated top-level containers (an
    encoder's and a decoder's layers) all count; their blocks are returned in the order
    their first node runs. A module called twice with the same index (weight sharing, as in
    ALBERT) is one block: the paths cannot tell its calls apart.

Example:
    >>> blocks = blocks_from_paths([("a", "L['self'].h.0.attn"), ("b", "L['self'].h.0"),
    ...                             ("c", "L['self'].h.1.mlp"), ("d", "L['self'].ln_f")])
    >>> [(b.path, b.nodes) for b in blocks]
    [("L['self'].h.0", ('a', 'b')), ("L['self'].h.1", ('c',))]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from ckptfx.joint import Role

# An integer path component: ".3" (Dynamo's and named_modules' spelling), "[3]" or "['3']".
_INDEX = re.compile(r"(?:\.(\d+)(?=\.|\[|$))|(?:\['?(\d+)'?\])")


@dataclasses.dataclass(frozen=True)
class Block:
    """One repeated block of a model.

    Attributes:
        path: the block's module path, e.g. ``"L['self'].transformer.h.3"``.
        container: the path of the container it is an element of (``"...transformer.h"``).
        index: its integer index in that container.
        nodes: names of the forward nodes it ran, in graph order.
    """

    path: str
    container: str
    index: int
    nodes: tuple[str, ...]


def _indexed_prefixes(path: str) -> list[tuple[str, int, str]]:
    """Every (container, index, block path) along ``path``, outermost first."""
    out = []
    for m in _INDEX.finditer(path):
        digits = m.group(1) if m.group(1) is not None else m.group(2)
        out.append((path[:m.start()], int(digits), path[:m.end()]))
    return out


def _top_level_containers(indices: dict[str, set[int]]) -> set[str]:
    """Containers with at least two indices that do not sit inside another such container."""
    repeated = {c for c, idx in indices.items() if len(idx) >= 2}
    return {c for c in repeated
            if not any(c != o and c.startswith(o) and c[len(o):len(o) + 1] in (".", "[")
                       for o in repeated)}


def blocks_from_paths(pairs: Iterable[tuple[str, str]]) -> tuple[Block, ...]:
    """Groups nodes into repeated blocks by their module paths (see the module docstring).

    Args:
        pairs: ``(node name, module path)`` in graph order; nodes without a path are
            skipped (they run outside every module).

    Returns:
        The blocks, ordered by their first node; empty when no container repeats.
    """
    pairs = [(n, p) for n, p in pairs if p]
    indices: dict[str, set[int]] = {}
    for _, path in pairs:
        for container, index, _ in _indexed_prefixes(path):
            indices.setdefault(container, set()).add(index)
    top = _top_level_containers(indices)
    members: dict[tuple[str, int, str], list[str]] = {}
    for name, path in pairs:
        for container, index, block_path in _indexed_prefixes(path):
            if container in top:
                members.setdefault((container, index, block_path), []).append(name)
                break
    # dicts keep insertion order, and pairs come in graph order: blocks by first node
    return tuple(Block(path=bp, container=c, index=i, nodes=tuple(names))
                 for (c, i, bp), names in members.items())


def find_blocks(table) -> tuple[Block, ...]:
    """The repeated blocks of a joint graph's forward nodes.

    Only nodes with ``Role.FORWARD`` count: backward nodes carry the module stack of the
    forward op they differentiate, and primals belong to no block.

    Args:
        table: the graph's :class:`ckptfx.analysis.table.NodeTable`.

    Returns:
        The blocks in forward order (see :func:`blocks_from_paths`); empty when the graph has
        no module metadata (e.g. traced by ``aot_function`` rather than Dynamo).
    """
    return blocks_from_paths((r.name, r.module_path) for r in table.rows if r.role is Role.FORWARD)
