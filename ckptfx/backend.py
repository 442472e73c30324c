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

import functools
import hashlib
import pathlib
from typing import Any

from ckptfx.config import RematConfig
from ckptfx.report import RematReport


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

    Args:
        config: a RematConfig or a dict of options; or pass options as keywords
            (``CkptBackend(memory_budget=0.5)``).
        **options: RematConfig fields (validated: unknown keys raise ConfigError).

    Attributes:
        config: the RematConfig in use.
        reports: one RematReport per joint graph partitioned, in compile order.
    """

    def __init__(self, config: RematConfig | None = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("CkptBackend: pass either a RematConfig or keyword options, not both")
        self.config = RematConfig.coerce(config) if config is not None else \
            RematConfig.from_options(options)
        self.reports: list[RematReport] = []

    def __call__(self, gm, example_inputs):
        from ckptfx import _torch_compat as compat

        if self.config.inner == "eager":
            from functorch.compile import make_boxed_func

            from ckptfx.passes.partition import partition_fn

            def nop(g, _inputs):
                return make_boxed_func(g.forward)

            return compat.aot_autograd_backend(
                fw_compiler=nop, bw_compiler=nop, inference_compiler=nop,
                partition_fn=partition_fn(self.config, self.reports.append),
                keep_inference_input_mutations=True,
            )(gm, example_inputs)
        partitioner = make_inductor_partitioner(self.config, self.reports.append)
        patches = {"custom_partitioner_fn": partitioner, **compat.inductor_config_patches()}
        return compat.compile_fx(gm, example_inputs, config_patches=patches)

    def __repr__(self) -> str:
        return f"CkptBackend({self.config!r})"


def ckpt_backend(gm, example_inputs, options: dict[str, Any] | None = None, **kwargs: Any):
    """The function registered as backend ``"ckpt"``.

    Args:
        gm: the Dynamo FX graph.
        example_inputs: its example inputs.
        options: the ``options=`` of torch.compile (RematConfig fields).

    Raises:
        ConfigError: an unknown option or a bad value (names it and the allowed values).
    """
    if kwargs.get("mode") is not None:
        from ckptfx.errors import ConfigError

        raise ConfigError(f"mode={kwargs['mode']!r} is not supported by backend 'ckpt'; "
                          f"pass options={{...}} instead (see RematConfig)")
    return CkptBackend(RematConfig.from_options(options))(gm, example_inputs)
