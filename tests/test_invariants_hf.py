"""The invariants (docs/architecture.md) as hypothesis properties over tiny random Hugging Face
models: CLIP vision and text towers, the full CLIP, BERT (bare and with a classification head) and
ViT (bare and with a classification head), under eager and SDPA attention, with padded text."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from trimkit.testing import check_invariants

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

FAMILIES = ["clip_vision", "clip_text", "clip", "bert", "bert_cls", "vit", "vit_cls"]
VOCAB = 40


@st.composite
def models(draw, families=FAMILIES):
    """A tiny config of one family: 1 or 2 heads of width 8, 2 or 3 layers, eager or SDPA,
    16 or 36 patches, 6 to 12 text tokens with random padding (or no attention mask), and
    CLIP's legacy (argmax) or current (first eos id) pooling rule."""
    family = draw(st.sampled_from(families))
    heads = draw(st.sampled_from([1, 2]))
    common = dict(hidden_size=8 * heads, num_attention_heads=heads, intermediate_size=16 * heads,
                  num_hidden_layers=draw(st.integers(2, 3)),
                  attn_implementation=draw(st.sampled_from(["eager", "sdpa"])))
    text = dict(seq=draw(st.integers(6, 12)), batch=draw(st.integers(1, 3)),
                legacy_eos=draw(st.booleans()), masked=draw(st.booleans()),
                seed=draw(st.integers(0, 9)))
    image_size = draw(st.sampled_from([32, 48]))
    return family, common, text, image_size


def _noise(model: torch.nn.Module) -> torch.nn.Module:
    """Random non-zero biases and norms, so tokens differ in interesting ways."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def factory(family: str, common: dict, text: dict, image_size: int):
    def text_cfg() -> dict:
        eos = 2 if text["legacy_eos"] else VOCAB - 1
        return dict(common, vocab_size=VOCAB, max_position_embeddings=16, eos_token_id=eos,
                    bos_token_id=1, pad_token_id=0)

    def vision_cfg() -> dict:
        return dict(common, image_size=image_size, patch_size=8)

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        if family == "clip_vision":
            model = CLIPVisionModel(CLIPVisionConfig(**vision_cfg()))
        elif family == "clip_text":
            model = CLIPTextModel(CLIPTextConfig(**text_cfg()))
        elif family == "clip":
            impl = common["attn_implementation"]
            strip = {k: v for k, v in text_cfg().items() if k != "attn_implementation"}
            vision = {k: v for k, v in vision_cfg().items() if k != "attn_implementation"}
            model = CLIPModel(CLIPConfig(text_config=strip, vision_config=vision,
                                         projection_dim=8, attn_implementation=impl))
        elif family in ("bert", "bert_cls"):
            cls = BertModel if family == "bert" else BertForSequenceClassification
            model = cls(BertConfig(vocab_size=VOCAB, max_position_embeddings=16, num_labels=3,
                                   **common))
        else:
            cls = ViTModel if family == "vit" else ViTForImageClassification
            model = cls(ViTConfig(image_size=image_size, patch_size=8, num_labels=3, **common))
        return _noise(model)
    return make


def text_inputs(family: str, text: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids (BOS/CLS first; CLIP: the pooled EOS at each sample's end) and a padding
    mask with random lengths, or ``None`` (unpadded) when the draw says so."""
    g = torch.Generator().manual_seed(text["seed"])
    b, n = text["batch"], text["seq"]
    ids = torch.randint(3, VOCAB - 2, (b, n), generator=g)
    lengths = torch.randint(2, n + 1, (b,), generator=g) if text["masked"] else torch.full((b,), n)
    mask = (torch.arange(n)[None] < lengths[:, None]).long()
    ids[:, 0] = 1
    if family in ("clip_text", "clip"):
        # the largest id, so both rules (argmax, first eos id) read it
        ids[torch.arange(b), lengths - 1] = VOCAB - 1
    ids = ids.masked_fill(mask == 0, 0)
    return ids, (mask if text["masked"] else None)


