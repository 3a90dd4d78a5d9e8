"""LLaVA-style decoder VLMs (tiny random models): FastV in the language model (prefill,
KV cache, generate), the vision tower's recipes, and the adapter's refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from llava_models import IMAGE_TOKEN, PATCHES, PROMPTS, batch, model, prompt
from trimkit.adapters.hf.decoder import kept_tokens
from trimkit.adapters.hf.llava import image_token_count

import trimkit

NEW = 5


def _generate(m, inputs, **kwargs):
    with torch.no_grad():
        out = m.generate(**inputs, max_new_tokens=NEW, do_sample=False, **kwargs)
    return out[:, -NEW:]


def _logits(m, inputs, **kwargs):
    with torch.no_grad():
        return m(**inputs, **kwargs).logits


def _prefill(m, inputs):
    """The cache a prefill leaves, and its logits."""
    with torch.no_grad():
        out = m(**inputs, use_cache=True)
    return out.cache, out.logits


# ----------------------------------------------------------------------------- the adapter

def test_detected_by_the_llava_adapter_with_its_two_streams():
    m = model()
    assert trimkit.find_adapter(m).name == "llava"
    desc = trimkit.describe(m)
    assert set(desc.streams) == {"image", "language"}
    assert desc.streams["image"].num_tokens == PATCHES + 1
    assert desc.streams["language"].positional
    assert len(desc.streams["language"].layers) == 4
    # the Hugging Face encoder adapter leaves the model to it, but can be forced
    from trimkit.registry import ADAPTERS

    assert not ADAPTERS["hf"].detect(m)


# ------------------------------------------------------------------ zero trimming, remove

@pytest.mark.parametrize("text", ["llama", "qwen2"])
def test_keeping_everything_changes_nothing(text):
    m = model(text)
    inputs = batch(PROMPTS)
    ref, greedy, beams = _logits(m, inputs), _generate(m, inputs), _generate(m, inputs,
                                                                             num_beams=3)
    trimkit.apply(m, "fastv", keep=1.0)
    assert torch.equal(_logits(m, inputs), ref)
    assert torch.equal(_generate(m, inputs), greedy)
    assert torch.equal(_generate(m, inputs, num_beams=3), beams)
    cache, _ = _prefill(m, inputs)
    assert kept_tokens(cache) is None


def test_remove_restores_outputs_state_and_attention():
    m = model()
    inputs = batch(PROMPTS)
    ref, greedy = _logits(m, inputs), _generate(m, inputs)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    trimkit.apply(m, "fastv", keep=0.25)
    assert not torch.equal(_generate(m, inputs), greedy)
    trimkit.remove(m)
    assert torch.equal(_logits(m, inputs), ref)
    assert torch.equal(_generate(m, inputs), greedy)
    assert m.config.text_config._attn_implementation == "sdpa"
    after = m.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


# ---------------------------------------------------------------- what FastV keeps, where

def test_later_layers_cache_only_the_kept_image_tokens():
    m = model()
    inputs = batch(PROMPTS)
    real = inputs["attention_mask"].sum(1)
    trimkit.apply(m, "fastv", layer=2, keep=0.25)
    cache, logits = _prefill(m, inputs)
    n = inputs["input_ids"].shape[1]
    kept = math.ceil(0.25 * PATCHES)
    # each sample keeps its text and 4 of its 16 image tokens; the batch is padded to the
    # longest survivor (the sample without padding)
    assert [cache.layers[j].get_seq_length() for j in range(4)] == [n, n, n - 12, n - 12]
    level = kept_tokens(cache).levels[0]
    assert level.first == 2
    assert level.live.sum(1).tolist() == (real - PATCHES + kept).tolist()
    ids = inputs["input_ids"].gather(1, level.index)
    assert ((ids == IMAGE_TOKEN) & level.live).sum(1).tolist() == [kept] * 3
    assert logits.shape[1] == n  # logits keep the prompt's length


def test_shortened_layers_share_one_additive_mask_per_call():
    """The mask of the layers after the drop is built once per call and level, as additive
    logits (SDPA would convert a bool mask again in every layer), in the prefill and in
    each decoding step; a dead slot gets the dtype's lowest logit, a live one 0."""
    m = model(layers=5)
    inputs = batch(PROMPTS)
    trimkit.apply(m, "fastv", layer=2, keep=0.25)
    seen = []
    for j in (3, 4):
        m.model.language_model.layers[j].register_forward_pre_hook(
            lambda mod, a, k: seen.append(k["attention_mask"]), with_kwargs=True)
    cache, logits = _prefill(m, inputs)
    token = logits[:, -1:].argmax(-1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
    with torch.no_grad():
        m(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
    level = kept_tokens(cache).levels[0]
    assert len(seen) == 4 and seen[0] is seen[1] and seen[2] is seen[3]
    prefill, step = seen[0], seen[2]
    assert prefill.dtype == step.dtype == torch.float32
    low = torch.finfo(torch.float32).min
    assert set(prefill.unique().tolist()) == set(step.unique().tolist()) == {0.0, low}
    assert torch.equal(step[:, 0, 0, :level.live.shape[1]] == 0, level.live)


def test_kept_tokens_are_the_top_by_the_last_tokens_attention():
    """The scores equal the attention weights of the untrimmed model run eagerly."""
    m = model(attn="eager")
    inputs = batch(PROMPTS)
    with torch.no_grad():
        att = m(**inputs, output_attentions=True).attentions[1]  # layer K = 2 ranks
    scores = att[:, :, -1, :].mean(1)
    image = inputs["input_ids"] == IMAGE_TOKEN
    top = scores.masked_fill(~image, -1).topk(8, dim=1).indices.sort(dim=1).values
    trimkit.apply(m, "fastv", layer=2, keep=0.5)
    cache, _ = _prefill(m, inputs)
    level = kept_tokens(cache).levels[0]
    ids = inputs["input_ids"].gather(1, level.index)
    for b in range(3):
        kept = level.index[b][(ids[b] == IMAGE_TOKEN) & level.live[b]]
        assert kept.tolist() == top[b].tolist()


def _manual(m, inputs, index: torch.Tensor, k: int) -> torch.Tensor:
    """FastV by hand on one unpadded sample: the first ``k`` layers on every token, the rest
    on the tokens at ``index`` with their own positions (causal, SDPA); last logits."""
    inner = m.model
    ids = inputs["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    feats = inner.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    feats = torch.cat(list(feats))
    embeds = embeds.masked_scatter((ids == IMAGE_TOKEN)[..., None], feats)
    lang = inner.language_model
    pos = torch.arange(ids.shape[1])[None]
    tables = lang.rotary_emb(embeds, pos)
    h = embeds
    for i, layer in enumerate(lang.layers):
        if i == k:
            h, pos = h[:, index], pos[:, index]
            tables = tuple(t[:, index] for t in tables)
        h = layer(h, attention_mask=None, position_embeddings=tables, position_ids=pos)
    return m.lm_head(lang.norm(h))[:, -1]


@pytest.mark.parametrize("text", ["llama", "qwen2"])
def test_trimmed_prefill_and_decoding_equal_fastv_by_hand(text):
    m = model(text)
    inputs = batch(PROMPTS[:1])
    trimkit.apply(m, "fastv", layer=2, keep=0.5)
    with torch.no_grad():
        out = m(**inputs, use_cache=True)
        index = kept_tokens(out.cache).levels[0].index[0]
        with trimkit.trimming_disabled(m):
            want = _manual(m, inputs, index, 2)
        torch.testing.assert_close(out.logits[:, -1], want, atol=1e-5, rtol=0)
        # a decoding step reads the kept tokens from the cache: the same as the prompt and
        # the new token run by hand with the same tokens kept
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = m(input_ids=nxt, cache=out.cache, use_cache=True,
                 attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long))
        longer = dict(inputs, input_ids=torch.cat([inputs["input_ids"], nxt], 1))
        n = inputs["input_ids"].shape[1]
        with trimkit.trimming_disabled(m):
            want = _manual(m, longer, torch.cat([index, torch.tensor([n])]), 2)
        torch.testing.assert_close(step.logits[:, -1], want, atol=1e-5, rtol=0)


def test_a_sample_decodes_the_same_alone_and_in_a_left_padded_batch():
    m = model()
    trimkit.apply(m, "fastv", layer=1, keep=0.4)
    inputs = batch(PROMPTS)
    together = _logits(m, inputs)[:, -1]
    tokens = _generate(m, inputs)
    beams = _generate(m, inputs, num_beams=2)
    for b, p in enumerate(PROMPTS):
        alone = batch([p])
        alone["pixel_values"] = inputs["pixel_values"][b:b + 1]
        torch.testing.assert_close(_logits(m, alone)[:, -1], together[b:b + 1], atol=1e-5,
                                   rtol=0)
        assert torch.equal(_generate(m, alone), tokens[b:b + 1])
        assert torch.equal(_generate(m, alone, num_beams=2), beams[b:b + 1])


def test_eager_and_sdpa_agree():
    inputs = batch(PROMPTS)
    got = []
    for attn in ("sdpa", "eager"):
        m = trimkit.apply(model(attn=attn), "fastv", keep=0.3)
        got.append((_logits(m, inputs)[:, -1], _generate(m, inputs)))
    torch.testing.assert_close(got[0][0], got[1][0], atol=1e-5, rtol=0)
    assert torch.equal(got[0][1], got[1][1])


def test_attn_prune_on_the_language_stream_is_fastv_and_may_prune_twice():
    inputs = batch(PROMPTS)
    fastv = _logits(trimkit.apply(model(), "fastv", layer=2, keep=0.5), inputs)
    m = trimkit.apply(model(), "attn_prune", stream="language", layers=[1], keep_ratio=0.5)
    assert torch.equal(_logits(m, inputs), fastv)
    trimkit.remove(m)
    trimkit.apply(m, "attn_prune", stream="language", layers=[0, 2], keep_ratio=0.5)
    cache, _ = _prefill(m, inputs)
    n = inputs["input_ids"].shape[1]
    assert [cache.layers[j].get_seq_length() for j in range(4)] == [n, n - 8, n - 8, n - 12]
    assert len(_generate(m, inputs)[0]) == NEW


def test_inputs_embeds_and_no_cache():
    m = model()
    inputs = batch(PROMPTS)
    trimkit.apply(m, "fastv", keep=0.25)
    want = _logits(m, inputs)
    embeds = m.get_input_embeddings()(inputs["input_ids"])
    got = _logits(m, dict(inputs, input_ids=None, inputs_embeds=embeds))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(m, inputs, use_cache=False), want, atol=1e-6, rtol=0)


def test_a_deep_copy_is_an_independent_trimmed_model():
    m = trimkit.apply(model(), "fastv", keep=0.25)
    inputs = batch(PROMPTS)
    want = _generate(m, inputs)
    twin = copy.deepcopy(m)
    assert torch.equal(_generate(twin, inputs), want)
    trimkit.remove(twin)
    assert torch.equal(_generate(m, inputs), want)


def test_trimming_disabled_runs_the_whole_generation_untrimmed():
    m = model()
    inputs = batch(PROMPTS)
    greedy = _generate(m, inputs)
    trimkit.apply(m, "fastv", keep=0.25)
    with trimkit.trimming_disabled(m):
        assert torch.equal(_generate(m, inputs), greedy)


# --------------------------------------------------------------------------- refusals

def test_bad_options_and_recipes_leave_the_model_unchanged():
    m = model()
    inputs = batch(PROMPTS)
    ref = _logits(m, inputs)
    with pytest.raises(ValueError, match=r"layer must be in \[1, 3\]"):
        trimkit.apply(m, "fastv", layer=4)
    with pytest.raises(ValueError, match="keep must be"):
        trimkit.apply(m, "fastv", keep=0.0)
    with pytest.raises(ValueError, match="only drops tokens"):
        trimkit.apply(m, "tome", stream="language", r=2)
    with pytest.raises(ValueError, match="only drops tokens"):
        trimkit.apply(m, "attn_prune", stream="language", layers=[1], fuse=True)
    assert not trimkit.is_applied(m)
    assert m.config.text_config._attn_implementation == "sdpa"
    assert torch.equal(_logits(m, inputs), ref)


def test_fastv_needs_a_language_stream():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            image_size=32, patch_size=8)).eval()
    with pytest.raises(ValueError, match="'language' stream"):
        trimkit.apply(clip, "fastv")


