"""Graph breaks that ``torch.compile`` no longer meets in trimmed models: the open_clip text
entry's argument lookup, the learned trimmers' keep-at-least-one rescue and the head-skipping
projections' weight-slice cache. Each check names the file whose frames used to break, so the
breaks that remain for other reasons (per-sample token counts) do not hide a regression here.
"""

from __future__ import annotations

import math

import pytest
import test_open_clip as oc
import torch
from generic_models import inputs, jitter
from open_clip.model import CLIP
from timm.models.vision_transformer import VisionTransformer
from trimkit.adapters.open_clip import TEXT, text_entry

import trimkit
from trimkit.headskip import _LiveProjection
from trimkit.hooks import ArgumentReader, EntryMethod
from trimkit.learned import HeadTrimmer, _ensure_one
from trimkit.sites import TrimContext


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _explain(model: torch.nn.Module, args: tuple) -> tuple:
    """``(explanation, eager output, compiled output)`` of an eval forward under
    ``torch._dynamo.explain`` (its graphs run as captured, like ``backend="eager"``), after
    one eager call, which traces the rewritten forwards' specialisations outside dynamo."""
    got = []
    with torch.no_grad():
        expected = model(*args)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(lambda *a: got.append(model(*a)))(*args)
    return explained, expected, got[0]


def _breaks_in(explained, filename: str) -> list[str]:
    """The reasons of the graph breaks that happen in ``filename`` (their innermost frame)."""
    return [b.reason.splitlines()[0] for b in explained.break_reasons
            if b.user_stack and b.user_stack[-1].filename.endswith(filename)]


# ------------------------------------------------------------------ open_clip text entry


