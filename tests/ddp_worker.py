"""One process of the two-process CPU run in ``test_training.py::test_ddp_two_processes``
(launched with ``torch.distributed.run``; not a test module itself).

Trains two small models with `trimkit.train` and saves, per rank, the flattened parameters
before and after, the history, the evaluations and the sample indices it trained on:

- ``task``: the task objective, with gradient accumulation and a sharded eval loader, and
  ``cpu`` left False (no GPU is visible: the processes must still be joined, on CPU);
- ``twice``: an objective that calls the DDP-wrapped model twice per micro-batch, both
  passes with gradients (a teacher and a student sharing weights, as self-distillation
  does), the student alone using one parameter (like a learned trimmer's);
- ``resume``: an uninterrupted run and one resumed from its mid-run checkpoint;
- ``smarttrim``: the learned recipe on a tiny METER (teacher and student passes, cost loss).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trimkit
from trimkit.tools.training import unwrap


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 2)
        self.gate = nn.Parameter(torch.zeros(16))

    def forward(self, x: torch.Tensor, student: bool = False) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if student:
            h = h * 2 * torch.sigmoid(self.gate)
        return self.fc2(h)


class TwoPasses(trimkit.Objective):
    def __init__(self):
        self.seen: list[int] = []

    def __call__(self, model, batch, step):
        x, idx, y = batch
        assert isinstance(unwrap(model), Net)
        self.seen += idx.tolist()
        teacher = model(x)
        student = model(x, student=True)
        task, full = F.mse_loss(student, y), F.mse_loss(teacher, y)
        sd = F.mse_loss(student, teacher.detach())
        return task + full + sd, {"task": task.detach(), "full": full.item(), "sd": sd.item()}


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g)
    data = TensorDataset(x, torch.arange(32), x @ torch.randn(4, 2, generator=g))
    results = {}

    torch.manual_seed(rank)  # different on each rank: DDP must broadcast rank 0's weights
    model = Net()
    before = flat(model)
    res = trimkit.train(
        model, DataLoader(data, batch_size=4, shuffle=True),
        lambda out, batch: F.mse_loss(out, batch[-1]), forward=lambda m, b: m(b[0], student=True),
        eval_loader=DataLoader(data, batch_size=8), eval_every=2, steps=4, grad_accum=2,
        lr=1e-2, seed=0, progress=False)  # no GPU visible: trimkit joins them on CPU
    results["task"] = {"before": before, "after": flat(model), "history": res.history,
                       "evals": res.evals}

    torch.manual_seed(0)
    model = Net()
    objective = TwoPasses()
    before = flat(model)
    res = trimkit.train(model, DataLoader(data, batch_size=4, shuffle=True),
                        objective=objective, steps=4, lr=1e-2, seed=0, cpu=True,
                        progress=False)
    results["twice"] = {"before": before, "after": flat(model), "history": res.history,
                        "seen": objective.seen}

    # a checkpoint mid-run, resumed: the same weights as the uninterrupted run
    after = []
    for resume in (False, out / "ckpt" / "step_3"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.Linear(16, 2))
        res = trimkit.train(model, DataLoader(data, batch_size=4, shuffle=True),
                            lambda out, batch: F.mse_loss(out, batch[-1]),
                            forward=lambda m, b: m(b[0]), steps=6, lr=1e-2, seed=0, cpu=True,
                            progress=False, checkpoint_dir=out / "ckpt", save_every=3,
                            resume=resume)
        after.append((flat(model), len(res.history)))
    results["resume"] = after

    # the smarttrim recipe on a tiny METER: learned trimmers, a teacher pass with trimming
    # disabled and a trimmed student pass per micro-batch, the cost loss
    from trimkit.adapters.meter import METER, meter_tiny

    torch.manual_seed(rank)
    meter = trimkit.apply(METER(meter_tiny(tasks=("vqa",))), "smarttrim", ratio=0.5)
    g = torch.Generator().manual_seed(2)
    vqa = TensorDataset(torch.randn(16, 3, 32, 32, generator=g),
                        torch.randint(3, 100, (16, 6), generator=g),
                        torch.ones(16, 6, dtype=torch.long),
                        torch.randint(0, 7, (16,), generator=g))
    before = flat(meter)
    res = trimkit.train(meter, DataLoader(vqa, batch_size=4, shuffle=True),
                        lambda out, batch: F.cross_entropy(out, batch[-1]), steps=3, lr=1e-3,
                        seed=0, cpu=True, progress=False)
    results["smarttrim"] = {"before": before, "after": flat(meter), "history": res.history}
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
