"""transformers' ViLT: the adapter (one stream, the image, with the text as its prefix), the
conformance kit over tiny configs in every execution form, zero trimming, padding and
pixel_mask, PuMer on a single-stream VLM (its counts as properties, its text-to-image scores),
the kit's seed for models that sample, and the generic adapter's message."""

from __future__ import annotations

import copy
import pickle
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    ViltConfig,
    ViltForImageAndTextRetrieval,
    ViltForImagesAndTextClassification,
    ViltForMaskedLM,
    ViltForQuestionAnswering,
    ViltModel,
)
from trimkit.adapters.hf import ViltAdapter

import trimkit
from trimkit import ModelDescription
from trimkit.ops import prefix_attention, prefix_tokens
from trimkit.state import TokenState
from trimkit.testing import ConformanceError, InvariantError, check_adapter, check_invariants

TEXT, IMAGE_SIDE, PATCH, DIM = 8, 32, 8, 32
PATCHES = (IMAGE_SIDE // PATCH) ** 2


def _config(**more) -> ViltConfig:
    fields = dict(hidden_size=DIM, num_hidden_layers=4, num_attention_heads=2,
                  intermediate_size=64, image_size=IMAGE_SIDE, patch_size=PATCH, vocab_size=100,
                  max_position_embeddings=TEXT, num_labels=3, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    return ViltConfig(**{**fields, **more})


def make_vqa() -> ViltForQuestionAnswering:
    torch.manual_seed(0)
    return ViltForQuestionAnswering(_config()).eval()


def _text(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and their padding mask: texts of 3 to 8 tokens padded to 8."""
    ids = torch.randint(1, 100, (b, TEXT), generator=g)
    mask = (torch.arange(TEXT) < torch.randint(3, TEXT + 1, (b, 1), generator=g)).long()
    return ids.masked_fill(mask == 0, 0), mask


def pixel_inputs(b: int, seed: int = 0) -> tuple:
    """Images (every other one with its right half left out by ``pixel_mask``) and texts,
    in the order of the model's positional arguments."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = _text(b, g)
    pixels = torch.randn(b, 3, IMAGE_SIDE, IMAGE_SIDE, generator=g)
    pixel_mask = torch.ones(b, IMAGE_SIDE, IMAGE_SIDE, dtype=torch.long)
    pixel_mask[::2, :, IMAGE_SIDE // 2:] = 0  # every other image: its right half
    return ids, mask, None, pixels, pixel_mask


def embed_inputs(b: int, seed: int = 0) -> tuple:
    """Image embeddings (no patch sampling: deterministic) with a padding mask over them,
    and texts; the first image token is the one ViLT's CLS would be, never padding."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = _text(b, g)
    n = 1 + PATCHES
    embeds = torch.randn(b, n, DIM, generator=g)
    image_mask = (torch.arange(n) < torch.randint(n // 2, n + 1, (b, 1), generator=g)).long()
    return ids, mask, None, None, image_mask, None, embeds


def perturb_embeds(inputs: tuple) -> tuple:
    ids, mask, _, _, image_mask, _, embeds = inputs
    embeds = torch.where(image_mask[..., None].bool(), embeds, torch.full_like(embeds, 3.0))
    return ids.masked_fill(mask == 0, 7), mask, None, None, image_mask, None, embeds


def perturb_pixels(inputs: tuple) -> tuple:
    """Other text padding, and other pixels where ``pixel_mask`` leaves the image out."""
    ids, mask, _, pixels, pixel_mask = inputs
    pixels = torch.where(pixel_mask[:, None].bool(), pixels, torch.full_like(pixels, 5.0))
    return ids.masked_fill(mask == 0, 7), mask, None, pixels, pixel_mask


def _logits(out) -> torch.Tensor:
    return out.logits


# ---------------------------------------------------------------------- the conformance kit


def test_conformance_with_image_embeddings_and_padding_in_both_modalities():
    """Every recipe, every invariant (masked, compacted and packed execution, batch
    independence, padding content in the text and the image never matters)."""
    report = check_adapter(make_vqa, embed_inputs, max_examples=10, output=_logits,
                           perturb_padding=perturb_embeds, shrink=False)
    assert report.adapter == "vilt"
    assert set(report.checked) == {"attn_prune", "prune_heads", "pumer", "smarttrim", "tome"}
    # only the decoder-VLM recipes, which have no place in a single-stream encoder
    assert set(report.skipped) == {"fastv", "visionzip", "visionzip+fastv"}
    stream = report.streams["image"]
    assert stream.prefix == "text" and stream.num_protected == 1 and stream.padded
    assert "prefix text" in str(report)


def test_conformance_with_sampled_patches_needs_a_seed():
    """ViLT samples its patches on every forward: the kit says so, and with ``seed`` it
    checks the model as it runs from pixels (pixel_mask included)."""
    with pytest.raises(ConformanceError, match=r"draws random numbers in eval.*seed="):
        check_adapter(make_vqa, pixel_inputs, recipes=["tome"], batch_sizes=(2,),
                      output=_logits)
    report = check_adapter(make_vqa, pixel_inputs, max_examples=4, batch_sizes=(1,),
                           output=_logits, seed=0, shrink=False, perturb_padding=perturb_pixels,
                           recipes=["tome", "pumer", "attn_prune"])
    assert set(report.checked) == {"tome", "pumer", "attn_prune"}


def _seeded(model, inputs):
    torch.manual_seed(0)
    return model(*inputs).logits


@pytest.mark.parametrize("mode", ["compacted", "masked", "packed"])
def test_zero_trimming_is_the_model_within_1e_6(mode):
    model = make_vqa()
    inputs = pixel_inputs(3)
    with torch.no_grad():
        ref = _seeded(model, inputs)
        trimkit.apply(model, "pumer", prune_ratio=0.0, image_merge_ratio=0.0,
                      text_merge_ratio=0.0, mode=mode)
        assert (_seeded(model, inputs) - ref).abs().max() <= 1e-6
        trimkit.remove(model)
        assert torch.equal(_seeded(model, inputs), ref)


@pytest.mark.parametrize("cls, out", [
    (ViltForMaskedLM, lambda o: o.logits),
    (ViltModel, lambda o: o.last_hidden_state),
    (ViltForImageAndTextRetrieval, lambda o: o.logits),
])
def test_other_heads_keep_their_output_shapes_and_read_restored_positions(cls, out):
    """The MLM head reads the text where the input put it: last_hidden_state keeps the
    input's length; with nothing trimmed it is the model's own output at every real
    position (padding positions hold zeros)."""
    torch.manual_seed(0)
    model = cls(_config()).eval()
    inputs = embed_inputs(2)
    with torch.no_grad():
        ref = out(model(*inputs))
        trimkit.apply(model, "tome", r=0)
        got = out(model(*inputs))
        real = torch.cat([inputs[1], inputs[4]], 1)[:, :got.shape[1]].bool()
        assert torch.allclose(got[real], ref[real], atol=1e-5)
        trimkit.remove(model)
        trimkit.apply(model, "pumer", layers=[0, 1])
        got = out(model(*inputs))
    assert got.shape == ref.shape and torch.isfinite(got).all()


def test_two_images_per_text_enter_the_stream_twice():
    torch.manual_seed(0)
    config = _config(num_images=2, modality_type_vocab_size=3)
    model = ViltForImagesAndTextClassification(config).eval()
    ids, mask, _, _, image_mask, _, embeds = embed_inputs(2)
    embeds2 = torch.stack([embeds, embeds.flip(1)], 1)
    pixel_mask = torch.stack([image_mask, image_mask], 1)[..., None]
    args = (ids, mask, None, None, pixel_mask, None, embeds2)
    with torch.no_grad():
        ref = model(*args).logits
        trimkit.apply(model, "attn_prune", keep_ratio=1.0)
        assert torch.allclose(model(*args).logits, ref, atol=1e-5)
        trimkit.remove(model)
        trimkit.apply(model, "attn_prune", keep_ratio=0.5, layers=[1])
        model(*args)
    tokens = [s.tokens_out for s in trimkit.last_stats(model).layers if s.layer == 1]
    assert len(tokens) == 1  # the second image's call restarted the stream's statistics


# ------------------------------------------------------------------------------- PuMer


def _expected_pumer(text_real: int, image_real: int, p: float, m: float, t: float,
                    layers: list[int], depth: int) -> list[int]:
    """Live tokens after each layer of one sample: text CLS + other text, image CLS + N."""
    n, te, out = image_real - 1, text_real - 1, []
    for i in range(depth):
        if i in layers:
            k = max(n - round(p * n), 1) if p > 0 else n
            r = min(round(m * n), n // 2, k // 2)
            n = k - r
            te -= min(round(t * te), te // 2)
        out.append(1 + te + 1 + n)
    return out


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(1, 3), st.floats(0, 0.9), st.floats(0, 0.5), st.floats(0, 0.5),
       st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True), st.integers(0, 99))
def test_pumer_counts_on_vilt(b, p, m, t, layers, seed):
    """Per sample, per layer: ``N − round(p·N)`` image tokens kept (at least 1), then
    ``min(round(m·N), N//2, k//2)`` merged, ``min(round(t·T), T//2)`` of the T text tokens
    other than the CLS merged; padding never counts."""
    model = make_vqa()
    inputs = embed_inputs(b, seed)
    trimkit.apply(model, "pumer", prune_ratio=p, image_merge_ratio=m, text_merge_ratio=t,
                  layers=layers)
    with torch.no_grad():
        model(*inputs)
    got = torch.stack([s.tokens_out for s in trimkit.last_stats(model).layers], 1)
    text_real, image_real = inputs[1].sum(1), inputs[4].sum(1)
    for j in range(b):
        want = _expected_pumer(int(text_real[j]), int(image_real[j]), p, m, t,
                               sorted(layers), 4)
        assert got[j].tolist() == want


def test_pumer_defaults_on_vilt_are_the_reference_codes():
    """2, 5, 8 of 12 layers; prune 0.1, merge 0.3 (image) and 0.2 (text); after the
    attention, before the FFN."""
    torch.manual_seed(0)
    model = ViltForQuestionAnswering(_config(num_hidden_layers=12)).eval()
    trimkit.apply(model, "pumer")
    ops = {k: list(site.post) for k, site in model.trimkit.items() if len(site.post)}
    assert sorted(ops) == ["image_2", "image_5", "image_8"]
    op = ops["image_2"][0]
    assert (op.prune_ratio, op.merge_ratio, op.text_merge_ratio) == (0.1, 0.3, 0.2)


def test_prune_scores_are_the_attention_the_real_text_pays():
    """`prefix_attention` computes only the text rows: equal to the full attention map's
    rows of the live text tokens, averaged over heads, weighted by size."""
    g = torch.Generator().manual_seed(0)
    b, h, n, d, t = 2, 3, 12, 4, 5
    x = torch.randn(b, n, 8, generator=g)
    real = torch.ones(b, n, dtype=torch.bool)
    real[0, 3:5] = False  # sample 0: 3 real text tokens of 5
    state = TokenState.start(x, padding_mask=~real, protected=real & (torch.arange(n) < t),
                             prefix=t, track_source=True)
    q, k = torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    bias = torch.where(real, 0.0, -1e9)[:, None, None, :]
    got = prefix_attention(q, k, bias, d ** -0.5, state)
    probs = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5 + bias, -1).mean(1)
    rows = prefix_tokens(state)
    want = torch.stack([probs[j][rows[j]].mean(0) for j in range(b)])
    assert torch.allclose(got, want, atol=1e-6)
    assert rows.sum(1).tolist() == [3, 5]


def test_pumer_never_merges_text_with_image_or_the_text_cls():
    model = make_vqa()
    inputs = embed_inputs(3, seed=4)
    trimkit.apply(model, "pumer", prune_ratio=0.3, image_merge_ratio=0.5,
                  text_merge_ratio=0.5, layers=[0, 1, 2], track_source=True)
    with torch.no_grad():
        model(*inputs)
    state = trimkit.last_states(model)["image"]
    src = state.source
    lead = state.prefix
    assert lead == TEXT
    for j in range(3):
        for slot in src[j][src[j] >= 0].unique():
            members = (src[j] == slot).nonzero().flatten()
            assert bool((members < lead).all()) or bool((members >= lead).all())
        assert (src[j] == src[j, 0]).sum() == 1 and (src[j] == src[j, lead]).sum() == 1


def test_fine_tune_pumer_on_vilt():
    model = make_vqa()
    trimkit.apply(model, "pumer", layers=[1, 2])
    g = torch.Generator().manual_seed(1)
    data = [(*embed_inputs(4, seed=i), torch.randint(0, 3, (4,), generator=g))
            for i in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def loss(out, batch):
        return F.cross_entropy(out.logits, batch[-1])

    res = trimkit.train(model, torch.utils.data.DataLoader(data, batch_size=None), loss,
                        steps=3, lr=1e-3, cpu=True, seed=0)
    assert {"task", "sd"} <= set(res.history[-1])
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------- errors and messages


def test_generic_adapter_says_vilt_attention_does_not_trace():
    """Its `nn.Softmax(dim=-1)(scores)` mentions attention; the message quotes fx's error."""
    model = make_vqa()
    why = trimkit.api.find_adapter(model, "generic").why_not(model)
    assert "ViltSelfAttention) mentions attention but" in why
    assert "Proxy object cannot be iterated" in why
    with pytest.raises(TypeError, match="mentions attention but"):
        trimkit.apply(model, "tome", adapter="generic")


def test_gradient_checkpointing_is_refused_and_changes_nothing():
    model = make_vqa()
    model.activation_checkpointing_enable()
    forward = model.vilt.encoder.layer[0].attention.attention.forward
    with pytest.raises(trimkit.UnsupportedConfigError, match="gradient checkpointing"):
        trimkit.apply(model, "tome")
    assert not trimkit.is_applied(model)
    assert model.vilt.encoder.layer[0].attention.attention.forward == forward


class _GridVilt(ViltAdapter):
    """The shipped adapter stating a patch grid: with ``image_embeds`` in row-major order
    the patches are the last rows·cols entry tokens, after the text prefix and the CLS."""

    name = "vilt-grid"

    def __init__(self, grid: tuple[int, int]):
        self.grid = grid

    def describe(self, model):
        desc = super().describe(model)
        return ModelDescription(desc.family, {"image": replace(desc.streams["image"],
                                                               grid=self.grid)})


def test_the_grid_is_counted_from_the_end_after_the_prefix():
    side = IMAGE_SIDE // PATCH
    check_invariants(make_vqa, embed_inputs(2), "tome", dict(r=2), dict(r=0), output=_logits,
                     adapter=_GridVilt((side, side)))
    with pytest.raises(InvariantError, match="after a prefix of 8 and at most 1 protected"):
        check_invariants(make_vqa, embed_inputs(2), "tome", dict(r=2), dict(r=0),
                         output=_logits, adapter=_GridVilt((side, side - 1)))


def test_copies_and_pickles_are_independent_trimmed_models():
    model = trimkit.apply(make_vqa(), "pumer", layers=[1, 2])
    inputs = embed_inputs(3)
    with torch.no_grad():
        out = model(*inputs).logits
        twin = copy.deepcopy(model)
        thawed = pickle.loads(pickle.dumps(model))
        assert torch.equal(twin(*inputs).logits, out)
        assert torch.equal(thawed(*inputs).logits, out)
        trimkit.remove(twin)
        assert torch.allclose(twin(*inputs).logits, make_vqa()(*inputs).logits, atol=1e-6)
        assert torch.equal(model(*inputs).logits, out)


def test_bench_preset_has_a_resize_baseline_at_the_images_aspect():
    """`trimkit bench` on ViLT (no static grid: its patches follow the input) finds the
    resize baseline by the patch size, the images keeping their 384:640 aspect."""
    from trimkit.tools.bench import benchmark

    spec = ("hf:vilt-b32-finetuned-vqa?hidden_size=32&num_hidden_layers=2&"
            "num_attention_heads=2&intermediate_size=64&text_len=12")
    row, = benchmark(spec, "pumer", {"layers": [0]}, batch_sizes=(1,), warmup=0, repeats=1,
                     memory=False)
    assert row.resize_side is not None and row.resize_side % 32 == 0 and row.resize_side < 384
    assert row.gflops_resize < row.gflops_base and row.gflops_trim < row.gflops_base


@pytest.mark.parametrize("options, match", [
    (dict(layers=[4]), r"layers must be indices in \[0, 4\) of stream 'image'"),
    (dict(layers={"text": [1]}), "layers names stream 'text'"),
    (dict(image_merge_ratio=1.5), "image_merge_ratio must be"),
])
def test_bad_pumer_options_on_vilt_are_refused_and_change_nothing(options, match):
    model = make_vqa()
    attention = model.vilt.encoder.layer[0].attention.attention
    with pytest.raises(ValueError, match=match):
        trimkit.apply(model, "pumer", **options)
    assert not trimkit.is_applied(model) and "forward" not in attention.__dict__
    assert not model.vilt._forward_pre_hooks and not model.vilt.embeddings._forward_hooks
