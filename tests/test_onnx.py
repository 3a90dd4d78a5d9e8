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
    (dict(init_logit=0.0, layers=[1]), "heads are gated per instance"),
    (dict(init_logit=0.0, layers=[1], heads=False), "differ per sample"),
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
    monkeypatch.setattr("trimkit.export._run_onnx",
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
