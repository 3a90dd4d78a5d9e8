"""A ready training loop for trimmed (or any) models, on Hugging Face accelerate.

`train(model, loader, loss_fn)` fine-tunes ``model`` in place: one process on CPU or GPU,
or many under ``accelerate launch`` / ``torchrun`` (DDP), with gradient accumulation,
clipping, mixed precision, an LR schedule, periodic evaluation, checkpoints that resume
exactly, and a progress bar showing the live loss terms.

What one micro-batch costs is an `Objective`: `TaskObjective` (the task loss) unless the
model carries a recipe that brings its own (`objective_for`: a learned recipe trains with
self-distillation and a cost loss). Objectives get the model as accelerate prepared it
(maybe DDP-wrapped, so calling it keeps gradients in sync); `unwrap` gives the model inside.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import (
    broadcast_object_list,
    extract_model_from_parallel,
    gather_object,
    send_to_device,
    set_seed,
)
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..api import _applied, is_applied
from ..learned import param_groups
from ..registry import RECIPES

__all__ = [
    "LR_SCHEDULES",
    "CheckpointError",
    "NonFiniteLossError",
    "Objective",
    "TaskObjective",
    "TrainResult",
    "default_forward",
    "latest_checkpoint",
    "objective_for",
    "train",
    "unwrap",
]

LR_SCHEDULES = ("constant", "linear", "cosine")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
ON_NONFINITE = ("raise", "skip")
STATE_FILE = "trainer_state.json"
OBJECTIVE_FILE = "objective.pt"

Forward = Callable[[nn.Module, Any], Any]
LossFn = Callable[[Any, Any], torch.Tensor]
EvalFn = Callable[[nn.Module, Iterable], Mapping[str, float]]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside whatever DDP / DataParallel / ``torch.compile`` wrapped it in (the
    same object the caller passed to `train`), e.g. to reach trimkit's state on it."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch: a mapping gives keyword arguments (all but ``"labels"``), a
    tuple or list positional ones (all but the last element, the target), anything else is
    passed as the one argument."""
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    if isinstance(batch, (tuple, list)):
        return model(*batch[:-1])
    return model(batch)


class CheckpointError(ValueError):
    """A training checkpoint cannot be resumed into this run: its ``trainer_state.json`` is
    damaged, or it was saved from another model (raised before anything is loaded)."""


class NonFiniteLossError(FloatingPointError):
    """`train` met a loss, or a gradient, that is NaN or infinite: ``step`` (0-based
    optimizer step), ``terms`` (each logged term of the step's micro-batches that was not
    finite, with its value) and ``checkpoint`` (the last one saved, intact; ``None``)."""

    def __init__(self, message: str, step: int, terms: dict[str, float],
                 checkpoint: Path | None):
        super().__init__(message)
        self.step, self.terms, self.checkpoint = step, terms, checkpoint


