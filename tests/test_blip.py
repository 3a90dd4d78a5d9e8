"""BLIP (transformers): what the adapter describes, the task APIs after `apply` (``generate``
for answers and captions, ITM and ITC retrieval), what the decoder cross-attends to, static
head pruning, and clear errors. The invariants are in test_invariants_blip.py."""

from __future__ import annotations

import copy

import pytest
import torch
from blip_models import NEW_TOKENS, inputs, make

import trimkit


def test_describe_streams_and_keys_only_layers():
    desc = trimkit.describe(make("vqa_model", layers=2))
    image, text = desc.streams["image"], desc.streams["text"]
    assert [layer.keys_only for layer in image.layers] == [False, False, True, True]
    assert [layer.block for layer in image.layers[2:]] == ["text_encoder.encoder.layer.0",
                                                          "text_encoder.encoder.layer.1"]
    assert image.attention_layers() == [0, 1]
    assert all(layer.cross_stream == "image" for layer in text.layers)
    assert text.padded and image.num_tokens == 17
    caption = trimkit.describe(make("caption_model"))
    assert list(caption.streams) == ["image"] and len(caption.streams["image"].layers) == 2


def _cross_keys(model: torch.nn.Module, where: str) -> list[int]:
    """Number of keys each call of the first cross-attention under ``where`` reads."""
    seen: list[int] = []
    layer = model.get_submodule(where).encoder.layer[0].crossattention.self
    handle = layer.key.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    return seen, handle


def test_caption_decoder_reads_only_the_surviving_image_tokens():
    model = make("caption_model")
    trimkit.apply(model, "attn_prune", keep_ratio=0.5, layers=[0])
    seen, handle = _cross_keys(model, "text_decoder.bert")
    with torch.no_grad():
        out = model.generate(pixel_values=inputs("caption", 2, 0, False)[0],
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    handle.remove()
    assert out.shape == (2, NEW_TOKENS + 1)
    # the keys are computed once (KV cache) on the 1 + 8 surviving image tokens of 17
    assert seen == [9]


def test_vqa_text_encoder_reads_fewer_image_tokens_layer_by_layer():
    model = make("vqa_model", layers=3)
    trimkit.apply(model, "smarttrim", stable_init=False, tokens=["image"], heads=False,
                  budget=0.5, layers={"image": [3, 4]})
    seen: list[int] = []
    handles = [layer.crossattention.self.key.register_forward_hook(
        lambda m, a, o: seen.append(a[0].shape[1])) for layer in model.text_encoder.encoder.layer]
    ids, pixels, mask = inputs("vqa", 2, 6, False)
    with torch.no_grad():
        model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=2)
    for h in handles:
        h.remove()
    # keys-only image layers 3 and 4 sit before text layers 0 and 1: 17 -> 9 -> 5, kept
    assert seen == [9, 5, 5]


def test_generate_with_beams_matches_each_image_alone():
    model = make("caption_beams")
    trimkit.apply(model, "smarttrim", stable_init=False)
    pixels = inputs("caption", 3, 0, False, seed=3)[0]
    with torch.no_grad():
        batch = model(pixels)
        assert trimkit.last_stats(model).layers[-1].tokens_out.unique().numel() > 1
        for i in range(3):
            torch.testing.assert_close(model(pixels[i:i + 1]), batch[i:i + 1], atol=1e-5,
                                       rtol=0)


def test_padded_questions_answer_as_if_asked_alone():
    """transformers' BLIP drops encoder_attention_mask before its cross-attention, so its
    decoder attends to a padded question's padding; the trimmed model masks it."""
    model = make("vqa", layers=2)
    ids, pixels, mask = inputs("vqa", 3, 7, True, seed=1)
    assert not bool(mask.all())
    alone = []
    with torch.no_grad():
        for i in range(3):
            n = int(mask[i].sum())
            alone.append(model(ids[i:i + 1, :n], pixels[i:i + 1], mask[i:i + 1, :n]))
        untrimmed = model(ids, pixels, mask)
        trimkit.apply(model, "tome", r=0)
        trimmed = model(ids, pixels, mask)
    short = [i for i in range(3) if not bool(mask[i].all())]
    assert max((untrimmed[i] - alone[i][0]).abs().max().item() for i in short) > 1e-4
    for i in range(3):
        torch.testing.assert_close(trimmed[i:i + 1], alone[i], atol=1e-5, rtol=0)


