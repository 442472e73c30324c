"""A 2-stage 1F1B pipeline with ckptfx: each stage's budget counts its microbatches in flight.

    torchrun --standalone --nproc_per_node 2 examples/pipeline.py

``ckptfx.pipeline_stage_options`` turns the device memory left for activations into each
stage's options: in 1F1B stage i of n keeps up to n - i microbatches' saved values alive.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

import ckptfx
from _common import CFG, batch, gpt, setup

MICROBATCHES = 4
ACTIVATION_MEMORY = 4 * 2**20  # bytes this example lets each stage's activations take


class First(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.tok, self.pos = model.tok, model.pos
        self.blocks = nn.ModuleList(model.blocks[: len(model.blocks) // 2])

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return x


class Last(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(model.blocks[len(model.blocks) // 2:])
        self.ln, self.head = model.ln, model.head

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def loss_fn(logits, ids):
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                       ids[:, 1:].reshape(-1))


def main() -> None:
    device = setup()
    rank, stages = dist.get_rank(), dist.get_world_size()
    stage = (First if rank == 0 else Last)(gpt(device))
    # what the schedule holds besides a step: stage outputs (and input gradients), fp32
    micro = CFG.batch // MICROBATCHES * CFG.seq * 4
    options = ckptfx.pipeline_stage_options(
        Schedule1F1B, rank, stages, ACTIVATION_MEMORY, MICROBATCHES,
        output_bytes=micro * (CFG.width if rank < stages - 1 else CFG.vocab),
        input_bytes=micro * CFG.width if rank > 0 else 0)
    backend = ckptfx.CkptBackend(**options, inner="eager")
    pipe = PipelineStage(torch.compile(stage, backend=backend), rank, stages, device)
    schedule = Schedule1F1B(pipe, MICROBATCHES, loss_fn=loss_fn)
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-3)
    losses = []
    for step in range(3):
        opt.zero_grad()
        ids = batch(step, device, per_rank=False)  # the first stage's input, the last's target
        mb_losses: list = []
        if rank == 0:
            schedule.step(ids)
        else:
            schedule.step(target=ids, losses=mb_losses)
            losses.append(torch.stack(mb_losses).mean().item())
        opt.step()
    for r in range(stages):  # each stage prints its own figures, in order
        if r == rank:
            print(f"stage {rank}: {options}")
            for report in backend.reports:
                notes = [n for n in report.notes if n.startswith("microbatches in flight")]
                print(f"  saved {report.saved_bytes / 2**20:.2f} MiB per microbatch, predicted "
                      f"peak {report.predicted_peak_bytes / 2**20:.2f} MiB", *notes, sep="; ")
            if losses:
                print(f"  losses {', '.join(f'{x:.4f}' for x in losses)}")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
