"""METER as a plain module (`trimkit.adapters.meter.model`) and its official-checkpoint
loader (`trimkit.adapters.meter.loader`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp
from trimkit.adapters.meter import (
    METER,
    BertCrossLayer,
    LoadReport,
    MeterConfig,
    interpolate_pos_embed,
    load_meter_checkpoint,
    meter_base,
    meter_tiny,
)

from trimkit.rewrite import find_attention, insert_after_output, patch_forward

B, T, REAL = 2, 10, 6  # row 0 has REAL tokens then padding, row 1 is full


def _build(cfg: MeterConfig | None = None, seed: int = 0) -> METER:
    torch.manual_seed(seed)
    return METER(cfg if cfg is not None else meter_tiny()).eval()


@pytest.fixture(scope="module")
def model() -> METER:
    return _build()


def _inputs(cfg: MeterConfig, seed: int = 1, image_size: int | None = None):
    g = torch.Generator().manual_seed(seed)
    s = image_size or cfg.image_size
    images = torch.randn(B, 3, s, s, generator=g)
    ids = torch.randint(3, cfg.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, REAL:] = 0
    ids[0, REAL:] = 1  # RoBERTa <pad>
    return images, ids, mask


def _all_outputs(m: METER, images, ids, mask) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = dict(m.infer(images, ids, mask))
        other = images.flip(0)
        out.update(vqa=m.vqa(images, ids, mask), nlvr2=m.nlvr2(images, other, ids, mask),
                   snli=m.snli(images, ids, mask), itm=m.itm(images, ids, mask),
                   irtr=m.irtr(images, ids, mask), forward=m(images, ids, mask))
    return out


# ---------------------------------------------------------------------------- shapes


def test_task_head_shapes(model):
    cfg = model.config
    images, ids, mask = _inputs(cfg)
    out = _all_outputs(model, images, ids, mask)
    p = cfg.num_patches
    assert out["text_feats"].shape == (B, T, cfg.hidden_size)
    assert out["image_feats"].shape == (B, 1 + p, cfg.hidden_size)
    assert out["cls_feats"].shape == (B, 2 * cfg.hidden_size)
    assert out["vqa"].shape == (B, cfg.vqa_labels)
    assert out["nlvr2"].shape == (B, 2)
    assert out["snli"].shape == (B, 3)
    assert out["itm"].shape == (B, 2)
    assert out["irtr"].shape == (B,)
    torch.testing.assert_close(out["forward"], out["vqa"])  # first of vqa/snli/itm in tasks
    with torch.no_grad():
        assert model.encode_image(images).shape == (B, 1 + p, cfg.vision_width)
        assert model.encode_text(ids, mask).shape == (B, T, cfg.text_hidden)
    for v in out.values():
        assert torch.isfinite(v).all()


def test_structure_follows_official_layout(model):
    cfg = model.config
    assert len(model.vit_model.transformer.resblocks) == cfg.vision_layers
    assert model.vit_model.proj is None  # METER never projects; no dangling parameter
    assert len(model.cross_modal_text_layers) == len(model.cross_modal_image_layers) == 2
    assert all(isinstance(layer, BertCrossLayer) for layer in model.cross_modal_text_layers)
    assert not hasattr(model.text_transformer, "pooler") or model.text_transformer.pooler is None
    # nlvr2: a third token type initialised from the image type, as the official code does
    tt = model.token_type_embeddings.weight
    assert tt.shape == (3, cfg.hidden_size)
    torch.testing.assert_close(tt[2], tt[1])
    # irtr: rank_output = Linear(2h, 1) initialised from ITM's "match" row
    assert model.rank_output.weight.shape == (1, 2 * cfg.hidden_size)
    torch.testing.assert_close(model.rank_output.weight, model.itm_score.fc.weight[1:])
    names = set(model.state_dict())
    for key in ("cross_modal_text_layers.0.attention.self.query.weight",
                "cross_modal_image_layers.1.crossattention.self.value.bias",
                "cross_modal_text_layers.1.crossattention.output.LayerNorm.weight",
                "cross_modal_image_layers.0.intermediate.dense.weight",
                "cross_modal_image_layers.0.output.LayerNorm.bias",
                "cross_modal_text_pooler.dense.weight", "itm_score.fc.weight",
                "vqa_classifier.3.weight", "nlvr2_classifier.0.weight",
                "snli_classifier.3.bias", "rank_output.bias"):
        assert key in names, key


def test_forward_dispatch_and_missing_heads():
    torch.manual_seed(0)
    m = METER(meter_tiny(tasks=("snli", "vqa"))).eval()
    images, ids, mask = _inputs(m.config)
    with torch.no_grad():
        torch.testing.assert_close(m(images, ids, mask), m.snli(images, ids, mask))
        with pytest.raises(RuntimeError, match="itm"):
            m.itm(images, ids, mask)
    assert m.token_type_embeddings.weight.shape[0] == 2
    only_nlvr2 = METER(meter_tiny(tasks=("nlvr2",))).eval()
    with pytest.raises(RuntimeError, match="nlvr2"):
        only_nlvr2(images, ids, mask)
    with pytest.raises(ValueError, match="unknown"):
        meter_tiny(tasks=("vqa", "captioning"))


# ---------------------------------------------------------------------------- padding


def test_padded_token_content_is_ignored(model):
    images, ids, mask = _inputs(model.config)
    ref = _all_outputs(model, images, ids, mask)
    junk = ids.clone()
    junk[0, REAL:] = torch.randint(3, model.config.vocab_size, (T - REAL,),
                                   generator=torch.Generator().manual_seed(7))
    got = _all_outputs(model, images, junk, mask)
    for name, value in ref.items():
        if name == "text_feats":  # padded slots carry garbage by definition
            torch.testing.assert_close(got[name][0, :REAL], value[0, :REAL])
            torch.testing.assert_close(got[name][1], value[1])
        else:
            torch.testing.assert_close(got[name], value, msg=name)


def test_padding_does_not_change_the_result(model):
    """Row 0 padded to T gives what row 0 alone, unpadded, gives."""
    images, ids, mask = _inputs(model.config)
    with torch.no_grad():
        padded = model.infer(images, ids, mask)
        alone = model.infer(images[:1], ids[:1, :REAL], mask[:1, :REAL])
        bool_mask = model.infer(images, ids, mask.bool())
    torch.testing.assert_close(padded["cls_feats"][:1], alone["cls_feats"])
    torch.testing.assert_close(padded["image_feats"][:1], alone["image_feats"])
    torch.testing.assert_close(padded["text_feats"][:1, :REAL], alone["text_feats"])
    torch.testing.assert_close(bool_mask["cls_feats"], padded["cls_feats"])


# ---------------------------------------------------------------------------- fusion layer


def _reference_layer(layer: BertCrossLayer, x, y, xm, ym) -> torch.Tensor:
    """The official BertCrossLayer math, written out with an additive mask."""
    sd = layer.state_dict()
    heads = layer.attention.self.num_attention_heads

    def lin(name, t):
        return F.linear(t, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def ln(name, t):
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-12)

    def attn(prefix, q_in, kv_in, key_mask):
        def split(t):
            return t.view(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)

        q, k, v = (split(lin(f"{prefix}.self.{n}", s))
                   for n, s in (("query", q_in), ("key", kv_in), ("value", kv_in)))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores + (1.0 - key_mask[:, None, None, :].float()) * -10000.0
        ctx = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).flatten(2)
        return ln(f"{prefix}.output.LayerNorm", lin(f"{prefix}.output.dense", ctx) + q_in)

    h = attn("attention", x, x, xm)
    h = attn("crossattention", h, y, ym)
    inter = F.gelu(lin("intermediate.dense", h))
    return ln("output.LayerNorm", lin("output.dense", inter) + h)


def _layer_inputs(hidden: int, n: int = 7, m: int = 5):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(B, n, hidden, generator=g), torch.randn(B, m, hidden, generator=g)
    xm = torch.ones(B, n, dtype=torch.bool)
    xm[0, 4:] = False
    ym = torch.ones(B, m, dtype=torch.bool)
    ym[1, 3:] = False
    return x, y, xm, ym


def test_cross_layer_matches_official_math(model):
    x, y, xm, ym = _layer_inputs(model.config.hidden_size)
    for layer in [*model.cross_modal_text_layers, *model.cross_modal_image_layers]:
        with torch.no_grad():
            torch.testing.assert_close(layer(x, y, xm, ym), _reference_layer(layer, x, y, xm, ym))


class _ChildrenAsLeaves(fx.Tracer):
    """Like the engine's tracer: the traced module's direct children are leaves."""

    def __init__(self, root: torch.nn.Module):
        super().__init__()
        self._children = {id(c) for c in root.children()}

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return id(m) in self._children or super().is_leaf_module(m, qualname)


def _trace(module: torch.nn.Module) -> fx.GraphModule:
    return fx.GraphModule(module, _ChildrenAsLeaves(module).trace(module))


def _sdpa_calls(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and n.target is F.scaled_dot_product_attention]


def test_every_fusion_layer_traces(model):
    x, y, xm, ym = _layer_inputs(model.config.hidden_size)
    for layer in [*model.cross_modal_text_layers, *model.cross_modal_image_layers]:
        gm = _trace(layer)
        called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
        assert called == ["attention", "crossattention", "intermediate", "output"]
        with torch.no_grad():
            torch.testing.assert_close(gm(x, y, xm, ym), layer(x, y, xm, ym))
            torch.testing.assert_close(fx.symbolic_trace(layer)(x, y, xm, ym),
                                       layer(x, y, xm, ym))
        for block in (layer.attention, layer.crossattention):
            assert [n.target for n in _trace(block).graph.nodes
                    if n.op == "call_module"] == ["self", "output"]


def test_attention_core_is_one_sdpa(model):
    cfg = model.config
    heads, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    x, y, xm, ym = _layer_inputs(cfg.hidden_size)
    layer = model.cross_modal_text_layers[0]
    cases = [(layer.attention.self, (x, xm), x.shape[1], x.shape[1]),
             (layer.crossattention.self, (x, y, ym), x.shape[1], y.shape[1])]
    for core, args, n, m in cases:
        gm = _trace(core)
        (call,) = _sdpa_calls(gm)
        assert call.kwargs["dropout_p"] == 0.0  # eval
        (spec,) = find_attention(gm)  # the engine recognises it
        assert spec["out"] is call
        ShapeProp(gm).propagate(*args)
        q, k, v, mask = (call.args[0], call.args[1], call.args[2], call.kwargs["attn_mask"])
        assert q.meta["tensor_meta"].shape == (B, heads, n, d)
        assert k.meta["tensor_meta"].shape == v.meta["tensor_meta"].shape == (B, heads, m, d)
        assert mask.meta["tensor_meta"].shape == (B, 1, 1, m)
        assert mask.meta["tensor_meta"].dtype == torch.bool
        with torch.no_grad():
            torch.testing.assert_close(gm(*args), core(*args))


def test_engine_patch_forward_accepts_fusion_layers(model):
    """The engine's own rewrite pass traces each layer and each attention core."""
    x, y, xm, ym = _layer_inputs(model.config.hidden_size)
    layer = model.cross_modal_image_layers[1]
    with torch.no_grad():
        want = layer(x, y, xm, ym)

    def probe(gm: fx.GraphModule) -> None:
        gm.add_submodule("probe", torch.nn.Identity())
        insert_after_output(gm, "crossattention", "probe")

    patches = [patch_forward(layer, probe),
               patch_forward(layer.attention.self, lambda gm: None),
               patch_forward(layer.crossattention.self, lambda gm: None)]
    try:
        with torch.no_grad():
            torch.testing.assert_close(layer(x, y, xm, ym), want)
    finally:
        for p in reversed(patches):
            p.undo()
    assert "forward" not in layer.__dict__

