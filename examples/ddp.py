"""DDP with ckptfx: compile the model, then wrap it (``DDP(torch.compile(model))``).

    torchrun --standalone --nproc_per_node 2 examples/ddp.py

Dynamo splits the graph at DDP's gradient buckets; ckptfx plans every bucket's graph with one
byte budget for the model, and ``verify_ranks`` checks that every rank decided the same.
"""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ckptfx
from _common import gpt, setup, summary, train


def main() -> None:
    device = setup()
    model = gpt(device)
    backend = ckptfx.CkptBackend(memory_budget=0.5, verify_ranks=True, inner="eager")
    ddp = DDP(torch.compile(model, backend=backend))
    summary("DDP", backend, train(ddp, ddp.parameters(), device))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
