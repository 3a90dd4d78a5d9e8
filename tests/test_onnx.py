"""ONNX export of fixed-count recipes (`trimkit.export_onnx`, docs/deploy.md): the exported
graph runs in onnxruntime and matches PyTorch; per-sample trimming is refused with a reason."""

from __future__ import annotations

import io

import pytest
import torch
from generic_models import inputs
from test_compile import build

import trimkit
from trimkit.ops import entry_positions
from trimkit.state import TokenState

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

FIXED = {
    "tome": dict(r=2),
    "attn_prune": dict(keep_ratio=0.5, layers=[0, 1], fuse=True),
    "pumer": dict(),  # merge-only on a one-stream model
    "prune_heads": None,  # heads= filled in per model
    "smarttrim-budget": dict(budget=0.5, heads=False, layers=[1]),
}
#: a timm ViT through its own adapter, and models the generic adapter reads (for
#: prune_heads a DeiT forced through it: the fused generic toy shows no output projection)
CASES = [("timm", r) for r in FIXED] + [
    ("postnorm-softmax", "tome"), ("postnorm-softmax", "attn_prune"),
    ("postnorm-softmax", "pumer"), ("deit", "prune_heads")]


@pytest.mark.parametrize("name,recipe", CASES)
def test_fixed_count_recipes_export_and_match(name, recipe, tmp_path):
    model, kind = build(name, recipe, FIXED[recipe])
    x = inputs(kind, 2)
    done = trimkit.export_onnx(model, x, tmp_path / "m.onnx", check=True, atol=1e-4)
    assert done.exporter == "dynamo" and done.max_diff is not None and done.max_diff < 1e-4
    assert done.masked_streams == ()  # every stream compacted in the graph
    assert not model.training  # left as it was
    if recipe != "prune_heads":  # the graph computes fewer tokens: it is the trimmed one
        with torch.no_grad():
            model(*x)
        assert int(trimkit.last_stats(model).layers[-1].tokens_out[0]) < 17


def test_torchscript_exporter_works_too(tmp_path):
    model, kind = build("timm", "tome", FIXED["tome"])
    done = trimkit.export_onnx(model, inputs(kind, 2), tmp_path / "m.onnx", check=True,
                               dynamo=False)
    assert done.exporter == "torchscript" and done.max_diff < 1e-4


@pytest.mark.parametrize("options,why", [
    (dict(init_logit=0.0, layers=[1], ratio=0.9), "heads are gated per instance"),
    (dict(init_logit=0.0, layers=[1], heads=False, ratio=0.9), "learned threshold decides"),
])
def test_adaptive_recipes_are_refused_with_the_reason(options, why, tmp_path):
    model, kind = build("timm", "smarttrim", options)
    with pytest.raises(trimkit.OnnxExportError, match=why) as err:
        trimkit.export_onnx(model, inputs(kind, 2), tmp_path / "m.onnx")
    assert "data" in str(err.value) and not (tmp_path / "m.onnx").exists()


def test_a_wrong_export_is_reported_with_its_difference(tmp_path, monkeypatch):
    model, kind = build("timm", "tome", FIXED["tome"])
    x = inputs(kind, 2)
    trimkit.export_onnx(model, x, tmp_path / "m.onnx", dynamo=False)
    monkeypatch.setattr("trimkit.tools.export._run_onnx",
                        lambda path, args: [model(*args).detach().numpy() + 1.0])
    with pytest.raises(trimkit.OnnxExportError, match="differs from PyTorch by 1"):
        trimkit.export_onnx(model, x, tmp_path / "m.onnx", check=True, dynamo=False)


def test_entry_positions_while_exporting_equal_eager():
    """The export form of `entry_positions` (no scatter_reduce "amax") gives the same."""
    x = torch.randn(2, 6, 4)
    state = TokenState.start(x, track_source=True)
    state.source = torch.tensor([[0, 0, 1, -1, 2, 1], [2, 0, 1, 1, -1, 0]])
    expected = entry_positions(state)

    class Positions(torch.nn.Module):
        def forward(self, source: torch.Tensor) -> torch.Tensor:
            return entry_positions(TokenState(x, state.keep, state.size, state.protected,
                                              source))

    import onnxruntime as ort

    buf = io.BytesIO()
    torch.onnx.export(Positions(), (state.source,), buf, dynamo=False)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: state.source.numpy()})[0]
    assert got.tolist() == expected.tolist()


def _other_inputs(args: tuple) -> tuple:
    """Inputs of the same shapes with another padding pattern per row and other content:
    the batch reversed, floats perturbed."""
    g = torch.Generator().manual_seed(7)
    return tuple(a if not isinstance(a, torch.Tensor)
                 else a.flip(0) + 0.1 * torch.randn(a.shape, generator=g)
                 if a.is_floating_point() else a.flip(0) for a in args)