def test_itc_text_does_not_depend_on_the_image():
    """A text encoded alone (the contrastive path) is trimmed without reading the image."""
    model = make("itc")
    trimkit.apply(model, "smarttrim", stable_init=False, tokens=["text"], heads=["text"])
    ids, pixels, mask = inputs("itc", 2, 6, True)
    feats = []
    with torch.no_grad():
        for px in (pixels, torch.randn_like(pixels)):
            out = torch.nn.functional.normalize(model.text_proj(model.text_encoder(
                input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]), dim=-1)
            model.vision_model(pixel_values=px)  # the image state of another forward
            feats.append(out)
    torch.testing.assert_close(feats[0], feats[1], atol=0, rtol=0)
    with torch.no_grad():
        model.vision_model(pixel_values=pixels)
        after_image = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(torch.nn.functional.normalize(model.text_proj(after_image[:, 0]),
                                                             dim=-1), feats[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("itm", [True, False])
def test_retrieval_paths_trim_and_remove_restores(itm):
    model = make("itm")
    ref_sd = copy.deepcopy(model.state_dict())
    ids, pixels, _, mask = inputs("itm", 3, 6, True)
    with torch.no_grad():
        ref = model(ids, pixels, itm, mask).itm_score
        trimkit.apply(model, "attn_prune", keep_ratio=0.4, stream="image")
        out = model(ids, pixels, itm, mask).itm_score
        stats = trimkit.last_stats(model).layers
        assert out.shape == ref.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, ref)
        assert min(s.tokens_out.min().item() for s in stats if s.stream == "image") < 17
        trimkit.remove(model)
        assert torch.equal(model(ids, pixels, itm, mask).itm_score, ref)
    assert all(torch.equal(v, ref_sd[k]) for k, v in model.state_dict().items())


def test_smarttrim_trains_on_vqa_loss():
    model = make("vqa_model")
    trimkit.apply(model, "smarttrim", ratio=0.5)
    model.train()
    ids, pixels, mask = inputs("vqa", 2, 6, False)
    labels = torch.randint(3, 40, (2, 3))
    labels[:, 0] = model.config.text_config.bos_token_id
    with trimkit.recording_costs(model) as rec:
        loss = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels).loss
        ratio = rec.ratio()
    (loss + ratio.mean()).backward()
    trimmers = [m for m in model.modules() if isinstance(m, trimkit.learned.TokenTrimmer)]
    assert trimmers and all(t.bias.grad is not None for t in trimmers)
    assert ratio.requires_grad and torch.all(ratio > 0)


def test_prune_heads_on_the_text_encoder():
    model = make("vqa_model")
    ids, pixels, mask = inputs("vqa", 2, 6, False)
    trimkit.apply(model, "prune_heads", heads={"text.0": [1], "text.1.cross": [0]})
    desc = trimkit.describe(model)
    assert desc.streams["text"].layers[0].num_heads == 1
    assert desc.streams["text"].layers[1].cross_num_heads == 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                             max_new_tokens=2)
    assert out.shape[0] == 2
    with pytest.raises(ValueError, match="derives its head width"):
        trimkit.apply(model, "prune_heads", heads={"image.0": [0]})


