"""Static head pruning of Hugging Face (v5) BERT, CLIP and ViT models: silent heads go without
changing outputs under eager and SDPA attention, head counts come from the modules, FLOPs
drop by what the heads cost, the model runs without trimkit, ranking from data, other
recipes on the pruned model, and reloading weights into a rebuilt model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import (
    AutoConfig,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    CLIPConfig,
    CLIPModel,
    ViTConfig,
    ViTForImageClassification,
)

import trimkit
from trimkit.cost import layer_flops
from trimkit.testing import check_invariants

VOCAB, EOS = 40, 39
D, H = 16, 4  # width and heads of every tower: heads of width 4
d = D // H


def _noise(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _tower(**kw) -> dict:
    return dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=H,
                intermediate_size=2 * D, **kw)


def bert(attn: str = "sdpa", cls: type = BertModel) -> torch.nn.Module:
    torch.manual_seed(0)
    return _noise(cls(BertConfig(vocab_size=VOCAB, max_position_embeddings=24, num_labels=3,
                                 attn_implementation=attn, **_tower())))


def clip(attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    text = _tower(vocab_size=VOCAB, max_position_embeddings=16, eos_token_id=EOS,
                  bos_token_id=1, pad_token_id=0)
    return _noise(CLIPModel(CLIPConfig(text_config=text,
                                       vision_config=_tower(image_size=32, patch_size=8),
                                       projection_dim=8, attn_implementation=attn)))


def vit(attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    return _noise(ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, num_labels=3,
                                                      attn_implementation=attn, **_tower())))


def text_batch(lengths=(9, 6), n: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (BOS first, EOS last of each sample) and their padding mask."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB - 2, (len(lengths), n), generator=g)
    ids[:, 0] = 1
    mask = (torch.arange(n)[None] < torch.tensor(lengths)[:, None]).long()
    ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = EOS
    return ids.masked_fill(mask == 0, 0), mask


PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

#: family -> (build, inputs, output of interest, {attention: (layer path, q, out) to silence})
FAMILIES = {
    "bert": (bert, lambda: text_batch(), lambda o: o.last_hidden_state,
             {"text.0": ("encoder.layer.0", "attention.self.query", "attention.output.dense"),
              "text.1": ("encoder.layer.1", "attention.self.query", "attention.output.dense")}),
    "clip": (clip, lambda: (text_batch()[0], PIXELS, text_batch()[1]),
             lambda o: torch.cat([o.text_embeds, o.image_embeds], -1),
             {"text.1": ("text_model.encoder.layers.1", "self_attn.q_proj", "self_attn.out_proj"),
              "image.0": ("vision_model.encoder.layers.0", "self_attn.q_proj",
                          "self_attn.out_proj")}),
    "vit": (vit, lambda: (PIXELS,), lambda o: o.logits,
            {"image.0": ("vit.layers.0", "attention.q_proj", "attention.o_proj"),
             "image.1": ("vit.layers.1", "attention.q_proj", "attention.o_proj")}),
}


def silence(model: torch.nn.Module, path: str, head: int) -> None:
    """Make a head contribute nothing: zero its columns of the output projection."""
    with torch.no_grad():
        model.get_submodule(path).weight[:, head * d:(head + 1) * d] = 0


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def no_trace_of_trimkit(model: torch.nn.Module) -> None:
    assert not trimkit.is_applied(model)
    for m in model.modules():
        assert "forward" not in m.__dict__
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert "trimkit" not in model._modules


# --------------------------------------------------------------------------- silent heads


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_silent_heads_go_without_changing_outputs(family, attn):
    build, inputs, output, where = FAMILIES[family]
    model, x = build(attn), inputs()
    spec = {}
    for j, (name, (layer, _, out)) in enumerate(where.items()):
        heads = [j, 3] if j == 0 else [1]
        for h in heads:
            silence(model, f"{layer}.{out}", h)
        spec[name] = heads
    with torch.no_grad():
        ref = output(model(*x))
    p0, f0 = params(model), trimkit.count_flops(model, *x)
    assert trimkit.apply(model, "prune_heads", heads=spec) is model
    no_trace_of_trimkit(model)
    with torch.no_grad():
        torch.testing.assert_close(output(model(*x)), ref, atol=1e-5, rtol=0)
    desc = trimkit.describe(model)
    for name, (layer, q, out) in where.items():
        stream, i = name.split(".")
        kept = H - len(spec[name])
        lay = desc.streams[stream].layers[int(i)]
        assert (lay.num_heads, lay.head_dim, lay.dim) == (kept, d, D)
        block = model.get_submodule(layer)
        assert block.get_submodule(q).weight.shape == (kept * d, D)
        assert block.get_submodule(out).weight.shape == (D, kept * d)
        assert lay.heads.counts and block.get_submodule(
            lay.heads.counts[0].rpartition(".")[0]) is block.get_submodule(lay.attention)
    removed = sum(len(v) for v in spec.values())
    assert p0 - params(model) == removed * (4 * d * D + 3 * d)  # q, k, v rows + biases, out cols
    assert trimkit.count_flops(model, *x) < f0
    assert trimkit.pruned_heads(model) == {k: sorted(v) for k, v in spec.items()}
    # the config keeps the sizes the model was built with: head counts live on the modules
    cfg = getattr(model.config, "text_config", model.config)
    assert cfg.num_attention_heads == H


def test_bert_flops_drop_by_what_the_heads_cost():
    model = bert()
    ids, mask = torch.randint(3, VOCAB, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    f0 = trimkit.count_flops(model, ids, mask)
    trimkit.apply(model, "prune_heads", heads={"text.0": [0, 2], "text.1": [3]})
    b, n = ids.shape
    per_head = 2 * b * n * 4 * d * D + 4 * b * n * n * d  # projections; scores and sum
    assert f0 - trimkit.count_flops(model, ids, mask) == 3 * per_head
    # the cost model reads the pruned width from the description
    desc = trimkit.describe(model)
    x = torch.randn(b, n, D)
    with trimkit.api.flop_counter() as counter, torch.no_grad():
        model.encoder.layer[0](x)
    assert counter.get_total_flops() == layer_flops(desc.stream().layers[0], n, n) * b


@pytest.mark.parametrize("family", list(FAMILIES))
def test_eager_and_sdpa_agree_after_pruning(family):
    build, inputs, output, where = FAMILIES[family]
    model, x = build("eager"), inputs()
    trimkit.apply(model, "prune_heads", heads={k: [1, 2] for k in where})
    with torch.no_grad():
        eager = output(model(*x))
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(output(model(*x)), eager, atol=1e-5, rtol=0)


# ------------------------------------------------------------------- ranking, other recipes


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ratio_from_data_prunes_zero_importance_heads_first(family):
    """A silent head has zero gradient x output importance: ranking removes it first, and the
    outputs do not change."""
    build, inputs, output, where = FAMILIES[family]
    model, x = build(), inputs()
    for j, (layer, _, out) in enumerate(where.values()):
        silence(model, f"{layer}.{out}", j + 1)
    loss_fn = None  # ViT: cross-entropy against its own prediction
    if family == "clip":
        loss_fn = lambda out, batch: out.logits_per_image.logsumexp(-1).sum()  # noqa: E731
    elif family == "bert":
        loss_fn = lambda out, batch: out.pooler_output.square().sum()  # noqa: E731
    with torch.no_grad():
        ref = output(model(*x))
    scores = trimkit.head_scores(model, [x], loss_fn=loss_fn)
    for j, name in enumerate(where):
        assert scores[name][j + 1] == 0 and max(scores[name]) > 0
    streams = sorted({k.split(".")[0] for k in where})
    layers = {s: [int(k.split(".")[1]) for k in where if k.startswith(s)] for s in streams}
    trimkit.apply(model, "prune_heads", ratio=0.75, data=[x], loss_fn=loss_fn,
                  streams=streams, layers=layers)
    assert trimkit.pruned_heads(model) == {name: [j + 1] for j, name in enumerate(where)}
    with torch.no_grad():
        torch.testing.assert_close(output(model(*x)), ref, atol=1e-5, rtol=0)


def test_ratio_from_data_on_bert_then_other_recipes_keep_the_invariants():
    model = bert(cls=BertForSequenceClassification)
    ids, mask = text_batch()
    data = [{"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2])}]
    trimkit.apply(model, "prune_heads", ratio=0.5, data=data)  # the output's own loss
    spec = trimkit.pruned_heads(model)
    assert sorted(spec) == ["text.0", "text.1"] and all(len(v) == 2 for v in spec.values())
    assert [lay.num_heads for lay in trimkit.describe(model).stream().layers] == [2, 2]
    no_trace_of_trimkit(model)

    def perturb(args: tuple) -> tuple:
        other = torch.randint(3, VOCAB - 2, ids.shape, generator=torch.Generator().manual_seed(9))
        return (torch.where(mask.bool(), args[0], other), args[1])

    for recipe, options, zero in (("tome", dict(r=2), dict(r=0)),
                                  ("attn_prune", dict(keep_ratio=0.5, layers=[0]),
                                   dict(keep_ratio=1.0)),
                                  ("smarttrim", dict(stable_init=False, layers=[0, 1]),
                                   dict(layers=[0, 1]))):
        check_invariants(lambda: copy.deepcopy(model), (ids, mask), recipe, options, zero,
                         output=lambda o: o.logits, merges_only=recipe == "tome",
                         perturb_padding=perturb)


def test_global_ratio_on_clip_then_tome_on_both_towers():
    model = clip()
    ids, mask = text_batch()
    data = [(ids, PIXELS, mask)]
    trimkit.apply(model, "prune_heads", ratio=0.5, scope="global", data=data,
                  loss_fn=lambda out, batch: out.logits_per_image.logsumexp(-1).sum())
    spec = trimkit.pruned_heads(model)
    assert sum(len(v) for v in spec.values()) == 4 * H // 2
    for stream in ("image", "text"):
        check_invariants(lambda: copy.deepcopy(model), data[0], "tome",
                         dict(r=1, stream=stream), dict(r=0, stream=stream),
                         output=lambda o: torch.cat([o.text_embeds, o.image_embeds], -1),
                         merges_only=True)


# ------------------------------------------------------------------------------- reloading


@pytest.mark.parametrize("family", list(FAMILIES))
def test_state_dict_reloads_into_a_rebuilt_model_pruned_with_the_record(family):
    build, inputs, output, where = FAMILIES[family]
    model, x = build(), inputs()
    trimkit.apply(model, "prune_heads", heads={k: [0] for k in where})
    first = next(iter(where))
    trimkit.apply(model, "prune_heads", heads={first: [1]})  # indices of the current heads
    spec = json.loads(json.dumps(trimkit.pruned_heads(model)))
    assert spec[first] == [0, 2]  # indices of the original heads
    fresh = build()
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(2)  # shapes come from the record, values from the state_dict
    trimkit.apply(fresh, "prune_heads", heads=spec)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(output(fresh(*x)), output(model(*x)))


def test_save_pretrained_needs_the_record_to_reload(tmp_path):
    """``from_pretrained`` builds heads from the config, which pruning does not change: it
    refuses the pruned shapes. Rebuild from the config, prune with the record, load."""
    from safetensors.torch import load_file

    model = bert(cls=BertForSequenceClassification)
    trimkit.apply(model, "prune_heads", heads={"text.0": [1, 2]})
    model.save_pretrained(tmp_path)
    (tmp_path / "pruned_heads.json").write_text(json.dumps(trimkit.pruned_heads(model)))
    with pytest.raises(RuntimeError, match="mismatch"):
        BertForSequenceClassification.from_pretrained(tmp_path)
    fresh = BertForSequenceClassification(AutoConfig.from_pretrained(tmp_path)).eval()
    trimkit.apply(fresh, "prune_heads",
                  heads=json.loads((tmp_path / "pruned_heads.json").read_text()))
    report = fresh.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert not report.missing_keys and not report.unexpected_keys
    ids, mask = text_batch()
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask).logits, model(ids, mask).logits)
