"""The training loop: steps and accumulation, exact resume, evaluation, schedules, mixed
precision, recipe objectives, argument errors, and two processes under DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import trimkit
from trimkit.registry import RECIPES
from trimkit.tools.training import TaskObjective, default_forward, objective_for, unwrap

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def regression(n: int = 24) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.randn(4, 2, generator=g) + 0.1)


def mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2))


def mse(out: torch.Tensor, batch) -> torch.Tensor:
    return F.mse_loss(out, batch[-1])


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def loader(data, batch_size=4, shuffle=True) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


QUIET = dict(progress=False, seed=0)


def test_default_forward_batch_conventions():
    seen = []

    def model(*args, **kwargs):
        seen.append((args, kwargs))

    default_forward(model, {"x": 1, "mask": 2, "labels": 3})
    default_forward(model, (1, 2, 3))
    default_forward(model, [1, 2])
    default_forward(model, 7)
    assert seen == [((), {"x": 1, "mask": 2}), ((1, 2), {}), ((1,), {}), ((7,), {})]


def test_train_fits_and_reports():
    model = mlp().eval()
    before = mse(model(regression().tensors[0]), regression().tensors)
    res = trimkit.train(model, loader(regression()), mse, steps=30, lr=1e-2, **QUIET)
    assert isinstance(res, trimkit.TrainResult) and res.step == 30
    assert [h["step"] for h in res.history] == list(range(1, 31))
    assert all(set(h) == {"step", "loss", "lr"} for h in res.history)
    assert all(isinstance(h["loss"], float) for h in res.history)
    assert res.evals == []
    assert not model.training  # the mode it came in with
    assert "forward" not in model.__dict__
    with torch.no_grad():
        assert mse(model(regression().tensors[0]), regression().tensors) < before / 2


def test_epochs_decide_steps_and_log_every_averages():
    # 5 micro-batches per epoch in groups of 2: 3 steps per epoch, the last one short
    calls = []

    class Counting(trimkit.Objective):
        def __call__(self, model, batch, step):
            calls.append(step)
            return mse(model(batch[0]), batch), {"k": float(len(calls))}

    res = trimkit.train(mlp(), loader(regression(20)), objective=Counting(), epochs=2,
                        grad_accum=2, log_every=2, **QUIET)
    assert res.step == 6
    assert calls == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]
    # each entry: the mean over the micro-batches since the last one
    assert [(h["step"], h["k"]) for h in res.history] == [(2, 2.5), (4, 6.0), (6, 9.0)]


def test_grad_accum_equals_a_bigger_batch():
    # 20 samples: groups of 2×4 and 1×8 give 8, 8, 4, the last group short by one batch
    data = regression(20)
    a, b = nn.Linear(4, 2), nn.Linear(4, 2)
    b.load_state_dict(a.state_dict())
    kw = dict(epochs=2, lr=1e-2, max_grad_norm=10.0, **QUIET)
    trimkit.train(a, loader(data, 4, shuffle=False), mse, grad_accum=2, **kw)
    trimkit.train(b, loader(data, 8, shuffle=False), mse, grad_accum=1, **kw)
    assert torch.allclose(flat(a), flat(b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_equals_uninterrupted(tmp_path, grad_accum):
    # 6 batches per epoch (shuffled, dropout on): the checkpoint falls mid-epoch
    kw = dict(lr=1e-2, grad_accum=grad_accum, **QUIET)
    n = 4 if grad_accum == 1 else 2
    full = mlp(0.2)
    ref = trimkit.train(full, loader(regression()), mse, steps=2 * n, **kw)
    half = mlp(0.2)
    trimkit.train(half, loader(regression()), mse, steps=n, checkpoint_dir=tmp_path, **kw)
    meta = json.loads((tmp_path / f"step_{n}" / "trainer_state.json").read_text())
    assert (meta["step"], meta["epoch"], meta["position"]) == (n, 0, n * grad_accum)
    resumed = mlp(0.2)
    res = trimkit.train(resumed, loader(regression()), mse, steps=2 * n,
                        checkpoint_dir=tmp_path, resume=True, **kw)
    assert res.history == ref.history[n:]
    assert torch.allclose(flat(resumed), flat(full), atol=1e-6, rtol=0)
    assert (tmp_path / f"step_{2 * n}" / "trainer_state.json").is_file()


def test_resume_mid_schedule_restores_objective_state(tmp_path):
    class Counting(TaskObjective):
        def __init__(self):
            super().__init__(mse)
            self.seen = 0

        def __call__(self, model, batch, step):
            self.seen += len(batch[0])
            return super().__call__(model, batch, step)

        def state_dict(self):
            return {"seen": self.seen}

        def load_state_dict(self, state):
            self.seen = state["seen"]

    kw = dict(steps=10, lr=1e-2, lr_schedule="cosine", warmup_steps=3, **QUIET)
    full, obj = mlp(0.2), Counting()
    ref = trimkit.train(full, loader(regression()), objective=obj, checkpoint_dir=tmp_path,
                        save_every=6, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_6"]
    resumed, obj2 = mlp(0.2), Counting()
    res = trimkit.train(resumed, loader(regression()), objective=obj2,
                        resume=tmp_path / "step_6", **kw)
    assert obj2.seen == obj.seen == 40
    assert res.history == ref.history[6:]
    assert torch.allclose(flat(resumed), flat(full), atol=1e-6, rtol=0)


def test_resume_true_without_checkpoint_starts_fresh(tmp_path):
    res = trimkit.train(mlp(), loader(regression()), mse, steps=2, checkpoint_dir=tmp_path,
                        resume=True, **QUIET)
    assert res.step == 2 and len(res.history) == 2
    with pytest.raises(FileNotFoundError):
        trimkit.train(mlp(), loader(regression()), mse, steps=2, resume=tmp_path / "nothing",
                      **QUIET)


def test_evaluation_every_n_steps_and_at_the_end():
    model = mlp(0.5)
    calls = []

    def eval_fn(m, batches):
        calls.append((m is model, m.training, torch.is_grad_enabled()))
        return {"n": float(sum(len(b[0]) for b in batches))}

    res = trimkit.train(model, loader(regression()), mse, steps=5, eval_every=2,
                        eval_loader=loader(regression(), 8, shuffle=False), eval_fn=eval_fn,
                        **QUIET)
    assert res.evals == [{"step": s, "n": 24.0} for s in (2, 4, 5)]
    assert calls == [(True, False, False)] * 3
    assert model.training

    # default: the mean task loss over the eval loader, in eval mode
    res = trimkit.train(model, loader(regression()), mse, steps=1,
                        eval_loader=[regression()[:10], regression()[10:]], **QUIET)
    model.eval()
    with torch.no_grad():
        expected = mse(model(regression().tensors[0]), regression().tensors).item()
    assert res.evals == [{"step": 1, "loss": pytest.approx(expected, rel=1e-5)}]


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.5, 1, 1, 1, 1, 1]),
    ("linear", [0.5, 1, 1, 0.75, 0.5, 0.25]),
    ("cosine", [0.5, 1, 1, 0.8535534, 0.5, 0.1464466]),
])
def test_lr_schedules(schedule, expected):
    res = trimkit.train(mlp(), loader(regression()), mse, steps=6, lr=1.0, warmup_steps=2,
                        lr_schedule=schedule, optimizer=lambda p: torch.optim.SGD(p, lr=1e-3),
                        **QUIET)
    assert [h["lr"] for h in res.history] == pytest.approx([e * 1e-3 for e in expected])


def test_max_grad_norm_clips_and_logs():
    model = mlp()
    before = flat(model)
    res = trimkit.train(model, loader(regression()), mse, steps=1, max_grad_norm=1e-3,
                        optimizer=lambda p: torch.optim.SGD(p, lr=1.0), **QUIET)
    assert res.history[0]["grad_norm"] > 1e-3
    assert (flat(model) - before).norm() <= 1e-3 * (1 + 1e-4)


def test_progress_bar_shows_live_terms(capsys):
    trimkit.train(mlp(), loader(regression()), mse, steps=3, progress=True, seed=0)
    err = capsys.readouterr().err
    assert "loss=" in err and "lr=" in err and "3/3" in err


def test_bf16_on_cpu_and_fp16_refused():
    model = mlp()
    before = flat(model)
    trimkit.train(model, loader(regression()), mse, steps=2, lr=1e-2,
                  mixed_precision="bf16", **QUIET)
    assert not torch.equal(flat(model), before)
    assert "forward" not in model.__dict__  # accelerate's autocast wrapper is gone
    assert model(regression().tensors[0]).dtype == torch.float32
    with pytest.raises(ValueError, match="fp16"):
        trimkit.train(mlp(), loader(regression()), mse, steps=1, mixed_precision="fp16",
                      **QUIET)


class Stream(IterableDataset):
    def __iter__(self):
        yield from regression()


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, ValueError, "exactly one of loss_fn"),
    ({"loss_fn": mse, "objective": TaskObjective(mse)}, ValueError, "exactly one of loss_fn"),
    ({"loss_fn": mse, "train_loader": [1, 2]}, TypeError, "DataLoader"),
    ({"loss_fn": mse, "train_loader": DataLoader(Stream(), batch_size=4)}, ValueError,
     "steps="),
    ({"loss_fn": mse, "lr_schedule": "step"}, ValueError, "lr_schedule"),
    ({"loss_fn": mse, "grad_accum": 0}, ValueError, "grad_accum"),
    ({"loss_fn": mse, "mixed_precision": "fp8"}, ValueError, "mixed_precision"),
    ({"loss_fn": mse, "save_every": 2}, ValueError, "checkpoint_dir"),
    ({"loss_fn": mse, "resume": True}, ValueError, "checkpoint_dir"),
    ({"loss_fn": mse, "eval_every": 2}, ValueError, "eval_loader"),
])
def test_argument_errors(kwargs, error, match):
    kwargs.setdefault("train_loader", loader(regression()))
    with pytest.raises(error, match=match):
        trimkit.train(mlp(), **kwargs, progress=False)


def test_iterable_dataset_runs_with_steps():
    res = trimkit.train(mlp(), DataLoader(Stream(), batch_size=4), mse, steps=8, **QUIET)
    assert res.step == 8  # 6 batches per pass: two passes


def test_objective_comes_from_the_applied_recipe(monkeypatch):
    import timm

    torch.manual_seed(0)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    assert isinstance(objective_for(vit, mse, None, 5), TaskObjective)
    trimkit.apply(vit, "tome", r=1)
    # tome keeps `Recipe.objective`'s default: no objective of its own
    assert type(RECIPES["tome"]).objective is trimkit.Recipe.objective
    assert RECIPES["tome"].objective(vit, mse, None, 5, {"r": 1}) is None
    assert isinstance(objective_for(vit, mse, None, 5), TaskObjective)

    made = []

    def objective(model, loss_fn, forward, total_steps, options):
        made.append((model is vit, loss_fn, forward, total_steps, options["r"]))
        return TaskObjective(loss_fn, forward)

    monkeypatch.setattr(RECIPES["tome"], "objective", objective)
    data = TensorDataset(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))
    ce = lambda out, batch: F.cross_entropy(out, batch[-1])  # noqa: E731
    trimkit.train(vit, loader(data, 2), ce, epochs=2, **QUIET)
    assert made == [(True, ce, None, 4, 1)]
    assert trimkit.is_applied(vit) and unwrap(vit) is vit


def test_ddp_two_processes(tmp_path):
    """Two CPU processes (gloo): both end with the same weights, the ones one process gets
    from the same global batches; an objective may call the wrapped model twice per step;
    a checkpoint resumes exactly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for name in ("task", "twice", "smarttrim"):
        assert torch.equal(r0[name]["after"], r1[name]["after"])
        assert not torch.allclose(r0[name]["after"], r0[name]["before"])
        assert r0[name]["history"] == r1[name]["history"]
    assert not torch.equal(r0["task"]["before"], r1["task"]["before"])  # rank 0's broadcast
    assert not torch.equal(r0["smarttrim"]["before"], r1["smarttrim"]["before"])
    assert {"task", "full", "sd", "ratio", "target"} <= set(r0["smarttrim"]["history"][-1])
    for r in (r0, r1):
        (full, n_full), (resumed, n_resumed) = r["resume"]
        assert (n_full, n_resumed) == (6, 3)
        assert torch.allclose(resumed, full, atol=1e-6, rtol=0)
    # the two shards of one epoch: disjoint, together the whole data set
    assert sorted(r0["twice"]["seen"] + r1["twice"]["seen"]) == list(range(32))
    assert not set(r0["twice"]["seen"]) & set(r1["twice"]["seen"])

    # 2 processes × batches of 4 = one process with batches of 8, same shuffling seed
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from ddp_worker import Net
    finally:
        sys.path.remove(str(ROOT / "tests"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g)
    data = TensorDataset(x, torch.arange(32), x @ torch.randn(4, 2, generator=g))
    torch.manual_seed(0)
    model = Net()
    res = trimkit.train(model, loader(data, 8), mse, forward=lambda m, b: m(b[0], student=True),
                        eval_loader=loader(data, 8, shuffle=False), eval_every=2, steps=4,
                        grad_accum=2, lr=1e-2, **QUIET)
    assert torch.allclose(flat(model), r0["task"]["after"], atol=1e-5, rtol=0)
    assert [e["loss"] for e in r0["task"]["evals"]] == pytest.approx(
        [e["loss"] for e in res.evals], rel=1e-5)