def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    layer = BertCrossLayer(32, 2, 128, dropout=0.1)
    core = layer.attention.self
    (call,) = _sdpa_calls(_trace(core.train()))
    assert call.kwargs["dropout_p"] == 0.1
    (call,) = _sdpa_calls(_trace(core.eval()))
    assert call.kwargs["dropout_p"] == 0.0


# ---------------------------------------------------------------------------- base size


def test_meter_base_builds_with_published_sizes():
    cfg = meter_base()
    assert (cfg.image_size, cfg.patch_size, cfg.vision_layers, cfg.hidden_size,
            cfg.num_fusion_layers, cfg.vqa_labels, cfg.tasks) == (288, 16, 11, 768, 6, 3129,
                                                                   ("vqa",))
    m = METER(cfg)
    n = sum(p.numel() for p in m.parameters())
    # CLIP ViT-B/16 minus its last block (78.8M) + RoBERTa-base without pooler (124.1M)
    # + 2×6 co-attention layers (113.4M) + transforms, poolers, VQA head: 325.8M
    assert 300e6 < n < 350e6, n
    assert m.vit_model.positional_embedding.shape == (18 * 18 + 1, 768)
    assert m.text_transformer.embeddings.position_embeddings.weight.shape == (514, 768)
    assert m.vqa_classifier[3].weight.shape == (3129, 1536)


