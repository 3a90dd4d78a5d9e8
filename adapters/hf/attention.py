"""trimkit's entry in transformers' `AttentionInterface`, and what routes a model to it.

Hugging Face modules in transformers 5 compute q, k and v themselves and hand the attention
product to a function looked up by name in the `AttentionInterface` registry, under the
name their config's ``_attn_implementation`` holds. trimkit registers one such function
(`ATTN_IMPLEMENTATION`) and sets it on the trimmed model with
``model.set_attn_implementation``. The function finds the site bound to the calling
attention module and runs the site's core there; wherever trimming has nothing to do (it is
disabled, or nothing trimmed the stream yet and the layer records nothing) it calls the
implementation the model had before, with the model's own mask, so eager, SDPA, flex or
flash attention keep working exactly as chosen.

The model builds its attention mask once per forward, by the same name, from transformers'
`AttentionMaskInterface`: trimkit registers a mask function there too, which builds the mask
the original implementation would get, so the model's own mask stays right wherever that
implementation runs.

A config object may be shared by several model instances: the implementation each config
had is recorded once, counted per trimmed model (a deep or unpickled copy counts for its
own copies), and put back when the last one is removed. A module that runs through
trimkit's function without a site (an untrimmed model sharing the config, a part of the
model no stream describes) gets that recorded implementation.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trimkit.hooks import Undo, untouched
from trimkit.sites import Site

__all__ = ["ATTN_IMPLEMENTATION", "Binding", "Intercept", "original_implementation",
           "route_attention", "trimkit_attention", "trimkit_mask"]

#: the name trimkit's attention function is registered under
ATTN_IMPLEMENTATION = "trimkit"


@dataclass
class Binding:
    """What one attention module of a trimmed model runs: its layer's ``site``; ``plain``:
    no op of the stream acts before this attention (in this or an earlier layer) and the
    site records nothing from it, so while the stream is still laid out as it entered this
    call (`trimkit.hooks.untouched`), the model's own implementation and mask give the
    same result."""

    site: Site
    plain: bool


class Intercept:
    """Base of bindings that run around the model's own implementation instead of a site's
    core (e.g. recording one query row's attention, `trimkit.adapters.hf.decoder`): called as
    ``intercept(fn, module, query, key, value, attention_mask, dropout=, scaling=, **kwargs)``
    with ``fn`` the implementation the model had before trimkit; returns what ``fn``
    returns."""

    def __call__(self, fn: Callable, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor, attention_mask: Any, **kwargs: Any) -> Any:
        return fn(module, query, key, value, attention_mask, **kwargs)


#: where an attention module keeps its `Binding`: in its own instance ``__dict__`` (a global
#: weak table makes ``torch.compile`` guard on other models' entries, which can vanish)
_BINDING = "_trimkit_binding"
#: id(config) -> [config, its implementation before trimkit, number of trimmed models]
_CONFIGS: dict[int, list[Any]] = {}


def _recorded(config: Any) -> list[Any] | None:
    entry = _CONFIGS.get(id(config))
    return entry if entry is not None and entry[0] is config else None


def original_implementation(config: Any) -> str:
    """The attention implementation ``config`` had before trimkit routed it (its current one
    when trimkit never did)."""
    entry = _recorded(config)
    name = entry[1] if entry is not None else config._attn_implementation
    if name == ATTN_IMPLEMENTATION:
        raise RuntimeError(f"a {type(config).__name__} names trimkit's attention implementation "
                           f"but no trimmed model owns it")
    return name or "eager"


def _function(module: nn.Module, name: str) -> Callable:
    """The attention function ``name`` as ``module``'s own forward would look it up."""
    if name == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"cannot find the eager attention function of "
                               f"{type(module).__module__}")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS.get_interface(name, None)


def trimkit_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: Any, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs: Any
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An `AttentionInterface` function: the site's core where trimming acts, else the
    model's own implementation. q, k, v are B×H×N×d; returns B×N×H×d and no weights.

    The mask the model built once for the whole encoder (over its entry tokens) is not used
    by the core: the trimming state carries padding and dead tokens per layer, and a causal
    mask is rebuilt from the tokens' entry positions (`trimkit.sites`)."""
    binding = module.__dict__.get(_BINDING)
    if isinstance(binding, Intercept):
        fn = _function(module, original_implementation(module.config))
        return binding(fn, module, query, key, value, attention_mask, dropout=dropout,
                       scaling=scaling, **kwargs)
    site = None if binding is None else binding.site
    if site is None or not site.ctx.enabled or (binding.plain
                                                and untouched(site.ctx, site.stream)):
        fn = _function(module, original_implementation(module.config))
        return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                  **kwargs)
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", False)
    out = site.core(query, key, value, attn_mask=None, dropout_p=dropout,
                    is_causal=bool(causal), scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def trimkit_mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    """An `AttentionMaskInterface` function: the mask the config's original implementation
    would get (``None`` where that one builds none, like transformers does)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = original_implementation(config)
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS[name](*args, config=config, **kwargs)


def _configs(model: nn.Module) -> list[Any]:
    """Every transformers config the model's modules hold, with their sub-configs."""
    from transformers import PretrainedConfig

    stack = [m.config for m in model.modules()
             if isinstance(getattr(m, "config", None), PretrainedConfig)]
    seen: dict[int, Any] = {}
    while stack:
        config = stack.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if isinstance(sub, PretrainedConfig):
                stack.append(sub)
    return list(seen.values())


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, trimkit_attention)
    if ATTN_IMPLEMENTATION not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, trimkit_mask)


class _Route:
    """Undoes `route_attention`: unbinds the modules and releases the configs. A deep copy
    or an unpickled copy of the model claims its own copies of the configs (with the
    implementations they had before trimkit), so either model can be removed alone."""

    def __init__(self, modules: list[nn.Module], configs: list[Any]):
        self.modules, self.configs = modules, configs
        self.originals = [e[1] if (e := _recorded(c)) is not None
                          else c.__dict__.get("_attn_implementation_internal") for c in configs]
        self._claim()

    def _claim(self) -> None:
        _register()
        for config, original in zip(self.configs, self.originals, strict=True):
            entry = _recorded(config)
            if entry is None:
                entry = _CONFIGS[id(config)] = [config, original, 0]
            entry[2] += 1

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._claim()

    def __call__(self) -> None:
        for module in self.modules:
            module.__dict__.pop(_BINDING, None)
        for config in self.configs:
            entry = _recorded(config)
            if entry is not None:
                entry[2] -= 1
                if entry[2] == 0:
                    config.__dict__["_attn_implementation_internal"] = entry[1]
                    del _CONFIGS[id(config)]


def route_attention(model: nn.Module, bindings: dict[nn.Module, Binding | Intercept]) -> Undo:
    """Register trimkit's attention function, set it on ``model`` and bind each attention
    module to its site; return what undoes all of it (the implementations come back as they
    were, bit for bit, once no trimmed model shares their config)."""
    undo = _Route(list(bindings), _configs(model))
    try:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        stuck = sorted({type(m).__name__ for m in bindings
                        if m.config._attn_implementation != ATTN_IMPLEMENTATION})
        if stuck:
            raise TypeError(f"transformers did not let trimkit set its attention "
                            f"implementation on {', '.join(stuck)}; such models are not "
                            f"supported")
        for module in bindings:
            original_implementation(module.config)  # fails here, not in the first forward
    except Exception:
        undo()
        raise
    for module, binding in bindings.items():
        module.__dict__[_BINDING] = binding
    return undo
