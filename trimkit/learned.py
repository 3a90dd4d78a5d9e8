"""Learned, per-instance trimmers (SmartTrim, Wang et al., LREC-COLING 2024).

Both are `TokenOp`s that run at a layer's entry, before its attention:

- `TokenTrimmer` scores every token with a local MLP plus a bilinear global term against the
  stream's own pooled token and, in a cross-modal layer, the other stream's pooled token;
- `HeadTrimmer` gates each attention head of the layer (self- and, if any, cross-attention)
  from the stream's pooled token.

In training the decisions are Gumbel-sigmoid samples with the straight-through estimator,
multiplied into the previous keep mask (dropped stays dropped) and applied as attention bias
(masked execution). At inference a token or head is kept where its logit is positive, or,
with a fixed budget, the top fraction by logit per instance; compaction then removes the
dropped tokens for real. With stable initialisation every logit starts at ``init_logit`` so
the model begins untrimmed.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from .ops import drop_below_top, drop_tokens, gumbel_sigmoid_st, topk_by_score
from .sites import Site, TokenOp, unpack_state
from .state import TokenState

__all__ = ["HeadTrimmer", "TokenTrimmer", "param_groups", "pooled_token", "set_noise"]


def set_noise(model: nn.Module, noise: float) -> None:
    """Scale the Gumbel noise of every learned trimmer in ``model`` (1: the plain
    Gumbel-softmax sample; 0: the deterministic decision ``logit > 0`` that inference takes).
    Annealing it to 0 during training makes the trained cost the inference cost: a sampled
    mask keeps a token with probability ``sigmoid(logit)``, a threshold keeps it or not."""
    for m in model.modules():
        if isinstance(m, (TokenTrimmer, HeadTrimmer)):
            m.noise = float(noise)


def param_groups(model: nn.Module, lr: float, *, trimmer_lr: float | None = None,
                 threshold_lr: float | None = None) -> list[dict]:
    """Optimizer parameter groups for fine-tuning a model with learned trimmers: the model's
    own trainable parameters at ``lr``, the trimmers' weights at ``trimmer_lr`` (default
    ``lr``) and their thresholds at ``threshold_lr`` (default ``trimmer_lr``).

    The thresholds are the biases of the trimmers' last layers: they shift every logit of a
    layer at once, which is what the cost loss asks for. Under Adam a parameter moves by
    about its learning rate per step, so a short fine-tune from a stable initialisation
    (logits at +3 to +5) needs a fast threshold to reach its target; a fast learning rate
    on every trimmer weight instead makes the logits run to hundreds, where the
    straight-through gradient vanishes."""
    trimmers = [m for m in model.modules() if isinstance(m, (TokenTrimmer, HeadTrimmer))]
    thresholds = {id(m.threshold) for m in trimmers}
    trimmer_params = {id(p) for m in trimmers for p in m.parameters()}
    own, weights, biases = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in thresholds:
            biases.append(p)
        elif id(p) in trimmer_params:
            weights.append(p)
        else:
            own.append(p)
    trimmer_lr = lr if trimmer_lr is None else trimmer_lr
    threshold_lr = trimmer_lr if threshold_lr is None else threshold_lr
    groups = [{"params": own, "lr": lr}, {"params": weights, "lr": trimmer_lr},
              {"params": biases, "lr": threshold_lr}]
    return [g for g in groups if g["params"]]


def pooled_token(state: TokenState, has_cls: bool) -> torch.Tensor:
    """B×D summary of a stream: its first token when that is a protected CLS, else the mean
    of its live tokens weighted by ``keep``."""
    if has_cls:
        return state.x[:, 0]
    w = state.keep.to(state.x.dtype)[..., None]
    return (state.x * w).sum(1) / w.sum(1).clamp_min(1.0)


def _ensure_one(decide: torch.Tensor, logits: torch.Tensor, eligible: torch.Tensor
                ) -> torch.Tensor:
    """``decide`` (B×N keep, bool or 0/1 float) with the best eligible entry switched on in rows
    that keep none, so at least one survives wherever one is eligible.

    Branch-free, so that `torch.compile` traces it without reading a tensor on the host: the
    rescue is computed for every batch, and entries it leaves off are ``decide``'s own,
    bit for bit (a rescued float entry is ``1`` with ``decide``'s straight-through gradient)."""
    if decide.shape[1] == 0:  # nothing to rescue, and argmax needs an entry
        return decide
    empty = ~((decide > 0) & eligible).any(1, keepdim=True) & eligible.any(1, keepdim=True)
    best = logits.detach().masked_fill(~eligible, -math.inf).argmax(1, keepdim=True)
    rescue = torch.zeros_like(eligible).scatter_(1, best, empty)  # B×N: True at best if empty
    if decide.dtype == torch.bool:
        return decide | rescue
    return torch.where(rescue, decide + (1.0 - decide.detach()), decide)


def _stable_init(last: nn.Linear, bias: nn.Parameter, init_logit: float | None) -> None:
    if init_logit is not None:
        nn.init.zeros_(last.weight)
        nn.init.constant_(bias, init_logit)


def _bounded(bias: torch.Tensor, score: torch.Tensor, span: float | None) -> torch.Tensor:
    """Keep logits ``bias + span · tanh(score / span)``: the input-dependent part stays within
    ``± span`` of the layer's threshold ``bias``. Unbounded scores drift to where the
    straight-through gradient (through ``sigmoid'``) vanishes, and a shift of the threshold,
    which is what the cost loss asks for, then no longer reaches them. ``span=None``: the
    paper's unbounded ``bias + score``."""
    if span is None:
        return bias + score
    return bias + span * torch.tanh(score / span)


class TokenTrimmer(TokenOp):
    """Cross-modal-aware token trimmer: keep logit ``π_i = b + span · tanh(s_i / span)`` with
    the score ``s_i = MLP(LN(x_i)) + (W_t LN(x_i))ᵀ g / √r``, ``g = W_g [LN(c_s); LN'(c_o)]``
    (own pooled token, other stream's pooled token) and ``b`` the layer's threshold.

    ``other_dim`` is the width of the other stream's tokens (``None``: single-modality layer,
    or the ablation without cross-modal awareness: ``g = W_g LN(c_s)``, and the trimmer reads
    nothing of another stream); ``c_o`` is the other stream's pooled token as its latest
    state holds it (zeros while that stream is absent or at another width). ``budget`` (a
    fraction) switches inference to a fixed budget: each instance keeps the top
    ``ceil(budget · E)`` of its E live unprotected tokens by logit. ``span=None`` leaves the
    score unbounded (``π_i = b + s_i``) and ``norm_pooled=False`` feeds the pooled tokens to
    ``W_g`` as they are, as the paper does (`trimkit.recipes.smarttrim`, ``preset="paper"``).
    """

    def __init__(self, dim: int, *, other_dim: int | None = None, hidden: int | None = None,
                 rank: int | None = None, init_logit: float | None = 4.0, tau: float = 1.0,
                 budget: float | None = None, span: float | None = 6.0,
                 norm_pooled: bool = True):
        super().__init__()
        hidden = hidden or max(dim // 4, 8)
        self.rank = rank or max(dim // 4, 8)
        self.other_dim, self.tau, self.budget = other_dim, float(tau), budget
        self.noise = 1.0
        self.norm = nn.LayerNorm(dim)
        # pooled tokens enter the global score normalised too: a raw residual-stream vector
        # can be large, and the bilinear product of two learned projections of it saturates
        # the logits (and kills their gradient) within a few fast optimizer steps
        self.norm_pooled = bool(norm_pooled)
        self.other_norm = nn.LayerNorm(other_dim) if other_dim and norm_pooled else None
        self.span = None if span is None else float(span)
        self.local = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(),
                                   nn.Linear(hidden, 1, bias=False))
        self.token_proj = nn.Linear(dim, self.rank, bias=False)
        self.global_proj = nn.Linear(dim + (other_dim or 0), self.rank, bias=False)
        self.bias = nn.Parameter(torch.zeros(()))
        _stable_init(self.local[-1], self.bias, init_logit)
        if init_logit is not None:
            nn.init.zeros_(self.global_proj.weight)

    @property
    def threshold(self) -> nn.Parameter:
        """The bias that shifts every keep logit of the layer (see `param_groups`)."""
        return self.bias

    @property
    def data_dependent_count(self) -> bool:  # type: ignore[override]
        """A threshold decides the count per instance; a ``budget`` fixes it."""
        return self.budget is None

    def extra_repr(self) -> str:
        return (f"cross={self.other_dim is not None}, tau={self.tau}, budget={self.budget}, "
                f"span={self.span}, norm_pooled={self.norm_pooled}")

    def flops(self, tokens: torch.Tensor) -> torch.Tensor:
        dim, hidden = self.token_proj.in_features, self.local[0].out_features
        per_token = 2 * (dim * hidden + hidden + dim * self.rank)  # matmuls, as counted
        return tokens * per_token + 2 * self.global_proj.in_features * self.rank

    def logits(self, state: TokenState, site: Site) -> torch.Tensor:
        """B×N keep logits."""
        ctx = site.ctx
        own = pooled_token(state, ctx.protected.get(site.stream, 0) > 0)
        pooled = [self.norm(own) if self.norm_pooled else own]
        if self.other_dim is not None:
            other = ctx.keys_state(site.cross_stream, site.pair) if site.cross_stream else None
            if other is not None and other.segments is not None:
                other = unpack_state(other)  # pooled per sample
            if (other is None or other.x.shape[-1] != self.other_dim
                    or other.x.shape[0] != state.x.shape[0]):
                # the other stream is not there yet, or not at this layer's width (e.g. still
                # in its own encoder): the global score uses the stream's own token only
                pooled.append(state.x.new_zeros(state.x.shape[0], self.other_dim))
            else:
                c_o = pooled_token(other, ctx.protected.get(site.cross_stream, 0) > 0)
                pooled.append(self.other_norm(c_o) if self.other_norm is not None else c_o)
        h = self.norm(state.x)
        g = self.global_proj(torch.cat(pooled, -1).to(h.dtype))  # B×r
        bilinear = (self.token_proj(h) * g[:, None]).sum(-1) / math.sqrt(self.rank)
        return _bounded(self.bias, self.local(h)[..., 0] + bilinear, self.span)

    def forward(self, state: TokenState, site: Site) -> TokenState:
        pi = self.logits(state, site)
        eligible = state.live & ~state.protected
        if site.training:
            mask = gumbel_sigmoid_st(pi.float(), self.tau, noise=self.noise)
            mask = torch.where(state.protected, torch.ones_like(mask), mask)
            mask = _ensure_one(mask, pi, eligible)
            keep = state.keep.to(mask.dtype) * mask
            return replace(state, keep=keep, has_dead=True, packed=False)
        if self.budget is not None:  # a fixed count: known on the host where the layout is
            return drop_tokens(state, *drop_below_top(state, pi, self.budget))
        keep = _ensure_one(pi > 0, pi, eligible)
        return drop_tokens(state, eligible & ~keep)


class HeadTrimmer(TokenOp):
    """Per-instance head gates from the pooled token: ``b + span · tanh(MLP(c_s) / span)`` gives
    one logit per head of the self-attention and, with ``cross_heads``, of the
    cross-attention. A gate multiplies
    its head's output before the output projection; at inference a head gated off in every
    instance of the batch is not computed: neither its attention product nor, where the
    layer's `HeadLayout` allows, its q/k/v and output projections (`trimkit.headskip`).
    ``budget`` keeps the top ``ceil(budget · H)`` heads per instance instead of
    thresholding."""

    gates_heads = True

    def __init__(self, dim: int, heads: int, *, cross_heads: int = 0, hidden: int | None = None,
                 init_logit: float | None = 4.0, tau: float = 1.0, budget: float | None = None,
                 span: float | None = 6.0):
        super().__init__()
        hidden = hidden or max(dim // 4, 8)
        self.heads, self.cross_heads = heads, cross_heads
        self.tau, self.budget = float(tau), budget
        self.noise = 1.0
        self.span = None if span is None else float(span)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, heads + cross_heads, bias=False))
        self.bias = nn.Parameter(torch.zeros(heads + cross_heads))
        _stable_init(self.mlp[-1], self.bias, init_logit)

    @property
    def threshold(self) -> nn.Parameter:
        """The biases of the head logits (see `param_groups`)."""
        return self.bias

    def extra_repr(self) -> str:
        return f"heads={self.heads}, cross_heads={self.cross_heads}, budget={self.budget}"

    def flops(self, tokens: torch.Tensor) -> torch.Tensor:
        first, last = self.mlp[1], self.mlp[-1]
        per_sample = 2 * (first.in_features * first.out_features
                          + last.in_features * last.out_features)
        return torch.full_like(tokens, float(per_sample))

    def _gates(self, logits: torch.Tensor, training: bool) -> torch.Tensor:
        every = torch.ones_like(logits, dtype=torch.bool)
        if training:
            return _ensure_one(gumbel_sigmoid_st(logits.float(), self.tau, noise=self.noise),
                               logits, every)
        if self.budget is not None:
            return topk_by_score(logits, self.budget, every).to(logits.dtype)
        return _ensure_one(logits > 0, logits, every).to(logits.dtype)

    def forward(self, state: TokenState, site: Site) -> TokenState:
        if state.x.shape[0] == 0:  # an empty batch has no instance to gate heads for
            return state
        c = pooled_token(state, site.ctx.protected.get(site.stream, 0) > 0)
        logits = _bounded(self.bias, self.mlp(c), self.span)
        site.head_gates = self._gates(logits[:, :self.heads], site.training)
        if self.cross_heads:
            site.cross_head_gates = self._gates(logits[:, self.heads:], site.training)
        return state