# ---------------------------------------------------------------------------- loader

CLIP_TEXT_EXTRAS = ("vit_model.token_embedding.weight", "vit_model.positional_embedding",
                    "vit_model.ln_final.weight", "vit_model.ln_final.bias")
ROBERTA_EXTRAS = ("text_transformer.pooler.dense.weight", "text_transformer.pooler.dense.bias",
                  "text_transformer.embeddings.position_ids")


def official_checkpoint(m: METER) -> dict:
    """Our state dict renamed to the official METER names, with the keys the official
    checkpoints carry and METER never uses, wrapped like a Lightning checkpoint."""
    cfg = m.config
    sd = {}
    for key, value in m.state_dict().items():
        if key.startswith("vit_model."):
            key = "vit_model.visual." + key[len("vit_model."):]
        sd[key] = value.clone()
    w = cfg.vision_width
    sd["vit_model.token_embedding.weight"] = torch.randn(49408, w)
    sd["vit_model.positional_embedding"] = torch.randn(77, w)
    sd["vit_model.ln_final.weight"], sd["vit_model.ln_final.bias"] = torch.ones(w), torch.zeros(w)
    h = cfg.text_hidden
    sd["text_transformer.pooler.dense.weight"] = torch.randn(h, h)
    sd["text_transformer.pooler.dense.bias"] = torch.randn(h)
    sd["text_transformer.embeddings.position_ids"] = torch.arange(cfg.roberta_max_positions)[None]
    return {"state_dict": sd, "epoch": 9, "global_step": 1234}


