"""Head layouts that several adapters share (where a family's attention keeps its heads)."""

from __future__ import annotations

from trimkit import HeadLayout

__all__ = ["bert_heads"]


def bert_heads(attn: str) -> HeadLayout:
    """A BERT-style attention ``attn`` of a layer (``"attention"``, ``"crossattention"``):
    ``self.query/key/value``, then ``output.dense``; its ``self`` module reshapes by
    ``num_attention_heads`` and keeps the inner width in ``all_head_size``. Used by METER's
    fusion layers and BLIP's text encoder."""
    return HeadLayout(q=f"{attn}.self.query", k=f"{attn}.self.key", v=f"{attn}.self.value",
                      out=f"{attn}.output.dense", counts=(f"{attn}.self.num_attention_heads",),
                      widths=(f"{attn}.self.all_head_size",))