class _ItmScore(torch.nn.Module):
    """What a BLIP retrieval deployment returns: the ITM logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model(*args).itm_score


@pytest.mark.parametrize("name,recipe", [
    ("hf-bert-padded", "tome"), ("hf-clip", "tome"), ("open_clip", "tome"),
    ("meter", "pumer"), ("blip-itm", "pumer")])
def test_padded_and_two_stream_models_export_and_match_on_other_padding(name, recipe,
                                                                         tmp_path):
    """A padded stream has per-sample counts that follow from the mask: the graph trims it in
    masked form, and matches PyTorch on inputs with another padding pattern than it was
    exported on; a stream without padding is compacted in the graph."""
    from test_compile import _other_adapter

    make, args, _ = _other_adapter(name)
    model = make().eval()
    trimkit.apply(model, recipe, **({"r": 1} if recipe == "tome" else {}))
    target = _ItmScore(model) if name == "blip-itm" else model
    other, kw = [_other_inputs(args)], {}
    if name == "meter":  # and a dynamic batch axis: 5 samples through a graph traced on 3
        batch = torch.export.Dim("batch")
        other.append(tuple(torch.cat([a, b[:2]]) for a, b in
                                 zip(args, other[0], strict=True)))
        kw = dict(dynamic_shapes=tuple({0: batch} for _ in args))
    done = trimkit.export_onnx(target, args, tmp_path / "m.onnx", check=True,
                               check_inputs=other, atol=2e-5, **kw)
    assert done.exporter == "dynamo" and done.max_diff < 2e-5
    assert done.masked_streams == ("text",)
    if name in ("meter", "blip-itm", "hf-clip", "open_clip"):  # the image is compacted
        with torch.no_grad():
            model(*args)
        image = [s for s in trimkit.last_stats(model).layers if s.stream == "image"]
        assert image[-1].tokens_out.max() < image[0].tokens_in.max()


def test_an_output_holding_packed_tokens_of_a_masked_stream_is_explained(tmp_path):
    """BLIP's towers return their survivors packed (data-dependent length); the graph keeps
    every slot of a padded stream, and the check says so instead of a bare mismatch."""
    from test_compile import _other_adapter

    make, args, _ = _other_adapter("blip-itm")
    model = make().eval()
    trimkit.apply(model, "pumer")
    with pytest.raises(trimkit.OnnxExportError, match="masked form .* Export a wrapper"):
        trimkit.export_onnx(model, args, tmp_path / "m.onnx", check=True, dynamo=False)


@pytest.mark.parametrize("dynamo", [True, False])
def test_a_dynamic_batch_axis_runs_other_batch_sizes(dynamo, tmp_path):
    model, kind = build("timm", "tome", FIXED["tome"])
    kw = (dict(dynamic_shapes=({0: torch.export.Dim("batch")},)) if dynamo
          else dict(dynamic_axes={"x": {0: "batch"}}, input_names=["x"]))
    done = trimkit.export_onnx(model, inputs(kind, 2), tmp_path / "m.onnx", check=True,
                               check_inputs=[inputs(kind, 5), inputs(kind, 1)], dynamo=dynamo,
                               **kw)
    assert done.max_diff < 1e-4


@pytest.mark.parametrize("dynamo", [True, False])
def test_another_batch_size_on_a_static_graph_is_explained(dynamo, tmp_path):
    """A graph traced at batch 2 without a dynamic axis cannot run batch 3: the check says
    so (`OnnxExportError`), instead of onnxruntime's own error."""
    model, kind = build("timm", "tome", FIXED["tome"])
    with pytest.raises(trimkit.OnnxExportError,
                       match=r"an input of shape \(3, 3, 32, 32\) \(input 0, '.*'\): axis 0 is "
                             r"fixed at 2 in the graph, as traced\. Export with that axis "
                             r"dynamic \(dynamic_shapes="):
        trimkit.export_onnx(model, inputs(kind, 2), tmp_path / "m.onnx", check=True,
                            check_inputs=[inputs(kind, 3)], dynamo=dynamo)


def test_the_torchscript_exporter_holds_other_padding_too(tmp_path):
    """The TorchScript exporter bakes in whatever Python reads: the masked form reads
    nothing, so its graph holds for another padding pattern as well."""
    from test_compile import _other_adapter

    make, args, _ = _other_adapter("hf-bert-padded")
    model = make().eval()
    trimkit.apply(model, "tome", r=1)
    done = trimkit.export_onnx(model, args, tmp_path / "m.onnx", check=True, dynamo=False,
                               check_inputs=[_other_inputs(args)], atol=2e-5)
    assert done.exporter == "torchscript" and done.masked_streams == ("text",)
