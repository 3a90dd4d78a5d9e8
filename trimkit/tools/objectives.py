"""Losses and the curriculum of learned trimming, usable from any training loop.

- `distillation_loss`: KL from the untrimmed pass (teacher) to the trimmed one, on logits
  with a temperature;
- `hidden_distillation_loss`: MSE between the two passes' last hidden states over the
  tokens the trimmed pass kept;
- `cost_loss`: squared gap between the batch's achieved cost ratio and the target;
- `RatioSchedule`: the target ratio, linear from 1 to the final value over the warm-up;
- `SelfDistillationObjective`: one training step's loss for a trimmed model, combining them
  (what `trimkit.train` runs for learned recipes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..api import _applied, recording_costs, trimming_disabled
from ..learned import set_noise
from .training import Objective, default_forward, unwrap

__all__ = [
    "RatioSchedule",
    "SelfDistillationObjective",
    "NoiseSchedule",
    "cost_loss",
    "distillation_loss",
    "hidden_distillation_loss",
    "logits_of",
]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, ``output.logits``, or ``output["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}; "
                    f"pass logits=... to say how")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over the batch; the
    teacher is not trained by this term."""
    t = temperature
    log_p = F.log_softmax(student.float() / t, dim=-1)
    log_q = F.log_softmax(teacher.detach().float() / t, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * t * t


def hidden_distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                             keep: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of B×N×D hidden states over the student's live tokens
    (``keep`` B×N, weights in [0, 1]); the teacher is not trained by this term."""
    w = keep.to(student.dtype)[..., None]
    diff = (student - teacher.detach()) ** 2 * w
    return diff.sum() / (w.sum() * student.shape[-1]).clamp_min(1.0)


def cost_loss(ratio: torch.Tensor, target: float) -> torch.Tensor:
    """``(mean(ratio) − target)²``: the batch's average cost is pulled toward the target, so
    instances may differ (that is the point of per-instance trimming)."""
    return (ratio.float().mean() - target) ** 2


class NoiseSchedule:
    """The scale of the trimmers' Gumbel noise at an optimizer step: linear from ``start``
    to ``final`` over ``total_steps`` (see `trimkit.learned.set_noise`)."""

    def __init__(self, start: float, final: float, total_steps: int):
        self.start, self.final, self.total = float(start), float(final), max(int(total_steps), 1)

    def __call__(self, step: int) -> float:
        t = min(max(step / self.total, 0.0), 1.0)
        return self.start + (self.final - self.start) * t


class RatioSchedule:
    """The target cost ratio at an optimizer step: linear from ``start`` (1.0, untrimmed) to
    ``final`` over the first ``warmup_steps``, then constant; ``warmup_steps = 0`` gives the
    final target from the first step (the curriculum switched off)."""

    def __init__(self, final: float, warmup_steps: int, start: float = 1.0):
        self.final, self.warmup_steps, self.start = float(final), int(warmup_steps), float(start)

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return self.final
        return self.start + (self.final - self.start) * step / self.warmup_steps


class _Call(nn.Module):
    """``forward(model, batch)`` as a module holding ``model``, so `functional_call` can run
    any forward function on other weights."""

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, Any], Any]):
        super().__init__()
        self.model, self.fn = model, forward

    def forward(self, batch: Any) -> Any:
        return self.fn(self.model, batch)


class SelfDistillationObjective(Objective):
    """Task loss of the trimmed pass + ``lambda_sd`` · distillation from the same model run
    with trimming disabled + ``lambda_cost`` · cost loss toward the scheduled target
    (+ ``lambda_hidden`` · hidden-state distillation), the trimmers' Gumbel noise
    following ``noise_schedule`` if given. With ``teacher_loss`` the full pass
    also gets its task loss (shared weights, both trained); without it the teacher runs
    under ``no_grad``. With ``frozen_teacher`` the teacher is the model as it was when the
    objective was built (a copy of its weights, kept in checkpoints), run untrimmed under
    ``no_grad``; ``lambda_cost = 0`` drops the cost loss (fixed-count trimmers)."""

    term_names = {"task": "the trimmed pass's task loss",
                  "full": "the untrimmed pass's task loss",
                  "sd": "the self-distillation KL", "hidden": "the hidden-state distillation",
                  "cost": "the cost loss", "ratio": "the achieved cost ratio",
                  "target": "the target cost ratio"}

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], *,
                 schedule: RatioSchedule | None = None,
                 forward: Callable[[nn.Module, Any], Any] | None = None,
                 logits: Callable[[Any], torch.Tensor] = logits_of, lambda_sd: float = 1.0,
                 temperature: float = 1.0, lambda_cost: float = 10.0,
                 lambda_hidden: float = 0.0, teacher_loss: bool = True,
                 noise_schedule: NoiseSchedule | None = None, frozen_teacher: bool = False):
        if lambda_cost > 0 and schedule is None:
            raise ValueError("a cost loss (lambda_cost > 0) needs a target schedule")
        if frozen_teacher and (teacher_loss or lambda_hidden > 0):
            raise ValueError("a frozen teacher is not trained and observes no hidden states: "
                             "use teacher_loss=False and lambda_hidden=0")
        self.model, self.loss_fn, self.schedule = model, loss_fn, schedule
        self.noise = noise_schedule
        self.forward = forward or default_forward
        self.logits = logits
        self.lambda_sd, self.temperature = float(lambda_sd), float(temperature)
        self.lambda_cost, self.lambda_hidden = float(lambda_cost), float(lambda_hidden)
        self.teacher_loss = bool(teacher_loss)
        self.frozen: dict[str, torch.Tensor] | None = None
        if frozen_teacher:
            base = unwrap(model)
            self.frozen = {f"model.{k}": v.detach().clone()
                           for k, v in [*base.named_parameters(), *base.named_buffers()]}

    def state_dict(self) -> dict:
        return {} if self.frozen is None else {"frozen_teacher": self.frozen}

    def load_state_dict(self, state: dict) -> None:
        if self.frozen is not None and "frozen_teacher" in state:
            self.frozen = {k: v.to(self.frozen[k].device) if k in self.frozen else v
                           for k, v in state["frozen_teacher"].items()}

    def _teacher(self, model: nn.Module, base: nn.Module, batch: Any) -> Any:
        """The untrimmed pass: on the frozen weights, or on the model's own."""
        if self.frozen is not None:
            with trimming_disabled(base), torch.no_grad():
                return torch.func.functional_call(_Call(base, self.forward), self.frozen,
                                                  (batch,), strict=False)
        with trimming_disabled(base), torch.set_grad_enabled(
                self.teacher_loss and torch.is_grad_enabled()):
            return self.forward(model, batch)

    def __call__(self, model: nn.Module, batch: Any, step: int
                 ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        base = unwrap(model)
        applied = _applied(base)
        if self.noise is not None:
            set_noise(base, self.noise(step))
        ctx = applied.ctx
        need_teacher = self.lambda_sd > 0 or self.teacher_loss or self.lambda_hidden > 0
        logs: dict[str, float | torch.Tensor] = {}  # tensors: read only when logged
        total = 0.0
        teacher_out, teacher_hidden = None, {}
        if need_teacher:
            ctx.observe, ctx.observed = self.lambda_hidden > 0, {}
            try:
                teacher_out = self._teacher(model, base, batch)
            finally:
                ctx.observe = False
            teacher_hidden = ctx.observed
            ctx.observed = {}
            if self.teacher_loss:
                full = self.loss_fn(teacher_out, batch)
                total = total + full
                logs["full"] = full.detach()
        ctx.observe = self.lambda_hidden > 0
        try:
            if self.lambda_cost > 0:
                with recording_costs(base) as costs:
                    student_out = self.forward(model, batch)
            else:
                student_out = self.forward(model, batch)
        finally:
            ctx.observe = False
        task = self.loss_fn(student_out, batch)
        total = total + task
        logs["task"] = task.detach()
        if self.lambda_sd > 0:
            sd = distillation_loss(self.logits(student_out), self.logits(teacher_out),
                                   self.temperature)
            total = total + self.lambda_sd * sd
            logs["sd"] = sd.detach()
        if self.lambda_hidden > 0:
            terms = [hidden_distillation_loss(x, teacher_hidden[s], ctx.states[s].keep)
                     for s, x in ctx.observed.items()
                     if s in teacher_hidden and teacher_hidden[s].shape == x.shape]
            if terms:
                hid = torch.stack(terms).mean()
                total = total + self.lambda_hidden * hid
                logs["hidden"] = hid.detach()
            ctx.observed = {}
        if self.lambda_cost > 0:
            target = self.schedule(step)
            ratio = costs.ratio()
            cost = cost_loss(ratio, target)
            total = total + self.lambda_cost * cost
            logs.update(cost=cost.detach(), ratio=ratio.detach().mean(), target=target)
            ctx.costs = []
        return total, logs