class Objective:
    """Computes the loss of one micro-batch. Subclasses: `TaskObjective` here; a learned
    recipe's objective (self-distillation + cost loss + curriculum) comes from the recipe."""

    #: what each logged term is, in words, for errors ("sd": "the self-distillation KL")
    term_names: dict[str, str] = {}

    def __call__(self, model: nn.Module, batch: Any, step: int
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """``model`` is the model as prepared by accelerate (maybe DDP-wrapped; `unwrap` gives
        the model inside), ``step`` the optimizer step being computed (0-based, counts
        optimizer steps, not micro-batches). Returns the loss to backpropagate and the terms
        to show and log: floats, or 0-dim tensors (read only when logged, which spares a
        device sync per micro-batch). Every process must return the same keys."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What a checkpoint must keep to resume this objective (plain JSON data if possible)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""


class TaskObjective(Objective):
    """The task loss: ``loss_fn(forward(model, batch), batch)``, logged as ``"loss"``.

    ``forward`` defaults to `default_forward` (a dict batch gives keyword arguments without
    ``"labels"``; a tuple / list batch gives all its elements but the last, the target)."""

    term_names = {"loss": "the task loss"}

    def __init__(self, loss_fn: LossFn, forward: Forward | None = None):
        self.loss_fn = loss_fn
        self.forward = forward or default_forward

    def __call__(self, model: nn.Module, batch: Any, step: int
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.loss_fn(self.forward(model, batch), batch)
        return loss, {"loss": loss.detach()}


def objective_for(model: nn.Module, loss_fn: LossFn | None, forward: Forward | None,
                  total_steps: int) -> Objective:
    """The objective `train` runs when none is given: the applied recipe's own
    (`Recipe.objective`; learned recipes have one), else `TaskObjective`."""
    base = unwrap(model)
    if is_applied(base):
        applied = _applied(base)
        recipe = RECIPES.get(applied.recipe)
        objective = None if recipe is None else recipe.objective(
            base, loss_fn, forward, total_steps, applied.options)
        if objective is not None:
            return objective
    if loss_fn is None:
        raise ValueError("no loss_fn to build the task objective from")
    return TaskObjective(loss_fn, forward)


@dataclass
class TrainResult:
    """What `train` did: the logged terms per step (``history``: dicts with ``"step"``, the
    optimizer steps done, each term and ``"lr"``), the evaluations (``evals``: dicts with
    ``"step"`` and the metrics) and the optimizer steps done (``step``)."""

    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    step: int = 0
    #: optimizer steps skipped for a non-finite loss or gradient (``on_nonfinite="skip"``)
    skipped: list[int] = field(default_factory=list)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint ``directory/step_N`` with the largest N, or ``None``."""
    best, best_step = None, -1
    root = Path(directory)
    if not root.is_dir():
        return None
    for path in root.iterdir():
        m = re.fullmatch(r"step_(\d+)", path.name)
        if m and (path / STATE_FILE).is_file() and int(m.group(1)) > best_step:
            best, best_step = path, int(m.group(1))
    return best


def train(model: nn.Module, train_loader: DataLoader, loss_fn: LossFn | None = None, *,
          objective: Objective | None = None, forward: Forward | None = None,
          eval_loader: Iterable | None = None, eval_fn: EvalFn | None = None,
          steps: int | None = None, epochs: int = 1, lr: float = 1e-4,
          trimmer_lr: float = 3e-3, threshold_lr: float | None = None,
          weight_decay: float = 0.0,
          optimizer: torch.optim.Optimizer | Callable[[list], torch.optim.Optimizer] | None = None,
          lr_schedule: str = "constant", warmup_steps: int = 0, grad_accum: int = 1,
          max_grad_norm: float | None = None, mixed_precision: str | None = "no",
          eval_every: int | None = None, checkpoint_dir: str | os.PathLike | None = None,
          save_every: int | None = None, resume: bool | str | os.PathLike = False,
          progress: bool = True, log_every: int = 1, seed: int | None = None,
          cpu: bool = False, ddp_kwargs: dict | None = None,
          on_nonfinite: str = "raise") -> TrainResult:
    """Train ``model`` in place on ``train_loader`` and return what happened.

    Give exactly one of ``loss_fn(outputs, batch)`` (the task loss; the objective is then
    `objective_for`'s: the applied recipe's own, else `TaskObjective`) and ``objective``.
    ``forward(model, batch)`` says how to call the model (default `default_forward`). The
    run lasts ``steps`` optimizer steps if given, else ``epochs`` passes over the loader;
    one step is ``grad_accum`` micro-batches, the gradient being their mean. With the
    default optimizer (AdamW), learned trimmers, which start from scratch while the model
    is only fine-tuned, train at ``trimmer_lr`` and their thresholds at ``threshold_lr``
    (default ``trimmer_lr`` × the applied recipe's ``threshold_scale`` option, 10 where it
    has none; see `trimkit.learned.param_groups`). See docs/training.md for every
    argument, checkpoints and multi-process launches.

    A step whose loss (any term of it) or gradient is NaN or infinite stops the run with a
    `NonFiniteLossError` naming the step and the terms, before the optimizer moves, so the
    model and the last checkpoint hold the last good step (``on_nonfinite="raise"``); with
    ``"skip"`` the step is dropped instead (no update; `TrainResult.skipped` lists it).
    """
    _check_args(train_loader, loss_fn, objective, steps, epochs, grad_accum, lr_schedule,
                warmup_steps, mixed_precision, eval_loader, eval_every, checkpoint_dir,
                save_every, resume, log_every)
    if on_nonfinite not in ON_NONFINITE:
        raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
    accelerator = _accelerator(grad_accum, mixed_precision, cpu, ddp_kwargs)
    if accelerator.num_processes == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # launched as several processes (torchrun) where accelerate found no GPU to join
        # them on: join them on CPU (gloo) rather than train independent copies
        PartialState._reset_state()
        accelerator = _accelerator(grad_accum, mixed_precision, True, ddp_kwargs)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("mixed_precision='fp16' needs a GPU; on CPU use 'bf16' or 'no'")
    if seed is not None:
        set_seed(seed)

    ckpt = _resume_point(resume, checkpoint_dir)
    meta = _read_state(ckpt) if ckpt is not None else None
    if ckpt is not None:
        _check_resumable(ckpt, meta, unwrap(model))
    # the shuffling seed must be the same on every process (each takes its shard of one
    # permutation) and across a resume (the remaining batches are the same ones)
    if meta is not None:
        data_seed = int(meta["data_seed"])
    elif seed is not None:
        data_seed = seed
    else:
        data_seed = broadcast_object_list([random.SystemRandom().randrange(2**31)])[0]
    accelerator.dataloader_config.data_seed = data_seed

    was_training = model.training
    instance_attrs = {k: model.__dict__[k] for k in ("forward", "_original_forward")
                      if k in model.__dict__}
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter that requires grad")
    if optimizer is None:
        # the recipe may say how much faster its thresholds train (smarttrim: threshold_scale)
        scale = (_applied(model).options.get("threshold_scale", 10.0) if is_applied(model)
                 else 10.0)
        groups = param_groups(model, lr, trimmer_lr=trimmer_lr,
                              threshold_lr=scale * trimmer_lr if threshold_lr is None
                              else threshold_lr)
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    elif not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(params)
    bar = None
    try:
        model.train()
        wrapped, opt, train_dl = accelerator.prepare(model, optimizer, train_loader)
        eval_dl = None
        if eval_loader is not None:
            eval_dl = (accelerator.prepare(eval_loader) if isinstance(eval_loader, DataLoader)
                       else _OnDevice(eval_loader, accelerator.device))
        try:
            per_epoch = len(train_dl)
        except TypeError:
            per_epoch = None
        if per_epoch == 0:
            raise ValueError("train_loader yields no batch (on this process)")
        total = steps if steps is not None else epochs * math.ceil(per_epoch / grad_accum)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_factor(lr_schedule, warmup_steps, total))
        # stepped here once per optimizer step taken: a prepared scheduler steps once per
        # process, for schedules counted in batches of the unsharded loader
        accelerator.register_for_checkpointing(scheduler)
        if objective is None:
            objective = objective_for(model, loss_fn, forward, total)

        step, epoch, position = 0, 0, 0
        if ckpt is not None:
            try:
                accelerator.load_state(str(ckpt))
            except (RuntimeError, KeyError, ValueError) as err:  # checked above, mostly
                raise CheckpointError(f"cannot resume from {ckpt}: {err}") from err
            # the saved LRs follow the saved run's schedule; this run's may differ (more steps)
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
            step, epoch, position = int(meta["step"]), int(meta["epoch"]), int(meta["position"])
            if per_epoch is not None and position >= per_epoch:
                epoch, position = epoch + 1, 0
            state = meta.get("objective")
            if meta.get("objective_file"):
                state = torch.load(ckpt / meta["objective_file"], weights_only=False)
            objective.load_state_dict(state or {})
        saved_at = step if ckpt is not None else None
        last_ckpt = ckpt

        result = TrainResult(step=step)
        main = accelerator.is_main_process
        bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True,
                   disable=not (progress and main))
        can_eval = eval_dl is not None and (eval_fn is not None or loss_fn is not None)
        fwd = forward or default_forward

        def evaluate() -> None:
            metrics = _evaluate(accelerator, accelerator.unwrap_model(wrapped), eval_dl,
                                eval_fn, loss_fn, fwd)
            result.evals.append({"step": step, **metrics})
            if not bar.disable:
                bar.write(f"eval at step {step}: " + _fmt(metrics))

        def save() -> None:
            nonlocal last_ckpt
            last_ckpt = Path(checkpoint_dir) / f"step_{step}"
            base = unwrap(model)
            _save(accelerator, last_ckpt, objective, {
                "step": step, "epoch": epoch, "position": position, "data_seed": data_seed,
                "total_steps": total,
                "recipe": _applied(base).recipe if is_applied(base) else None})

        sums: dict[str, Any] = {}
        counts: dict[str, int] = {}
        micro = 0
        trainable = [p for p in wrapped.parameters() if p.requires_grad]
        names = {id(p): n for n, p in unwrap(model).named_parameters()}
        pending: list[tuple[torch.Tensor, Mapping[str, Any]]] = []  # this step's micro-batches
        while step < total:
            start = position
            for batch in _epoch_batches(accelerator, train_dl, epoch, position):
                with accelerator.accumulate(wrapped):
                    loss, terms = objective(wrapped, batch, step)
                    accelerator.backward(loss)
                micro += 1
                position += 1
                pending.append((loss.detach(), terms))
                if not accelerator.sync_gradients:
                    continue
                if micro < grad_accum:
                    # a short last group of the epoch: make its gradient a mean too
                    for p in trainable:
                        if p.grad is not None:
                            p.grad.mul_(grad_accum / micro)
                # fp16 loss scaling makes overflowing gradients on purpose, and skips them
                bad = _not_finite(accelerator, pending, trainable,
                                  grads=accelerator.scaler is None)
                lr_now = opt.param_groups[0]["lr"]
                if bad is None:
                    for _, t in pending:
                        _add_terms(sums, counts, t)
                    if max_grad_norm is not None:
                        norm = accelerator.clip_grad_norm_(trainable, max_grad_norm)
                        _add_terms(sums, counts, {"grad_norm": norm})
                    opt.step()
                    if not accelerator.optimizer_step_was_skipped:
                        scheduler.step()
                else:
                    message, values = _describe_not_finite(
                        bad, pending, trainable, names, objective, step, grad_accum,
                        last_ckpt)
                    if on_nonfinite == "raise":
                        raise NonFiniteLossError(
                            message + " Pass on_nonfinite='skip' to skip such steps instead.",
                            step, values, last_ckpt)
                    result.skipped.append(step)
                    if not bar.disable:
                        bar.write(f"skipped: {message}")
                pending = []
                opt.zero_grad(set_to_none=True)
                step, micro = step + 1, 0
                bar.update(1)
                if step % log_every == 0 or step == total:
                    logged = _reduce_terms(accelerator, sums, counts)
                    sums, counts = {}, {}
                    result.history.append({"step": step, **logged, "lr": lr_now})
                    bar.set_postfix_str(_fmt({**logged, "lr": lr_now}), refresh=False)
                if can_eval and eval_every is not None and step % eval_every == 0 \
                        and step != total:
                    evaluate()
                if checkpoint_dir is not None and save_every is not None \
                        and step % save_every == 0:
                    save()
                    saved_at = step
                if step >= total:
                    break
            else:
                if position == start == 0:
                    raise ValueError(f"train_loader yielded no batch in epoch {epoch}")
                epoch, position = epoch + 1, 0
        bar.close()
        result.step = step
        if can_eval:
            evaluate()
        if checkpoint_dir is not None and saved_at != step:
            save()
        return result
    finally:
        if bar is not None:
            bar.close()
        # accelerate's mixed precision wraps the instance's forward: give the class's back
        for k in ("forward", "_original_forward"):
            model.__dict__.pop(k, None)
        model.__dict__.update(instance_attrs)
        model.train(was_training)
        accelerator.free_memory()


