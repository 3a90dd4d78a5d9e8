"""One trimmed model serves concurrent calls: N threads × M calls give the sequential
outputs, statistics are per thread, and the context managers hold for their own thread."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from transformers import BertConfig, BertModel
from trimkit.adapters.meter import METER, meter_tiny

import trimkit

THREADS, CALLS = 4, 6


def _timm() -> tuple[torch.nn.Module, Callable[[int], tuple]]:
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                          num_classes=5)

    def inputs(i: int) -> tuple:
        g = torch.Generator().manual_seed(i)
        return (torch.randn(1 + i % 3, 3, 32, 32, generator=g),)
    return m, inputs


def _bert() -> tuple[torch.nn.Module, Callable[[int], tuple]]:
    torch.manual_seed(0)
    m = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_attention_heads=2,
                             num_hidden_layers=3, intermediate_size=64))

    def inputs(i: int) -> tuple:
        g = torch.Generator().manual_seed(i)
        b, t = 1 + i % 3, 8 + i % 4
        ids = torch.randint(3, 50, (b, t), generator=g)
        lengths = torch.randint(2, t + 1, (b,), generator=g)
        mask = (torch.arange(t)[None] < lengths[:, None]).long()
        return (ids, mask)
    return m, inputs


def _meter() -> tuple[torch.nn.Module, Callable[[int], tuple]]:
    torch.manual_seed(0)
    cfg = meter_tiny(num_heads=2, hidden_size=16)
    m = METER(cfg)

    def inputs(i: int) -> tuple:
        g = torch.Generator().manual_seed(i)
        b, t = 1 + i % 3, 8
        images = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
        ids = torch.randint(3, cfg.vocab_size, (b, t), generator=g)
        lengths = torch.randint(2, t + 1, (b,), generator=g)
        mask = (torch.arange(t)[None] < lengths[:, None]).long()
        return (images, ids.masked_fill(mask == 0, 1), mask)
    return m, inputs


MODELS = {"timm": _timm, "bert": _bert, "meter": _meter}
#: every recipe with sites on every model it fits (pumer needs an image stream)
CASES = [(name, recipe, opts)
         for name in MODELS
         for recipe, opts in [("tome", dict(r=1)), ("attn_prune", dict(keep_ratio=0.6)),
                              ("pumer", {}), ("smarttrim", {})]
         if not (name == "bert" and recipe == "pumer")]


def _first(out: object) -> torch.Tensor:
    """A model's main output tensor (a tensor, the first of a tuple, or an output class's)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return _first(out[0])
    if isinstance(out, dict):
        return _first(next(iter(out.values())))
    return _first(out.to_tuple())


def _concurrently(fn: Callable[[int], object], threads: int = THREADS) -> list:
    """``fn(t)`` in ``threads`` threads started together; their results, errors re-raised."""
    results: list = [None] * threads
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def run(t: int) -> None:
        try:
            barrier.wait()
            results[t] = fn(t)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize(("name", "recipe", "opts"), CASES)
def test_threads_give_the_sequential_outputs(name: str, recipe: str, opts: dict) -> None:
    model, inputs = MODELS[name]()
    trimkit.apply(model, recipe, **opts)
    model.eval()
    calls = [inputs(i) for i in range(THREADS * CALLS)]
    with torch.no_grad():
        expected = [_first(model(*args)) for args in calls]
        stats = []
        for args in calls:
            model(*args)
            stats.append([s.as_dict() for s in trimkit.last_stats(model).layers])

        def worker(t: int) -> list:
            got = []
            for i in range(t, len(calls), THREADS):
                out = _first(model(*calls[i]))
                got.append((i, out, [s.as_dict() for s in trimkit.last_stats(model).layers]))
            return got

        for got in _concurrently(worker):
            for i, out, layer_stats in got:
                torch.testing.assert_close(out, expected[i], rtol=0, atol=0)
                assert layer_stats == stats[i]


def test_trimming_disabled_holds_for_its_own_thread_only() -> None:
    model, inputs = _timm()
    trimkit.apply(model, "tome", r=2)
    model.eval()
    x = inputs(1)
    with torch.no_grad():
        trimmed = model(*x)
        with trimkit.trimming_disabled(model):
            full = model(*x)
    assert not torch.equal(trimmed, full)
    inside = threading.Event()
    done = threading.Event()
    seen: dict[str, torch.Tensor] = {}

    def disabled() -> None:
        with torch.no_grad(), trimkit.trimming_disabled(model):
            inside.set()
            done.wait(30)
            seen["disabled"] = model(*x)

    def trimmed_calls() -> None:
        inside.wait(30)
        with torch.no_grad():
            seen["trimmed"] = torch.stack([model(*x) for _ in range(5)])
        done.set()

    workers = [threading.Thread(target=disabled), threading.Thread(target=trimmed_calls)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    torch.testing.assert_close(seen["disabled"], full, rtol=0, atol=0)
    for out in seen["trimmed"]:
        torch.testing.assert_close(out, trimmed, rtol=0, atol=0)


def test_last_stats_are_per_thread() -> None:
    model, inputs = _timm()
    trimkit.apply(model, "tome", r=2)
    model.eval()
    with torch.no_grad():
        model(*inputs(0))
    mine = trimkit.last_stats(model).table()

    def other(t: int) -> list:
        with torch.no_grad():
            model(*inputs(5))  # batch of 3 in another thread
        return [s.tokens_in.shape[0] for s in trimkit.last_stats(model).layers]

    assert _concurrently(other, threads=1) == [[3, 3, 3]]
    assert trimkit.last_stats(model).table() == mine
    assert {s.tokens_in.shape[0] for s in trimkit.last_stats(model).layers} == {1}


def test_set_mode_holds_for_every_thread() -> None:
    model, inputs = _timm()
    trimkit.apply(model, "tome", r=2)
    model.eval()
    trimkit.set_mode(model, "masked")

    def shapes(t: int) -> set:
        states = []
        with torch.no_grad():
            model(*inputs(2))
        states = trimkit.last_states(model)
        return {s.x.shape[1] for s in states.values()}

    assert _concurrently(shapes, threads=2) == [{17}, {17}]  # masked: nothing gathered
