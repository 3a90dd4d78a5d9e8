"""The open_clip adapter: the invariants (docs/architecture.md) as hypothesis properties over tiny
random CLIP / CustomTextCLIP models and standalone towers, for both streams; the text pooler's token
kept and found wherever it sits; the family's API after `apply`; clear refusals."""

from __future__ import annotations

import open_clip
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import TextTransformer, VisionTransformer
from trimkit.adapters.open_clip import UnsupportedConfigError, pooled_index

import trimkit
from trimkit.testing import check_invariants

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
VOCAB = 40
SOT, EOT = VOCAB - 2, VOCAB - 1


def token_ids(batch: int, n: int, ends: list[int], seed: int = 0) -> torch.Tensor:
    """CLIP-tokenizer-shaped ids: start token, random tokens, EOT (the highest id) at
    ``ends[b]``, zero padding after it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, n, dtype=torch.long)
    for b, e in enumerate(ends):
        ids[b, 0] = SOT
        ids[b, 1:e] = torch.randint(1, SOT, (e - 1,), generator=g)
        ids[b, e] = EOT
    return ids


def perturb_after_eot(inputs: tuple) -> tuple:
    """The same batch with other (lower) ids after each EOT: a causal text tower's pooled
    output cannot depend on them."""
    *rest, ids = inputs
    after = torch.arange(ids.shape[1])[None] > ids.argmax(-1, keepdim=True)
    noise = torch.randint(1, SOT, ids.shape, generator=torch.Generator().manual_seed(7))
    return (*rest, torch.where(after, noise, ids))


@st.composite
def clips(draw):
    """A tiny CLIP or CustomTextCLIP: ViT tower (CLS or average pooling, LayerScale, qk_norm
    blocks, final LN after pooling) and text tower (causal or not, pooled by argmax, eos,
    last or first token), with a batch of images and padded token ids."""
    heads = draw(st.sampled_from([1, 2]))
    image_size = draw(st.sampled_from([16, 24, 32]))
    vision = dict(image_size=image_size, patch_size=8, width=8 * heads, head_width=8,
                  layers=draw(st.integers(1, 3)), pool_type=draw(st.sampled_from(["tok", "avg"])),
                  ls_init_value=draw(st.sampled_from([None, 0.5])),
                  qk_norm=draw(st.booleans()), final_ln_after_pool=draw(st.booleans()))
    causal = draw(st.booleans())
    pool = draw(st.sampled_from(["argmax", "eos", "last"] + ([] if causal else ["first"])))
    n = draw(st.integers(4, 10))
    text = dict(context_length=n, vocab_size=VOCAB, width=8 * heads, heads=heads,
                layers=draw(st.integers(1, 3)), no_causal_mask=not causal, pool_type=pool,
                eos_id=EOT, ls_init_value=draw(st.sampled_from([None, 0.5])))
    cls = draw(st.sampled_from([CLIP, CustomTextCLIP]))
    batch = draw(st.integers(1, 4))
    ends = draw(st.lists(st.integers(1, n - 1), min_size=batch, max_size=batch))
    images = torch.randn(batch, 3, image_size, image_size,
                         generator=torch.Generator().manual_seed(batch))
    case = dict(cls=cls, vision=vision, text=text, causal=causal, pool=pool)
    return case, (images, token_ids(batch, n, ends, seed=n))


def factory(case: dict):
    def make():
        torch.manual_seed(0)
        m = case["cls"](embed_dim=8, vision_cfg=case["vision"], text_cfg=case["text"])
        with torch.no_grad():  # non-zero biases so tokens differ in interesting ways
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return m
    return make


def both(out: tuple) -> torch.Tensor:
    """Image and text features side by side: the stream not trimmed must not change either."""
    return torch.cat([out[0], out[1]], -1)


def padding_perturbation(case: dict):
    return perturb_after_eot if case["causal"] and case["pool"] in ("argmax", "eos") else None


def n_layers(case: dict, stream: str) -> int:
    return (case["vision"] if stream == "image" else case["text"])["layers"]


@SETTINGS
@given(clips(), st.integers(0, 4), st.sampled_from(["image", "text"]))
def test_tome_invariants(case, r, stream):
    case, inputs = case
    if stream == "image":
        patches = (case["vision"]["image_size"] // 8) ** 2
        r = min(r, patches // (2 * n_layers(case, stream)))
    check_invariants(factory(case), inputs, "tome", dict(r=r, stream=stream),
                     dict(r=0, stream=stream), output=both, merges_only=True,
                     perturb_padding=padding_perturbation(case))


@SETTINGS
@given(clips(), st.floats(0.05, 1.0), st.booleans(), st.sampled_from(["image", "text"]),
       st.data())
def test_attn_prune_invariants(case, keep, fuse, stream, data):
    case, inputs = case
    layers = data.draw(st.lists(st.integers(0, n_layers(case, stream) - 1), min_size=1,
                                max_size=3))
    check_invariants(factory(case), inputs, "attn_prune",
                     dict(keep_ratio=keep, fuse=fuse, layers=layers, stream=stream),
                     dict(keep_ratio=1.0, stream=stream), output=both,
                     perturb_padding=padding_perturbation(case))


@SETTINGS
@given(clips(), st.sampled_from([None, 0.3, 0.75]), st.booleans(), st.booleans(),
       st.sampled_from([None, ["image"], ["text"]]))
def test_smarttrim_invariants(case, budget, tokens, heads, streams):
    """Learned trimmers with random initialisation, so they drop for real; stable
    initialisation keeps everything, so it is the zero-trimming case."""
    case, inputs = case
    if not (tokens or heads):
        tokens = True
    layers = {"image": list(range(n_layers(case, "image"))),
              "text": list(range(n_layers(case, "text")))}
    check_invariants(factory(case), inputs, "smarttrim",
                     dict(stable_init=False, budget=budget, tokens=tokens, heads=heads,
                          lambda_cost=0.0, streams=streams, layers=layers),
                     dict(tokens=tokens, heads=heads, streams=streams, layers=layers,
                          lambda_cost=0.0),
                     output=both, perturb_padding=padding_perturbation(case))


@SETTINGS
@given(clips(), st.floats(0.0, 0.5), st.floats(0.0, 0.5), st.booleans(), st.data())
def test_pumer_invariants(case, image_merge, text_merge, proportional, data):
    """The towers do not read each other: PuMer's merging half in both, at layers drawn per
    tower."""
    case, inputs = case
    layers = {s: data.draw(st.lists(st.integers(0, n_layers(case, s) - 1), min_size=1,
                                    max_size=2)) for s in ("image", "text")}
    check_invariants(factory(case), inputs, "pumer",
                     dict(image_merge_ratio=image_merge, text_merge_ratio=text_merge,
                          proportional=proportional, layers=layers),
                     dict(image_merge_ratio=0.0, text_merge_ratio=0.0), output=both,
                     merges_only=True, perturb_padding=padding_perturbation(case))


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["last", "argmax"]), st.integers(1, 3),
       st.sampled_from(["tome", "attn_prune", "smarttrim"]))
def test_text_tower_with_padding_mask(pool, batch, recipe):
    """A bidirectional TextTransformer with its own padding mask (B·H×N×N, per sample)."""
    n = 8

    def make():
        torch.manual_seed(0)
        return TextTransformer(context_length=n, vocab_size=VOCAB, width=16, heads=2, layers=2,
                               output_dim=8, no_causal_mask=True, use_pad_mask=True,
                               pad_id=0, pool_type=pool)

    ids = token_ids(batch, n, [(3 + 2 * b) % (n - 1) + 1 for b in range(batch)])
    options = {"tome": (dict(r=2), dict(r=0)),
               "attn_prune": (dict(keep_ratio=0.4, layers=[0, 1]), dict(keep_ratio=1.0)),
               "smarttrim": (dict(stable_init=False), dict())}[recipe]
    check_invariants(make, (ids,), recipe, *options, merges_only=recipe == "tome")


def test_vision_tower_alone():
    """A standalone VisionTransformer with custom (qk_norm) blocks and average pooling."""
    def make():
        torch.manual_seed(0)
        return VisionTransformer(image_size=32, patch_size=8, width=16, layers=3, heads=2,
                                 mlp_ratio=2.0, pool_type="avg", qk_norm=True, output_dim=8)

    images = torch.randn(3, 3, 32, 32)
    check_invariants(make, (images,), "tome", dict(r=[3, 2, 2]), dict(r=0), merges_only=True)
    check_invariants(make, (images,), "attn_prune", dict(keep_ratio=0.3, fuse=True),
                     dict(keep_ratio=1.0))


# ------------------------------------------------------------------ the text pooler's token

def tiny_clip(causal: bool = True, pool: str = "argmax", n: int = 10) -> CLIP:
    torch.manual_seed(0)
    return CLIP(embed_dim=8, vision_cfg=dict(image_size=16, patch_size=8, width=16, layers=2,
                                             head_width=8),
                text_cfg=dict(context_length=n, vocab_size=VOCAB, width=16, heads=2, layers=3,
                              no_causal_mask=not causal, pool_type=pool, eos_id=EOT)).eval()


@pytest.mark.parametrize("pool", ["argmax", "eos", "last"])
@pytest.mark.parametrize("recipe,options", [
    ("attn_prune", dict(stream="text", keep_ratio=0.05, layers=[0, 1, 2])),
    ("tome", dict(stream="text", r=[4, 4, 4])),
    ("smarttrim", dict(streams=["text"], stable_init=False, budget=0.05, layers=[0, 1, 2])),
])
def test_pooled_token_is_protected_wherever_it_sits(pool, recipe, options):
    """EOT first, last, in between, per sample: never dropped or merged, read at its slot."""
    n = 10
    model = tiny_clip(pool=pool, n=n)
    ends = [1, 4, 9, 6]
    ids = token_ids(4, n, ends)
    idx = pooled_index(ids, pool, EOT)
    with torch.no_grad():
        ref = model.encode_text(ids)
        trimkit.apply(model, recipe, track_source=True, **options)
        out = model.encode_text(ids)
        state = trimkit.last_states(model)["text"]
        slot = state.source.gather(1, idx[:, None])[:, 0]
        assert (slot >= 0).all(), "the pooled token was dropped"
        rows = torch.arange(4)
        assert state.protected[rows, slot].all() and state.live[rows, slot].all()
        assert ((state.source == slot[:, None]).sum(1) == 1).all(), "the pooled token merged"
        assert (state.size[rows, slot] == 1).all()
        if pool != "last":  # under a causal mask, nothing after the pooled token is live
            assert (state.live.sum(1) <= idx + 1).all()
        assert trimkit.last_stats(model).layers[-1].tokens_out.max() < n
        # what the pooled token reaches differs, so the output differs, but stays finite
        assert out.shape == ref.shape and torch.isfinite(out).all()
        # the restored output puts the pooled token back at the position the ids give
        trimkit.set_mode(model, "masked")
        assert torch.allclose(model.encode_text(ids), out, atol=1e-5)


def test_padding_after_eot_is_dropped_and_irrelevant():
    """Under a causal mask the tokens after EOT cannot reach it: they start dead (so they
    cost nothing), and zero trimming leaves the output as it was, whatever they are."""
    model = tiny_clip(n=12)
    ids = token_ids(3, 12, [2, 5, 11])
    with torch.no_grad():
        ref = model.encode_text(ids)
        trimkit.apply(model, "tome", r=0, stream="text")
        out = model.encode_text(ids)
        assert torch.allclose(out, ref, atol=1e-6)
        assert trimkit.last_stats(model).layers[0].tokens_in.tolist() == [3, 6, 12]
        assert torch.allclose(model.encode_text(perturb_after_eot((ids,))[0]), ref, atol=1e-6)
        # a batch of one packs to its own length: the padding is not computed at all
        single = model.encode_text(ids[:1])
        assert torch.allclose(single, ref[:1], atol=1e-6)
        assert trimkit.last_states(model)["text"].x.shape[1] == 3


def test_family_api_after_apply():
    """encode_image, encode_text, forward (tuple and dict), token outputs and
    forward_intermediates keep their signatures and formats."""
    model = tiny_clip()
    images, ids = torch.randn(2, 3, 16, 16), token_ids(2, 10, [3, 7])
    with torch.no_grad():
        ref_img = model.encode_image(images, normalize=True)
        ref_txt = model.encode_text(ids, normalize=True)
        ref_fwd = model(images, ids)
        ref_int = model.forward_intermediates(images, ids)
        trimkit.apply(model, "smarttrim", stable_init=False)
        assert isinstance(model, CLIP)
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(text=ids, normalize=True)
        assert img.shape == ref_img.shape and txt.shape == ref_txt.shape
        assert torch.allclose(img.norm(dim=-1), torch.ones(2))
        out = model(images, ids)
        assert len(out) == len(ref_fwd) and all(
            a.shape == b.shape for a, b in zip(out, ref_fwd, strict=True))
        assert model(text=ids)[0] is None
        model.output_dict = True
        assert set(model(images, ids)) == {"image_features", "text_features", "logit_scale"}
        model.output_dict = False
        inter = model.forward_intermediates(images, ids)  # untrimmed, so exactly as before
        for key in ("image_features", "text_features"):
            assert torch.allclose(inter[key], ref_int[key], atol=1e-6)
        model.visual.output_tokens = True
        pooled, tokens = model.visual(images)
        assert pooled.shape == ref_img.shape and tokens.shape[0] == 2
        model.visual.output_tokens = False
        trimkit.remove(model)


def test_remove_restores_bit_for_bit():
    def patched(m):
        return sorted((name, key) for name, mod in m.named_modules() for key in mod.__dict__
                      if key in ("forward", "encode_text", "forward_intermediates",
                                 "_global_pool")) + [
            (name, "hooks") for name, mod in m.named_modules() if mod._forward_hooks]

    for make in (lambda: tiny_clip(), lambda: CustomTextCLIP(
            embed_dim=8, vision_cfg=dict(image_size=16, patch_size=8, width=16, layers=2,
                                         head_width=8, pool_type="avg"),
            text_cfg=dict(context_length=10, vocab_size=VOCAB, width=16, heads=2, layers=2))):
        torch.manual_seed(0)
        model = make().eval()
        images, ids = torch.randn(2, 3, 16, 16), token_ids(2, 10, [3, 7])
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            ref = model(images, ids)
            before = patched(model)
            trimkit.apply(model, "tome", r=2, stream="text")
            assert patched(model) != before
            model(images, ids)
            trimkit.remove(model)
            assert patched(model) == before
            out = model(images, ids)
        assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
        assert not hasattr(model, "trimkit")


def _untouched_after_error(model: torch.nn.Module, inputs: tuple, match: str, **apply) -> None:
    model.eval()
    with torch.no_grad():
        ref = model(*inputs)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(UnsupportedConfigError, match=match):
            trimkit.apply(model, **apply)
        assert not trimkit.is_applied(model) and not hasattr(model, "trimkit")
        assert not any("forward" in m.__dict__ or m._forward_hooks for m in model.modules())
        out = model(*inputs)
    ref, out = (ref, out) if isinstance(ref, tuple) else ((ref,), (out,))
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True) if a is not None)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("vision,text,match", [
    (dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2), {},
     "attentional pooling"),
    (dict(pool_type="none"), {}, "returns every token"),
    ({}, dict(qk_norm=True), "custom attention blocks"),
    ({}, dict(pool_type="none"), "pool_type='none'"),
])
def test_unsupported_configs_are_refused_untouched(vision, text, match):
    torch.manual_seed(0)
    model = CLIP(embed_dim=8, vision_cfg=dict(image_size=16, patch_size=8, width=16, layers=2,
                                              head_width=8, **vision),
                 text_cfg=dict(context_length=10, vocab_size=VOCAB, width=16, heads=2, layers=2,
                               **text))
    inputs = (torch.randn(2, 3, 16, 16), token_ids(2, 10, [3, 7]))
    _untouched_after_error(model, inputs, match, recipe="tome", r=1)


def test_refusals_name_the_reason():
    torch.manual_seed(0)
    cosine = VisionTransformer(image_size=16, patch_size=8, width=16, layers=1, heads=2,
                               mlp_ratio=2.0, scaled_cosine_attn=True, output_dim=8)
    with pytest.raises(UnsupportedConfigError, match="scaled cosine"):  # open_clip's own
        trimkit.apply(cosine, "tome", r=1)  # forward fails on this config, so none is run
    assert not trimkit.is_applied(cosine)
    model = tiny_clip()
    model.set_grad_checkpointing(True)
    _untouched_after_error(model, (torch.randn(1, 3, 16, 16), token_ids(1, 10, [4])),
                           "gradient checkpointing", recipe="tome", r=1)
    torch.manual_seed(0)
    coca_text = CustomTextCLIP(
        embed_dim=8, vision_cfg=dict(layers=(1, 1, 1, 1), width=8, image_size=32),
        text_cfg=dict(context_length=10, vocab_size=VOCAB, width=16, heads=2, layers=2,
                      embed_cls=True))
    _untouched_after_error(coca_text, (None, token_ids(1, 10, [4])), "appended CLS",
                           recipe="tome", r=1)


def test_resnet_clip_trims_its_text_only():
    """A CLIP whose image tower is a ResNet has one stream: text."""
    torch.manual_seed(0)
    model = CLIP(embed_dim=8, vision_cfg=dict(layers=(1, 1, 1, 1), width=8, image_size=32),
                 text_cfg=dict(context_length=10, vocab_size=VOCAB, width=16, heads=2,
                               layers=2)).eval()
    assert list(trimkit.describe(model).streams) == ["text"]
    ids = token_ids(2, 10, [3, 8])
    check_invariants(lambda: model, (None, ids), "attn_prune",
                     dict(keep_ratio=0.3, layers=[0, 1]), dict(keep_ratio=1.0),
                     output=lambda o: o[1], perturb_padding=perturb_after_eot)


def test_entry_positions_masks_and_restore():
    """The engine's positional helpers on a hand-made state: a later token merged into an
    earlier one stands at the later position; masks are read there; outputs go back."""
    from trimkit.ops import (
        compact,
        drop_tokens,
        entry_positions,
        gather_entry_mask,
        merge_tokens,
        restore_positions,
    )
    from trimkit.state import TokenState

    x = torch.arange(6.0).view(1, 6, 1).expand(1, 6, 2).clone()
    state = TokenState.start(x, track_source=True)
    state = merge_tokens(state, torch.tensor([[4]]), torch.tensor([[1]]),
                         torch.tensor([[True]]))
    state = drop_tokens(state, torch.tensor([[False, False, True, False, False, False]]))
    assert entry_positions(state).tolist() == [[0, 4, 5, 3, 5, 5]]  # 2 dropped, 4 merged
    state, _ = compact(state)
    pos = entry_positions(state)
    assert pos.tolist() == [[0, 4, 3, 5]]
    causal = torch.full((6, 6), float("-inf")).triu(1)
    got = gather_entry_mask(causal, pos)[0, 0]
    assert torch.equal(got == 0, pos[0][:, None] >= pos[0][None, :])
    back = restore_positions(state, state.x)[0, :, 0]
    assert back.tolist() == [0.0, 2.5, 0.0, 3.0, 2.5, 5.0]  # merged value at both members


def test_prune_heads_then_trim():
    """Static head pruning (``nn.MultiheadAttention`` heads removed from the weights) and
    token trimming on top of it."""
    model = tiny_clip()
    images, ids = torch.randn(2, 3, 16, 16), token_ids(2, 10, [3, 7])
    with torch.no_grad():
        trimkit.apply(model, "prune_heads", heads={"image.0": [0], "text.1": [1]})
        assert trimkit.describe(model).streams["text"].layers[1].num_heads == 1
        ref = model(images, ids)
        check_invariants(lambda: model, (images, ids), "tome", dict(r=1, stream="text"),
                         dict(r=0, stream="text"), output=both, merges_only=True)
        assert all(torch.equal(a, b) for a, b in zip(model(images, ids), ref, strict=True))


def test_bench_builder_registered():
    from trimkit.tools.bench import BUILDERS, parse_spec

    assert "open_clip" in BUILDERS
    assert parse_spec("open_clip:ViT-B-16?tower=text") == ("open_clip", "ViT-B-16",
                                                             {"tower": "text"})
    assert open_clip.get_model_config("ViT-B-16") is not None
