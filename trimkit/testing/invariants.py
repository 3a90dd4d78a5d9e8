"""trimkit's invariants 1–9 (docs/architecture.md, "Invariants") checked on one recipe, one
set of options and one batch (`check_invariants`), and those that apply to one-shot recipes
(`check_transform`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import api
from ..adapter import Adapter
from ..describe import LayerDesc
from ..heads import KINDS, head_key_name, pruned_heads


class InvariantError(AssertionError):
    """An invariant does not hold; the message says which and by how much."""


def first_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output (a tensor, a tuple, or a dict-like output)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, torch.Tensor):
                return v
    raise TypeError(f"cannot find a tensor in a model output of type {type(out).__name__}")


def slice_batch(inputs: tuple, i: int, batch: int) -> tuple:
    """Sample ``i`` of every batched tensor in ``inputs`` (others pass unchanged)."""
    return tuple(a[i:i + 1] if isinstance(a, torch.Tensor) and a.shape[:1] == (batch,) else a
                 for a in inputs)


def _close(name: str, a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    if a.shape != b.shape:
        raise InvariantError(f"{name}: output shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    if not err <= atol:
        raise InvariantError(f"{name}: outputs differ by {err:.3g} (tolerance {atol:g})")


def check_invariants(
    make_model: Callable[[], nn.Module],
    inputs: tuple,
    recipe: str,
    options: dict[str, Any],
    zero_options: dict[str, Any],
    *,
    output: Callable[[Any], torch.Tensor] = first_tensor,
    merges_only: bool = False,
    perturb_padding: Callable[[tuple], tuple] | None = None,
    atol: float = 1e-5,
    adapter: str | Adapter | None = None,
    seed: int | None = None,
) -> None:
    """Check the invariants 1–9 (docs/architecture.md) for ``recipe`` on the model
    ``make_model()`` builds.

    ``inputs`` is a tuple of positional arguments with the batch first; ``options`` trims
    for real, ``zero_options`` makes the same recipe trim nothing; ``merges_only`` says the
    recipe never drops (so sizes must sum to the entry count); ``perturb_padding`` returns
    the inputs with padding content changed (for streams that have padding); ``adapter``
    forces one (a registered name or an instance) instead of the detected one; ``seed``
    seeds torch's global RNG before every forward, for models whose forward draws random
    numbers in eval (ViLT samples its image patches).
    Raises `InvariantError` naming the first invariant that fails.
    """
    torch.manual_seed(0)
    model = make_model().eval()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def run(args: tuple) -> torch.Tensor:
        return output(seeded(model, args, seed))

    with torch.no_grad():
        ref = run(inputs)

        # 1. zero trimming is the identity, in both executions
        api.apply(model, recipe, adapter=adapter, **zero_options)
        for mode in ("compacted", "masked"):
            api.set_mode(model, mode)
            _close(f"invariant 1 (zero trimming is the identity, {mode})",
                   run(inputs), ref, atol)
        api.remove(model)

        api.apply(model, recipe, track_source=True, adapter=adapter, **options)
        out = run(inputs)
        desc = api.describe(model)
        states = api.last_states(model)
        stats = api.last_stats(model).layers

        # 9a. deterministic eval
        if not torch.equal(run(inputs), out):
            raise InvariantError("invariant 9: two eval forwards on the same input differ")
        # 8. no NaN
        if not torch.isfinite(out).all():
            raise InvariantError("invariant 8: the trimmed output has NaN or inf")
        for name, st in states.items():
            entry = st.source.shape[1]
            live = st.live
            # 8. an unprotected token survives
            if ((live & ~st.protected).sum(1) < 1).any():
                raise InvariantError(f"invariant 8: stream {name!r} lost every unprotected token")
            # 7 and 4. size == coverage; padding (covering nothing) is never live
            cover = torch.zeros(live.shape, dtype=torch.float64)
            src = st.source.clamp_min(0)
            cover.scatter_add_(1, src, (st.source >= 0).double())
            if not torch.allclose(cover[live], st.size[live].double()):
                raise InvariantError(f"invariant 7/4: in stream {name!r} a live token's size "
                                     f"differs from the number of input tokens it covers "
                                     f"(or a padding token became live)")
            if merges_only and not desc.streams[name].padded and (st.source < 0).any():
                raise InvariantError(f"invariant 7: a merge-only recipe lost tokens of stream "
                                     f"{name!r}: sizes sum to {(st.size * live).sum(1).tolist()}, "
                                     f"expected {entry} per sample")
            # 2. protected entry tokens are alone in live protected slots: the first
            # num_protected after the prefix (if any), and the prefix's first token
            p, lead = desc.streams[name].num_protected, st.prefix
            firsts = list(range(lead, min(lead + p, entry))) + ([0] if lead else [])
            if firsts:
                slots = st.source[:, firsts]
                if (slots < 0).any():
                    raise InvariantError(f"invariant 2: a protected token of {name!r} was dropped")
                ok = st.protected.gather(1, slots) & (cover.gather(1, slots) == 1)
                if not ok.all():
                    raise InvariantError(f"invariant 2: a protected token of {name!r} was merged")
            if lead:  # a token stands for tokens of the prefix or for tokens after it
                before = torch.zeros(live.shape, dtype=torch.float64)
                in_prefix = (torch.arange(entry) < lead)[None] & (st.source >= 0)
                before.scatter_add_(1, src, in_prefix.double())
                if (live & (before > 0) & (before < cover)).any():
                    raise InvariantError(f"invariant 2: in stream {name!r} a token of its "
                                         f"prefix ({desc.streams[name].prefix}) was merged "
                                         f"with one after it")
            # a stated patch grid is the last entry tokens, counted from the end, after the
            # prefix and the protected ones only
            grid = desc.streams[name].grid
            if grid is not None and not 0 <= entry - lead - grid[0] * grid[1] <= p:
                raise InvariantError(f"stream {name!r} states a {grid[0]}×{grid[1]} patch grid, "
                                     f"which is not its {entry} entry tokens after a prefix of "
                                     f"{lead} and at most {p} protected ones (StreamDesc.grid)")
        # 3. live counts never grow
        prev: dict[str, torch.Tensor] = {}
        for s in stats:
            before = prev.get(s.stream)
            if (s.tokens_out > s.tokens_in).any() or (
                    before is not None and (s.tokens_in > before).any()):
                raise InvariantError(f"invariant 3: live tokens grew at {s.stream} layer {s.layer}")
            prev[s.stream] = s.tokens_out

        # 5. masked, compacted, packed and packed within layers ("auto" in eval) agree
        api.set_mode(model, "compacted")
        compacted = run(inputs)
        for mode in ("masked", "packed", "auto"):
            api.set_mode(model, mode)
            _close(f"invariant 5 ({mode} vs compacted)", run(inputs), compacted, atol)
        api.set_mode(model, "compacted")

        # 6. batch independence
        batch = out.shape[0]
        for i in range(batch):
            _close(f"invariant 6 (sample {i} alone vs in its batch)",
                   run(slice_batch(inputs, i, batch)), out[i:i + 1], atol)

        # 4. padding content never matters
        if perturb_padding is not None:
            _close("invariant 4 (padding content changed the output)",
                   run(perturb_padding(inputs)), out, atol)

        # 9b. remove restores everything
        api.remove(model)
        if not torch.equal(run(inputs), ref):
            raise InvariantError("invariant 9: outputs after remove differ from the original")
        now = model.state_dict()
        if list(now) != list(sd) or not all(torch.equal(now[k], sd[k]) for k in sd):
            raise InvariantError("invariant 9: state_dict after remove differs from the original")


def seeded(model: nn.Module, inputs: tuple, seed: int | None) -> Any:
    """``model(*inputs)``, with torch's global RNG seeded first when ``seed`` is given (for
    models that draw random numbers in eval: every call then draws the same)."""
    if seed is not None:
        torch.manual_seed(seed)
    return model(*inputs)


def head_count(layer: LayerDesc, kind: str) -> int:
    """How many heads ``layer``'s self-attention (``kind="self"``) or cross-attention
    (``"cross"``) has, as described: what a `Case` for a head-pruning recipe draws scores
    for, and what `check_transform` checks against after pruning."""
    return layer.num_heads if kind == "self" else (layer.cross_num_heads or layer.num_heads)


def check_transform(
    make_model: Callable[[], nn.Module],
    inputs: tuple,
    recipe: str,
    options: dict[str, Any],
    zero_options: dict[str, Any],
    *,
    output: Callable[[Any], torch.Tensor] = first_tensor,
    atol: float = 1e-5,
    adapter: str | Adapter | None = None,
    seed: int | None = None,
) -> None:
    """The invariants that apply to a one-shot recipe (``Recipe.transforms``, static head
    pruning): ``zero_options`` leave the outputs as they were (1); with ``options`` the
    output keeps its shape and is finite (8), eval is deterministic (9), each sample's
    output does not depend on its batch (6), and `describe` gives each attention as many
    heads as it had minus those `trimkit.pruned_heads` says were removed; ``seed`` as in
    `check_invariants`. Raises `InvariantError` naming the first that fails."""
    torch.manual_seed(0)
    model = make_model().eval()
    impl = api.find_adapter(model, adapter)

    def run(args: tuple) -> torch.Tensor:
        return output(seeded(model, args, seed))

    with torch.no_grad():
        ref = run(inputs)
        before = impl.describe(model)
        api.apply(model, recipe, adapter=impl, **zero_options)
        _close("invariant 1 (zero trimming is the identity)", run(inputs), ref, atol)
        api.apply(model, recipe, adapter=impl, **options)
        out = run(inputs)
        if out.shape != ref.shape:
            raise InvariantError(f"{recipe}: the output's shape changed from "
                                 f"{tuple(ref.shape)} to {tuple(out.shape)}")
        if not torch.isfinite(out).all():
            raise InvariantError("invariant 8: the trimmed output has NaN or inf")
        if not torch.equal(run(inputs), out):
            raise InvariantError("invariant 9: two eval forwards on the same input differ")
        after, gone = impl.describe(model), pruned_heads(model)
        for s in before.streams.values():
            for i, layer in enumerate(s.layers):
                for kind in KINDS:
                    # a keys-only layer states its reader's heads, checked at the reader
                    if layer.keys_only or kind == "cross" and layer.cross_attention is None:
                        continue
                    name = head_key_name((s.name, i, kind))
                    want = head_count(layer, kind) - len(gone.get(name, ()))
                    got = head_count(after.streams[s.name].layers[i], kind)
                    if got != want:
                        raise InvariantError(
                            f"{recipe}: after pruning, describe() says {name} has {got} "
                            f"heads; it had {head_count(layer, kind)} and "
                            f"{len(gone.get(name, ()))} were removed (trimkit.pruned_heads), "
                            f"so {want} are expected")
        batch = out.shape[0]
        for i in range(batch):
            _close(f"invariant 6 (sample {i} alone vs in its batch)",
                   run(slice_batch(inputs, i, batch)), out[i:i + 1], atol)
