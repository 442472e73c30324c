"""Pipeline stages: budgets that count the microbatches a stage keeps in flight.

Note [Microbatches in flight]
    A pipeline schedule runs a stage's forward for several microbatches before their
    backwards: the saved values of each stay alive until its backward. In 1F1B stage ``i``
    of ``n`` keeps up to ``n - i`` microbatches in flight (stage 0 the most, the last stage
    one); GPipe keeps all of them. With ``m = microbatches_in_flight`` and a budget of B
    bytes, a plan's saved bytes s (one microbatch) and its simulated peak P (one forward and
    backward) must satisfy

    * ``budget_kind="saved"``: ``m * s <= B``: the graph is planned for B // m;
    * ``budget_kind="peak"``: ``(m - 1) * s + P <= B``: m - 1 microbatches wait with their
      saved values while one runs its step. The peak search first plans for B alone (its
      peak P0); then the graph is planned for a saved budget s <= (B - P) / (m - 1), with P
      the peak of the last plan, until a plan fits (P moves little with s: the step's
      working set dominates it, so this ends in a round or two). The saved-bytes solver is
      exact, so the plan is the least recompute under that bound.

    Fraction budgets are on each graph's own scale and are left as they are; the report
    states the per-microbatch and the in-flight figures whatever the budget.

Note [What the schedule holds]
    Measured with ``torch.distributed.pipelining`` (torch 2.13, 1F1B, 2 stages, 4
    microbatches; the storages ops create, ``tests/test_parallel.py``), a stage holds more
    than its microbatches' saved values: a microbatch's stage output lives until its
    backward (``fwd_cache``) and often longer (a send request keeps it until a later send
    completes; the last stage keeps every output until the step returns them,
    ``output_chunks`` with ``step(return_outputs=True)``, the default), and a stage after
    the first keeps the input gradient it sends back until that send completes, while it
    runs the next backward. One step's simulated peak lets the step's outputs die when
    its forward returns (Note [Memory model]: a caller keeps only what the backward
    needs), but the schedule holds them, so :func:`pipeline_stage_options` subtracts
    ``n * output_bytes`` for n microbatches per step (the running one's and the others'; a
    bound: the first stage measured m of the others at once, the first microbatch's output
    held until the step's third backward), plus ``input_bytes`` for a stage after the
    first (one held at a time, measured). The receive
    buffers (one per microbatch for the activations and for the gradients a stage
    receives) are allocated at the first step and kept: like parameters, gradients and
    optimizer state they are resident, and belong outside ``device_memory_bytes``. Not
    modelled: the loss function's memory on the last stage (it runs outside the compiled
    stage; the schedule keeps each microbatch's loss until the step ends), and scratch
    memory inside one op.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ckptfx.config import MemoryBudget, RematConfig
from ckptfx.errors import ConfigError

SCHEDULES = ("1F1B", "GPipe")


def in_flight(config: RematConfig) -> int:
    """``microbatches_in_flight`` (m >= 1)."""
    return config.microbatches_in_flight


def applies(config: RematConfig) -> bool:
    """Whether the in-flight accounting changes the budget: m > 1 and a byte budget."""
    budget = config.memory_budget
    return in_flight(config) > 1 and budget is not None and budget.nbytes is not None


def per_microbatch_config(config: RematConfig, peak_bytes: int | None = None) -> RematConfig:
    """The config one microbatch's graph is planned with (Note [Microbatches in flight]).

    Args:
        config: the stage's options.
        peak_bytes: for ``budget_kind="peak"``, the simulated peak of one step of the last
            plan (bytes).

    Returns:
        ``config`` itself when the accounting does not apply; else a config with a saved
        budget of B // m (saved), or of max(0, (B - peak_bytes) // (m - 1)) (peak).
    """
    if not applies(config):
        return config
    m, budget = in_flight(config), config.memory_budget.nbytes
    if config.effective_budget_kind == "saved":
        nbytes = budget // m
    else:
        nbytes = max(0, (budget - int(peak_bytes or 0)) // (m - 1))
    return dataclasses.replace(config, memory_budget=MemoryBudget(nbytes=nbytes),
                               budget_kind="saved")


def in_flight_peak(config: RematConfig, saved_bytes: int, peak_bytes: int | None) -> int | None:
    """(m - 1) * saved + peak: the stage's peak with m microbatches in flight (bytes)."""
    if peak_bytes is None:
        return None
    return (in_flight(config) - 1) * saved_bytes + peak_bytes


def in_flight_note(config: RematConfig, saved_bytes: int, peak_bytes: int | None) -> str:
    """The report's line of per-microbatch and in-flight figures ("" when m = 1)."""
    m = in_flight(config)
    if m == 1:
        return ""
    peak = in_flight_peak(config, saved_bytes, peak_bytes)
    budget = config.memory_budget
    of = f" of memory_budget={budget} ({config.effective_budget_kind})" if budget else ""
    return (f"microbatches in flight: {m}; per microbatch: saved {saved_bytes} B, peak "
            f"{peak_bytes if peak_bytes is not None else 'unknown'} B; in flight: saved "
            f"{m * saved_bytes} B, peak {peak if peak is not None else 'unknown'} B{of}")


