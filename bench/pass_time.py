"""How long each partitioner takes on deep joint graphs, and what its plan keeps (bench only).

For each depth, the joint graph of a plain GPT (``ckptfx.demo.TinyGPT``: hidden 256, 4 heads,
seq 128, batch 4) is captured as ``torch.compile`` hands it to a partitioner (Inductor's
decompositions and joint-graph passes; :func:`ckptfx.capture.inductor_joint`). Every
partitioner then runs on a fresh copy of that same graph, the partitioners interleaved within
each repeat, and the table gives per partitioner and depth:

* seconds: the median over the repeats, in the context ``torch.compile`` runs a
  partitioner in (:func:`as_torch_compile`), of the partition call (PyTorch's whole partitioner;
  ckptfx's whole ``partition_fn``: preparation, analysis, plan, rewrite, verification and the
  report's simulation), and its ratio to PyTorch's min-cut on the same graph in the same run;
  the same in CPU seconds of the process (``time.process_time``: steadier than wall-clock
  seconds on a machine that runs other work);
* saved bytes and simulated peak bytes of the emitted forward and backward
  (:func:`ckptfx.memory.simulate`, primals excluded), the same measure for every partitioner.

Usage::

    python bench/pass_time.py --quick                 # 12 and 24 layers
    python bench/pass_time.py --layers 12 24 48 96 --json pass_time.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx

MIB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class Contender:
    """One partitioner: a key, a label for the table, and the call that partitions."""

    key: str
    label: str
    partition: Callable[..., tuple[fx.GraphModule, fx.GraphModule]]


def _torch_min_cut(budget: float):
    def partition(gm, joint_inputs, **kwargs):
        import torch._functorch.config as functorch_config
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        with functorch_config.patch(activation_memory_budget=budget):
            return min_cut_rematerialization_partition(gm, joint_inputs, compiler="inductor",
                                                       **kwargs)
    return partition


def _ckptfx(options: dict, fallbacks: list[str]):
    from ckptfx.passes.partition import partition_fn

    def on_report(report):
        if report.fallback:
            fallbacks.append(report.fallback)

    fn = partition_fn(options, on_report)

    def partition(gm, joint_inputs, **kwargs):
        return fn(gm, joint_inputs, compiler="inductor", **kwargs)
    return partition


def contenders(fallbacks: list[str]) -> tuple[Contender, ...]:
    """The five partitioners; ckptfx's fallbacks to PyTorch (errors) go to ``fallbacks``."""
    return (
        Contender("torch", "PyTorch min-cut", _torch_min_cut(1.0)),
        Contender("torch_0.5", "PyTorch activation_memory_budget=0.5", _torch_min_cut(0.5)),
        Contender("ckpt", "ckpt default", _ckptfx({}, fallbacks)),
        Contender("ckpt_0.5", "ckpt memory_budget=0.5", _ckptfx({"memory_budget": 0.5}, fallbacks)),
        Contender("ckpt_peak_0.0", 'ckpt least peak (0.0, "peak")',
                  _ckptfx({"memory_budget": 0.0, "budget_kind": "peak"}, fallbacks)),
    )


def gpt_joint(layers: int, hidden: int = 256, heads: int = 4, seq: int = 128, batch: int = 4,
              vocab: int = 4096):
    """The joint graph of ``TinyGPT`` as Inductor hands it to a partitioner (a JointGraph)."""
    from ckptfx.capture import inductor_joint
    from ckptfx.demo import GPTConfig, TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab=vocab, seq=seq, layers=layers, heads=heads, width=hidden))
    return inductor_joint(model, torch.randint(0, vocab, (batch, seq)))


def fresh_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a joint GraphModule: new nodes (same names), each with a shallow copy of its
    ``meta`` (fake values shared), so a partitioner's edits never reach the original; a lazy
    GraphModule (code generated on first use), as ``torch.compile`` makes it."""
    with warnings.catch_warnings():  # the codegen's pytree spec warns when copied
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    for old, new in zip(gm.graph.find_nodes(op="output"), graph.find_nodes(op="output")):
        new.meta = dict(old.meta)
    from torch.fx._lazy_graph_module import _LazyGraphModule

    return _LazyGraphModule(gm, graph)  # as torch.compile makes them


@contextlib.contextmanager
def as_torch_compile():
    """The context ``torch.compile`` runs a partitioner in (``compile_fx``): GraphModules
    generate their code lazily, on first use; the Python dispatcher is on."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch.fx._lazy_graph_module import _use_lazy_graph_module

    with _use_lazy_graph_module(True), enable_python_dispatcher():
        yield