def test_official_key_names():
    ckpt = official_checkpoint(_build())["state_dict"]
    for key in ("vit_model.visual.conv1.weight",
                "vit_model.visual.transformer.resblocks.0.attn.in_proj_weight",
                "vit_model.visual.transformer.resblocks.1.mlp.c_proj.bias",
                "vit_model.visual.ln_post.weight", "vit_model.visual.class_embedding",
                "text_transformer.embeddings.word_embeddings.weight",
                "text_transformer.embeddings.LayerNorm.weight",
                "text_transformer.encoder.layer.0.attention.self.query.weight",
                "text_transformer.encoder.layer.1.output.LayerNorm.bias",
                "cross_modal_text_layers.0.crossattention.self.query.weight",
                "cross_modal_image_transform.weight", "token_type_embeddings.weight",
                "vqa_classifier.0.weight", "itm_score.fc.bias"):
        assert key in ckpt, key


def test_load_official_checkpoint_roundtrip(tmp_path):
    src, dst = _build(seed=0), _build(seed=1)
    ckpt = official_checkpoint(src)
    report = load_meter_checkpoint(dst, ckpt)
    assert isinstance(report, LoadReport) and report.ok
    assert sorted(report.dropped) == sorted(CLIP_TEXT_EXTRAS + ROBERTA_EXTRAS)
    assert report.adapted == []
    src_params = dict(src.named_parameters())
    for name, p in dst.named_parameters():
        assert torch.equal(p, src_params[name]), name
    images, ids, mask = _inputs(src.config)
    a, b = _all_outputs(src, images, ids, mask), _all_outputs(dst, images, ids, mask)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)

    path = tmp_path / "meter.ckpt"
    torch.save(ckpt, path)
    again = _build(seed=2)
    assert load_meter_checkpoint(again, str(path)).ok
    assert torch.equal(again.vit_model.conv1.weight, src.vit_model.conv1.weight)