def _accelerator(grad_accum: int, mixed_precision: str | None, cpu: bool,
                 ddp_kwargs: dict | None) -> Accelerator:
    # accelerate keeps its settings in per-process singletons; each run sets its own (the
    # process group, kept in PartialState, survives)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        gradient_accumulation_steps=grad_accum, mixed_precision=mixed_precision, cpu=cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(**ddp_kwargs)] if ddp_kwargs else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))


def _check_args(train_loader, loss_fn, objective, steps, epochs, grad_accum, lr_schedule,
                warmup_steps, mixed_precision, eval_loader, eval_every, checkpoint_dir,
                save_every, resume, log_every) -> None:
    if (loss_fn is None) == (objective is None):
        raise ValueError("give exactly one of loss_fn (the task loss, loss_fn(outputs, batch)) "
                         "and objective (a trimkit.Objective)")
    if not isinstance(train_loader, DataLoader):
        raise TypeError(f"train_loader must be a torch.utils.data.DataLoader (accelerate shards, "
                        f"places and reshuffles it), got {type(train_loader).__name__}")
    if steps is None:
        try:
            len(train_loader)
        except TypeError:
            raise ValueError("train_loader has no len() (an iterable dataset?), so the number "
                             "of steps is unknown: pass steps=...") from None
    for name, value in (("steps", steps), ("epochs", epochs), ("grad_accum", grad_accum),
                        ("log_every", log_every), ("eval_every", eval_every),
                        ("save_every", save_every)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISIONS} (or None: from "
                         f"accelerate's launch config), got {mixed_precision!r}")
    if eval_every is not None and eval_loader is None:
        raise ValueError("eval_every needs an eval_loader")
    if save_every is not None and checkpoint_dir is None:
        raise ValueError("save_every needs a checkpoint_dir")
    if resume is True and checkpoint_dir is None:
        raise ValueError("resume=True looks in checkpoint_dir: give one (or resume=<path>)")


