"""``torch.compile`` of trimmed models in eval (docs/deploy.md).

Fixed-count recipes (tome, attn_prune, pumer merge-only, prune_heads) compile as one graph:
the engine knows their token counts on the host (`TokenState.known`), so nothing reads a
tensor value back. Adaptive ones (smarttrim: per-sample counts) compile with
``dynamic=True``; data-dependent shapes break the graph there, and outputs match eager.
Most checks use ``backend="eager"`` (dynamo's capture, no code generation) to stay fast.
"""

from __future__ import annotations

import pytest
import torch
from generic_models import FAMILIES, inputs, jitter
from timm.models.vision_transformer import VisionTransformer

import trimkit

FIXED = {
    "tome": dict(r=2),
    "attn_prune": dict(keep_ratio=0.5, layers=[0, 1]),
    "attn_prune-fuse": dict(keep_ratio=0.5, layers=[0, 1], fuse=True),
    "pumer": dict(),  # merge-only on a one-stream model
    "prune_heads": None,  # heads= filled in per model
    # learned token trimmers at a fixed budget (random trimmers: the count is what matters)
    "smarttrim-budget": dict(budget=0.5, heads=False, layers=[1]),
}
MODELS = ["timm", "prenorm-sdpa", "postnorm-softmax", "torch-encoder-postnorm"]
#: the generic adapter cannot head-prune a fused attention whose output projection its graph
#: does not show (prenorm-sdpa); a timm DeiT forced through it can
CASES = [(name, recipe) for name in MODELS for recipe in sorted(FIXED)
         if (name, recipe) != ("prenorm-sdpa", "prune_heads")
         and (name == "timm" or recipe != "attn_prune-fuse")] + [("deit", "prune_heads")]


def timm_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                             num_classes=5)


