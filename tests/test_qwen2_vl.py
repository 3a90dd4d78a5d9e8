"""Qwen2-VL and Qwen2.5-VL (tiny random models): FastV in the language model with multimodal
rotary positions (prefill, KV cache, generate), and the vision tower's refusal."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from qwen2_vl_models import IMAGE_TOKEN, PROMPTS, TOKENS, batch, model
from trimkit.adapters.hf.decoder import kept_tokens

import trimkit

NEW = 4
FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


def _generate(m, inputs, **kwargs):
    with torch.no_grad():
        out = m.generate(**inputs, max_new_tokens=NEW, do_sample=False, **kwargs)
    return out[:, -NEW:]


def _logits(m, inputs, **kwargs):
    with torch.no_grad():
        return m(**inputs, **kwargs).logits


def _prefill(m, inputs):
    with torch.no_grad():
        out = m(**inputs, use_cache=True)
    return out.cache, out.logits


# ----------------------------------------------------------------------------- the adapter

@pytest.mark.parametrize("family", FAMILIES)
def test_detected_with_a_language_and_an_image_stream(family):
    m = model(family=family)
    assert trimkit.find_adapter(m).name == "qwen2-vl"
    desc = trimkit.describe(m)
    assert set(desc.streams) == {"image", "language"}
    assert desc.streams["language"].positional
    assert len(desc.streams["language"].layers) == 4
    assert desc.streams["image"].layers[0].block == "model.visual.blocks.0"
    assert trimkit.find_adapter(m.model).name == "qwen2-vl"  # the bare Qwen2VLModel too


# ------------------------------------------------------------------ zero trimming, remove

@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_everything_changes_nothing(family):
    m = model(family=family)
    inputs = batch(PROMPTS)
    ref, greedy = _logits(m, inputs), _generate(m, inputs)
    beams = _generate(m, inputs, num_beams=2)
    trimkit.apply(m, "fastv", keep=1.0)
    assert torch.equal(_logits(m, inputs), ref)
    assert torch.equal(_generate(m, inputs), greedy)
    assert torch.equal(_generate(m, inputs, num_beams=2), beams)
    cache, _ = _prefill(m, inputs)
    assert kept_tokens(cache) is None


def test_remove_restores_outputs_state_and_attention():
    m = model()
    inputs = batch(PROMPTS)
    ref, greedy = _logits(m, inputs), _generate(m, inputs)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    trimkit.apply(m, "fastv", layer=1, keep=0.25)
    assert not torch.equal(_logits(m, inputs), ref)
    assert m.config.vision_config._attn_implementation == "sdpa"  # the tower is not routed
    trimkit.remove(m)
    assert torch.equal(_logits(m, inputs), ref)
    assert torch.equal(_generate(m, inputs), greedy)
    assert m.config.text_config._attn_implementation == "sdpa"
    after = m.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


# ---------------------------------------------------------------- what FastV keeps, where

@pytest.mark.parametrize("family", FAMILIES)
def test_later_layers_cache_only_the_kept_image_tokens(family):
    m = model(family=family)
    inputs = batch(PROMPTS)
    real = inputs["attention_mask"].sum(1)
    trimkit.apply(m, "fastv", layer=2, keep=0.25)
    cache, logits = _prefill(m, inputs)
    n = inputs["input_ids"].shape[1]
    kept = math.ceil(0.25 * TOKENS)
    dropped = TOKENS - kept
    # the batch is padded to its longest survivor (the sample without padding)
    assert [cache.layers[j].get_seq_length() for j in range(4)] == [n, n, n - dropped,
                                                                    n - dropped]
    level = kept_tokens(cache).levels[0]
    assert level.live.sum(1).tolist() == (real - dropped).tolist()
    ids = inputs["input_ids"].gather(1, level.index)
    assert ((ids == IMAGE_TOKEN) & level.live).sum(1).tolist() == [kept] * 3
    assert logits.shape[1] == n


def _positions(m, inputs) -> torch.Tensor:
    """The 3×B×N M-RoPE position ids the model computes for ``inputs``."""
    pos, _ = m.model.get_rope_index(inputs["input_ids"],
                                    mm_token_type_ids=inputs["mm_token_type_ids"],
                                    image_grid_thw=inputs["image_grid_thw"],
                                    attention_mask=inputs["attention_mask"])
    return pos


def _manual(m, inputs, index: torch.Tensor, k: int, positions: torch.Tensor | None = None
            ) -> torch.Tensor:
    """FastV by hand on one unpadded sample: the first ``k`` layers on every token, the rest
    on the tokens at ``index`` with the cos/sin rows of their own 3-D positions (causal,
    SDPA); the last token's logits. ``positions`` replaces the model's position ids."""
    inner = m.model
    ids = inputs["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    feats = torch.cat(list(inner.get_image_features(
        inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output))
    embeds = embeds.masked_scatter((ids == IMAGE_TOKEN)[..., None], feats)
    lang = inner.language_model
    pos = _positions(m, inputs) if positions is None else positions
    tables = lang.rotary_emb(embeds, pos)
    h = embeds
    for i, layer in enumerate(lang.layers):
        if i == k:
            h = h[:, index]
            tables = tuple(t[:, index] for t in tables)
        h = layer(h, attention_mask=None, position_embeddings=tables)
    return m.lm_head(lang.norm(h))[:, -1]


def _longer(inputs, token: torch.Tensor) -> dict:
    """``inputs`` with ``token`` (1×1) appended as text."""
    return dict(inputs, input_ids=torch.cat([inputs["input_ids"], token], 1),
                attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1),
                mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"],
                                             torch.zeros_like(token, dtype=torch.int)], 1))


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_keep_their_3d_positions_in_prefill_and_decoding(family):
    m = model(family=family)
    inputs = batch(PROMPTS[:1])
    n = inputs["input_ids"].shape[1]
    trimkit.apply(m, "fastv", layer=2, keep=0.5)
    with torch.no_grad():
        out = m(**inputs, use_cache=True)
        index = kept_tokens(out.cache).levels[0].index[0]
        assert len(index) == n - TOKENS // 2
        with trimkit.trimming_disabled(m):
            want = _manual(m, inputs, index, 2)
            # the same tokens at 1-D positions (each token at its index, as a text-only model
            # would place it) give other logits: the test sees which positions are used
            flat = torch.arange(n).view(1, 1, n).expand(3, 1, n)
            wrong = _manual(m, inputs, index, 2, positions=flat)
        torch.testing.assert_close(out.logits[:, -1], want, atol=1e-5, rtol=0)
        assert (want - wrong).abs().max() > 1e-4
        # a decoding step: the new token at the position the untrimmed model gives it
        # (rope_deltas from the prefill), reading the kept tokens from the cache
        deltas = m.model.rope_deltas.clone()
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = m(input_ids=nxt, cache=out.cache, use_cache=True)
        assert torch.equal(m.model.rope_deltas, deltas)
        with trimkit.trimming_disabled(m):
            want = _manual(m, _longer(inputs, nxt), torch.cat([index, torch.tensor([n])]), 2)
        torch.testing.assert_close(step.logits[:, -1], want, atol=1e-5, rtol=0)


def test_generate_decodes_what_fastv_by_hand_decodes():
    """Greedy tokens of the trimmed model equal a by-hand loop that recomputes each step
    from the kept tokens and the new ones at their M-RoPE positions."""
    m = model()
    inputs = batch(PROMPTS[:1])
    n = inputs["input_ids"].shape[1]
    trimkit.apply(m, "fastv", layer=1, keep=0.4)
    tokens = _generate(m, inputs)
    cache, _ = _prefill(m, inputs)
    index = kept_tokens(cache).levels[0].index[0]
    current, want = inputs, []
    with torch.no_grad(), trimkit.trimming_disabled(m):
        for t in range(NEW):
            nxt = _manual(m, current, torch.cat([index, torch.arange(n, n + t)]), 1)
            nxt = nxt.argmax(-1, keepdim=True)
            want.append(int(nxt))
            current = _longer(current, nxt)
    assert tokens[0].tolist() == want


@pytest.mark.parametrize("family", FAMILIES)
def test_a_sample_decodes_the_same_alone_and_in_a_left_padded_batch(family):
    m = model(family=family)
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


def test_video_tokens_are_dropped_like_image_tokens():
    from qwen2_vl_models import PAD, VIDEO_TOKEN, VISION_END, VISION_START

    m = model()
    frames = 16  # a 2×4×8 grid of patches (4 frames, 2 per temporal patch) → 16 tokens
    ids = torch.tensor([[1, 5, VISION_START] + [VIDEO_TOKEN] * frames + [VISION_END, 7, 8],
                        [PAD, 1, VISION_START] + [VIDEO_TOKEN] * frames + [VISION_END, 7, 8]])
    inputs = dict(input_ids=ids, attention_mask=(ids != PAD).long(),
                  pixel_values_videos=torch.randn(2, 64, 24,
                                                  generator=torch.Generator().manual_seed(0)),
                  video_grid_thw=torch.tensor([[2, 4, 8]] * 2),
                  mm_token_type_ids=(ids == VIDEO_TOKEN).int() * 2)
    greedy = _generate(m, inputs)
    trimkit.apply(m, "fastv", keep=1.0)
    assert torch.equal(_generate(m, inputs), greedy)
    trimkit.remove(m)
    trimkit.apply(m, "fastv", layer=2, keep=0.25)
    cache, _ = _prefill(m, inputs)
    level = kept_tokens(cache).levels[0]
    kept = inputs["input_ids"].gather(1, level.index)
    assert ((kept == VIDEO_TOKEN) & level.live).sum(1).tolist() == [4, 4]
    assert cache.layers[3].get_seq_length() == ids.shape[1] - 12
    assert _generate(m, inputs).shape == (2, NEW)


def test_generate_keeps_the_shorter_cache_and_the_untrimmed_rope_deltas():
    m = model()
    inputs = batch(PROMPTS)
    _generate(m, inputs)
    deltas = m.model.rope_deltas.clone()
    trimkit.apply(m, "fastv", layer=2, keep=0.25)
    with torch.no_grad():
        out = m.generate(**inputs, max_new_tokens=NEW, do_sample=False,
                         return_dict_in_generate=True)
    assert torch.equal(m.model.rope_deltas, deltas)
    # the prompt and the new tokens but the last (whose keys no step needed yet)
    total = inputs["input_ids"].shape[1] + NEW - 1
    dropped = TOKENS - math.ceil(0.25 * TOKENS)
    assert [out.cache.layers[j].get_seq_length() for j in range(4)] == [
        total, total, total - dropped, total - dropped]


def test_eager_and_sdpa_agree_and_masked_agrees_with_compacted():
    inputs = batch(PROMPTS)
    got = []
    for attn in ("sdpa", "eager"):
        m = trimkit.apply(model(attn=attn), "fastv", keep=0.3)
        got.append((_logits(m, inputs)[:, -1], _generate(m, inputs)))
    torch.testing.assert_close(got[0][0], got[1][0], atol=1e-5, rtol=0)
    assert torch.equal(got[0][1], got[1][1])
    trimkit.set_mode(m, "masked")
    cache, masked = _prefill(m, inputs)
    assert kept_tokens(cache).levels[0].live.shape[1] == inputs["input_ids"].shape[1]
    torch.testing.assert_close(masked[:, -1], got[1][0], atol=1e-5, rtol=0)
    assert torch.equal(_generate(m, inputs), got[1][1])


def test_inputs_embeds_find_the_image_placeholders():
    m = trimkit.apply(model(), "fastv", keep=0.25)
    inputs = batch(PROMPTS)
    want = _logits(m, inputs)
    embeds = m.get_input_embeddings()(inputs["input_ids"])
    got = _logits(m, dict(inputs, input_ids=None, inputs_embeds=embeds,
                          position_ids=_positions(m, inputs)))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_a_deep_copy_is_an_independent_trimmed_model():
    m = trimkit.apply(model(), "fastv", keep=0.25)
    inputs = batch(PROMPTS)
    want = _generate(m, inputs)
    twin = copy.deepcopy(m)
    assert torch.equal(_generate(twin, inputs), want)
    trimkit.remove(twin)
    assert torch.equal(_generate(m, inputs), want)


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("recipe,options", [
    ("tome", {"r": 2}), ("visionzip", {}), ("attn_prune", {}), ("pumer", {}),
    ("smarttrim", {}), ("attn_prune", {"stream": "image", "layers": [1]})])
def test_the_vision_tower_is_refused_up_front(recipe, options):
    m = model()
    inputs = batch(PROMPTS)
    ref = _logits(m, inputs)
    with pytest.raises(trimkit.UnsupportedConfigError,
                       match=r"does not trim Qwen2-VL's vision tower .* use fastv"):
        trimkit.apply(m, recipe, **options)
    assert not trimkit.is_applied(m)
    assert m.config._attn_implementation == "sdpa"
    assert not m.model.visual._forward_pre_hooks and not m.model._forward_pre_hooks
    assert torch.equal(_logits(m, inputs), ref)


def test_bad_options_and_language_recipes_leave_the_model_unchanged():
    m = model()
    inputs = batch(PROMPTS)
    ref = _logits(m, inputs)
    with pytest.raises(ValueError, match=r"layer must be in \[1, 3\]"):
        trimkit.apply(m, "fastv", layer=4)
    with pytest.raises(ValueError, match="only drops tokens"):
        trimkit.apply(m, "tome", stream="language", r=2)
    with pytest.raises(ValueError, match="does not say where this attention keeps its heads"):
        trimkit.apply(m, "prune_heads", heads={"language.1": [0]})
    m.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(trimkit.UnsupportedConfigError, match="'sdpa' or 'eager'"):
        trimkit.apply(m, "fastv")
    assert m.config.text_config._attn_implementation == "flash_attention_2"
    m.config.text_config._attn_implementation = "sdpa"
    assert not trimkit.is_applied(m)
    assert torch.equal(_logits(m, inputs), ref)


# ------------------------------------------------------------------ the conformance kit

def _kit_inputs(b: int) -> tuple:
    """Positional arguments of ``Qwen2VLForConditionalGeneration.forward``, batch first."""
    x = batch([PROMPTS[i % len(PROMPTS)] for i in range(b)])
    return (x["input_ids"], x["attention_mask"], None, None, None, None, None,
            x["pixel_values"], None, x["image_grid_thw"], None, x["mm_token_type_ids"])


def _other_padding(inputs: tuple) -> tuple:
    ids, mask = inputs[0], inputs[1]
    return (ids.masked_fill(mask == 0, 42), *inputs[1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_passes_the_conformance_kit(family):
    """Every invariant of one forward, left padding included; the vision tower's recipes
    are refused (see above), so only fastv is checked."""
    from trimkit.testing import check_adapter

    report = check_adapter(lambda: model(family=family), _kit_inputs, recipes=["fastv"],
                           max_examples=3, batch_sizes=(1, 3), perturb_padding=_other_padding)
    assert set(report.checked) == {"fastv"}


# ------------------------------------------------------------------------- the benchmark

def test_bench_reports_the_kv_cache_each_prefill_leaves():
    from trimkit.tools.bench import benchmark, format_table

    rows = benchmark("qwen2-vl:tiny?image_size=16", "fastv", {"keep": 0.25}, batch_sizes=[2],
                     warmup=0, repeats=1, memory=False)
    assert [r.task for r in rows] == ["prefill", "cache copy", "decode", "per token"]
    prefill = rows[0]
    # 34 text and 16 image tokens; the last 2 of 4 layers keep 4 image tokens
    assert prefill.cache_mb_trim / prefill.cache_mb_base == pytest.approx(
        (2 * 50 + 2 * 38) / (4 * 50))
    assert "cache MiB trim" in format_table(rows)


def test_bench_decodes_at_the_positions_generate_uses():
    """The decoding task passes each new token's M-RoPE position itself: its tokens are
    generate's, untrimmed and trimmed."""
    from trimkit.adapters.hf.qwen2_vl_bench import qwen2_vl_model

    m, make_inputs, tasks = qwen2_vl_model("tiny", text_len=6, new_tokens=3, image_size=16)
    ids, mask, pixels, grids, types = make_inputs(2)
    for keep in (None, 0.25):
        if keep is not None:
            trimkit.apply(m, "fastv", keep=keep)
        with torch.no_grad():
            tasks["prefill"](m, ids, mask, pixels, grids, types)
            last = tasks["decode"](m, ids, mask, pixels, grids, types)
            want = m.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                              image_grid_thw=grids, mm_token_type_ids=types,
                              max_new_tokens=4, do_sample=False)
        assert torch.equal(last[:, 0], want[:, -1])
