"""METER (Dou et al., CVPR 2022), CLIP-ViT + RoBERTa + co-attention fusion, as a plain module.

"An Empirical Study of Training End-to-End Vision-and-Language Transformers"; reference
implementation github.com/zdou0830/METER (``meter/modules/meter_module.py``,
``bert_model.py``, ``clip_model.py``, ``heads.py``, ``objectives.py``). This is an
independent re-implementation with the same module attribute names, so official checkpoints
map onto it by name (see `adapters.meter.loader`).

Layout (attribute names as in the official ``METERTransformerSS``)::

    vit_model                     open_clip VisionTransformer, used through its parts only
    text_transformer              transformers RobertaModel (or BertModel), no pooler
    cross_modal_{text,image}_transform   Linear(encoder width -> hidden_size)
    token_type_embeddings         Embedding(2, hidden), 3 rows when "nlvr2" is a task
    cross_modal_{text,image}_layers      ModuleList of BertCrossLayer (parallel co-attention)
    cross_modal_{text,image}_pooler      Pooler: tanh(dense(token 0))
    vqa_classifier / nlvr2_classifier / snli_classifier / itm_score / rank_output

Written for ``torch.fx``: every fusion-layer module returns a tensor, masks are boolean
``B×N`` tensors (True = real token) that reach exactly one
``F.scaled_dot_product_attention`` per attention module, and no layer reads tensor values
in Python control flow.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "METER",
    "TASKS",
    "BertAttention",
    "BertCrossAttention",
    "BertCrossAttentionCore",
    "BertCrossLayer",
    "BertIntermediate",
    "BertOutput",
    "BertSelfAttention",
    "BertSelfOutput",
    "ITMHead",
    "MeterConfig",
    "Pooler",
    "ROBERTA_PAD_ID",
    "init_weights",
    "meter_base",
    "meter_tiny",
]

#: Every task head METER ships, in the official order.
TASKS = ("vqa", "nlvr2", "snli", "itm", "irtr")

#: Tasks ``METER.forward`` may dispatch to (single image + text, in this preference order
#: among those listed in ``config.tasks``).
_FORWARD_TASKS = ("vqa", "snli", "itm")

#: LayerNorm epsilon of the fusion layers: the official code builds them from a
#: ``RobertaConfig``/``BertConfig`` without setting ``layer_norm_eps`` (default 1e-12).
_FUSION_LN_EPS = 1e-12
#: RoBERTa-base's own LayerNorm epsilon (``roberta-base`` config.json).
_ROBERTA_LN_EPS = 1e-5
#: RoBERTa's padding token id; positions are counted from ``pad_token_id + 1``.
ROBERTA_PAD_ID = 1


@dataclass(frozen=True)
class MeterConfig:
    """Sizes of a METER model. Defaults are the published METER-CLIP-ViT-B/16-RoBERTa.

    ``vision_layers`` is the number of CLIP resblocks actually built: the official
    ``clip_model.Transformer`` builds ``layers - 1`` blocks of a 12-layer CLIP ViT-B, i.e. 11.
    ``mlp_ratio`` sets the MLP width of all three towers (4 everywhere in METER).
    ``text_encoder`` is ``"roberta"`` (METER's) or ``"bert"`` (a BERT-family encoder such
    as MiniLM: padding id 0, two token types, positions from 0, LayerNorm eps 1e-12).
    ``text_max_positions`` is the text encoder's ``max_position_embeddings``; ``None`` means
    ``max_text_len + 2`` for RoBERTa (it counts positions from ``pad_token_id + 1 = 2``) and
    ``max_text_len`` for BERT, enough for ``max_text_len`` tokens (MiniLM's table has 512).
    `meter_base` sets 514, the size of the ``roberta-base`` table that official checkpoints
    carry, so they load without reshaping (the loader also truncates a larger table onto a
    smaller one).
    """

    image_size: int = 288
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 11
    vision_heads: int = 12
    vocab_size: int = 50265
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    max_text_len: int = 50
    text_max_positions: int | None = None
    hidden_size: int = 768
    num_fusion_layers: int = 6
    num_heads: int = 12
    mlp_ratio: int = 4
    drop_rate: float = 0.1
    vqa_labels: int = 3129
    tasks: tuple[str, ...] = field(default=("vqa",))
    text_encoder: str = "roberta"

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.text_encoder not in ("roberta", "bert"):
            raise ValueError(f"text_encoder must be 'roberta' or 'bert', "
                             f"got {self.text_encoder!r}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown METER task(s) {unknown}; choose from {TASKS}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        for width, heads, what in ((self.vision_width, self.vision_heads, "vision"),
                                   (self.text_hidden, self.text_heads, "text"),
                                   (self.hidden_size, self.num_heads, "fusion")):
            if width % heads:
                raise ValueError(f"{what} width {width} is not divisible by {heads} heads")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def roberta_max_positions(self) -> int:
        if self.text_max_positions is not None:
            return self.text_max_positions
        return self.max_text_len + ROBERTA_PAD_ID + 1


def meter_base(**overrides) -> MeterConfig:
    """The published METER-CLIP-ViT-B/16 + RoBERTa-base sizes (288 px fine-tuning default)."""
    return replace(MeterConfig(text_max_positions=514), **overrides)


def meter_tiny(**overrides) -> MeterConfig:
    """A few-thousand-parameter METER with every task head, for tests."""
    cfg = MeterConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=2,
                      vision_heads=2, vocab_size=100, text_hidden=32, text_layers=2,
                      text_heads=2, hidden_size=32, num_fusion_layers=2, num_heads=2,
                      vqa_labels=7, drop_rate=0.0, tasks=TASKS)
    return replace(cfg, **overrides)


# ---------------------------------------------------------------------------- fusion layers


class BertSelfAttention(nn.Module):
    """Multi-head self-attention of a fusion layer (official key names ``query/key/value``).

    ``forward(hidden_states, mask) -> B×N×D`` context (before the output projection);
    ``mask`` is a bool ``B×N`` key mask, True = attend. The attention product is exactly one
    `F.scaled_dot_product_attention` call with q, k, v shaped ``B×H×N×d``.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_attention_heads = num_heads
        self.attention_head_size = hidden_size // num_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(hidden_size, self.all_head_size)
        self.key = nn.Linear(hidden_size, self.all_head_size)
        self.value = nn.Linear(hidden_size, self.all_head_size)
        self.dropout_p = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # B×N×(H·d) -> B×H×N×d, without reading any size
        return x.unflatten(-1, (self.num_attention_heads, self.attention_head_size)).transpose(1, 2)

    def _attend(self, q_in: torch.Tensor, kv_in: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.query(q_in))
        k = self._heads(self.key(kv_in))
        v = self._heads(self.value(kv_in))
        m = mask[:, None, None, :]
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=m, dropout_p=self.dropout_p if self.training else 0.0)
        return ctx.transpose(1, 2).flatten(2)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._attend(hidden_states, hidden_states, mask)