def setup(model_draw) -> tuple:
    """(make_model, inputs, output, perturb_padding) for one drawn model."""
    family, common, text, image_size = model_draw
    make = factory(family, common, text, image_size)
    g = torch.Generator().manual_seed(text["seed"])
    pixels = torch.randn(text["batch"], 3, image_size, image_size, generator=g)
    perturb = None
    if family in ("clip_vision", "vit", "vit_cls"):
        inputs: tuple = (pixels,)
    else:
        ids, mask = text_inputs(family, text)
        if family == "clip":
            inputs = (ids, pixels, mask)
        else:
            inputs = (ids, mask)
        if mask is not None:
            def perturb(args: tuple) -> tuple:
                ids, rest = args[0], args[1:]
                other = torch.randint(3, VOCAB - 2, ids.shape, generator=torch.Generator()
                                      .manual_seed(99))
                mask = args[-1]
                return (torch.where(mask.bool(), ids, other), *rest)

    def output(out) -> torch.Tensor:
        if family == "clip":
            return torch.cat([out.image_embeds, out.text_embeds], -1)
        if family in ("bert_cls", "vit_cls"):
            return out.logits
        return out.pooler_output

    return make, inputs, output, perturb


def _stream(family: str, data) -> dict:
    return {"stream": data.draw(st.sampled_from(["image", "text"]))} if family == "clip" else {}


@SETTINGS
@given(models(), st.integers(0, 4), st.sampled_from(["constant", "decreasing"]), st.data())
def test_tome_invariants(model_draw, r, schedule, data):
    make, inputs, output, perturb = setup(model_draw)
    extra = _stream(model_draw[0], data)
    check_invariants(make, inputs, "tome", dict(r=r, schedule=schedule, **extra),
                     dict(r=0, **extra), output=output, merges_only=True,
                     perturb_padding=perturb)


@SETTINGS
@given(models(), st.floats(0.05, 1.0), st.booleans(), st.data())
def test_attn_prune_invariants(model_draw, keep, fuse, data):
    make, inputs, output, perturb = setup(model_draw)
    depth = model_draw[1]["num_hidden_layers"]
    layers = data.draw(st.lists(st.integers(0, depth - 1), min_size=1, max_size=3))
    extra = _stream(model_draw[0], data)
    check_invariants(make, inputs, "attn_prune",
                     dict(keep_ratio=keep, fuse=fuse, layers=layers, **extra),
                     dict(keep_ratio=1.0, **extra), output=output, perturb_padding=perturb)


@SETTINGS
@given(models(), st.sampled_from([None, 0.3, 0.75]), st.booleans(), st.booleans(), st.data())
def test_smarttrim_invariants(model_draw, budget, tokens, heads, data):
    """Random (not stable) initialisation drops for real; stable initialisation keeps
    everything, so it is the zero-trimming case."""
    make, inputs, output, perturb = setup(model_draw)
    if not (tokens or heads):
        tokens = True
    depth = model_draw[1]["num_hidden_layers"]
    layers = data.draw(st.lists(st.integers(0, depth - 1), min_size=1, max_size=3))
    if model_draw[0] == "clip":
        layers = {"image": layers, "text": layers}
    check_invariants(make, inputs, "smarttrim",
                     dict(stable_init=False, budget=budget, tokens=tokens, heads=heads,
                          lambda_cost=0.0, layers=layers),
                     dict(tokens=tokens, heads=heads, layers=layers, lambda_cost=0.0),
                     output=output, perturb_padding=perturb)


@SETTINGS
@given(models(), st.floats(0.0, 0.5), st.floats(0.0, 0.5), st.booleans(), st.data())
def test_pumer_invariants(model_draw, image_merge, text_merge, proportional, data):
    """PuMer's merging half in every stream (these models have no text reading an image)."""
    make, inputs, output, perturb = setup(model_draw)
    depth = model_draw[1]["num_hidden_layers"]
    layers = data.draw(st.lists(st.integers(0, depth - 1), min_size=1, max_size=3))
    check_invariants(make, inputs, "pumer",
                     dict(image_merge_ratio=image_merge, text_merge_ratio=text_merge,
                          proportional=proportional, layers=layers),
                     dict(image_merge_ratio=0.0, text_merge_ratio=0.0), output=output,
                     merges_only=True, perturb_padding=perturb)
