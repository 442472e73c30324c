"""FSDP2 with ckptfx: ``fully_shard`` each block and the root, then compile.

    torchrun --standalone --nproc_per_node 2 examples/fsdp2.py            # the whole model
    torchrun --standalone --nproc_per_node 2 examples/fsdp2.py --per-block

FSDP2's all-gathers and reduce-scatters run in its hooks, outside the compiled graphs; a
collective inside a compiled graph is never recomputed.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import ckptfx
from _common import gpt, setup, summary, train


def main() -> None:
    device = setup()
    model = gpt(device)
    backend = ckptfx.CkptBackend(memory_budget=0.5, verify_ranks=True, inner="eager")
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    if "--per-block" in sys.argv:
        for block in model.blocks:
            block.compile(backend=backend)
        step_fn = model
    else:
        step_fn = torch.compile(model, backend=backend)
    summary("FSDP2", backend, train(step_fn, model.parameters(), device))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
