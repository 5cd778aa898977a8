"""One ``train.fit.train_step`` under DDP, for tests/test_fit.py (run it with torchrun).

    torchrun --standalone --nproc_per_node 2 tests/ddp_step.py OUT.pt

Every process builds the same model and the same fixed global batch of 4 sequences, takes its
equal shard (2 sequences; the last sequence, on rank 1, is partly padding so the shards hold
different numbers of real frames), wraps the model in DistributedDataParallel (gloo on CPU) and
runs one train_step, twice: with BatchNorm frozen (``eval()``: running statistics, dropout off,
gradients still flow) and in normal training mode. Rank 0 writes the batch, the initial weights,
and the weights and gradients after each step to OUT.pt for the test to compare with one process
stepping on the whole batch.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from rtsed.models.model import build_model
from train.fit import train_step

BATCH, FRAMES, CLASSES = 4, 64, 3
MODEL = dict(name="dnd_3_1", channels=8, n_classes=CLASSES, dropout=0.0)


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, FRAMES, 40, generator=g)
    y = (torch.rand(BATCH, FRAMES, CLASSES, generator=g) > 0.7).float()
    mask = torch.ones(BATCH, FRAMES)
    mask[-1, 40:] = 0.0  # a padded last sequence, as SequenceDataset makes
    return x, y, mask


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per = BATCH // world
    x, y, mask = fixed_batch()
    shard = slice(rank * per, (rank + 1) * per)
    result: dict[str, object] = {"x": x, "y": y, "mask": mask, "world": world}
    for mode in ("frozen", "train"):
        torch.manual_seed(0)
        model = build_model(MODEL["name"], **{k: v for k, v in MODEL.items() if k != "name"})
        result[f"{mode}_init"] = {k: v.clone() for k, v in model.state_dict().items()}
        net = DistributedDataParallel(model)
        net.train(mode == "train")  # frozen: BN running statistics, dropout off; grads still flow
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss = train_step(net, optimizer, x[shard], y[shard], mask[shard])
        result[f"{mode}_loss"] = loss
        result[f"{mode}_state"] = {k: v.clone() for k, v in model.state_dict().items()}
        result[f"{mode}_grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    if rank == 0:
        torch.save(result, out)
    dist.barrier()  # tear down together (see train.fit: an early destroy can abort the process)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