class BertCrossAttentionCore(BertSelfAttention):
    """Cross-attention core: queries from ``hidden_states``, keys/values from the other
    stream. ``forward(hidden_states, encoder_hidden_states, encoder_mask) -> B×N×D``.
    (The official module is also a ``BertSelfAttention`` registered as ``crossattention.self``.)
    """

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_mask: torch.Tensor) -> torch.Tensor:
        return self._attend(hidden_states, encoder_hidden_states, encoder_mask)


class BertSelfOutput(nn.Module):
    """Post-norm residual: ``LayerNorm(dropout(dense(h)) + input_tensor)``."""

    def __init__(self, hidden_size: int, dropout: float = 0.0, eps: float = _FUSION_LN_EPS,
                 in_size: int | None = None):
        super().__init__()
        self.dense = nn.Linear(in_size or hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    """Self-attention block: ``forward(hidden_states, mask) -> LayerNorm(dense(ctx) + h)``."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.self = BertSelfAttention(hidden_size, num_heads, dropout)
        self.output = BertSelfOutput(hidden_size, dropout)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden_states, mask), hidden_states)


class BertCrossAttention(nn.Module):
    """Cross-attention block: ``forward(hidden_states, encoder_hidden_states, encoder_mask)
    -> LayerNorm(dense(ctx) + hidden_states)``."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.self = BertCrossAttentionCore(hidden_size, num_heads, dropout)
        self.output = BertSelfOutput(hidden_size, dropout)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_mask: torch.Tensor) -> torch.Tensor:
        ctx = self.self(hidden_states, encoder_hidden_states, encoder_mask)
        return self.output(ctx, hidden_states)