class _Tower(torch.nn.Module):
    """A text tower's entry method that reads the masks the wrapper set."""

    def __init__(self, ctx: TrimContext):
        super().__init__()
        self.ctx = ctx

    def encode(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        real, protected = self.ctx.entry[TEXT]
        out = text * real + 100 * protected
        return out / out.sum() if normalize else out.float()


def test_argument_reader_finds_positions_once_on_the_bound_method():
    def positional(self, a, text, b=1): ...
    def keyword(self, *, text): ...
    def after_varargs(self, *rest, text=None): ...
    def absent(self, ids): ...

    tower = _Tower(TrimContext())
    ids = torch.arange(3)
    assert ArgumentReader(tower.encode, ["text"]).positions == {"text": 0}  # ``self`` bound
    assert ArgumentReader(positional.__get__(tower), ["text"]).positions == {"text": 1}
    assert ArgumentReader(positional, ["text"]).positions == {"text": 2}  # unbound: ``self``
    read = ArgumentReader(positional.__get__(tower), ["text", "b"])
    assert read((1, ids), {})["text"] is ids and "b" not in read((1, ids), {})  # no defaults
    assert read((1,), {"text": ids, "b": 2}) == {"text": ids, "b": 2}
    for fn in (keyword, after_varargs):  # by keyword only
        read = ArgumentReader(fn.__get__(tower), ["text"])
        assert read.positions == {"text": None} and read((ids,), {}) == {}
        assert read((), {"text": ids})["text"] is ids
    with pytest.raises(TypeError, match="`text` parameter"):
        ArgumentReader(absent.__get__(tower), ["text"], required=True)


def test_text_entry_traces_whole_after_other_state_changes():
    """A trimmed forward has changed the context's dicts before the text tower's entry; the
    entry still traces into the same graph (``inspect``'s binding broke it there) and sets,
    then clears, the masks as in eager, with the ids given by position or by keyword."""
    ctx = TrimContext()
    owner = oc.tiny_clip()  # CLIP, causal, pooled at the argmax (EOT)
    tower = _Tower(ctx)
    run = EntryMethod(tower, "encode", text_entry(ctx, owner, tower.encode))

    def forward(ids: torch.Tensor) -> torch.Tensor:
        ctx.observed["image"] = ids  # what the image stream's sites do first
        return run(ids) + run(text=ids, normalize=True)

    ids = oc.token_ids(3, 10, [9, 4, 1])
    expected = forward(ids)
    got = torch.compile(forward, backend="eager", fullgraph=True)(ids)  # a break would raise
    assert torch.equal(got, expected) and TEXT not in ctx.entry
    with pytest.raises(TypeError, match="missing its `text`"):
        run()
    assert TEXT not in ctx.entry
    ctx.enabled = False  # untrimmed: no masks are set
    with pytest.raises(KeyError):
        run(ids)


def test_trimmed_open_clip_compiles_without_an_entry_break():
    """A CLIP (ViT and causal text tower) with ToMe on both streams: no graph break comes from
    the text entry's argument lookup (its text stream still breaks where per-sample counts
    decide shapes), and the compiled model computes what eager does."""
    model = oc.factory(dict(
        cls=CLIP, vision=dict(image_size=32, patch_size=8, width=16, head_width=8, layers=1),
        text=dict(context_length=8, vocab_size=oc.VOCAB, width=16, heads=2, layers=1,
                  eos_id=oc.EOT)))().eval()
    args = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)),
            oc.token_ids(2, 8, [7, 4], seed=3))
    trimkit.apply(model, "tome", r=1)
    explained, expected, got = _explain(model, args)
    assert not _breaks_in(explained, "inspect.py")
    assert not [b for b in explained.break_reasons if "mapping proxy" in b.reason]
    torch.testing.assert_close(oc.both(got), oc.both(expected), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ learned trimmers' rescue


def _ensure_one_reference(decide: torch.Tensor, logits: torch.Tensor, eligible: torch.Tensor
                          ) -> torch.Tensor:
    """The rescue as written with a host-side early return (what the branch-free one must
    equal)."""
    kept = (decide > 0) & eligible
    empty = ~kept.any(1) & eligible.any(1)
    if not bool(empty.any()):
        return decide
    best = logits.detach().float().masked_fill(~eligible, -math.inf).argmax(1)
    rescue = torch.zeros_like(eligible).scatter(1, best[:, None], True) & empty[:, None]
    if decide.dtype == torch.bool:
        return decide | rescue
    return decide + (1.0 - decide.detach()) * rescue.to(decide.dtype)


def _case(empty_rows: bool, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """B×N logits, eligibility (a row with none eligible, protected first column) and the
    decisions ``logits > 0`` as ``dtype``; with ``empty_rows``, rows 1 and 2 keep nothing."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g)
    eligible = torch.ones(5, 7, dtype=torch.bool)
    eligible[:, 0] = False
    eligible[3] = False
    logits[0, 1:4] = 1.0  # row 0 keeps some
    if empty_rows:
        logits[1:3] = -torch.rand(2, 7, generator=g) - 0.1
        logits[1, 0] = 5.0  # the best logit of row 1 is not eligible
    else:
        logits[1:3, 2] = 0.5
    logits[4, 1:] = 0.3
    return (logits > 0).to(dtype), logits, eligible


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as integers of its width (``-0.0`` differs from ``0.0``)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.float16])
@pytest.mark.parametrize("empty_rows", [False, True])
def test_ensure_one_equals_the_branching_rescue(dtype, empty_rows):
    decide, logits, eligible = _case(empty_rows, dtype)
    got = _ensure_one(decide, logits, eligible)
    expected = _ensure_one_reference(decide, logits, eligible)
    assert got.dtype == decide.dtype == expected.dtype and torch.equal(got, expected)
    if not empty_rows:  # nothing rescued: ``decide`` bit for bit
        assert torch.equal(_bits(got), _bits(decide))
    else:  # the best eligible token of each empty row; none where nothing is eligible
        rescued = (got > 0) & ~(decide > 0)
        assert rescued.nonzero().tolist() == [[1, logits[1, 1:].argmax().item() + 1],
                                              [2, logits[2, 1:].argmax().item() + 1]]
    empty = torch.zeros(2, 0, dtype=dtype)
    assert _ensure_one(empty, empty.float(), empty.bool()) is empty


@pytest.mark.parametrize("empty_rows", [False, True])
def test_ensure_one_keeps_the_straight_through_gradient(empty_rows):
    _, logits, eligible = _case(empty_rows, torch.float32)
    weights = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    grads, values = [], []
    for fn in (_ensure_one, _ensure_one_reference):
        leaf = logits.clone().requires_grad_()
        soft = torch.sigmoid(leaf)
        decide = (leaf > 0).float() - soft.detach() + soft  # straight-through, as in training
        out = fn(decide, leaf, eligible)
        (out * weights).sum().backward()
        grads.append(leaf.grad)
        values.append(out.detach())
    assert torch.equal(values[0], values[1]) and torch.equal(grads[0], grads[1])


def _smarttrim_vit(heads: bool) -> torch.nn.Module:
    """A tiny timm ViT in eval with smarttrim at its last layer, trimmers perturbed so that
    they decide per sample."""
    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                                 num_classes=5)
    model = jitter(make)().eval()
    trimkit.apply(model, "smarttrim", init_logit=0.0, layers=[1], heads=heads, tokens=not heads,
                  ratio=0.9)  # one trimmed layer of two: 0.5 is out of its reach
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.trimkit.parameters():
            p.add_(torch.randn_like(p))
    return model


def test_smarttrim_vit_has_no_graph_break_in_the_learned_trimmers():
    """The rescue used to read ``empty.any()`` on the host, breaking the graph at every
    trimmer; now no break comes from learned.py, and compiled matches eager."""
    model, args = _smarttrim_vit(heads=False), inputs("image", 2)
    explained, expected, got = _explain(model, args)
    assert not _breaks_in(explained, "trimkit/learned.py")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ head-skipping projections


def test_head_skipping_projections_compile_without_the_slice_cache():
    """Heads gated off in the whole batch: the sliced projections compile without breaking
    on the cache's data-pointer check (the cache is skipped under compile), match eager, and
    eager still fills and reuses the cache."""
    model, args = _smarttrim_vit(heads=True), inputs("image", 2)
    for site in model.trimkit.values():
        for op in site.pre:
            if isinstance(op, HeadTrimmer):  # heads 0 and 2 off in every instance
                with torch.no_grad():
                    op.mlp[-1].weight.zero_()
                    op.bias.copy_(torch.tensor([-4.0, 4.0, -4.0, 4.0]))
    projections = [m.forward for m in model.modules()
                   if isinstance(m.__dict__.get("forward"), _LiveProjection)]
    assert projections
    with torch.no_grad():  # eager: sliced once per set of live heads, then reused
        expected = model(*args)
        cached = [p._cache[(1, 3)] for p in projections]
        torch.testing.assert_close(model(*args), expected, atol=0, rtol=0)
    assert all(list(p._cache) == [(1, 3)] and p._cache[(1, 3)][0] is c[0]
               for c, p in zip(cached, projections, strict=True))
    for p in projections:
        p._cache.clear()
    got = []
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(lambda *a: got.append(model(*a)))(*args)
    assert not _breaks_in(explained, "trimkit/headskip.py")
    assert not any(p._cache for p in projections)  # the compiled graph slices by itself
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=0)
