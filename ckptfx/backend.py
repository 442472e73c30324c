"""The ``"ckpt"`` torch.compile backend.

``torch.compile(model, backend="ckpt", options={...})`` works in a fresh process without
importing ckptfx: the package registers :func:`ckpt_backend` under the entry-point group
``torch_dynamo_backends``. :class:`CkptBackend` is the same backend as an object that keeps a
:class:`~ckptfx.report.RematReport` per compiled graph.

Example:
    >>> import torch, ckptfx
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    >>> backend = ckptfx.CkptBackend(inner="eager")
    >>> loss = torch.compile(model, backend=backend)(torch.randn(4, 8)).sum()
    >>> loss.backward()
    >>> backend.reports[-1].solver
    'mincut'

Inner compilers:
    ``inner="inductor"`` (default) runs Inductor with ckptfx as its partitioner
    (``torch._inductor.config.custom_partitioner_fn``), whose ``uuid()`` keys Inductor's and
    AOTAutograd's caches on ckptfx's source and on the config, so a cache hit never replays
    a plan made by other code or options. ``inner="eager"`` runs the same partitioned graphs
    without codegen.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import pathlib
from typing import Any

from ckptfx.config import MemoryBudget, RematConfig
from ckptfx.errors import ConfigError, InfeasibleBudgetError
from ckptfx.ledger import BudgetLedger, ReportStore, graph_fingerprint
from ckptfx.report import RematReport

log = logging.getLogger("ckptfx")


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    h = hashlib.sha256()
    root = pathlib.Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _partitioner_class():
    """``CkptPartitioner``: a ``CustomPartitionerFn`` subclass, built on first use so that
    importing ckptfx does not import Inductor. It lives at module level (``__getattr__``) so
    Inductor can pickle it into its cache key; a pickled one carries only its config."""
    cls = globals().get("_CkptPartitioner")
    if cls is not None:
        return cls
    from ckptfx import _torch_compat as compat

    class CkptPartitioner(compat.inductor_partitioner_base()):
        def __init__(self, config: RematConfig, on_report=None) -> None:
            from ckptfx.passes.partition import partition_fn

            self.config = config
            self._fn = partition_fn(config, on_report)

        def __call__(self, gm, joint_inputs, **kwargs):
            fw, bw = self._fn(gm, joint_inputs, **kwargs)
            compat.keep_planned_layouts(fw, bw)
            return fw, bw

        def uuid(self) -> Any:
            return hashlib.sha256(
                (_source_hash() + "|" + self.config.cache_key()).encode()).hexdigest()

        def __reduce__(self):
            return (CkptPartitioner, (self.config,))

    CkptPartitioner.__module__ = __name__
    CkptPartitioner.__qualname__ = "CkptPartitioner"
    globals()["_CkptPartitioner"] = CkptPartitioner
    return CkptPartitioner


def __getattr__(name: str):
    if name == "CkptPartitioner":
        return _partitioner_class()
    raise AttributeError(name)


def make_inductor_partitioner(config: RematConfig, on_report=None):
    """A CkptPartitioner (Inductor ``custom_partitioner_fn``) running ckptfx with ``config``."""
    return _partitioner_class()(config, on_report)


class CkptBackend:
    """A torch.compile backend that plans rematerialization with ckptfx.

    One backend object is one model: a ``memory_budget`` in bytes is shared by all the
    graphs Dynamo makes of it (graph breaks, DDP buckets; Note [One byte budget per model]
    in :mod:`ckptfx.ledger`), and every graph adds its report to :attr:`reports`, restored
    from disk when Inductor's cache serves the compile.

    Args:
        config: a RematConfig or a dict of options; or pass options as keywords
            (``CkptBackend(memory_budget=0.5)``).
        **options: RematConfig fields (validated: unknown keys raise ConfigError).

    Attributes:
        config: the RematConfig in use.
        reports: one RematReport per joint graph partitioned, in compile order.
        ledger: bytes each compiled graph keeps for the backward (a BudgetLedger).
        fingerprints: with ``verify_ranks=True``, the plan fingerprint of every graph
            compiled (equal on every rank; Note [Identical decisions on every rank]).
    """

    def __init__(self, config: RematConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("CkptBackend: pass either a RematConfig or keyword options, not both")
        self.config = RematConfig.coerce(config) if config is not None else \
            RematConfig.from_options(options)
        self.reports: list[RematReport] = []
        self.ledger = BudgetLedger()
        self.fingerprints: list[str] = []
        self._counts = {"planned": 0, "from cache": 0, "fell back": 0}
        _watch_ddp()

    def __call__(self, gm, example_inputs):
        from ckptfx import _torch_compat as compat

        key = graph_fingerprint(gm, example_inputs)
        compile_id = compat.current_compile_id()
        held, others = self.ledger.held_by_others(key, compile_id)
        config = self._graph_config(held)
        got: list[RematReport] = []
        from_cache = False
        note = self._budget_note(config, held, others)
        on_report = functools.partial(_collect, got, note)
        try:  # the user's errors reach the caller by their own class (strict, options)
            if config.inner == "eager":
                compiled = _compile_eager(gm, example_inputs, config, on_report)
            else:
                partitioner = make_inductor_partitioner(config, on_report)
                patches = {"custom_partitioner_fn": partitioner,
                           **compat.inductor_config_patches()}
                peak = _InductorPeak(config, got, self.reports)
                compiled = compat.compile_fx(
                    gm, example_inputs, config_patches=patches,
                    inner_compile=compat.planned_order_inner_compile(peak))
        except (ConfigError, InfeasibleBudgetError) as exc:
            raise compat.dynamo_passthrough(exc) from None
        if config.inner != "eager":
            store = ReportStore(os.path.join(compat.inductor_cache_dir(), "ckptfx-reports"))
            store_key = hashlib.sha256(f"{partitioner.uuid()}|{key}".encode()).hexdigest()
            if got:
                store.save(store_key, got)
            elif _needs_autograd(example_inputs):
                got, from_cache = _restored(store.load(store_key), note), True
        if config.verify_ranks:
            self.fingerprints.append(self._verify(got, config))
        self.reports.extend(got)
        self.ledger.record(key, compile_id, sum(r.saved_bytes for r in got))
        if note and not all(r.feasible for r in got):
            log.warning("ckptfx: memory_budget=%s is the model's, and its other %d graph(s) keep "
                        "%d B of it: this graph cannot fit in the rest, and the model keeps %d B. "
                        "Raise the budget, or remove graph breaks so one plan sees the model",
                        self.config.memory_budget, others, held, self.ledger.total)
        self._log(got, from_cache)
        return compiled

    def _verify(self, got: list[RematReport], config: RematConfig) -> str:
        """``verify_ranks``: this graph's plan compared across the process group."""
        from ckptfx import _torch_compat as compat
        from ckptfx.distributed import plan_decisions, verify_same_plan
        from ckptfx.errors import RankMismatchError

        graph_id = got[0].graph_id if got else -1
        try:
            return verify_same_plan(graph_id, plan_decisions(got, config.cache_key()))
        except RankMismatchError as exc:  # the caller catches it by its class
            raise compat.dynamo_passthrough(exc) from None

    def _graph_config(self, held: int) -> RematConfig:
        """This graph's config: a byte budget less what the model's other graphs keep."""
        budget = self.config.memory_budget
        if budget is None or budget.nbytes is None or not held:
            return self.config
        # with m microbatches in flight the other graphs keep m times their bytes
        # (Note [Microbatches in flight] in ckptfx/stages.py)
        kept = held * self.config.microbatches_in_flight
        return dataclasses.replace(
            self.config, memory_budget=MemoryBudget(nbytes=max(0, budget.nbytes - kept)))

    def _budget_note(self, config: RematConfig, held: int, others: int) -> str:
        if config is self.config:
            return ""
        return (f"memory_budget={self.config.memory_budget} is the model's: {held} B are kept "
                f"by {others} other graph(s), this graph is planned with "
                f"{config.memory_budget.nbytes} B")

    def _log(self, got: list[RematReport], from_cache: bool) -> None:
        for r in got:
            self._counts["from cache" if from_cache else "fell back" if r.fallback else "planned"] += 1
        counts = ", ".join(f"{v} {k}" for k, v in self._counts.items())
        log.info("ckptfx: %d graph(s) so far (%s); the model keeps %d B for the backward%s",
                 sum(self._counts.values()), counts, self.ledger.total,
                 f" of memory_budget={self.config.memory_budget}"
                 if self.config.memory_budget is not None and
                 self.config.memory_budget.nbytes is not None else "")

    def __repr__(self) -> str:
        return f"CkptBackend({self.config!r})"