class BertIntermediate(nn.Module):
    """``gelu(dense(h))`` (exact erf GELU, as the official ``hidden_act="gelu"``)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(BertSelfOutput):
    """FFN output: ``LayerNorm(dropout(dense(h)) + input_tensor)``, from the FFN width."""

    def __init__(self, intermediate_size: int, hidden_size: int, dropout: float = 0.0,
                 eps: float = _FUSION_LN_EPS):
        super().__init__(hidden_size, dropout, eps, in_size=intermediate_size)


class BertCrossLayer(nn.Module):
    """One METER co-attention layer (post-norm BERT layer with cross-attention).

    ``forward(hidden_states, encoder_hidden_states, mask, encoder_mask) -> Tensor``, masks
    bool ``B×N`` / ``B×M``, True = real token. Self-attention over ``hidden_states``, then
    cross-attention to ``encoder_hidden_states``, then the FFN, each with its own residual
    and LayerNorm.
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int,
                 dropout: float = 0.0):
        super().__init__()
        self.attention = BertAttention(hidden_size, num_heads, dropout)
        self.crossattention = BertCrossAttention(hidden_size, num_heads, dropout)
        self.intermediate = BertIntermediate(hidden_size, intermediate_size)
        self.output = BertOutput(intermediate_size, hidden_size, dropout)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                mask: torch.Tensor, encoder_mask: torch.Tensor) -> torch.Tensor:
        h = self.attention(hidden_states, mask)
        h = self.crossattention(h, encoder_hidden_states, encoder_mask)
        return self.output(self.intermediate(h), h)


# ---------------------------------------------------------------------------- heads


class Pooler(nn.Module):
    """``tanh(dense(x[:, 0]))``."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class ITMHead(nn.Module):
    """Image-text matching head: ``fc = Linear(2·hidden, 2)``."""

    def __init__(self, in_features: int):
        super().__init__()
        self.fc = nn.Linear(in_features, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _classifier(in_features: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.GELU(),
                         nn.Linear(hidden, out))


def init_weights(module: nn.Module) -> None:
    """The official ``objectives.init_weights``: N(0, 0.02) weights, zero biases, unit LN."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.zeros_(module.bias)
        nn.init.ones_(module.weight)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------- the model


def _build_vit(cfg: MeterConfig) -> nn.Module:
    from open_clip.transformer import QuickGELU, VisionTransformer

    vit = VisionTransformer(
        image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.vision_width,
        layers=cfg.vision_layers, heads=cfg.vision_heads, mlp_ratio=float(cfg.mlp_ratio),
        output_dim=cfg.vision_width, act_layer=QuickGELU)
    # METER uses every token after ln_post; the CLIP projection is never applied and its
    # VisualTransformer has none, so it is removed here (no unused parameter, no key).
    vit.proj = None
    return vit


def _build_bert(cfg: MeterConfig) -> nn.Module:
    from transformers import BertConfig, BertModel

    bc = BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        intermediate_size=cfg.text_hidden * cfg.mlp_ratio,
        max_position_embeddings=cfg.text_max_positions or cfg.max_text_len, type_vocab_size=2,
        layer_norm_eps=1e-12, pad_token_id=0, hidden_dropout_prob=cfg.drop_rate,
        attention_probs_dropout_prob=cfg.drop_rate, attn_implementation="sdpa")
    return BertModel(bc, add_pooling_layer=False)


def _build_roberta(cfg: MeterConfig) -> nn.Module:
    from transformers import RobertaConfig, RobertaModel

    rc = RobertaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        intermediate_size=cfg.text_hidden * cfg.mlp_ratio,
        max_position_embeddings=cfg.roberta_max_positions, type_vocab_size=1,
        layer_norm_eps=_ROBERTA_LN_EPS, pad_token_id=ROBERTA_PAD_ID,
        hidden_dropout_prob=cfg.drop_rate, attention_probs_dropout_prob=cfg.drop_rate,
        attn_implementation="sdpa")
    return RobertaModel(rc, add_pooling_layer=False)


