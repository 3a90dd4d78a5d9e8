"""SigLIP: Hugging Face's ``SiglipModel`` / ``SiglipVisionModel`` / ``SiglipTextModel`` and
timm's SigLIP ViTs (no class token, an attention-pooling head, ``global_pool="map"``).

The conformance kit on both families (every recipe, every execution form); the pooling
head reads only live tokens and weighs merged ones by their size (checked against the head
run on every token repeated ``size`` times, which is what log(size) on its logits
computes); with no CLS, attention pruning scores tokens by the mean live query; the
family's API (features, hidden states, timm's ``forward_features`` / ``forward_head``);
refusals that leave the model unchanged."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from transformers import (
    SiglipConfig,
    SiglipForImageClassification,
    SiglipModel,
    SiglipTextConfig,
    SiglipTextModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import trimkit
from trimkit.testing import ConformanceReport, check_adapter

ALL = {"tome", "attn_prune", "smarttrim", "pumer", "prune_heads"}
VOCAB = 40
COMMON = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=2)
TEXT = dict(vocab_size=VOCAB, max_position_embeddings=16, projection_size=16, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
VISION = dict(image_size=32, patch_size=8)


def _noise(model: torch.nn.Module) -> torch.nn.Module:
    """Random non-zero biases and norms, so tokens differ in interesting ways."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def passes(report: ConformanceReport, streams: set[str]) -> None:
    """Every built-in recipe was checked on ``streams`` and none failed."""
    assert not report.failures and set(report.streams) == streams
    assert all(report.checked.get(r, 0) >= 1 for r in ALL), report.summary()


def images(b: int) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b))


# ------------------------------------------------------------------------------- timm


def timm_siglip(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dict(dict(pretrained=False, img_size=32, patch_size=8, embed_dim=16, depth=2,
                    num_heads=2, num_classes=5), **kw)
    return _noise(timm.create_model("vit_base_patch16_siglip_224", **cfg))


def test_timm_siglip_passes_the_conformance_kit():
    report = check_adapter(timm_siglip, lambda b: (images(b),), max_examples=2)
    passes(report, {"image"})
    assert report.adapter == "timm-vit" and report.entry == {"image": 16}
    assert report.description.stream("image").num_protected == 0


def _trimmed(state, entry: int) -> bool:
    """Whether some token of ``state`` (of ``entry`` tokens at the start) was dropped or
    merged."""
    return (state.keep.shape[1] < entry or not bool(state.keep.bool().all())
            or bool((state.size > 1).any()))


def _pool_by_repeats(pool, tokens: torch.Tensor, keep: torch.Tensor, size: torch.Tensor
                     ) -> torch.Tensor:
    """``pool`` of each sample's live tokens, each repeated ``size`` times: what adding
    log(size) to a pooling head's logits computes, from the head's own forward."""
    return torch.cat([pool(t[k].repeat_interleave(s[k].round().long(), 0)[None])
                      for t, k, s in zip(tokens, keep, size, strict=True)])


@pytest.mark.parametrize("mode", ["masked", "compacted", "packed"])
@pytest.mark.parametrize("recipe, options", [
    ("tome", dict(r=3)), ("attn_prune", dict(keep_ratio=0.5, layers=[0], fuse=True)),
    ("smarttrim", dict(lambda_cost=0.0, stable_init=False))])
def test_timm_pooling_head_reads_live_tokens_by_size(mode, recipe, options):
    model = timm_siglip(reg_tokens=2)  # two protected registers the head does not read
    x = images(3)
    trimkit.apply(model, recipe, **options)
    trimkit.set_mode(model, mode)
    with torch.no_grad():
        feats = model.forward_features(x)
        state = trimkit.last_states(model)["image"]
        pooled = model.forward_head(feats, pre_logits=True)
        assert torch.equal(model.forward_head(feats), model.head(pooled))
        assert torch.allclose(model(x), model.head(pooled), atol=1e-6)
        assert state.keep.shape == feats.shape[:2]  # one row per sample, also packed
        keep = state.keep.bool().clone()
        keep[:, :2] = False  # the registers: timm's pool leaves them out
        expected = _pool_by_repeats(model.attn_pool, feats, keep, state.size)
    assert _trimmed(state, 18)
    assert torch.allclose(pooled, expected, atol=1e-5)


def test_timm_pool_follows_the_recipes_proportional_option():
    """ToMe without proportional attention: merged tokens count once in the head too."""
    model = timm_siglip()
    x = images(2)
    trimkit.apply(model, "tome", r=3, proportional=False)
    trimkit.set_mode(model, "compacted")
    with torch.no_grad():
        feats = model.forward_features(x)
        size = trimkit.last_states(model)["image"].size
        assert (size > 1).any()
        assert torch.allclose(model.forward_head(feats, pre_logits=True),
                              model.attn_pool(feats), atol=1e-6)


def test_timm_unsupported_pooling_heads_are_refused_untouched():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                              class_token=False, global_pool="prr", num_classes=0).eval()
    x = images(2)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(trimkit.UnsupportedConfigError, match="prr.*Nothing was changed"):
        trimkit.apply(model, "tome", r=2)
    assert not trimkit.is_applied(model) and "pool" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(x), before)