def test_strict_load_names_bad_keys_and_changes_nothing():
    src, dst = _build(seed=0), _build(seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    ckpt = official_checkpoint(src)
    sd = ckpt["state_dict"]
    del sd["cross_modal_text_layers.0.crossattention.self.query.weight"]
    del sd["vit_model.visual.transformer.resblocks.1.attn.in_proj_bias"]
    sd["junk.weight"] = torch.zeros(3)
    sd["mlm_score.bias"] = torch.zeros(7)
    sd["vqa_classifier.3.bias"] = torch.zeros(5)  # wrong number of answers
    with pytest.raises(ValueError) as err:
        load_meter_checkpoint(dst, ckpt)
    msg = str(err.value)
    for key in ("cross_modal_text_layers.0.crossattention.self.query.weight",
                "vit_model.transformer.resblocks.1.attn.in_proj_bias",  # our name
                "junk.weight", "mlm_score.bias", "vqa_classifier.3.bias"):
        assert key in msg, key
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k]), k

    report = load_meter_checkpoint(dst, ckpt, strict=False)
    assert sorted(report.missing) == sorted([
        "cross_modal_text_layers.0.crossattention.self.query.weight",
        "vit_model.transformer.resblocks.1.attn.in_proj_bias", "vqa_classifier.3.bias"])
    assert sorted(report.unexpected) == ["junk.weight", "mlm_score.bias"]
    assert report.mismatched == ["vqa_classifier.3.bias: (5,) -> (7,)"]
    assert torch.equal(dst.cross_modal_text_layers[0].crossattention.self.query.weight,
                       before["cross_modal_text_layers.0.crossattention.self.query.weight"])
    assert torch.equal(dst.cross_modal_image_pooler.dense.weight,
                       src.cross_modal_image_pooler.dense.weight)


def test_resolution_change_interpolates_position_embedding():
    src = _build(meter_tiny(), seed=0)  # 32 px: 4×4 grid
    dst = _build(meter_tiny(image_size=48), seed=1)  # 6×6 grid
    report = load_meter_checkpoint(dst, official_checkpoint(src))
    assert report.ok
    assert len(report.adapted) == 1 and "positional_embedding" in report.adapted[0]
    pos = dst.vit_model.positional_embedding
    assert pos.shape == (37, src.config.vision_width)
    torch.testing.assert_close(pos[0], src.vit_model.positional_embedding[0])
    torch.testing.assert_close(
        pos, interpolate_pos_embed(src.vit_model.positional_embedding.detach(), 37))
    images, ids, mask = _inputs(dst.config, image_size=48)
    out = _all_outputs(dst, images, ids, mask)
    assert out["image_feats"].shape == (B, 37, dst.config.hidden_size)
    # same size is the identity; a 3-D (1×N×D) table is handled as the official one is
    table = torch.randn(17, 8)
    torch.testing.assert_close(interpolate_pos_embed(table, 17), table)
    assert interpolate_pos_embed(table[None], 37).shape == (1, 37, 8)


def test_fine_tuning_set_up_adaptations():
    """A VQA+ITM checkpoint with the roberta-base position table into an all-task model:
    the third token type and rank_output are initialised as the official code does."""
    src = _build(meter_tiny(tasks=("vqa", "itm"), text_max_positions=60), seed=0)
    dst = _build(meter_tiny(), seed=1)
    with pytest.raises(ValueError, match="nlvr2_classifier.0.weight"):
        load_meter_checkpoint(dst, official_checkpoint(src))
    report = load_meter_checkpoint(dst, official_checkpoint(src), strict=False)
    assert not report.unexpected and not report.mismatched
    assert {k.split(".")[0] for k in report.missing} == {"nlvr2_classifier", "snli_classifier"}
    assert len(report.adapted) == 3
    tt = dst.token_type_embeddings.weight
    torch.testing.assert_close(tt[:2], src.token_type_embeddings.weight)
    torch.testing.assert_close(tt[2], src.token_type_embeddings.weight[1])
    torch.testing.assert_close(dst.rank_output.weight, src.itm_score.fc.weight[1:])
    torch.testing.assert_close(dst.rank_output.bias, src.itm_score.fc.bias[1:])
    pe = dst.text_transformer.embeddings.position_embeddings.weight
    torch.testing.assert_close(pe, src.text_transformer.embeddings.position_embeddings.weight[:52])


