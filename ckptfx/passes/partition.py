"""partition_fn: ckptfx as an AOTAutograd partitioner, with its safety net.

``partition_fn(config)`` returns a callable with AOTAutograd's partitioner signature
``(joint_module, joint_inputs, *, num_fwd_outputs, **kwargs) -> (fw_module, bw_module)``,
usable with ``aot_function``/``aot_module``/``aot_autograd``.

Safety net (Invariant: a partition may cost memory, never a wrong gradient): any exception
in analysis, solving or rewriting falls back to PyTorch's own min-cut partitioner with one
warning naming the cause, recorded in the report (``RematReport.fallback``); with
``strict=True`` the exception propagates instead.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
from collections.abc import Callable, Iterator

from ckptfx import _torch_compat as compat
from ckptfx.config import RematConfig
from ckptfx.errors import ConfigError
from ckptfx.joint import JointGraph
from ckptfx.passes.prepare import prepare_joint
from ckptfx.pipeline import partition_joint
from ckptfx.report import RematReport

log = logging.getLogger("ckptfx")
_graph_ids = itertools.count()


def _forward_saved_bytes(fw, num_fwd_outputs: int) -> int:
    """Bytes of the storages a forward GraphModule returns for the backward (its outputs
    after the user outputs), for the report of a fallback partition; 0 if unknown."""
    import torch

    from ckptfx.analysis.sizes import SizeHints, value_bytes

    try:
        out = fw.graph.find_nodes(op="output")[0]
        saved = compat.arg_tree_leaves(*out.args)[num_fwd_outputs:]
        hints = SizeHints.from_graphs(fw.graph)
        storages = {}
        for node in saved:
            val = getattr(node, "meta", {}).get("val")
            if isinstance(val, torch.Tensor):
                storages[id(val.untyped_storage())] = hints.evaluate(value_bytes(val))
        return sum(storages.values())
    except Exception:  # the report is informative only; a fallback must not fail on it
        return 0


def emit(report: RematReport) -> None:
    """Logs one graph's report: the full report at DEBUG on the ``ckptfx`` logger (the
    backend logs its one INFO line per compiled graph), and the report as JSON in PyTorch's
    structured compile trace (``TORCH_TRACE``; ``tlparse`` shows the artifact
    ``ckptfx_report``)."""
    import json

    log.debug("%s", report)
    try:
        compat.trace_structured_artifact(
            "ckptfx_report", lambda: json.dumps(report.to_dict(), default=str))
    except Exception as exc:  # the trace is informative only
        log.debug("ckptfx: no structured trace artifact (%s)", exc)


def fallback_partition(joint_module, joint_inputs, num_fwd_outputs: int, **kwargs):
    """The safety net's partition: gradients exact, memory whatever it takes.

    PyTorch's min-cut partitioner at ``activation_memory_budget=1.0`` (below 1.0 it may
    recompute random ops with fresh randomness, pytorch/pytorch#190758); if its backward
    still recomputes a node that may not be recomputed (``recompute_ban``: random, effectful,
    collective, data-dependent size), PyTorch's default partitioner, which saves everything
    the backward reads.

    Returns:
        (fw_module, bw_module).
    """
    fw, bw = compat.torch_safe_partition(
        joint_module, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
    unsafe = unsafe_recomputations(joint_module, num_fwd_outputs, bw)
    if unsafe:
        log.warning("ckptfx: PyTorch's min-cut recomputes %s; using its default partitioner",
                    ", ".join(unsafe[:8]))
        fw, bw = compat.torch_default_partition(
            joint_module, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
    return fw, bw


def unsafe_recomputations(joint_module, num_fwd_outputs: int, bw) -> list[str]:
    """Names of forward nodes of ``joint_module`` that ``bw`` computes again although
    :func:`ckptfx.analysis.nodes.recompute_ban` forbids it."""
    from ckptfx.analysis.nodes import recompute_ban
    from ckptfx.joint import Role, classify

    roles, _ = classify(joint_module.graph, num_fwd_outputs)
    return [n.name for n in bw.graph.nodes if n.op == "call_function"
            and roles.get(n.name) is Role.FORWARD and recompute_ban(n)]


@contextlib.contextmanager
def new_objects_collected() -> Iterator[None]:
    """Runs its body with the objects that exist before it frozen out of garbage collection.

    Note [Collecting during a partition]
        A partition allocates hundreds of thousands of objects (rows, graphs, nodes), and
        CPython's full collections it triggers walk the whole heap each time: the joint
        graph, its fake tensors, the model, everything the process holds. On a 48-layer GPT
        that was a fifth of ckptfx's time, more at 96 layers (``bench/pass_time.py``).
        ``gc.freeze()`` moves the objects that exist on entry out of reach of collection
        and ``gc.unfreeze()`` puts them back in the oldest generation on exit: garbage made
        inside is collected as usual, nothing that existed before is walked again. Where
        the caller froze objects itself (``gc.get_freeze_count()``) or disabled collection,
        nothing is changed.
    """
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def partition_fn(config: RematConfig | None = None,
                 on_report: Callable[[RematReport], None] | None = None,
                 fault: Callable[[JointGraph], None] | None = None):
    """An AOTAutograd partition_fn that plans with ckptfx.

    Args:
        config: options (default ``RematConfig()``).
        on_report: called with the RematReport of every partitioned graph.
        fault: test hook called on the JointGraph before planning; an exception it raises
            exercises the fallback path.

    Returns:
        ``fn(joint_module, joint_inputs, *, num_fwd_outputs, static_lifetime_input_indices=None,
        **kwargs) -> (fw_module, bw_module)``.
    """
    config = RematConfig.coerce(config)

    def fn(joint_module, joint_inputs, *, num_fwd_outputs, **kwargs):
        with new_objects_collected():  # Note [Collecting during a partition]
            return _partition(joint_module, joint_inputs, num_fwd_outputs, kwargs)

    def _partition(joint_module, joint_inputs, num_fwd_outputs, kwargs):
        graph_id = next(_graph_ids)
        static = kwargs.get("static_lifetime_input_indices")
        try:
            prepare_joint(joint_module)
            joint = JointGraph.from_partition_args(
                joint_module, joint_inputs, num_fwd_outputs=num_fwd_outputs,
                static_lifetime_input_indices=static)
            if fault is not None:
                fault(joint)
            fw, bw, report = partition_joint(joint, config, graph_id)
        except ConfigError:
            raise  # the user's options or policy: theirs to fix, not a reason to fall back
        except Exception as exc:
            if config.strict:
                raise
            cause = f"{type(exc).__name__}: {exc}"
            log.warning("ckptfx: falling back to PyTorch's min-cut partitioner for graph %d: %s",
                        graph_id, cause)
            kw = {k: v for k, v in kwargs.items() if k != "compiler"}
            fw, bw = fallback_partition(joint_module, joint_inputs, num_fwd_outputs, **kw)
            report = RematReport(graph_id=graph_id, solver="torch-fallback", fallback=cause,
                                 saved_bytes=_forward_saved_bytes(fw, num_fwd_outputs))
        if on_report is not None:
            on_report(report)
        emit(report)
        return fw, bw

    return fn
