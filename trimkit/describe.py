"""What an adapter tells the engine about a model: plain data, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["HeadLayout", "LayerDesc", "ModelDescription", "StreamDesc", "TokenInput"]


@dataclass(frozen=True)
class HeadLayout:
    """Where one attention module keeps its heads, for static head pruning (`trimkit.heads`).

    Every path is relative to the layer's ``block``. A head ``h`` of width ``d`` owns the
    slice ``h·d:(h+1)·d`` of each projection's head-side dimension (head-major order, the
    layout every ``x.unflatten(-1, (H, d))`` reshape assumes).

    - ``multihead``: a `torch.nn.MultiheadAttention` (or an already pruned
      `trimkit.heads.PrunedMultiheadAttention`); the engine replaces it by a
      `PrunedMultiheadAttention` with the kept heads. Nothing else needs naming.
    - ``qkv``: a fused ``nn.Linear`` whose output is ``[q; k; v]``, each ``H·d`` wide.
    - ``q``, ``k``, ``v``: separate ``nn.Linear`` projections, each with ``H·d`` outputs
      (give these or ``qkv``).
    - ``out``: the output projection ``nn.Linear``, with ``H·d`` inputs; its input is what
      gradient × output importance scores, so it must be called as a module, batch first.
    - ``per_head``: further ``nn.Linear`` modules sliced like ``q`` (e.g. a per-head
      output gate computed from the block's input).
    - ``counts``: attributes holding the head count, as ``"path.to.module.attr"`` (or just
      ``"attr"`` on the block); set to the number of kept heads.
    - ``widths``: attributes holding the inner width ``H·d``; set to ``kept·d``.
    - ``unsupported``: why this attention's heads cannot be pruned (e.g. a LayerNorm over
      all heads' outputs mixes them); selecting it is then a `ValueError` with this reason.
    - ``unprunable``: why heads cannot be removed from the weights here, although execution
      may skip a gated-off head's projections (`trimkit.headskip`): e.g. the family's own
      forward derives the head width from the model width, so a pruned module would not
      run without trimkit. Selecting it for pruning is a `ValueError` with this reason.
    """

    multihead: str | None = None
    qkv: str | None = None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    out: str | None = None
    per_head: tuple[str, ...] = ()
    counts: tuple[str, ...] = ()
    widths: tuple[str, ...] = ()
    unsupported: str | None = None
    unprunable: str | None = None


@dataclass(frozen=True)
class TokenInput:
    """A block input indexed by the stream's entry tokens (a rotary table, position ids):
    the engine gathers it at each call so that its rows follow the tokens (a dropped token's
    row disappears, a merged token keeps its destination's, `trimkit.ops.gather_token_input`).

    - ``arg``: the name of the block's forward parameter that receives it.
    - ``axis``: its token axis, counted from the end (negative).
    - ``rank``: its rank when it holds rows per sample (batch first); an input of lower
      rank is shared by the batch and gains its batch axis in front, plus singleton axes up
      to ``rank`` (a rotary table N×d combined with B×H×N×d queries: ``rank=4``).
    - ``leading``: how many leading tokens of every sample the input does not cover (the
      model slices them off before using it, e.g. a CLS token it does not rotate); ``None``
      when only the call tells: the input covers the last M of the N0 entry tokens, and
      the N0 − M before them must be protected.
    - ``neutral``: the row that leaves a token as it is (`trimkit.ops.NEUTRAL_ROWS`:
      ``"sin-cos"`` for a rotary table of sines then cosines, ``"cos-sin"``, ``"ones"``,
      ``"zeros"``), or ``None``. A packed sequence holds every sample's leading tokens but
      the model skips only the first sample's, so the others take this row. A stream packs
      only where every input covers every token (``leading=0``) or states its neutral row.
    """

    arg: str
    axis: int = -2
    rank: int | None = None
    leading: int | None = None
    neutral: str | None = None


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
    - ``head_dim``: the width of one head (default ``dim // num_heads``); it differs once
      heads were pruned, when the attention's inner width ``num_heads · head_dim`` is
      smaller than ``dim``.
    - ``cross_num_heads``: the cross-attention's head count (default ``num_heads``; heads
      of the same width ``head_dim``).
    - ``heads`` / ``cross_heads``: where the self- and cross-attention keep their heads
      (`HeadLayout`), for static head pruning; ``None`` where the adapter does not say.
    - ``pair``: in a ``parallel`` model, the index that pairs this cross-attending layer
      with the other stream's cross-attending layer running beside it (default: its
      position in the stream; layers without cross-attention never pair).
    - ``keys_only``: the stream computes nothing here; the layer of ``cross_stream`` paired
      with it (by ``pair``) reads its tokens as the keys of a cross-attention (a text
      encoder reading image tokens that have no layers of their own there). Ops at its
      site run at its entry and trim those keys before that read, guided by
      ``cross_stream``; ``block`` is the reading layer,
      ``attention`` names the cross-attention there, and its cost is counted where it is
      read (`trimkit.cost`). Such a layer has no attention of its own: recipes that score
      or match tokens with a layer's self-attention skip it.
    - ``token_inputs``: the block's further inputs indexed by the stream's entry tokens
      (`TokenInput`), which the engine gathers to follow the tokens.
    - ``mixes_heads``: how many H → H linears mix its self-attention's heads (talking
      heads, Shazeer et al. 2020: 2, one over the logits' heads before the softmax and one
      over the weights' after it; 0: the heads are independent). Where they mix, every
      head's output reads every head's scores: a head gate saves nothing, since every head
      still runs, and the cost model (`trimkit.cost`) counts all heads and the mixes.
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
    head_dim: int | None = None
    cross_num_heads: int | None = None
    heads: HeadLayout | None = None
    cross_heads: HeadLayout | None = None
    keys_only: bool = False
    token_inputs: tuple[TokenInput, ...] = ()
    mixes_heads: int = 0


@dataclass(frozen=True)
class StreamDesc:
    """A token stream (``"image"``, ``"text"``): its layers in order and its fixed facts.

    ``num_tokens`` is the entry length when it is static (a ViT at its native resolution),
    else ``None``; ``num_protected`` leading tokens (CLS, registers, distillation token) are
    never dropped or merged; ``padded`` says whether inputs may carry padding.

    ``grid``: for an image stream, the patch grid ``(rows, cols)`` of its entry tokens when
    it is static: the last ``rows·cols`` entry tokens are the patches in row-major order,
    counted from the end; the ones before them (the ``prefix``, then the ``num_protected``
    CLS or registers) are not patches. `trimkit.tools.viz` draws from it.

    ``prefix``: the modality (``"text"``) whose tokens lead this stream in every input, of
    a length set per call by the model's inputs: a single-stream VLM (ViLT) runs its text
    and its image through the same layers as one sequence. The adapter gives that length,
    with the padding and the protected tokens, from the inputs at each call
    (`trimkit.hooks.Entry.write`, `trimkit.hooks.EntryOutput`); ``num_protected`` then
    counts the protected tokens right *after* the prefix (the image CLS). The prefix's real
    tokens are protected: no op drops or merges them, except an op that trims that
    modality itself within it (PuMer's text merging), which merges prefix tokens only with
    each other and never the prefix's first token (its CLS). Its live tokens are
    `trimkit.ops.prefix_tokens`; the attention they pay each token is what an op needing
    ``"prefix_scores"`` gets (`trimkit.ops.prefix_attention`).

    ``entries``: the layers where a forward may start the stream: its first, and any later
    one where the model also takes the stream's tokens from outside instead of computing
    them in the layers before (METER's first fusion layer, when ``text_embeds`` replace its
    text encoder). Learned recipes check that their target cost is reachable whichever
    entry a forward takes (`trimkit.cost.lowest_ratio`).

    ``positional``: the attention masks the stream's layers receive (a causal mask, a
    per-sample padding mask) are given over its entry tokens, whatever was trimmed before.
    The state then tracks ``source``; each self-attention reads the mask at its tokens'
    entry positions (`trimkit.ops.entry_positions`: a merged token at its latest member's),
    and scores tokens from one real query row (its first protected token, the one a pooler
    reads, else its last live token).
    `trimkit.ops.restore_positions` puts a stream's output back at its entry positions,
    for models that read outputs at positions computed from their inputs.
    """

    name: str
    layers: tuple[LayerDesc, ...]
    num_tokens: int | None = None
    num_protected: int = 1
    padded: bool = False
    positional: bool = False
    grid: tuple[int, int] | None = None
    entries: tuple[int, ...] = (0,)
    prefix: str | None = None

    def attention_layers(self) -> list[int]:
        """Indices of the layers where the stream runs an attention of its own (every layer
        but the `LayerDesc.keys_only` ones)."""
        return [i for i, layer in enumerate(self.layers) if not layer.keys_only]


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