# ---------------------------------------------------------------------------- BERT, cached text


def _bert_inputs(vocab: int = 120):
    """Two images; five questions, each pointing at one of them, one of them padded."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=g)
    idx = torch.tensor([0, 1, 1, 0, 1])
    ids = torch.randint(1, vocab, (5, 6), generator=g)
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[1, 4:] = 0
    return images, idx, ids.masked_fill(mask == 0, 0), mask  # BERT pads with id 0


def test_bert_text_encoder_is_built_like_minilm():
    from transformers import BertModel, RobertaModel

    assert MeterConfig().text_encoder == "roberta"
    assert isinstance(_build().text_transformer, RobertaModel)
    cfg = meter_tiny(text_encoder="bert", vocab_size=120, text_max_positions=512)
    bert = _build(cfg).text_transformer
    assert isinstance(bert, BertModel) and bert.pooler is None
    c = bert.config
    assert (c.vocab_size, c.pad_token_id, c.type_vocab_size, c.max_position_embeddings,
            c.layer_norm_eps, c.hidden_size, c.num_hidden_layers, c._attn_implementation) == (
        120, 0, 2, 512, 1e-12, cfg.text_hidden, cfg.text_layers, "sdpa")
    # positions default to max_text_len (BERT counts them from 0)
    assert _build(meter_tiny(text_encoder="bert")).text_transformer.config \
        .max_position_embeddings == meter_tiny().max_text_len
    with pytest.raises(ValueError, match="text_encoder"):
        meter_tiny(text_encoder="gpt")


@pytest.mark.parametrize("encoder", ["bert", "roberta"])
def test_text_embeds_and_image_index_match_the_plain_call(encoder):
    """Cached text features with a per-question image index give what the plain call on
    the repeated images gives, for the forward, every single-image task and `infer`."""
    torch.manual_seed(0)
    m = METER(meter_tiny(text_encoder=encoder, vocab_size=120)).eval()
    images, idx, ids, mask = _bert_inputs()
    if encoder == "roberta":
        ids = ids.masked_fill(mask == 0, 1)
    with torch.no_grad():
        feats = m.encode_text(ids, mask)
        plain = m(images[idx], ids, mask)
        cached = m(images, attention_mask=mask, text_embeds=feats, image_index=idx)
        torch.testing.assert_close(cached, plain, atol=1e-5, rtol=0)
        same_images = m(images[idx], None, mask, text_embeds=feats)  # positional mask too
        torch.testing.assert_close(same_images, plain, atol=1e-5, rtol=0)
        for task in ("vqa", "snli", "itm", "irtr"):
            torch.testing.assert_close(
                getattr(m, task)(images, attention_mask=mask, text_embeds=feats,
                                 image_index=idx),
                getattr(m, task)(images[idx], ids, mask), atol=1e-5, rtol=0, msg=task)
        a = m.infer(images, attention_mask=mask.bool(), text_embeds=feats, image_index=idx)
        b = m.infer(images[idx], ids, mask)
    for key in ("cls_feats", "image_feats"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    torch.testing.assert_close(a["text_feats"][mask.bool()], b["text_feats"][mask.bool()],
                               atol=1e-5, rtol=0)


def test_text_embeds_need_a_mask_and_some_text():
    torch.manual_seed(0)
    m = METER(meter_tiny(text_encoder="bert", vocab_size=120)).eval()
    images, idx, ids, mask = _bert_inputs()
    with pytest.raises(ValueError, match="input_ids or text_embeds"):
        m(images, attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask"):
        m(images, text_embeds=torch.zeros(2, 6, m.config.text_hidden))