def test_gradient_checkpointing_is_refused_and_nothing_changes():
    model = make("vqa_model")
    model.activation_checkpointing_enable()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(trimkit.UnsupportedConfigError, match="gradient checkpointing"):
        trimkit.apply(model, "tome")
    assert not trimkit.is_applied(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_causal_text_encoder_is_refused():
    model = make("vqa_model")
    trimkit.apply(model, "tome", r=1, stream="text")
    ids, _, mask = inputs("vqa", 1, 6, False)
    with pytest.raises(RuntimeError, match="is_decoder"):
        model.text_encoder(input_ids=ids, attention_mask=mask, is_decoder=True)


def test_bench_times_encoding_generation_and_each_generated_token():
    from trimkit.tools.bench import benchmark, format_table

    spec = ("hf:blip-image-captioning-base?image_size=32&num_hidden_layers=2&text_layers=1"
            "&new_tokens=2")
    rows = benchmark(spec, "attn_prune", {"keep_ratio": 0.5, "layers": [0]}, [2], warmup=0,
                     repeats=1, memory=False)
    assert [r.task for r in rows] == ["encode", "generate 2", "per token"]
    enc, gen, tok = rows
    assert enc.gflops_trim < enc.gflops_base and gen.gflops_trim < gen.gflops_base
    assert tok.gflops_base == pytest.approx((gen.gflops_base - enc.gflops_base) / 2)
    # each decoding step cross-attends to 1 + 2 surviving image tokens instead of 1 + 4
    assert tok.gflops_trim < tok.gflops_base
    assert tok.times_base == pytest.approx([(g - e) / 2 for g, e in
                                            zip(gen.times_base, enc.times_base, strict=True)])
    table = format_table(rows)
    assert "per token" in table and "ms base" in table


def vqa_forward(model: torch.nn.Module, batch: tuple) -> object:
    """VQA with teacher-forced answers, returning the decoder's output (``.loss`` and
    ``.logits``): BLIP's own VQA forward returns no logits to distil."""
    ids, pixels, mask, answers = batch
    image = model.vision_model(pixel_values=pixels)[0]
    question = model.text_encoder(input_ids=ids, attention_mask=mask,
                                  encoder_hidden_states=image)[0]
    return model.text_decoder(input_ids=answers, encoder_hidden_states=question, labels=answers)


def test_trimkit_train_fine_tunes_smarttrim_on_vqa():
    model = make("vqa_model")
    trimkit.apply(model, "smarttrim", ratio=0.5, warmup=0.0)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids, pixels, mask = inputs("vqa", 2, 6, True, seed=int(torch.randint(9, (1,), generator=g)))
        answers = torch.randint(3, 40, (2, 3), generator=g)
        answers[:, 0] = model.config.text_config.bos_token_id
        batches.append((ids, pixels, mask, answers))
    before = [t.bias.detach().clone() for t in model.modules()
              if isinstance(t, trimkit.learned.TokenTrimmer)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    result = trimkit.train(model, loader, lambda out, batch: out.loss, forward=vqa_forward,
                           steps=3, progress=False, cpu=True)
    after = [t.bias.detach() for t in model.modules()
             if isinstance(t, trimkit.learned.TokenTrimmer)]
    assert all(float(b - a) < 0 for a, b in zip(before, after, strict=True))  # toward 0.5
    assert "ratio" in result.history[-1] and "sd" in result.history[-1]


def test_vision_heads_gated_off_skip_their_projections():
    model = make("caption_model", heads=4)
    pixels = inputs("caption", 2, 0, False)[0]
    full = trimkit.count_flops(model, pixels, input_ids=torch.tensor([[50, 7]] * 2))
    trimkit.apply(model, "smarttrim", tokens=False, budget=0.5, layers={"image": [0, 1]})
    attn = model.vision_model.encoder.layers[0].self_attn
    assert "forward" in attn.qkv.__dict__ and "forward" in attn.projection.__dict__
    gated = trimkit.count_flops(model, pixels, input_ids=torch.tensor([[50, 7]] * 2))
    # half the heads: their qkv rows and projection columns are not computed
    qkv_and_out = 2 * 2 * 17 * 32 * (3 * 32 + 32) // 2
    assert full - gated >= qkv_and_out