def partition_kwargs(joint) -> dict:
    """The keyword arguments AOTAutograd gives a partitioner for ``joint``."""
    from ckptfx.joint import Role

    primals = [p.name for p in joint.nodes_with(Role.PRIMAL)]
    static = [i for i, name in enumerate(primals) if name in joint.static_input_names]
    return {"num_fwd_outputs": joint.num_fwd_outputs, "static_lifetime_input_indices": static}


def measure(joint, entries: Sequence[Contender], repeats: int) -> list[dict]:
    """Runs every contender ``repeats`` times on fresh copies, interleaved; one row each."""
    from ckptfx.memory import simulate

    times: dict[str, list[float]] = {c.key: [] for c in entries}
    cpu: dict[str, list[float]] = {c.key: [] for c in entries}
    graphs = {}
    kwargs = partition_kwargs(joint)
    for _ in range(repeats):
        for c in entries:
            gm = fresh_copy(joint.gm)
            with as_torch_compile():
                start, start_cpu = time.perf_counter(), time.process_time()
                graphs[c.key] = c.partition(gm, joint.joint_inputs, **kwargs)
                times[c.key].append(time.perf_counter() - start)
                cpu[c.key].append(time.process_time() - start_cpu)
    nodes = len(joint.graph.nodes)
    reference = statistics.median(times[entries[0].key])
    reference_cpu = statistics.median(cpu[entries[0].key])
    rows = []
    for c in entries:
        timeline = simulate(*graphs[c.key])
        seconds, cpu_s = statistics.median(times[c.key]), statistics.median(cpu[c.key])
        rows.append({"contender": c.key, "label": c.label, "joint_nodes": nodes,
                     "seconds": seconds, "ratio": seconds / reference, "runs": times[c.key],
                     "cpu_seconds": cpu_s, "cpu_ratio": cpu_s / reference_cpu,
                     "saved_bytes": timeline.saved_bytes, "peak_bytes": timeline.peak_bytes})
    return rows


def markdown(rows: list[dict]) -> str:
    """One Markdown table: a row per depth and partitioner."""
    lines = ["| layers (joint nodes) | partitioner | seconds | × PyTorch min-cut | CPU s "
             "| CPU × min-cut | saved MiB | simulated peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = r["label"] + (f" (fell back: {r['fallback']})" if r.get("fallback") else "")
        lines.append(f"| {r['layers']} ({r['joint_nodes']:,}) | {label} | {r['seconds']:.2f} "
                     f"| {r['ratio']:.2f}× | {r['cpu_seconds']:.2f} | {r['cpu_ratio']:.2f}× "
                     f"| {r['saved_bytes'] / MIB:.1f} "
                     f"| {r['peak_bytes'] / MIB:.1f} |")
    return "\n".join(lines)


def run(layers: Sequence[int], repeats: int | None = None, keys: Sequence[str] | None = None,
        **shape) -> list[dict]:
    """Rows for every depth (see :func:`measure`); ``repeats`` defaults to 3 below 48 layers
    and 1 from there on; ``keys`` selects contenders (PyTorch's min-cut always runs first)."""
    rows = []
    for n in layers:
        joint = gpt_joint(n, **shape)
        fallbacks: list[str] = []
        entries = [c for c in contenders(fallbacks)
                   if keys is None or c.key in keys or c.key == "torch"]
        for row in measure(joint, entries, repeats or (3 if n < 48 else 1)):
            rows.append({"layers": n, **row})
        if fallbacks:
            for row in rows[-len(entries):]:
                if row["contender"].startswith("ckpt"):
                    row["fallback"] = "; ".join(sorted(set(fallbacks)))
        print(f"{n} layers done", file=sys.stderr, flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24, 48, 96])
    parser.add_argument("--quick", action="store_true", help="12 and 24 layers")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per partitioner (default 3 below 48 layers, else 1)")
    parser.add_argument("--contenders", nargs="+", default=None,
                        help="keys among torch torch_0.5 ckpt ckpt_0.5 ckpt_peak_0.0")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    layers = [12, 24] if args.quick else args.layers
    rows = run(layers, args.repeats, args.contenders)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "torch": torch.__version__, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