class METER(nn.Module):
    """METER with CLIP-ViT image encoder and RoBERTa text encoder (see module docstring).

    Inputs: ``images`` B×3×S×S (already normalised), ``input_ids`` B×T (RoBERTa ids, padding
    ``1``; BERT ids, padding ``0``, with ``text_encoder="bert"``), ``attention_mask`` B×T
    (bool or 0/1, True/1 = real token). Instead of ``input_ids``, the task methods and
    ``forward`` take ``text_embeds=`` (precomputed text-encoder outputs) and optionally
    ``image_index=`` (each text's row in ``images``), see `infer`. ``forward`` runs the
    first of ``vqa``, ``snli``, ``itm`` that appears in ``config.tasks`` (in the order of
    ``config.tasks``); call `nlvr2` and `irtr` (or any task) by name.
    """

    def __init__(self, config: MeterConfig | None = None):
        super().__init__()
        cfg = self.config = config if config is not None else meter_base()
        hs = cfg.hidden_size

        self.vit_model = _build_vit(cfg)
        self.text_transformer = (_build_bert(cfg) if cfg.text_encoder == "bert"
                                 else _build_roberta(cfg))

        self.cross_modal_text_transform = nn.Linear(cfg.text_hidden, hs)
        self.cross_modal_image_transform = nn.Linear(cfg.vision_width, hs)
        # official: 2 rows, re-made with 3 (row 2 = row 1) when NLVR2 is trained
        self.token_type_embeddings = nn.Embedding(3 if "nlvr2" in cfg.tasks else 2, hs)

        def layers() -> nn.ModuleList:
            return nn.ModuleList(
                BertCrossLayer(hs, cfg.num_heads, hs * cfg.mlp_ratio, cfg.drop_rate)
                for _ in range(cfg.num_fusion_layers))

        self.cross_modal_image_layers = layers()
        self.cross_modal_text_layers = layers()
        self.cross_modal_image_pooler = Pooler(hs)
        self.cross_modal_text_pooler = Pooler(hs)

        if "itm" in cfg.tasks or "irtr" in cfg.tasks:
            # the official IRTR fine-tuning also trains ITM and copies rank_output from it
            self.itm_score = ITMHead(hs * 2)
        if "vqa" in cfg.tasks:
            self.vqa_classifier = _classifier(hs * 2, hs * 2, cfg.vqa_labels)
        if "nlvr2" in cfg.tasks:
            self.nlvr2_classifier = _classifier(hs * 4, hs * 2, 2)
        if "snli" in cfg.tasks:
            self.snli_classifier = _classifier(hs * 2, hs * 2, 3)
        if "irtr" in cfg.tasks:
            # official: nn.Linear(hs, 1) whose weight/bias are then *replaced* by
            # itm_score.fc.{weight,bias}[1:] — so it really is Linear(2·hs, 1)
            self.rank_output = nn.Linear(hs * 2, 1)

        for name in ("cross_modal_text_transform", "cross_modal_image_transform",
                     "token_type_embeddings", "cross_modal_image_layers",
                     "cross_modal_text_layers", "cross_modal_image_pooler",
                     "cross_modal_text_pooler", "itm_score", "vqa_classifier",
                     "nlvr2_classifier", "snli_classifier"):
            if hasattr(self, name):
                getattr(self, name).apply(init_weights)
        if "nlvr2" in cfg.tasks:
            with torch.no_grad():
                self.token_type_embeddings.weight[2] = self.token_type_embeddings.weight[1]
        if "irtr" in cfg.tasks:
            with torch.no_grad():
                self.rank_output.weight.copy_(self.itm_score.fc.weight[1:])
                self.rank_output.bias.copy_(self.itm_score.fc.bias[1:])

    # ------------------------------------------------------------------ encoders

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP ViT tokens after ``ln_post``: B×(1+P)×vision_width (CLS first, not pooled)."""
        vit = self.vit_model
        x = vit.conv1(images.to(vit.conv1.weight.dtype))  # B×W×g×g
        x = x.flatten(2).transpose(1, 2)  # B×P×W
        cls = vit.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + vit.positional_embedding.to(x.dtype)
        x = vit.ln_pre(x)
        x = vit.transformer(x)
        return vit.ln_post(x)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text encoder's (RoBERTa's or BERT's) last hidden state, B×T×text_hidden."""
        out = self.text_transformer(input_ids=input_ids, attention_mask=attention_mask.long())
        return out.last_hidden_state

    # ------------------------------------------------------------------ fusion

    def infer(self, images: torch.Tensor, input_ids: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None, image_token_type_idx: int = 1, *,
              text_embeds: torch.Tensor | None = None,
              image_index: torch.Tensor | None = None) -> dict:
        """Encode, fuse, pool: ``{"text_feats": B×T×h, "image_feats": B×(1+P)×h,
        "cls_feats": B×2h}`` (text pooler ⊕ image pooler, both on token 0).

        ``text_embeds`` (B×T×text_hidden, the text encoder's last hidden state, e.g. cached
        for a frozen encoder) replaces ``input_ids``; ``attention_mask`` is still needed.
        ``image_index`` (B longs) maps each text to its image among ``images`` (B_img of
        them), so an image asked several questions is encoded once and its tokens are
        repeated for the fusion layers. (Trimming in the CLIP tower then sees B_img images
        and the fusion stack B texts: the image stream's trimming state restarts there.)
        """
        if attention_mask is None:
            raise ValueError("METER needs the text attention_mask")
        text_mask = attention_mask.bool()
        if text_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or text_embeds")
            text_embeds = self.encode_text(input_ids, attention_mask)
        x = self.cross_modal_text_transform(text_embeds)
        y = self.cross_modal_image_transform(self.encode_image(images))
        if image_index is not None:
            y = y[image_index]
        image_mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)

        types = self.token_type_embeddings.weight
        x = x + types[0]
        y = y + types[image_token_type_idx]

        for text_layer, image_layer in zip(self.cross_modal_text_layers,
                                           self.cross_modal_image_layers, strict=True):
            x1 = text_layer(x, y, text_mask, image_mask)
            y1 = image_layer(y, x, image_mask, text_mask)
            x, y = x1, y1

        cls_feats = torch.cat([self.cross_modal_text_pooler(x),
                               self.cross_modal_image_pooler(y)], dim=-1)
        return {"text_feats": x, "image_feats": y, "cls_feats": cls_feats}

    # ------------------------------------------------------------------ tasks

    def _head(self, task: str) -> nn.Module:
        name = {"vqa": "vqa_classifier", "nlvr2": "nlvr2_classifier",
                "snli": "snli_classifier", "itm": "itm_score", "irtr": "rank_output"}[task]
        head = getattr(self, name, None)
        if head is None:
            raise RuntimeError(f"this METER was built without the {task!r} head "
                               f"(config.tasks = {self.config.tasks})")
        return head

    def _cls(self, task: str, images, input_ids, attention_mask, text_embeds, image_index
             ) -> torch.Tensor:
        """``task``'s head on the pooled features of one `infer` pass."""
        head = self._head(task)
        feats = self.infer(images, input_ids, attention_mask, text_embeds=text_embeds,
                           image_index=image_index)
        return head(feats["cls_feats"])

    def vqa(self, images: torch.Tensor, input_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None, *,
            text_embeds: torch.Tensor | None = None,
            image_index: torch.Tensor | None = None) -> torch.Tensor:
        """VQAv2 answer logits, B×vqa_labels (``text_embeds``, ``image_index``: see
        `infer`; likewise for `snli`, `itm` and `irtr`)."""
        return self._cls("vqa", images, input_ids, attention_mask, text_embeds, image_index)

    def nlvr2(self, images1, images2, input_ids, attention_mask) -> torch.Tensor:
        """NLVR2 logits, B×2: one pass per image (image token types 1 and 2), pooled features
        concatenated."""
        head = self._head("nlvr2")
        a = self.infer(images1, input_ids, attention_mask, image_token_type_idx=1)["cls_feats"]
        b = self.infer(images2, input_ids, attention_mask, image_token_type_idx=2)["cls_feats"]
        return head(torch.cat([a, b], dim=-1))

    def snli(self, images: torch.Tensor, input_ids: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, *,
             text_embeds: torch.Tensor | None = None,
             image_index: torch.Tensor | None = None) -> torch.Tensor:
        """SNLI-VE logits, B×3."""
        return self._cls("snli", images, input_ids, attention_mask, text_embeds, image_index)

    def itm(self, images: torch.Tensor, input_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None, *,
            text_embeds: torch.Tensor | None = None,
            image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Image-text matching logits, B×2 (index 1 = match); the head is also built for
        "irtr", as in the official IRTR training."""
        return self._cls("itm", images, input_ids, attention_mask, text_embeds, image_index)

    def irtr(self, images: torch.Tensor, input_ids: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, *,
             text_embeds: torch.Tensor | None = None,
             image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Retrieval score, shape B (``rank_output(cls_feats)[:, 0]``)."""
        return self._cls("irtr", images, input_ids, attention_mask, text_embeds,
                         image_index)[:, 0]

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *,
                text_embeds: torch.Tensor | None = None,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        """The first of ``vqa``/``snli``/``itm`` listed in ``config.tasks`` (``text_embeds``
        and ``image_index`` as in `infer`)."""
        for task in self.config.tasks:
            if task in _FORWARD_TASKS:
                return getattr(self, task)(images, input_ids, attention_mask,
                                           text_embeds=text_embeds, image_index=image_index)
        raise RuntimeError(f"METER.forward runs one of {_FORWARD_TASKS}, none of which is in "
                           f"config.tasks = {self.config.tasks}; call .nlvr2(...) or "
                           f".irtr(...) directly")