def schedule_in_flight(schedule: Any, stage_index: int, num_stages: int,
                       n_microbatches: int) -> int:
    """Microbatches stage ``stage_index`` keeps in flight under ``schedule``.

    Args:
        schedule: ``"1F1B"`` or ``"GPipe"`` (any case), or a
            ``torch.distributed.pipelining`` schedule class or instance
            (``Schedule1F1B``, ``ScheduleGPipe``).
        stage_index: this stage, 0-based.
        num_stages: stages in the pipeline.
        n_microbatches: microbatches per step.

    Raises:
        ConfigError: an unknown schedule or an index out of range.
    """
    name = schedule if isinstance(schedule, str) else \
        getattr(schedule, "__name__", type(schedule).__name__)
    key = name.lower().removeprefix("schedule")
    if not (0 <= stage_index < num_stages) or n_microbatches < 1:
        raise ConfigError(f"stage_index={stage_index}, num_stages={num_stages}, "
                          f"n_microbatches={n_microbatches}: need 0 <= stage_index < "
                          f"num_stages and n_microbatches >= 1")
    if key == "1f1b":
        return min(num_stages - stage_index, n_microbatches)
    if key == "gpipe":
        return n_microbatches
    raise ConfigError(f"schedule={name!r}: allowed values: {', '.join(SCHEDULES)} (a name, or "
                      f"torch.distributed.pipelining's Schedule1F1B / ScheduleGPipe); for "
                      f"another schedule pass microbatches_in_flight yourself")


def schedule_held_bytes(stage_index: int, n_microbatches: int, output_bytes: int,
                        input_bytes: int) -> int:
    """Bytes the schedule holds besides a running microbatch's step (Note [What the
    schedule holds]): every microbatch's output (the simulated step lets its own die when
    its forward returns), and for a stage after the first one input gradient being sent
    back."""
    return n_microbatches * output_bytes + (input_bytes if stage_index > 0 else 0)


def pipeline_stage_options(schedule: Any, stage_index: int, num_stages: int,
                           device_memory_bytes: int, n_microbatches: int, *,
                           output_bytes: int = 0, input_bytes: int = 0) -> dict[str, Any]:
    """Options for the stage ``stage_index`` of a pipeline: a peak budget of the device's
    memory with the stage's microbatches in flight (Note [Microbatches in flight]), less
    what the schedule holds besides them (Note [What the schedule holds]).

    Example:
        >>> import ckptfx
        >>> ckptfx.pipeline_stage_options("1F1B", 0, 2, 2**30, n_microbatches=4)
        {'memory_budget': 1073741824, 'budget_kind': 'peak', 'microbatches_in_flight': 2}

    Args:
        schedule: see :func:`schedule_in_flight`.
        stage_index: this stage, 0-based.
        num_stages: stages in the pipeline.
        device_memory_bytes: bytes the stage's activations may take on its device (the
            device's memory less parameters, gradients, optimizer state, the schedule's
            receive buffers and, on the last stage, the loss function's memory), bytes.
        n_microbatches: microbatches per step.
        output_bytes: bytes of the stage's output for one microbatch (what it sends to the
            next stage; the last stage's: what the loss reads), 0 to reserve nothing.
        input_bytes: bytes of the stage's input for one microbatch (the gradient a stage
            after the first sends back has its size), 0 to reserve nothing.

    Returns:
        A dict of options for ``CkptBackend(**options)`` / ``options=``: a peak budget of
        ``device_memory_bytes`` less :func:`schedule_held_bytes`.

    Raises:
        ConfigError: an unknown schedule, an index out of range, a memory figure that is
            not an int >= 2, an ``output_bytes`` or ``input_bytes`` that is not an int >=
            0, or held tensors that leave less than 2 bytes.
    """
    for name, value, least in (("device_memory_bytes", device_memory_bytes, 2),
                               ("output_bytes", output_bytes, 0),
                               ("input_bytes", input_bytes, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"{name}={value!r}: allowed values: an int >= {least} (bytes)")
    m = schedule_in_flight(schedule, stage_index, num_stages, n_microbatches)
    held = schedule_held_bytes(stage_index, n_microbatches, output_bytes, input_bytes)
    if device_memory_bytes - held < 2:
        raise ConfigError(f"device_memory_bytes={device_memory_bytes}: the schedule holds "
                          f"{held} B of stage outputs and gradients (output_bytes="
                          f"{output_bytes}, input_bytes={input_bytes}); give the stage more "
                          f"memory or fewer microbatches")
    return {"memory_budget": device_memory_bytes - held, "budget_kind": "peak",
            "microbatches_in_flight": m}