class _InductorPeak:
    """Re-predicts a graph's peak once Inductor has compiled its forward and backward, with
    the buffers Inductor allocates (Note [Fused values] in :mod:`ckptfx.memory`).

    The partitioner reports before Inductor compiles, and the backward may compile at its
    first run; the report is replaced (in ``got`` and in the backend's ``reports``) then.
    """

    def __init__(self, config: RematConfig, got: list[RematReport],
                 reports: list[RematReport]) -> None:
        self.config, self.got, self.reports = config, got, reports
        self.forward = None

    def __call__(self, gm, is_backward: bool, buffers: frozenset[str]) -> None:
        if not is_backward:
            self.forward = (gm, buffers)
            return
        if self.forward is None or not self.got or self.got[0].predicted_peak_bytes is None:
            return
        old = self.got[0]
        from ckptfx.memory import BACKWARD, FORWARD

        peak = self._predict(self.forward[0], gm, {FORWARD: self.forward[1],
                                                   BACKWARD: buffers})
        if peak is None:
            return
        new = dataclasses.replace(old, predicted_peak_bytes=peak, notes=old.notes + (
            f"predicted peak counts the buffers Inductor allocates (fused intermediates "
            f"0 B); with a buffer per FX value it is "
            f"{old.predicted_peak_bytes} B",))
        self.got[0] = new
        self.reports[:] = [new if r is old else r for r in self.reports]

    def _predict(self, fw, bw, buffers) -> int | None:
        from ckptfx.analysis.sizes import SizeHints
        from ckptfx.memory import predict_peak

        hints = SizeHints.from_graphs(fw.graph, bw.graph,
                                      unbacked_default=self.config.unbacked_size_hint)
        try:
            return predict_peak(fw, bw, hints=hints, buffers=buffers)
        except Exception as exc:  # the report keeps the prediction made at partition time
            log.warning("ckptfx: peak simulation of Inductor's buffers failed (%s: %s); the "
                        "report keeps the prediction with a buffer per FX value",
                        type(exc).__name__, exc)
            return None