def build(name: str, recipe: str, options: dict | None) -> tuple[torch.nn.Module, str]:
    """A tiny model in eval with ``recipe`` applied (timm adapter, or the generic one)."""
    if name == "timm":
        model, kind, adapter = jitter(timm_vit)(), "image", None
    else:
        make, kind, adapter = FAMILIES[name]
        model = jitter(make)()
    model.eval()
    kw = {} if adapter is None else dict(adapter=adapter)
    if options is None:  # prune_heads: one head of the first layer
        stream = next(iter(trimkit.describe(model, **kw).streams))
        options = dict(heads=[(stream, 0, 1)])
    trimkit.apply(model, recipe.split("-")[0], **kw, **options)
    return model, kind


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name,recipe", CASES)
def test_fixed_count_recipes_compile_as_one_graph(name, recipe):
    model, kind = build(name, recipe, FIXED[recipe])
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=count, fullgraph=True)  # a break would raise
    x = inputs(kind, 2)
    with torch.no_grad():
        expected = model(*x)
        got = compiled(*x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert len(graphs) == 1
    if recipe != "prune_heads":  # the trimmed forward ran, and recorded its statistics
        stats = trimkit.last_stats(model).layers
        assert stats and all(s.tokens_in.shape == (2,) for s in stats)
        assert int(stats[-1].tokens_out[0]) < int(stats[0].tokens_in[0])


def test_explain_finds_no_graph_break_in_a_trimmed_timm_vit():
    model, _ = build("timm", "tome", FIXED["tome"])
    x = inputs("image", 2)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(*x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_a_specialisation_first_seen_under_compile_heals_after_one_call():
    """Applied in training mode, compiled in eval: the eval graph is traced by fx outside the
    compiled region on the first call (a break), then the frame recompiles whole."""
    torch.manual_seed(0)
    model = jitter(timm_vit)().train()
    trimkit.apply(model, "tome", r=2)
    model.eval()
    compiled = torch.compile(model, backend="eager")
    x = inputs("image", 2)
    with torch.no_grad():
        expected = model(*x)
        compiled(*x)
        torch._dynamo.reset()
        again = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(again(*x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["timm", "prenorm-sdpa"])
def test_adaptive_recipe_compiles_with_dynamic_shapes(name):
    """SmartTrim keeps a different number of tokens and heads per sample: compiled with
    ``dynamic=True`` it matches eager for two batch sizes."""
    # head gates on the timm ViT; tokens only on the generic model, to keep the test short
    model, kind = build(name, "smarttrim", dict(init_logit=0.0, layers=[1], ratio=0.9,
                                                heads=name == "timm"))
    torch.manual_seed(1)
    with torch.no_grad():  # trimmers whose decisions differ per sample
        for p in model.trimkit.parameters():
            p.add_(torch.randn_like(p))
    compiled = torch.compile(model, backend="eager", dynamic=True)
    varied = False
    for batch in (2, 3):
        x = inputs(kind, batch)
        with torch.no_grad():
            expected = model(*x)
            tokens = trimkit.last_stats(model).layers[-1].tokens_out
            varied = varied or bool((tokens != tokens[0]).any())
            torch.testing.assert_close(compiled(*x), expected, atol=1e-5, rtol=0)
    assert varied, "the trimmers kept the same count in every sample"


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_inductor_matches_eager(mode):
    """Inductor's code, and ``mode="reduce-overhead"`` (CUDA graphs on a GPU; on a CPU the
    same code without them), computes what eager does."""
    model, kind = build("timm", "tome", FIXED["tome"])
    compiled = torch.compile(model, fullgraph=True, dynamic=False, mode=mode)
    x = inputs(kind, 2)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*x), model(*x), atol=1e-5, rtol=1e-5)


def test_bench_compile_flag_compiles_all_timed_models_and_marks_rows(monkeypatch, capsys):
    """``trimkit bench --compile``: untrimmed, trimmed and resized models are compiled in
    place with the same mode (here through dynamo's eager backend, to stay fast)."""
    import json

    from trimkit.tools.cli import main

    modes = []
    original = torch.nn.Module.compile

    def compile(self, *args, **kwargs):
        modes.append(kwargs.get("mode"))
        return original(self, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile)
    code = main(["bench", "--model", "timm:vit_tiny_patch16_224?img_size=64&depth=2",
                 "--recipe", "tome", "--r", "2", "--batch-size", "2", "--repeats", "1",
                 "--warmup", "1", "--json", "--compile", "--no-memory"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert modes == ["default"] * 3  # base, trim, and the resize baseline
    assert [r["compiled"] for r in rows] == ["default"] and rows[0]["resize_side"]
    assert rows[0]["flops_ratio"] > 1


def _other_adapter(name: str) -> tuple:
    """``(make_model, inputs, output)`` for the adapters beyond timm and generic: padded text,
    two streams, cross-attention and keys-only layers."""
    import blip_models
    import test_invariants_meter as meter
    import test_open_clip as oc
    from test_conformance import hf_case
    from trimkit.adapters.meter import meter_tiny

    if name in ("hf-bert-padded", "hf-clip"):
        make, make_inputs, output, _ = hf_case("bert_cls" if name == "hf-bert-padded" else "clip")
        return make, make_inputs(3), output
    if name == "open_clip":
        from open_clip.model import CLIP

        case = dict(cls=CLIP, causal=True, pool="argmax",
                    vision=dict(image_size=32, patch_size=8, width=16, head_width=8, layers=2),
                    text=dict(context_length=10, vocab_size=oc.VOCAB, width=16, heads=2,
                              layers=2, eos_id=oc.EOT))
        pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
        return oc.factory(case), (pixels, oc.token_ids(3, 10, [9, 8, 7], seed=3)), oc.both
    if name == "hf-siglip":  # both towers, left-padded text, the attention-pooling head
        import test_siglip as sg

        ids, mask = sg.text_batch(3)
        return sg.hf_siglip, (ids, sg.images(3), mask), lambda out: torch.cat(
            [out.image_embeds, out.text_embeds], -1)
    if name == "blip-itm":
        return (lambda: blip_models.make("itm", heads=2, layers=2),
                blip_models.inputs("itm", 3, 6, True, 32, 3), blip_models.output("itm"))
    cfg = meter_tiny(num_heads=2, hidden_size=16, num_fusion_layers=2, image_size=32)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, cfg.vocab_size, (3, 8), generator=g)
    mask = (torch.arange(8)[None] < torch.tensor([8, 6, 5])[:, None]).long()
    args = (torch.randn(3, 3, 32, 32, generator=g), ids.masked_fill(mask == 0, 1), mask)
    return meter.factory(cfg), args, lambda out: out


@pytest.mark.parametrize("name", ["hf-bert-padded", "blip-itm", "meter"])
def test_padded_models_compile_with_dynamic_shapes_and_match_eager(name):
    """Padded or two-stream models break the graph where the data decides a shape (per-sample
    counts); compiled with dynamic shapes they still compute what eager does: tome on padded
    BERT and BLIP, smarttrim's per-instance token and head trimmers (random, so that samples
    keep different counts) on METER. (Every adapter compiles as one graph under
    `trimkit.fixed_shapes`, below; dynamo is slow on these broken graphs.)"""
    make, args, output = _other_adapter(name)
    model = make().eval()
    if name == "meter":
        trimkit.apply(model, "smarttrim", init_logit=0.0)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.trimkit.parameters():
                p.add_(torch.randn_like(p))
    else:
        trimkit.apply(model, "tome", r=1)
    with torch.no_grad():
        ref = output(model(*args))
        out = output(torch.compile(model, backend="eager", dynamic=True)(*args))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,recipe", [
    ("hf-bert-padded", "tome"), ("hf-clip", "tome"), ("hf-siglip", "attn_prune"),
    ("open_clip", "tome"),
    ("blip-itm", "tome"), ("blip-itm", "pumer"), ("meter", "tome"), ("meter", "pumer"),
    ("meter", "attn_prune"), ("meter", "prune_heads"), ("hf-bert-padded", "prune_heads")])
def test_fixed_shapes_compile_padded_and_two_stream_models_as_one_graph(name, recipe):
    """Under `trimkit.fixed_shapes` a padded stream is trimmed in masked form, so a fixed-count
    recipe compiles with ``fullgraph=True`` (a graph break would raise) on every adapter, and
    computes what eager does; streams without padding are still compacted."""
    make, args, output = _other_adapter(name)
    model = make().eval()
    options = {"tome": {"r": 1}, "attn_prune": {"keep_ratio": 0.5},
               "prune_heads": {"heads": [("text", 0, 1)]}}.get(recipe, {})
    trimkit.apply(model, recipe, **options)
    with torch.no_grad():
        ref = output(model(*args))
        with trimkit.fixed_shapes():
            out = output(torch.compile(model, backend="eager", fullgraph=True)(*args))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
