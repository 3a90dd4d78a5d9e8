"""Recipes made of others (`trimkit.recipe.Combined`): ``"visionzip+fastv"`` runs VisionZip
in LLaVA's vision tower and FastV in its language model from one `trimkit.apply`, and equals
each part alone where the other trims nothing; parts that would share an option name or a
layer are refused."""

from __future__ import annotations

import math

import pytest
import torch
from llava_models import IMAGE_TOKEN, batch, model, prompt
from trimkit.adapters.hf.decoder import kept_tokens
from trimkit.adapters.hf.llava import image_token_count
from trimkit.recipes.attn_prune import AttentionPrune
from trimkit.recipes.tome import ToMe

import trimkit
from trimkit.recipe import Combined

D, C = 4, 2  # VisionZip's dominant and contextual tokens


def _short():
    return batch([prompt([1, 5, 6], [7, 8, 9], D + C), prompt([1, 5], [7, 8], D + C)])


def _run(m, inputs):
    with torch.no_grad():
        out = m(**inputs, use_cache=True)
    return out.logits, out.cache


def test_visionzip_and_fastv_apply_together():
    """The projector gets D + C tokens per image, and the language model's layers after K
    keep the top half of them (text kept, padding gone), in the prefill's KV cache too."""
    m = model()
    inputs = _short()
    trimkit.apply(m, "visionzip+fastv", dominant=D, contextual=C, layer=2, keep=0.5)
    assert image_token_count(m) == D + C
    logits, cache = _run(m, inputs)
    n = inputs["input_ids"].shape[1]
    level = kept_tokens(cache).levels[0]
    assert level.first == 2
    kept = math.ceil(0.5 * (D + C))
    ids = inputs["input_ids"].gather(1, level.index)
    assert ((ids == IMAGE_TOKEN) & level.live).sum(1).tolist() == [kept, kept]
    assert [cache.layers[j].get_seq_length() for j in range(4)] == [n, n, n - kept, n - kept]
    assert torch.isfinite(logits).all()
    stats = {s.stream for s in trimkit.last_stats(m).layers}
    assert stats == {"image", "language"}
    with torch.no_grad():
        new = m.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert new.shape == (2, n + 3)
    trimkit.remove(m)
    assert not trimkit.is_applied(m)


def test_each_part_alone_where_the_other_trims_nothing():
    """keep=1 leaves the language model whole: the same logits as VisionZip alone; a
    dominant count above the patches keeps every image token: the same as FastV alone."""
    inputs = _short()
    both, alone = model(), model()
    trimkit.apply(both, "visionzip+fastv", dominant=D, contextual=C, keep=1.0)
    trimkit.apply(alone, "visionzip", dominant=D, contextual=C)
    torch.testing.assert_close(_run(both, inputs)[0], _run(alone, inputs)[0], atol=0, rtol=0)
    full = batch([prompt([1, 5, 6], [7, 8, 9]), prompt([1, 5], [7, 8])])
    both, alone = model(), model()
    trimkit.apply(both, "visionzip+fastv", dominant=10**6, layer=1, keep=0.25)
    trimkit.apply(alone, "fastv", layer=1, keep=0.25)
    a, cache = _run(both, full)
    b, _ = _run(alone, full)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert kept_tokens(cache) is not None


def test_the_combined_options_are_the_parts_with_visionzip_s_renamed():
    from trimkit.registry import RECIPES

    rec = RECIPES["visionzip+fastv"]
    assert set(rec.options) == {"dominant", "contextual", "vision_layer", "vision_stream",
                                "layer", "keep"}
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="layer must be in"):
        trimkit.apply(m, "visionzip+fastv", vision_layer=3)
    with pytest.raises(ValueError, match="has no option 'stream'"):
        trimkit.apply(m, "visionzip+fastv", stream="image")
    assert not trimkit.is_applied(m)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_parts_that_share_an_option_or_a_layer_are_refused():
    with pytest.raises(TypeError, match="option 'stream' of recipe 'attn_prune' is also"):
        type("Clash", (Combined,), {"name": "_clash", "parts": ((ToMe, {}), (AttentionPrune, {}))})
    with pytest.raises(TypeError, match="no option 'nope'"):
        type("Bad", (Combined,), {"name": "_bad", "parts": ((ToMe, {"x": "nope"}),)})
    both = type("Both", (Combined,), {"name": "_both", "parts": (
        (ToMe, {"tome_stream": "stream"}),
        (AttentionPrune, {}))})()
    m = model()
    desc = trimkit.describe(m)
    with pytest.raises(ValueError, match="would both trim layer 0 of stream 'image'"):
        both.plan(desc, both.resolve(dict(r=1, tome_stream="image", stream="image",
                                          layers=[0])))
