"""A trimmed model copies and pickles as itself: ``copy.deepcopy`` gives an independent
trimmed model (removing, disabling or running one never touches the other), and a
``pickle`` / ``torch.save`` round trip gives a trimmed model with the same outputs that
`trimkit.remove` turns back into the untrimmed one."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
from collections.abc import Callable

import blip_models
import pytest
import test_hf as hf
import test_open_clip as oc
import torch
from timm.models.vision_transformer import VisionTransformer
from trimkit.adapters.meter import METER, meter_tiny

import trimkit


def _timm(pool: str) -> Callable[[], tuple]:
    def make() -> tuple:
        torch.manual_seed(0)
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                                  num_classes=5, global_pool=pool).eval()
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        return model, (x,), lambda out: out, ("tome", dict(r=2))
    return make


def _bert() -> tuple:
    ids, mask = hf.text_batch()
    return (hf.bert(), (ids, mask), lambda out: out.last_hidden_state,
            ("tome", dict(r=2, stream="text")))


def _clip() -> tuple:
    ids, mask = hf.text_batch((12, 8), eos=True)
    return (hf.clip(), (ids, hf.PIXELS, mask),
            lambda out: torch.cat([out.text_embeds, out.image_embeds], -1),
            ("tome", dict(r=2)))


def _open_clip() -> tuple:
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return (oc.tiny_clip(), (images, oc.token_ids(2, 10, [3, 7])), oc.both,
            ("tome", dict(r=2, stream="text")))


def _blip(kind: str, recipe: str) -> Callable[[], tuple]:
    def make() -> tuple:
        return (blip_models.make(kind), blip_models.inputs(kind, 3, 6, True),
                blip_models.output(kind), (recipe, {}))
    return make


def _meter() -> tuple:
    torch.manual_seed(0)
    cfg = meter_tiny(num_heads=2, hidden_size=16)
    model = METER(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (3, 8), generator=g)
    mask = (torch.arange(8)[None] < torch.tensor([8, 6, 5])[:, None]).long()
    images = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=g)
    return model, (images, ids.masked_fill(mask == 0, 1), mask), lambda out: out, ("pumer", {})


CASES = {
    "timm-token": _timm("token"),
    "timm-avg": _timm("avg"),
    "hf-bert-padded": _bert,
    "hf-clip": _clip,
    "open_clip": _open_clip,
    "blip-itm": _blip("itm", "tome"),
    "blip-vqa": _blip("vqa", "pumer"),
    "meter": _meter,
}


def _run(model: torch.nn.Module, args: tuple, output: Callable) -> torch.Tensor:
    with torch.no_grad():
        return output(model(*args))


def _equal(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _trimmed(name: str) -> tuple:
    """The case's model, trimmed, with its inputs, output picker and both reference outputs."""
    model, args, output, (recipe, options) = CASES[name]()
    untrimmed = _run(model, args, output)
    trimkit.apply(model, recipe, **options)
    trimmed = _run(model, args, output)
    assert not torch.equal(trimmed, untrimmed), "the recipe must change the outputs"
    return model, args, output, trimmed, untrimmed


@pytest.mark.parametrize("name", CASES)
def test_deepcopy_is_an_independent_trimmed_model(name: str) -> None:
    model, args, output, trimmed, untrimmed = _trimmed(name)
    twin = copy.deepcopy(model)
    _equal(_run(twin, args, output), trimmed)
    with trimkit.trimming_disabled(twin):  # the engine's attention: to float error
        torch.testing.assert_close(_run(twin, args, output), untrimmed, rtol=0, atol=1e-5)
        _equal(_run(model, args, output), trimmed)
    trimkit.remove(twin)
    assert not trimkit.is_applied(twin) and trimkit.is_applied(model)
    _equal(_run(twin, args, output), untrimmed)
    _equal(_run(model, args, output), trimmed)
    trimkit.remove(model)
    _equal(_run(model, args, output), untrimmed)


@pytest.mark.parametrize("via", ["pickle", "torch.save"])
@pytest.mark.parametrize("name", CASES)
def test_pickle_round_trip_keeps_a_removable_trimmed_model(name: str, via: str) -> None:
    model, args, output, trimmed, untrimmed = _trimmed(name)
    if via == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    assert trimkit.is_applied(loaded)
    _equal(_run(loaded, args, output), trimmed)
    trimkit.remove(loaded)
    _equal(_run(loaded, args, output), untrimmed)
    _equal(_run(model, args, output), trimmed)
    assert {k: v for k, v in loaded.state_dict().items()}.keys() == {
        k for k in model.state_dict() if not k.startswith("trimkit.")}


def test_copies_of_copies_and_remove_in_any_order() -> None:
    model, args, output, trimmed, untrimmed = _trimmed("hf-bert-padded")
    twin = copy.deepcopy(model)
    third = pickle.loads(pickle.dumps(twin))
    trimkit.remove(model)  # the first one goes first: the others keep the attention route
    _equal(_run(model, args, output), untrimmed)
    for other in (twin, third):
        _equal(_run(other, args, output), trimmed)
    trimkit.remove(third)
    _equal(_run(twin, args, output), trimmed)
    trimkit.remove(twin)
    _equal(_run(twin, args, output), untrimmed)


def test_unpickled_in_a_fresh_process(tmp_path) -> None:
    """The process that loads a pickled trimmed model has never trimmed one: what the model
    needs process-wide (transformers' registry entry) comes back with it, and the hooks it
    carries keep their ids apart from those registered later."""
    model, args, output, trimmed, untrimmed = _trimmed("hf-bert-padded")
    torch.save({"model": model, "args": args, "trimmed": trimmed, "untrimmed": untrimmed},
               tmp_path / "model.pt")
    script = f"""
import torch, trimkit
saved = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
model, args = saved["model"], saved["args"]
with torch.no_grad():
    assert torch.equal(model(*args).last_hidden_state, saved["trimmed"])
    layer = model.encoder.layer[0]
    mine = layer.register_forward_hook(lambda *a: None)  # a later hook: its own id
    trimkit.remove(model)
    assert len(layer._forward_hooks) == 1 and mine.id in layer._forward_hooks
    assert torch.equal(model(*args).last_hidden_state, saved["untrimmed"])
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)


def test_an_adapter_with_local_undo_functions_names_trimkit_save() -> None:
    from trimkit.adapters.timm_vit import TimmViTAdapter

    class LocalUndo(TimmViTAdapter):
        name = "local undo"

        def install(self, model, desc, sites, ctx):
            undo = super().install(model, desc, sites, ctx)
            model.blocks[0].note = "patched"
            return [*undo, lambda: model.blocks[0].__dict__.pop("note")]

    model, *_ = CASES["timm-token"]()
    trimkit.apply(model, "tome", r=2, adapter=LocalUndo())
    for copier in (pickle.dumps, copy.deepcopy):
        with pytest.raises(pickle.PicklingError, match=r"<lambda>.*trimkit\.save\(model, path\)"):
            copier(model)
    trimkit.remove(model)
    pickle.dumps(model)
