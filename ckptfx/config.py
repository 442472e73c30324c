"""RematConfig: every option of the pass, validated once, frozen and hashable.

A config is passed explicitly to every stage; nothing reads options from the environment or
from another library's globals. ``RematConfig.from_options(dict)`` is what
``torch.compile(..., backend="ckpt", options={...})`` calls: it rejects unknown keys and bad
values with a :class:`ckptfx.errors.ConfigError` that names the option and the allowed values.

Example:
    >>> from ckptfx.config import RematConfig
    >>> RematConfig.from_options({"memory_budget": "512MiB", "inner": "eager"}).memory_budget
    MemoryBudget(fraction=None, nbytes=536870912)
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from ckptfx.errors import ConfigError
from ckptfx.solvers import registry

INNERS = ("inductor", "eager")
BUDGET_KINDS = ("saved", "peak")
COST_MODELS = ("roofline", "profile")

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """A memory budget: a fraction on the scale least..default, or absolute bytes.

    See ``Note [Budget fractions]``. Exactly one of ``fraction`` (a float in [0, 1]; 0 asks
    for the least memory achievable, 1 for what the pass keeps without a budget)
    and ``nbytes`` (int, bytes) is set.
    """

    fraction: float | None = None
    nbytes: int | None = None

    def resolve(self, least: int, default: int) -> int:
        """The budget in bytes on the scale ``least`` (fraction 0) .. ``default`` (fraction 1).

        Args:
            least: the fewest bytes any valid plan reaches (bytes).
            default: what the plan without a budget (the min-cut) reaches (bytes).

        Note [Budget fractions]
            A fraction f means ``least + f * (default - least)``: 1.0 is what ckptfx keeps
            without a budget, 0.0 the least achievable, linear in between. This is the scale
            of ``torch._functorch.config.activation_memory_budget`` (inputs-only at 0, the
            default min-cut at 1), so the same fraction asks the same of both. A fraction of
            the no-recompute bytes instead would let a budget of 0.8 keep more than no budget
            at all: on GPT-2 the no-recompute plan keeps 2.5x what the min-cut keeps.
        """
        if self.nbytes is not None:
            return self.nbytes
        assert self.fraction is not None
        return least + int(math.floor(self.fraction * max(0, default - least)))

    def __str__(self) -> str:
        return repr(float(self.fraction)) if self.fraction is not None else f"{self.nbytes} B"


def parse_budget(value: Any) -> MemoryBudget | None:
    """Parses the ``memory_budget`` option.

    Args:
        value: None (no budget); a float in [0, 1] (0 = the least memory achievable, 1 = what
            the pass keeps without a budget; see Note [Budget fractions]); an int >= 2 (bytes); or a string size such as ``"512MiB"``, ``"2GB"``,
            ``"1e9B"`` (units B, KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB = powers
            of 1024; the unit is required).

    Returns:
        A MemoryBudget, or None.

    Raises:
        ConfigError: NaN, infinite, negative, a fraction above 1, a bool, a bare int 0 or 1
            (ambiguous between a fraction and bytes: write 0.0/1.0 or "1B"), a string without
            a unit ("0.5": a fraction or bytes?), an unparsable string or an unknown unit.
    """
    allowed = ("a float fraction in [0, 1], int bytes >= 2, or a size string like '512MiB' "
               "(units: " + ", ".join(_UNITS) + ")")
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"memory_budget={value!r}: a bool is not a budget; use {allowed}")
    if isinstance(value, int):
        if value in (0, 1):
            raise ConfigError(
                f"memory_budget={value!r} is ambiguous: write {float(value)!r} for a fraction "
                f"of the activation bytes or '{value}B' for bytes")
        if value < 0:
            raise ConfigError(f"memory_budget={value!r} is negative; use {allowed}")
        return MemoryBudget(nbytes=value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ConfigError(f"memory_budget={value!r} is not finite; use {allowed}")
        if not 0.0 <= value <= 1.0:
            raise ConfigError(
                f"memory_budget={value!r}: a float is a fraction and must lie in [0, 1]; "
                f"for bytes pass an int or a string like '512MiB'")
        return MemoryBudget(fraction=value)
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        unit = match.group(2).lower() if match else ""
        if match is None or (unit and unit not in _UNITS):
            raise ConfigError(f"memory_budget={value!r} is not a size; use {allowed}")
        if not unit:
            raise ConfigError(
                f"memory_budget={value!r} has no unit: write a float for a fraction "
                f"(memory_budget={match.group(1)}) or a size with a unit ('{match.group(1)}B', "
                f"'{match.group(1)}MiB')")
        nbytes = float(match.group(1)) * _UNITS.get(unit, 1)
        if math.isnan(nbytes) or nbytes < 0:
            raise ConfigError(f"memory_budget={value!r} is negative; use {allowed}")
        return MemoryBudget(nbytes=int(nbytes))
    raise ConfigError(f"memory_budget={value!r} has type {type(value).__name__}; use {allowed}")


def solver_names() -> tuple[str, ...]:
    """The values ``solver=`` accepts: ``"auto"`` and every solver of
    :mod:`ckptfx.solvers.registry`, built-in or registered with ``registry.register``."""
    return ("auto", *registry.available())


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; allowed values: {', '.join(allowed)}")
    return value


@dataclasses.dataclass(frozen=True)
class RematConfig:
    """Options of the rematerialization pass.

    Attributes:
        memory_budget: None (no budget: the min-cut over saved bytes decides), or a
            :class:`MemoryBudget` (see :func:`parse_budget` for accepted inputs).
        budget_kind: ``"peak"`` bounds the simulated peak bytes of the whole step (what runs
            out of memory); ``"saved"`` bounds the bytes kept from forward to backward; None
            (default) is ``"peak"``. Only with ``memory_budget``.
        solver: ``"auto"`` (min-cut without a budget, ``"budget"`` with one), ``"mincut"``,
            ``"budget"`` (MILP, HiGHS), ``"greedy"`` (knapsack heuristic), ``"uniform"``.
        policy: None, a built-in policy name (see ``ckptfx.policies.BUILTIN``), or a policy
            object / callable (validated by :func:`ckptfx.policies.resolve`).
        inner: ``"inductor"`` (Inductor codegen with ckptfx as partitioner) or ``"eager"``.
        strict: raise instead of falling back (infeasible budget, unsupported graph).
        cost_model: ``"roofline"`` (FLOPs and bytes moved) or ``"profile"`` (timed ops).
        recompute_expensive: whether compute-bound ops (matmul, convolution, attention) may
            be recomputed (Note [Recomputing expensive ops]). None (default): not by the
            no-budget plan (PyTorch's min-cut makes the same choice), but a memory budget
            may recompute them, at their cost. True: the min-cut may too. False: no solver
            recomputes them, whatever the budget (an unmet budget says how far True goes).
        layers_per_checkpoint: k of the uniform policy/solver; None means round(sqrt(n)).
            Only with ``policy="uniform"`` or ``solver="uniform"``.
        time_limit_s: wall-clock limit of exact solvers and of the peak search, seconds (> 0).
        unbacked_size_hint: the size assumed for an unbacked SymInt (a data-dependent size)
            that the ShapeEnv cannot bound, elements; a bounded one takes its upper bound.
            Every choice is logged and noted in the report; see ``Note [Unbacked sizes]``
            in ``ckptfx/analysis/sizes.py``.
        verify_ranks: after planning each graph, all-gather a fingerprint of the plan (its
            saved and recomputed nodes and the options) across the default process group of
            ``torch.distributed`` and raise :class:`ckptfx.errors.RankMismatchError`, naming
            the first differing decision, when ranks disagree. Every rank must then compile
            the same graphs in the same order (a collective runs per graph). Off by default.
        microbatches_in_flight: m >= 1, the microbatches whose saved values a pipeline stage
            keeps alive at once (1F1B: stages - stage index; GPipe: all of them; see
            :func:`ckptfx.stages.pipeline_stage_options`). A byte budget then holds m times
            the saved bytes (``"saved"``: m * saved <= budget) or m - 1 microbatches' saved
            bytes plus one step's peak (``"peak"``); see ``Note [Microbatches in flight]``
            in ``ckptfx/stages.py``. Default 1.
        regather_params: trade memory for communication under sharded data parallelism
            traced into the graph (SimpleFSDP, traceable FSDP2): an all-gather of parameter
            shards and its ``wait_tensor`` may be recomputed, so the backward gathers the
            parameters again instead of keeping the unsharded copy from the forward. Priced
            by the gathered bytes over ``Machine.comm_bandwidth``; the plan's notes say how
            many bytes of unsharded parameters are no longer kept and how many the backward
            gathers again. Reduce-scatters, all-reduces and all-gathers of activations are
            never recomputed. See ``Note [Re-gathering parameters]`` in
            ``ckptfx/analysis/nodes.py``. Off by default.
    """

    memory_budget: MemoryBudget | None = None
    budget_kind: str | None = None
    solver: str = "auto"
    policy: Any = None
    inner: str = "inductor"
    strict: bool = False
    cost_model: str = "roofline"
    recompute_expensive: bool | None = None
    layers_per_checkpoint: int | None = None
    time_limit_s: float = 10.0
    unbacked_size_hint: int = 4096
    verify_ranks: bool = False
    microbatches_in_flight: int = 1
    regather_params: bool = False

    def __post_init__(self) -> None:
        if self.budget_kind is not None:
            _choice("budget_kind", self.budget_kind, BUDGET_KINDS)
        _choice("solver", self.solver, solver_names())
        _choice("inner", self.inner, INNERS)
        _choice("cost_model", self.cost_model, COST_MODELS)
        if self.recompute_expensive is not None and not isinstance(self.recompute_expensive, bool):
            raise ConfigError(f"recompute_expensive={self.recompute_expensive!r}: allowed values: "
                              f"None, True, False")
        for flag in ("strict", "verify_ranks", "regather_params"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag}={getattr(self, flag)!r}: allowed values: True, False")
        if self.memory_budget is not None and not isinstance(self.memory_budget, MemoryBudget):
            object.__setattr__(self, "memory_budget", parse_budget(self.memory_budget))
        k = self.layers_per_checkpoint
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"layers_per_checkpoint={k!r}: allowed values: None or an int >= 1")
        t = self.time_limit_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or math.isinf(t):
            raise ConfigError(f"time_limit_s={t!r}: allowed values: a finite number of seconds > 0")
        u = self.unbacked_size_hint
        if isinstance(u, bool) or not isinstance(u, int) or u < 1:
            raise ConfigError(f"unbacked_size_hint={u!r}: allowed values: an int >= 1")
        m = self.microbatches_in_flight
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"microbatches_in_flight={m!r}: allowed values: an int >= 1")
        if self.policy is not None:
            from ckptfx.policies import resolve  # policies import no heavy modules

            resolve(self.policy)  # raises ConfigError on a bad policy
        self._check_applicable()

    def _check_applicable(self) -> None:
        """Rejects options that would do nothing with the others given (a silent no-op is a
        user's mistake left standing)."""
        if self.budget_kind is not None and self.memory_budget is None:
            raise ConfigError(
                f"budget_kind={self.budget_kind!r} applies only with a memory_budget; pass "
                f"memory_budget (a fraction, bytes, or a size like '2GiB') or drop budget_kind")
        if self.solver == "mincut" and self.memory_budget is not None:
            raise ConfigError(
                f"solver='mincut' finds the fewest saved bytes and takes no memory_budget "
                f"(memory_budget={self.memory_budget}); use solver='auto' (min-cut without a "
                f"budget, the budget MILP with one), 'budget', 'greedy' or 'uniform'")
        if self.layers_per_checkpoint is not None and not self._uniform_requested():
            raise ConfigError(
                f"layers_per_checkpoint={self.layers_per_checkpoint!r} applies only to the "
                f"uniform policy; add policy='uniform' (or solver='uniform')")

    def _uniform_requested(self) -> bool:
        from ckptfx.policies import solver_request

        request = solver_request(self.policy) if self.policy is not None else None
        return self.solver == "uniform" or (request is not None and request[0] == "uniform")

    @property
    def mincut_recompute_expensive(self) -> bool:
        """Whether the no-budget plan (the min-cut) may recompute compute-bound ops.

        Note [Recomputing expensive ops]
            The plan without a budget saves the output of a matmul, a convolution or an
            attention rather than recompute it, as PyTorch's min-cut does: memory bought
            with the most compute is the worst trade. A memory budget asks for less memory
            than that plan keeps, and below it recomputing a matmul is often the only way
            (a checkpointed block recomputes its matmuls), so by default (``None``) the
            budget solvers and the peak search may recompute them, pricing them by their
            cost. ``True`` lets the min-cut recompute them too (its fewest bytes);
            ``False`` binds every solver, budgets included.
        """
        return bool(self.recompute_expensive)

    @property
    def budget_recompute_expensive(self) -> bool:
        """Whether a memory budget's solvers may recompute compute-bound ops (Note
        [Recomputing expensive ops]): unless ``recompute_expensive=False``."""
        return self.recompute_expensive is not False

    @property
    def effective_budget_kind(self) -> str:
        """The budget kind that applies: ``budget_kind``, or ``"peak"`` when unset."""
        return self.budget_kind or "peak"

    @property
    def effective_solver(self) -> str:
        """The solver that runs: ``auto`` is min-cut without a budget, ``budget`` with one."""
        if self.solver != "auto":
            return self.solver
        return "budget" if self.memory_budget is not None else "mincut"

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> "RematConfig":
        """Builds a config from a torch.compile ``options`` dict.

        Raises:
            ConfigError: an unknown key (the message lists the valid ones) or a bad value.
        """
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for backend 'ckpt'; "
                f"valid options: {', '.join(valid)}")
        if "memory_budget" in options:
            options["memory_budget"] = parse_budget(options["memory_budget"])
        return cls(**options)

    @classmethod
    def coerce(cls, config: "RematConfig | dict[str, Any] | None") -> "RematConfig":
        """The one way public entry points accept options: None (defaults), a RematConfig,
        or a dict of options (validated like ``options=``).

        Raises:
            ConfigError: anything else, or a dict with an unknown key or a bad value.
        """
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            return cls.from_options(config)
        raise ConfigError(f"config={config!r}: allowed values: None, a ckptfx.RematConfig, or a "
                          f"dict of options such as {{'memory_budget': 0.5}}")

    def cache_key(self) -> str:
        """A stable string of every option, for compile caches (see ``CkptPartitioner.uuid``)."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            parts.append(f"{f.name}={value!r}")
        return ";".join(parts)