def test_unsupported_attention_is_refused():
    m = model()
    m.set_attn_implementation("flex_attention")
    with pytest.raises(trimkit.UnsupportedConfigError, match="'sdpa' or 'eager'"):
        trimkit.apply(m, "fastv")
    assert not trimkit.is_applied(m)


# ------------------------------------------------------------------- the vision tower

def test_vision_recipes_change_the_image_token_count():
    m = model()
    inputs = batch(PROMPTS)
    assert image_token_count(m) == PATCHES
    trimkit.apply(m, "tome", r=2)
    count = image_token_count(m)
    assert count == PATCHES - 2 * 2  # two merging layers before LLaVA's layer -2
    with pytest.raises(ValueError, match="image_token_count"):
        _logits(m, inputs)
    short = batch([prompt([1, 5, 6], [7, 8, 9], count), prompt([1, 5], [7, 8], count)])
    assert _generate(m, short).shape == (2, NEW)
    trimkit.remove(m)
    assert image_token_count(m) == PATCHES


def _visionzip_by_hand(m, pixels, dominant: int, contextual: int) -> torch.Tensor:
    """VisionZip from the untrimmed tower's layer -2 (eager attention weights, keys averaged
    over heads), through the projector."""
    tower = m.model.vision_tower
    layer = tower.encoder.layers[-2]
    seen = {}
    handle = layer.self_attn.k_proj.register_forward_hook(
        lambda mod, args, out: seen.__setitem__("k", out))
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True, output_attentions=True)
    handle.remove()
    hidden, att = out.hidden_states[-2], out.attentions[-2]
    b, n, _ = hidden.shape
    keys = torch.nn.functional.normalize(seen["k"].view(b, n, 4, -1).mean(2), dim=-1)
    cls = att.mean(1)[:, 0, 1:]
    rows = []
    for i in range(b):
        keep = sorted((cls[i].topk(dominant).indices + 1).tolist())
        rest = [j for j in range(1, n) if j not in keep]
        targets = rest[::max(1, len(rest) // contextual)][:contextual]
        others = [j for j in rest if j not in targets]
        group = (keys[i, others] @ keys[i, targets].T).argmax(1).tolist()
        merged = [hidden[i, [t] + [o for o, g in zip(others, group, strict=True) if g == k]]
                  .mean(0) for k, t in enumerate(targets)]
        rows.append(torch.cat([hidden[i, keep], torch.stack(merged)]))
    with torch.no_grad():
        return m.model.multi_modal_projector(torch.stack(rows))


def test_visionzip_hands_the_projector_dominant_and_contextual_tokens():
    m = model(attn="eager")
    pixels = batch(PROMPTS)["pixel_values"]
    want = _visionzip_by_hand(m, pixels, 5, 3)
    trimkit.apply(m, "visionzip", dominant=5, contextual=3)
    assert image_token_count(m) == 8
    with torch.no_grad():
        got = torch.stack(m.model.get_image_features(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    short = batch([prompt([1, 5, 6], [7, 8, 9], 8), prompt([1, 5], [7, 8], 8)])
    assert _generate(m, short).shape == (2, NEW)


def test_visionzip_options_are_checked():
    m = model()
    with pytest.raises(ValueError, match="layer must be in"):
        trimkit.apply(m, "visionzip", layer=3)
    with pytest.raises(ValueError, match="at least one"):
        trimkit.apply(m, "visionzip", dominant=0, contextual=0)
    with pytest.raises(ValueError, match="does not have"):
        trimkit.apply(m, "visionzip", stream="nope")
    with pytest.raises(ValueError, match="only drops tokens"):
        trimkit.apply(m, "visionzip", stream="language")
    assert not trimkit.is_applied(m)


def test_a_siglip_tower_without_cls():
    """SigLIP has no CLS: LLaVA reads every token ("full"), VisionZip ranks by the mean
    query's attention, and FastV works the same in the language model."""
    m = model(vision="siglip")
    inputs = batch(PROMPTS)
    greedy = _generate(m, inputs)
    assert trimkit.describe(m).streams["image"].num_protected == 0
    trimkit.apply(m, "fastv", keep=1.0)
    assert torch.equal(_generate(m, inputs), greedy)
    trimkit.remove(m)
    trimkit.apply(m, "visionzip", dominant=5, contextual=3)
    assert image_token_count(m) == 8
    short = batch([prompt([1, 5, 6], [7, 8, 9], 8), prompt([1, 5], [7, 8], 8)])
    assert _generate(m, short).shape == (2, NEW)
    trimkit.remove(m)
    assert torch.equal(_generate(m, inputs), greedy)


def test_bench_reports_the_kv_cache_each_prefill_leaves():
    from trimkit.tools.bench import benchmark, format_table

    rows = benchmark("llava:tiny", "fastv", {"keep": 0.25}, batch_sizes=[2], warmup=0,
                     repeats=1, memory=False)
    assert [r.task for r in rows] == ["prefill", "cache copy", "decode", "per token"]
    prefill = rows[0]
    # 32 text and 16 image tokens; the last 2 of 4 layers keep 4 image tokens
    assert prefill.cache_mb_trim / prefill.cache_mb_base == pytest.approx(
        (2 * 48 + 2 * 36) / (4 * 48))
    assert "cache MiB trim" in format_table(rows)


def test_masked_execution_keeps_every_slot_and_agrees_with_compacted():
    inputs = batch(PROMPTS)
    m = trimkit.apply(model(), "fastv", layer=1, keep=0.3)
    compacted, tokens = _logits(m, inputs), _generate(m, inputs)
    trimkit.set_mode(m, "masked")
    cache, masked = _prefill(m, inputs)
    n = inputs["input_ids"].shape[1]
    assert [cache.layers[j].get_seq_length() for j in range(4)] == [n] * 4
    torch.testing.assert_close(masked, compacted, atol=1e-5, rtol=0)
    assert torch.equal(_generate(m, inputs), tokens)


# ------------------------------------------------------------------ the conformance kit

def _kit_inputs(b: int) -> tuple:
    x = batch([PROMPTS[i % len(PROMPTS)] for i in range(b)])
    return x["input_ids"], x["pixel_values"], x["attention_mask"]


def _other_padding(inputs: tuple) -> tuple:
    ids, pixels, mask = inputs
    return ids.masked_fill(mask == 0, 42), pixels, mask


def test_fastv_passes_the_conformance_kit():
    """Every invariant of one forward, left padding included. Vision-side recipes cannot
    run on LLaVA's fixed inputs: they change how many <image> tokens a prompt needs."""
    from trimkit.testing import check_adapter

    report = check_adapter(model, _kit_inputs, recipes=["fastv"], max_examples=4,
                           batch_sizes=(1, 3), perturb_padding=_other_padding)
    assert set(report.checked) == {"fastv"}


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_visionzip_passes_the_conformance_kit_on_a_tower(vision):
    from trimkit.testing import check_adapter

    def tower():
        return model(vision=vision).model.vision_tower

    def images(b: int) -> tuple:
        return (torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b)),)

    report = check_adapter(tower, images, recipes=["visionzip"], max_examples=6)
    assert set(report.checked) == {"visionzip"}