def _resume_point(resume: bool | str | os.PathLike, checkpoint_dir) -> Path | None:
    """The checkpoint to resume from: none, the latest in ``checkpoint_dir`` (``True``; none
    yet is a fresh start), or the one at a path (a checkpoint, or a folder of them)."""
    if resume is False or resume is None:
        return None
    if resume is True:
        return latest_checkpoint(checkpoint_dir)
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no trimkit checkpoint at or under {path}")
    return found


def _read_state(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``, checked: a `CheckpointError` names the file and
    the first field that is missing or wrong."""
    file = ckpt / STATE_FILE
    hint = ("the checkpoint is damaged or was edited; resume from another one "
            "(resume=<path>) or start afresh")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON ({err}): {hint}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(meta).__name__}: "
                              f"{hint}")
    for key in ("step", "epoch", "position", "data_seed"):
        if key not in meta:
            raise CheckpointError(f"{file}: field {key!r} is missing: {hint}")
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{file}: field {key!r} must be an int >= 0, got {value!r}: "
                                  f"{hint}")
    if not isinstance(meta.get("objective") or {}, dict):
        raise CheckpointError(f"{file}: field 'objective' must be an object or null: {hint}")
    extra = meta.get("objective_file")
    if extra is not None and not (isinstance(extra, str) and (ckpt / extra).is_file()):
        raise CheckpointError(f"{file}: field 'objective_file' must name a file of the "
                              f"checkpoint, got {extra!r}: {hint}")
    if not isinstance(meta.get("recipe"), (str, type(None))):
        raise CheckpointError(f"{file}: field 'recipe' must be a recipe name or null: {hint}")
    return meta


def _check_resumable(ckpt: Path, meta: dict[str, Any], model: nn.Module) -> None:
    """A `CheckpointError`, before anything is loaded, where the checkpoint was saved from
    another model: another recipe (its ``trainer_state.json`` field ``recipe``), or weights
    whose names or shapes differ (its ``model.safetensors``)."""
    have = _applied(model).recipe if is_applied(model) else None
    why = ""
    if "recipe" in meta and meta["recipe"] != have:
        why = (f" It was saved from a model with recipe {meta['recipe']!r} (field 'recipe' "
               f"of {ckpt / STATE_FILE}); this model has "
               f"{'recipe ' + repr(have) if have else 'no recipe'}: apply the same recipe, "
               f"with the same options, before resuming.")
    file = ckpt / "model.safetensors"
    if not file.is_file():
        if why:
            raise CheckpointError(f"cannot resume from {ckpt}.{why}")
        return
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    own = model.state_dict()
    kept = {(t.device, t.untyped_storage().data_ptr()) for k, t in own.items() if k in saved}
    missing = [k for k, t in own.items() if k not in saved
               and (t.device, t.untyped_storage().data_ptr()) not in kept]  # tied: written once
    unexpected = [k for k in saved if k not in own]
    shapes = [f"{k} ({saved[k]} in the file, {tuple(own[k].shape)} in the model)"
              for k in saved if k in own and saved[k] != tuple(own[k].shape)]
    problems = [f"{what} {', '.join(names[:3])}{' and more' if len(names) > 3 else ''}"
                for what, names in (("missing", missing), ("unexpected", unexpected),
                                    ("other shapes:", shapes)) if names]
    if problems or why:
        raise CheckpointError(f"cannot resume from {ckpt}: {file.name} does not fit this "
                              f"model ({'; '.join(problems) or 'its recipe differs'}).{why}")


def _not_finite(accelerator: Accelerator, pending: list[tuple[torch.Tensor, Any]],
                params: list[nn.Parameter], *, grads: bool) -> str | None:
    """What in this step is NaN or infinite: ``"loss"`` (of a micro-batch), ``"gradient"``,
    ``"another process"`` (which must stop this one too, under DDP), or ``None``; one
    device sync."""
    loss_ok = torch.isfinite(torch.stack([loss.float().sum() for loss, _ in pending])).all()
    flags = [~loss_ok]
    have = [p.grad for p in params if p.grad is not None]
    if grads and have:
        flags.append(~torch.isfinite(torch.nn.utils.get_total_norm(have)).to(loss_ok.device))
    local = torch.stack(flags).float()
    both = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 \
        else local
    mine, anywhere = local.tolist(), both.tolist()
    if mine[0]:
        return "loss"
    if len(mine) > 1 and mine[1]:
        return "gradient"
    return "another process" if any(anywhere) else None


def _describe_not_finite(what: str, pending: list[tuple[torch.Tensor, Any]],
                         params: list[nn.Parameter], names: dict[int, str],
                         objective: Objective, step: int, grad_accum: int,
                         checkpoint: Path | None) -> tuple[str, dict[str, float]]:
    """The error for `_not_finite`'s finding: the step, the micro-batch, each term that is
    not finite (named as the objective names it), and the checkpoint that is intact."""
    words = getattr(objective, "term_names", {})

    def word(k: str) -> str:
        return f"{k} ({words[k]})" if k in words else k

    bad: dict[str, float] = {}
    good: dict[str, float] = {}
    where = ""
    for i, (loss, terms) in enumerate(pending):
        values = {k: float(v) for k, v in terms.items()}
        total = float(loss.float().sum())
        if not math.isfinite(total) and not where:
            where = f" (micro-batch {i + 1} of {len(pending)})" if grad_accum > 1 else ""
            bad["loss"] = total
        for k, v in values.items():
            (good if math.isfinite(v) else bad).setdefault(k, v)
    fine = ", ".join(f"{k} = {v:.4g}" for k, v in good.items() if k not in bad) or "none"
    if what == "loss":
        parts = {k: v for k, v in bad.items() if k != "loss" or "loss" in words}
        if not parts and not good:  # an objective that logs no terms
            head = f"the loss is {bad['loss']} at step {step}{where}."
        elif parts:
            head = (f"the loss is not finite at step {step}{where}: "
                    + ", ".join(f"{word(k)} = {v}" for k, v in parts.items())
                    + f" (finite: {fine}).")
        else:
            head = (f"the loss is {bad['loss']} at step {step}{where} while each logged term "
                    f"is finite ({fine}): a weight times a term, or their sum, overflowed.")
    elif what == "gradient":
        params_bad = [names.get(id(p), "?") for p in params
                      if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        more = f" and {len(params_bad) - 3} more" if len(params_bad) > 3 else ""
        head = (f"the gradient is not finite at step {step}, in {', '.join(params_bad[:3])}"
                f"{more}, while the loss and its terms are finite ({fine}).")
        bad = {f"grad:{n}": math.nan for n in params_bad}
    else:
        head = f"another process met a non-finite loss or gradient at step {step}."
    kept = (f"the last checkpoint, {checkpoint}, is intact" if checkpoint is not None
            else "no checkpoint was saved before it")
    return (f"trimkit.train: {head} The optimizer did not step, so the model holds the last "
            f"good step, and {kept}.", bad)


def _lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier at optimizer step ``s``: linear warm-up to 1 over ``warmup`` steps (the
    first step already moves), then constant, linear or cosine decay toward 0 at ``total``."""
    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0
    return factor


def _epoch_batches(accelerator: Accelerator, loader: DataLoader, epoch: int,
                   skip: int) -> Iterator[Any]:
    """The batches of ``epoch`` after the first ``skip`` (resuming mid-epoch)."""
    if skip:
        loader = accelerator.skip_first_batches(loader, skip)
    loader.set_epoch(epoch)  # seeds this epoch's shuffle: the same permutation on a resume
    it = iter(loader)
    if skip:
        # the uninterrupted run started this epoch's iterator (which draws a seed from the
        # global RNG) before the checkpoint's RNG state was taken: fetch without drawing
        rng = _rng_state()
        first = next(it, _END)
        _set_rng_state(rng)
        if first is _END:
            return
        yield first
    yield from it


_END = object()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _add_terms(sums: dict, counts: dict, terms: Mapping[str, Any]) -> None:
    for k, v in terms.items():
        sums[k] = sums.get(k, 0.0) + (v.detach().float() if isinstance(v, torch.Tensor)
                                      else float(v))
        counts[k] = counts.get(k, 0) + 1


def _reduce_terms(accelerator: Accelerator, sums: dict, counts: dict) -> dict[str, float]:
    """Each term's mean over the micro-batches since the last log, over all processes."""
    local = {k: (float(sums[k]), counts[k]) for k in sums}
    if accelerator.num_processes == 1:
        parts = [local]
    else:
        parts = gather_object([local])
    total: dict[str, list[float]] = {}
    for part in parts:
        for k, (s, n) in part.items():
            acc = total.setdefault(k, [0.0, 0])
            acc[0] += s
            acc[1] += n
    return {k: s / n for k, (s, n) in total.items()}


def _fmt(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items())


class _OnDevice:
    """A non-DataLoader eval iterable with its batches moved to the device."""

    def __init__(self, batches: Iterable, device: torch.device):
        self.batches, self.device = batches, device

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            yield send_to_device(batch, self.device)

    def __len__(self) -> int:
        return len(self.batches)


def _batch_size(batch: Any) -> int:
    """Samples in a batch: the leading size of its first tensor (1 if none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, Mapping) else (
        batch if isinstance(batch, (tuple, list)) else ())
    for item in items:
        if isinstance(item, torch.Tensor):
            return _batch_size(item)
    return 1


def _evaluate(accelerator: Accelerator, model: nn.Module, loader: Iterable,
              eval_fn: EvalFn | None, loss_fn: LossFn | None, forward: Forward
              ) -> dict[str, float]:
    """``eval_fn(model, loader)`` (averaged over processes), or the mean task loss, with the
    model in eval mode under ``no_grad``; every module's mode is put back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            if eval_fn is not None:
                metrics = {k: float(v) for k, v in eval_fn(model, loader).items()}
                if accelerator.num_processes == 1:
                    return metrics
                parts = gather_object([metrics])
                return {k: sum(p[k] for p in parts) / len(parts) for k in metrics}
            total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
            for batch in loader:
                n = _batch_size(batch)
                total[0] += loss_fn(forward(model, batch), batch).detach().double() * n
                total[1] += n
            total = accelerator.reduce(total, reduction="sum")
            return {"loss": float(total[0] / total[1].clamp_min(1))}
    finally:
        for m, mode in modes:
            m.training = mode


def _save(accelerator: Accelerator, path: Path, objective: Objective, meta: dict) -> None:
    """``accelerator.save_state`` (model, optimizer, scheduler, RNG) plus the loop's position
    and the objective's state, written last so a checkpoint without it is incomplete."""
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        state = objective.state_dict()
        try:
            meta["objective"] = json.loads(json.dumps(state))
        except (TypeError, ValueError):
            torch.save(state, path / OBJECTIVE_FILE)
            meta["objective"], meta["objective_file"] = None, OBJECTIVE_FILE
        tmp = path / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(path / STATE_FILE)
    accelerator.wait_for_everyone()
