"""What an adapter tells the engine about a model: plain data, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LayerDesc", "ModelDescription", "StreamDesc"]


@dataclass(frozen=True)
class LayerDesc:
    """One transformer layer of a stream.

    - ``block``: the layer's module path in the model.
    - ``attention``: its self-attention module, relative to ``block``.
    - ``stream_arg``: position of the token argument in the block's forward.
    - ``mask_arg``: position of the block's own key-padding argument (bool B×N, True on
      real tokens), read at the stream's entry; ``None`` if the stream has no padding.
    - ``cross_attention`` / ``cross_stream``: a cross-attention module (relative to
      ``block``) whose keys are the tokens of ``cross_stream``.
    - ``leave_after``: the direct child of ``block`` after which tokens are trimmed (default:
      the first component of ``attention``); with ``residual`` the point is the residual
      addition that follows it (pre-norm blocks), else its output itself (post-norm blocks,
      whose attention module adds and normalises inside).
    - ``masks_are_padding``: the masks the attention modules receive only mark padding,
      which the trimming state carries (and updates) itself, so they are not applied again.
    - ``mlp_dim``: the width of the layer's FFN (default ``4 · dim``), for cost models.
    - ``pair``: in a ``parallel`` model, the index that pairs this cross-attending layer
      with the other stream's cross-attending layer running beside it (default: its
      position in the stream; layers without cross-attention never pair).
    """

    block: str
    attention: str
    num_heads: int
    dim: int
    stream_arg: int = 0
    mask_arg: int | None = None
    cross_attention: str | None = None
    cross_stream: str | None = None
    leave_after: str | None = None
    residual: bool = True
    masks_are_padding: bool = False
    pair: int | None = None
    mlp_dim: int | None = None


@dataclass(frozen=True)
class StreamDesc:
    """A token stream (``"image"``, ``"text"``): its layers in order and its fixed facts.

    ``num_tokens`` is the entry length when it is static (a ViT at its native resolution),
    else ``None``; ``num_protected`` leading tokens (CLS, registers, distillation token) are
    never dropped or merged; ``padded`` says whether inputs may carry padding.
    """

    name: str
    layers: tuple[LayerDesc, ...]
    num_tokens: int | None = None
    num_protected: int = 1
    padded: bool = False


@dataclass(frozen=True)
class ModelDescription:
    """Everything the recipes and the engine know about one model instance."""

    family: str
    streams: dict[str, StreamDesc] = field(default_factory=dict)
    #: layers with the same ``pair`` index in different streams run side by side on the
    #: previous layer's outputs (co-attention fusion stacks): cross-attention then sees the
    #: other stream as it entered its paired layer, not as that layer left it.
    parallel: bool = False

    def stream(self, name: str | None = None) -> StreamDesc:
        """The named stream, or the only one."""
        if name is None:
            if len(self.streams) != 1:
                raise ValueError(f"this model has streams {sorted(self.streams)}: name one")
            return next(iter(self.streams.values()))
        return self.streams[name]