# ------------------------------------------------------------------------ Hugging Face


def hf_siglip() -> torch.nn.Module:
    torch.manual_seed(0)
    return _noise(SiglipModel(SiglipConfig(text_config=dict(COMMON, **TEXT),
                                           vision_config=dict(COMMON, **VISION),
                                           attn_implementation="sdpa")))


def hf_vision(attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    return _noise(SiglipVisionModel(SiglipVisionConfig(**COMMON, **VISION,
                                                       attn_implementation=attn)))


def text_batch(b: int, seq: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the left (the pooled last position is always real) and their
    attention mask."""
    g = torch.Generator().manual_seed(b)
    ids = torch.randint(3, VOCAB, (b, seq), generator=g)
    lengths = seq - torch.arange(b) % 3
    mask = (torch.arange(seq).flip(0)[None] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def test_hf_siglip_model_passes_the_conformance_kit():
    """Both towers (PuMer merges in each), padded text, the vision pooling head."""
    def make_inputs(b: int) -> tuple:
        ids, mask = text_batch(b)
        return ids, images(b), mask

    def perturb(args: tuple) -> tuple:
        ids, pixels, mask = args
        other = torch.randint(3, VOCAB, ids.shape, generator=torch.Generator().manual_seed(9))
        return torch.where(mask.bool(), ids, other), pixels, mask

    report = check_adapter(hf_siglip, make_inputs, perturb_padding=perturb, max_examples=3,
                           output=lambda o: torch.cat([o.image_embeds, o.text_embeds], -1))
    passes(report, {"image", "text"})
    assert report.adapter == "hf" and report.entry["image"] == 16
    assert report.description.stream("image").grid == (4, 4)


def _head_by_repeats(model: torch.nn.Module, state) -> torch.Tensor:
    """SigLIP's pooling head, run untrimmed on each sample's live tokens (after the final
    norm) repeated ``size`` times."""
    with trimkit.trimming_disabled(model):
        tokens = model.post_layernorm(state.x)
        return _pool_by_repeats(model.head, tokens, state.keep.bool(), state.size)


@pytest.mark.parametrize("mode", ["masked", "compacted", "packed"])
@pytest.mark.parametrize("recipe, options", [
    ("tome", dict(r=3)), ("attn_prune", dict(keep_ratio=0.5, layers=[1])),
    ("smarttrim", dict(lambda_cost=0.0, stable_init=False))])
def test_hf_pooling_head_reads_live_tokens_by_size(mode, recipe, options):
    model = hf_vision("eager")
    x = images(3)
    trimkit.apply(model, recipe, **options)
    trimkit.set_mode(model, mode)
    with torch.no_grad():
        out = model(pixel_values=x)
        state = trimkit.last_states(model)["image"]
        expected = _head_by_repeats(model, state)
    assert out.last_hidden_state.shape == (3, 16, 16) and _trimmed(state, 16)
    assert torch.allclose(out.pooler_output, expected, atol=1e-5)
    if recipe == "tome":  # every position covered: the head over the restored output agrees
        with trimkit.trimming_disabled(model), torch.no_grad():
            assert torch.allclose(model.head(out.last_hidden_state.clone()),
                                  out.pooler_output, atol=1e-5)


def test_hf_mean_pooling_classifier_is_size_weighted():
    """``SiglipForImageClassification`` averages ``last_hidden_state``: dropped positions
    hold the size-weighted mean of the live tokens, so that average is the size-weighted
    mean over live tokens after the final norm."""
    torch.manual_seed(0)
    model = _noise(SiglipForImageClassification(SiglipConfig(
        text_config=dict(COMMON, **TEXT), vision_config=dict(COMMON, **VISION), num_labels=3)))
    x = images(2)
    trimkit.apply(model, "attn_prune", keep_ratio=0.5, layers=[0], fuse=True)
    trimkit.set_mode(model, "compacted")
    with torch.no_grad():
        logits = model(pixel_values=x).logits
        state = trimkit.last_states(model)["image"]
        with trimkit.trimming_disabled(model):
            tokens = model.vision_model.post_layernorm(state.x)
        w = (state.size * state.keep)[..., None]
        mean = (tokens * w).sum(1) / w.sum(1)
    assert state.keep.shape[1] < 16 and (state.size > 1).any()  # dropped, and one fused
    assert torch.allclose(logits, model.classifier(mean), atol=1e-5)


def test_hf_attn_prune_scores_by_the_mean_live_query():
    """No CLS: the tokens kept are the top ones by the attention the mean query of the live
    tokens pays them (averaged over heads), computed here from the first layer's weights."""
    model = hf_vision()
    x = images(2)
    trimkit.apply(model, "attn_prune", keep_ratio=0.5, layers=[0])
    trimkit.set_mode(model, "compacted")
    with torch.no_grad():
        model(pixel_values=x)
        source = trimkit.last_states(model)["image"].source
        with trimkit.trimming_disabled(model):
            layer = model.encoder.layers[0]
            attn = layer.self_attn
            h = layer.layer_norm1(model.embeddings(x))
            q = attn.q_proj(h).unflatten(-1, (2, 8)).transpose(1, 2)
            k = attn.k_proj(h).unflatten(-1, (2, 8)).transpose(1, 2)
            probs = torch.softmax(q.mean(2, keepdim=True) @ k.transpose(-2, -1) * attn.scale, -1)
            scores = probs.mean(1)[:, 0]
    for s, src in zip(scores, source, strict=True):
        assert set(src.ge(0).nonzero().flatten().tolist()) == set(
            s.topk(8).indices.tolist())


def test_hf_features_apis_and_outputs():
    model = hf_siglip()
    ids, mask = text_batch(2)
    x = images(2)
    trimkit.apply(model, "tome", r=2, stream="image")
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=x, attention_mask=mask,
                    output_hidden_states=True)
        image = model.get_image_features(pixel_values=x).pooler_output
        text = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    assert torch.allclose(out.image_embeds, image / image.norm(dim=-1, keepdim=True),
                          atol=1e-6)
    assert torch.allclose(out.text_embeds, text / text.norm(dim=-1, keepdim=True), atol=1e-6)
    assert out.logits_per_image.shape == (2, 2)
    lengths = [h.shape[1] for h in out.vision_model_output.hidden_states]
    assert lengths == [16, 14, 12]  # each layer's own length: two merges per layer
    assert out.vision_model_output.last_hidden_state.shape == (2, 16, 16)
    trimkit.remove(model)
    with torch.no_grad():
        untrimmed = model(input_ids=ids, pixel_values=x, attention_mask=mask)
    assert torch.allclose(untrimmed.text_embeds, out.text_embeds, atol=1e-6)  # image only
    assert not torch.allclose(untrimmed.image_embeds, out.image_embeds, atol=1e-4)


def test_hf_text_pooled_last_position_is_protected_and_padding_there_refused():
    torch.manual_seed(0)
    model = _noise(SiglipTextModel(SiglipTextConfig(**COMMON, **TEXT)))
    ids, _ = text_batch(3)
    trimkit.apply(model, "attn_prune", keep_ratio=0.05, layers=[0])
    trimkit.set_mode(model, "compacted")
    with torch.no_grad():
        model(input_ids=ids)  # no attention_mask: every token real, as SigLIP is trained
    source = trimkit.last_states(model)["text"].source
    assert (source[:, -1] >= 0).all()  # the last position survives a 5 % keep ratio
    right = torch.ones(3, 8, dtype=torch.long)
    right[0, 5:] = 0  # right padding: the pooler would read a padding token
    with pytest.raises(ValueError, match="last position.*padding"):
        model(input_ids=ids, attention_mask=right)
    with trimkit.fixed_shapes(), pytest.raises(RuntimeError, match="last position"):
        model(input_ids=ids, attention_mask=right)  # decided in the graph there
    trimkit.remove(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=right)  # the model's own behaviour again


@pytest.mark.parametrize("make", [timm_siglip, hf_vision], ids=["timm", "hf"])
def test_copies_are_independent_trimmed_models(make):
    """The pooling patches are objects, not closures: a deep copy and an unpickled copy trim
    as the original does, and each is removed alone."""
    model = make()
    x = images(2)
    trimkit.apply(model, "tome", r=3)

    def run(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out = m(x) if isinstance(m, VisionTransformer) else m(pixel_values=x).pooler_output
        return out

    trimmed = run(model)
    for copy_ in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(run(copy_), trimmed)
        trimkit.remove(copy_)
        assert not torch.allclose(run(copy_), trimmed, atol=1e-4)
        assert torch.equal(run(model), trimmed)


@pytest.mark.parametrize("make", [timm_siglip, hf_vision], ids=["timm", "hf"])
def test_training_reaches_the_trimmers_through_the_pooling_head(make):
    """Masked execution in training: the soft keep mask enters the pooling head's logits
    too (log(keep)), and the learned trimmers get gradients."""
    model = make().train()
    trimkit.apply(model, "smarttrim", layers=[1], lambda_cost=0.0, stable_init=False)
    x = images(2)
    out = model(x) if isinstance(model, VisionTransformer) else model(
        pixel_values=x).pooler_output
    out.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("trimkit.")]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_hf_vision_tower_without_its_head():
    """``vision_use_head=False``: nothing pools, ``last_hidden_state`` goes back to its
    length after the final norm, with the size-weighted mean at dropped positions."""
    torch.manual_seed(0)
    model = _noise(SiglipVisionModel(SiglipVisionConfig(**COMMON, **VISION,
                                                        vision_use_head=False)))
    x = images(2)
    trimkit.apply(model, "attn_prune", keep_ratio=0.5, layers=[0])
    means = {}
    for mode in ("masked", "compacted", "packed"):
        trimkit.set_mode(model, mode)
        with torch.no_grad():
            out = model(pixel_values=x)
        assert out.pooler_output is None and out.last_hidden_state.shape == (2, 16, 16)
        means[mode] = out.last_hidden_state.mean(1)
    assert torch.allclose(means["masked"], means["compacted"], atol=1e-5)
    assert torch.allclose(means["packed"], means["compacted"], atol=1e-5)


@pytest.mark.parametrize("tower, recipe, options", [
    ("vision", "tome", dict(r=4)), ("text", "smarttrim", dict(stable_init=False))])
def test_bench_preset_builds_and_trims(tower, recipe, options):
    from trimkit.tools.bench import build_model

    model, make_inputs = build_model(
        f"hf:siglip-base-patch16-224?tower={tower}&num_hidden_layers=2&hidden_size=32"
        f"&intermediate_size=32&num_attention_heads=2&image_size=64")
    inputs = make_inputs(2)
    if tower == "text":  # padding="max_length": the end id fills the rest, no mask
        assert len(inputs) == 1 and (inputs[0][:, -1] == 1).all()
    else:
        assert inputs[0].shape[-1] == 64
    with torch.no_grad():
        trimkit.apply(model, recipe, **options)
        model(*inputs)
        assert trimkit.last_stats(model).layers
        trimkit.remove(model)

