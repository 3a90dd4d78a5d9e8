"""The benchmark's resize baseline (the untrimmed model at the input side closest in FLOPs to
the trimmed one) and its round-robin timing, on tiny models (no timing asserted)."""

from __future__ import annotations

import pytest

import trimkit
from trimkit.tools.bench import (
    BUILDERS,
    RESIZE,
    Row,
    benchmark,
    build_model,
    format_table,
    time_calls,
    time_pair,
)

VIT = "timm:vit_tiny_patch16_224?depth=2&img_size={}"
BERT = ("hf:bert-base-uncased?num_hidden_layers=1&hidden_size=32&intermediate_size=64"
        "&num_attention_heads=2&seq_len=16")
RESIZE_KEYS = ("resize_side", "gflops_resize", "ips_resize", "speedup_resize")


def fast(spec: str, recipe: str, options: dict, batch: int = 2, **kw) -> list[Row]:
    return benchmark(spec, recipe, options, [batch], warmup=0, repeats=1, memory=False, **kw)


def gflops_at(spec: str, batch: int) -> float:
    model, make_inputs = build_model(spec)
    return trimkit.count_flops(model, *make_inputs(batch)) / batch / 1e9


def no_resize(row: Row) -> bool:
    return all(getattr(row, k) is None for k in RESIZE_KEYS) and row.times_resize == []


def test_resize_side_is_the_closest_in_flops():
    """128 px ViT (8×8 patches of 16 px), half the tokens pruned from layer 0: the resize
    side is a multiple of 16 below 128 whose GFLOPs are the closest to the trimmed model's."""
    (row,) = fast(VIT.format(128), "attn_prune", {"keep_ratio": 0.5, "layers": [0, 1]})
    side = row.resize_side
    assert side is not None and side % 16 == 0 and 16 <= side < 128
    assert row.gflops_resize == pytest.approx(gflops_at(VIT.format(side), 2))
    gap = abs(row.gflops_resize - row.gflops_trim)
    for other in (side - 16, side + 16):
        if 16 <= other < 128:
            assert gap <= abs(gflops_at(VIT.format(other), 2) - row.gflops_trim)
    assert row.gflops_resize < row.gflops_base
    assert row.speedup_resize > 0 and row.ips_resize > 0 and len(row.times_resize) == 1
    table = format_table([row])
    assert "speedup  speedup resize" in table and "resize px" in table
    assert f" {side} " in table.splitlines()[-1]


def test_no_resize_flag_and_table():
    (row,) = fast(VIT.format(64), "tome", {"r": 2}, resize=False)
    assert no_resize(row)
    assert "resize" not in format_table([row])


def test_mixed_rows_show_a_dash():
    (a,) = fast(VIT.format(64), "tome", {"r": 2}, batch=1)
    (b,) = fast(VIT.format(64), "tome", {"r": 2}, batch=1, resize=False)
    assert a.resize_side is not None
    lines = format_table([a, b]).splitlines()
    assert "resize px" in lines[1]
    # no memory probes: two dashes in each row, and four more where there is no baseline
    assert lines[2].split().count("-") == 2 and lines[3].split().count("-") == 6


def test_text_only_model_has_no_resize_baseline():
    (row,) = fast(BERT, "tome", {"r": 2, "stream": "text"})
    assert no_resize(row) and row.gflops_trim > 0


def test_recipe_without_fewer_flops_has_no_resize_baseline():
    (row,) = fast(VIT.format(64), "tome", {"r": 0})
    assert row.flops_ratio <= 1 and no_resize(row)


def test_builder_without_hook_or_with_a_broken_one(monkeypatch):
    """A builder that did not opt in gets no baseline; one whose keyword does not change the
    inputs' side gets none either, and nothing fails."""
    timm_builder = BUILDERS["timm"]
    monkeypatch.setitem(BUILDERS, "plain", timm_builder)
    (row,) = fast("plain:vit_tiny_patch16_224?depth=2&img_size=64", "tome", {"r": 2})
    assert no_resize(row)
    monkeypatch.setitem(BUILDERS, "broken", lambda name, side=None, **kw: timm_builder(name, **kw))
    monkeypatch.setitem(RESIZE, "broken", "side")
    messages: list[str] = []
    (row,) = fast("broken:vit_tiny_patch16_224?depth=2&img_size=64", "tome", {"r": 2},
                  progress=messages.append)
    assert no_resize(row)
    assert any("no resize baseline" in m and "side=" in m for m in messages)


def test_meter_tiny_resize():
    """METER tiny (32 px, 8 px patches), PuMer: the resize build keeps the preset's other
    fields and matches the trimmed FLOPs among 8, 16 and 24 px."""
    (row,) = fast("meter-tiny", "pumer", {})
    side = row.resize_side
    assert side in (8, 16, 24)
    spec = "meter:tiny?image_size={}"
    assert row.gflops_resize == pytest.approx(gflops_at(spec.format(side), 2))
    gap = abs(row.gflops_resize - row.gflops_trim)
    assert all(gap <= abs(gflops_at(spec.format(s), 2) - row.gflops_trim)
               for s in (8, 16, 24))
    assert row.speedup_resize > 0


def test_open_clip_resize_keeps_a_custom_vision_config():
    """open_clip's hook (``force_image_size``) also wins over a spec's own ``vision_cfg``."""
    spec = ('open_clip:ViT-B-16?tower=vision&vision_cfg={"layers":1,"width":64,"head_width":32,'
            '"patch_size":16,"image_size":64}&text_cfg={"layers":1,"width":32,"heads":2}'
            '&embed_dim=32')
    (row,) = fast(spec, "tome", {"r": 3})
    assert row.resize_side in (16, 32, 48)
    model, make_inputs = build_model(spec.replace("tower=vision", "tower=vision&force_image_size="
                                                  f"{row.resize_side}"))
    (images,) = make_inputs(1)
    assert images.shape[-1] == row.resize_side
    assert row.gflops_resize == pytest.approx(trimkit.count_flops(model, images) / 1e9)


def test_derived_rows_carry_the_resize_baseline():
    """BLIP captioning (two timed tasks and a derived one): one resize side per batch size,
    and the derived row's resize time is derived like base and trim."""
    spec = ("hf:blip-image-captioning-base?image_size=32&num_hidden_layers=2&text_layers=1"
            "&new_tokens=2")
    enc, gen, tok = fast(spec, "attn_prune", {"keep_ratio": 0.5, "layers": [0]})
    assert enc.resize_side == gen.resize_side == tok.resize_side == 16
    assert tok.times_resize == pytest.approx(
        [(g - e) / 2 for g, e in zip(gen.times_resize, enc.times_resize, strict=True)])
    assert tok.gflops_resize == pytest.approx((gen.gflops_resize - enc.gflops_resize) / 2)


def test_time_calls_round_robin():
    """Round i starts with call i mod n; time_pair is the two-call case."""
    log: list[str] = []

    def call(name: str):
        return lambda *_: log.append(name)

    seen: list[list[float]] = []
    times = time_calls([(call("a"), ()), (call("b"), ()), (call("c"), [(), ()])], warmup=1,
                       repeats=3, progress=lambda i, last: seen.append(last))
    assert log == list("abcc") + list("abcc") + list("bcca") + list("ccab")
    assert [len(t) for t in times] == [3, 3, 3] and len(seen) == 3 and len(seen[0]) == 3
    log.clear()
    tb, tt = time_pair(call("a"), call("b"), (), warmup=0, repeats=2)
    assert log == list("abba") and len(tb) == len(tt) == 2