def _collect(got: list, note: str, report: RematReport) -> None:
    got.append(dataclasses.replace(report, notes=report.notes + (note,)) if note else report)


def _compile_eager(gm, example_inputs, config: RematConfig, on_report):
    """AOTAutograd with ckptfx's partition_fn and no codegen (``inner="eager"``).

    The graphs run boxed (``compat.boxed_copy``): the code takes the list of inputs, clears
    it and drops each value after its last use, as Inductor's code does and as the memory
    simulation assumes. Unpacking the list into positional arguments would keep every saved
    tensor alive until the backward returns.
    """
    from ckptfx import _torch_compat as compat
    from ckptfx.passes.partition import partition_fn

    def nop(g, _inputs):
        return compat.boxed_copy(g)

    return compat.aot_autograd_backend(
        fw_compiler=nop, bw_compiler=nop, inference_compiler=nop,
        partition_fn=partition_fn(config, on_report), keep_inference_input_mutations=True,
    )(gm, example_inputs)


def _needs_autograd(example_inputs) -> bool:
    """Whether AOTAutograd makes a joint graph of this Dynamo graph (so a compile without a
    partition was served from a cache)."""
    import torch

    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)


def _restored(reports: list | None, note: str) -> list[RematReport]:
    """The reports of a compile served from Inductor's cache: the stored ones, or one saying
    that the plan came from the cache and its report is gone."""
    cached = "plan replayed from Inductor's cache; report restored from when it was made"
    if reports:
        return [dataclasses.replace(r, notes=r.notes + (cached,) + ((note,) if note else ()))
                for r in reports]
    log.warning("ckptfx: a compile was served from Inductor's cache and its report is not on "
                "disk; backend.reports has a placeholder (disable the cache to re-plan: "
                "TORCHINDUCTOR_FORCE_DISABLE_CACHES=1)")
    return [RematReport(graph_id=-1, solver="cache", notes=(
        "plan replayed from Inductor's cache; its report was not found on disk",))]


def _watch_ddp() -> None:
    """Note [DDP wrap order] in :mod:`ckptfx.distributed`: warn when a compiled
    ``DistributedDataParallel`` makes no graph for this backend."""
    import torch.distributed

    if torch.distributed.is_available():
        from ckptfx.distributed import watch_compiled_ddp

        watch_compiled_ddp(_graphs_made)


def _graphs_made(backend: Any, kwargs: dict) -> int | None:
    """Graphs a ckptfx backend has been handed so far; None for another library's backend."""
    if isinstance(backend, CkptBackend):
        return len(backend.reports)
    if backend is ckpt_backend:
        entry = _SHARED.get(id(kwargs.get("options")))
        return len(entry[1].reports) if entry is not None else 0
    return None


def ckpt_backend(gm, example_inputs, options: dict[str, Any] | None = None, **kwargs: Any):
    """The function registered as backend ``"ckpt"``.

    Args:
        gm: the Dynamo FX graph.
        example_inputs: its example inputs.
        options: the ``options=`` of torch.compile (RematConfig fields).

    Raises:
        ConfigError: an unknown option or a bad value (names it and the allowed values),
            raised through Dynamo unwrapped (not as ``BackendCompilerFailed``), so
            ``except ckptfx.ConfigError`` around the first call of the compiled model
            catches it.
    """
    from ckptfx import _torch_compat as compat
    from ckptfx.errors import ConfigError

    try:
        if kwargs.get("mode") is not None:
            raise ConfigError(f"mode={kwargs['mode']!r} is not supported by backend 'ckpt'; "
                              f"pass options={{...}} instead (see RematConfig)")
        config = RematConfig.from_options(options)
    except ConfigError as exc:
        raise compat.dynamo_passthrough(exc) from None
    entry = _SHARED.get(id(options))
    if entry is None or entry[0] is not options:
        entry = _SHARED[id(options)] = (options, CkptBackend(config))
    return entry[1](gm, example_inputs)


# backend="ckpt": torch.compile passes the same ``options`` dict for every graph it makes of
# one model, so the graphs of one torch.compile call share one CkptBackend and one byte
# budget (Note [One byte budget per model]); the dict is held so its id stays unique.
_SHARED: dict[int, tuple[Any, CkptBackend]] = {}

# torch.compile(..., backend="ckpt") imports this module (the entry point) and calls nothing
# of ckptfx until Dynamo makes a graph; a compiled DDP makes none (Note [DDP wrap order]), so
# the check is installed here when Dynamo is the importer. A plain ``import ckptfx`` does not
# import Dynamo and installs nothing.
if "torch._dynamo" in __import__("sys").modules:
    _watch_ddp()
