"""What a backend knows across the graphs of one compiled model.

Dynamo hands a backend one graph at a time: a graph break, DDP's gradient buckets or a
recompile each make another. Two things need the model rather than the graph:

* :class:`BudgetLedger`: a ``memory_budget`` in bytes is the model's (Note [One byte
  budget per model]).
* :class:`ReportStore`: a compile served from Inductor's or AOTAutograd's on-disk cache does
  not run the partitioner, so the report made when the plan was made is kept on disk beside
  those caches and restored on a hit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
from typing import Any

log = logging.getLogger("ckptfx")


def graph_fingerprint(gm: Any, example_inputs: Any) -> str:
    """A stable hash of a Dynamo graph: its code and the shape, stride, dtype and
    ``requires_grad`` of every example input (symbolic sizes by name)."""
    h = hashlib.sha256(str(getattr(gm, "code", "")).encode())
    for x in example_inputs:
        meta = (type(x).__name__, str(getattr(x, "shape", "")), str(getattr(x, "dtype", "")),
                getattr(x, "requires_grad", None),
                str(x.stride()) if hasattr(x, "stride") and callable(x.stride) else "")
        h.update(repr(meta).encode())
    return h.hexdigest()[:32]


@dataclasses.dataclass
class _Entry:
    frame: int | None
    compile: int | None
    nbytes: int


class BudgetLedger:
    """Bytes each compiled graph of a model keeps for its backward.

    Note [One byte budget per model]
        A budget in bytes is for the whole compiled model, not for each of its graphs. The
        graphs of one step run in the order they were first compiled, and a graph's saved
        values stay alive until its backward, which runs after the backward of every graph
        after it. So while graph k runs forward and backward, the values saved by graphs
        1..k-1 are alive: graph k is planned with the budget minus what they keep, and the
        model keeps at most the budget in all (for ``budget_kind="saved"`` exactly; for
        ``"peak"``, the step's peak is graph k's own peak on top of what earlier graphs
        keep). A graph that Dynamo compiles again (a recompile of its frame, or the same
        graph after ``torch._dynamo.reset()``) replaces its earlier entry. Fractions are
        per graph already (each on its own scale) and are left as they are.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def held_by_others(self, key: str, compile_id: tuple[int, int] | None) -> tuple[int, int]:
        """Forgets the entries ``key``'s compile replaces; returns (bytes, graphs) that the
        other graphs of the model keep."""
        self._entries.pop(key, None)
        if compile_id is not None:
            frame, attempt = compile_id
            stale = [k for k, e in self._entries.items()
                     if e.frame == frame and e.compile is not None and e.compile < attempt]
            for k in stale:
                del self._entries[k]
        return sum(e.nbytes for e in self._entries.values()), len(self._entries)

    def record(self, key: str, compile_id: tuple[int, int] | None, nbytes: int) -> None:
        frame, attempt = compile_id if compile_id is not None else (None, None)
        self._entries[key] = _Entry(frame, attempt, int(nbytes))

    @property
    def total(self) -> int:
        """Bytes all recorded graphs keep (bytes)."""
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


class ReportStore:
    """Reports kept on disk under ``root``, keyed by the partitioner's cache key and the
    graph; a failure to read or write is logged at DEBUG and never fails a compile."""

    def __init__(self, root: str) -> None:
        self.root = root

    def _path(self, key: str) -> str:
        return os.path.join(self.root, f"{key}.pkl")

    def save(self, key: str, reports: list) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
            tmp = self._path(key) + f".{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                pickle.dump(list(reports), f)
            os.replace(tmp, self._path(key))
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as exc:
            log.debug("ckptfx: could not store the report of %s: %s", key, exc)

    def load(self, key: str) -> list | None:
        try:
            with open(self._path(key), "rb") as f:
                reports = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
            log.debug("ckptfx: no stored report for %s: %s", key, exc)
            return None
        return reports if isinstance(reports, list) else None
