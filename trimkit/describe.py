"""What an adapter tells the engine about a model: plain data, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LayerDesc", "ModelDescription", "StreamDesc"]


@dataclass(frozen=True)
class LayerDesc:
    """One transformer layer of a stream.

    ``block`` is the layer's module path in the model; ``attention`` is the path of its
    attention module relative to ``block``; ``stream_arg`` is the position of the token
    argument in the block's forward.
    """

    block: str
    attention: str
    num_heads: int
    dim: int
    stream_arg: int = 0


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

    def stream(self, name: str | None = None) -> StreamDesc:
        """The named stream, or the only one."""
        if name is None:
            if len(self.streams) != 1:
                raise ValueError(f"this model has streams {sorted(self.streams)}: name one")
            return next(iter(self.streams.values()))
        return self.streams[name]
