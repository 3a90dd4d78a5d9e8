"""Saving a trimmed model and loading it into a freshly built one (`trimkit.save` / `load`,
`save_pretrained` / `from_pretrained`): outputs bit for bit for every recipe, `remove` after
`load` gives the base model, wrong architectures and unreadable files say why and change
nothing, options that are not JSON, and the Hugging Face round trip."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from blip_models import inputs as blip_inputs
from blip_models import make as blip
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForMaskedLM, BertModel, BlipForImageTextRetrieval
from trimkit.adapters.meter import METER, meter_tiny

import trimkit
from trimkit import Option, Recipe, SitePlan, register_recipe
from trimkit.registry import RECIPES
from trimkit.tools.persist import decode_option, encode_option, read_meta
from trimkit.trimmers import PruneByQueryScore

# ---------------------------------------------------------------------------- models


def vit(seed: int = 0, depth: int = 4, heads: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=4, embed_dim=16 * heads, depth=depth, num_heads=heads,
                             num_classes=5).eval()


def bert(seed: int = 0, heads: int = 4, layers: int = 2, cls: type = BertModel) -> nn.Module:
    torch.manual_seed(seed)
    model = cls(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=32,
                           max_position_embeddings=24, attn_implementation="sdpa"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def meter(seed: int = 0, **cfg) -> nn.Module:
    torch.manual_seed(seed)
    return METER(meter_tiny(**cfg)).eval()


IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def text_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 38, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return dict(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask)


def meter_batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    return torch.randn(3, 3, 32, 32, generator=g), ids.masked_fill(mask == 0, 1), mask


#: family -> (factory taking a seed, run: model -> output tensor)
FAMILIES: dict[str, tuple[Callable[..., nn.Module], Callable[[nn.Module], torch.Tensor]]] = {
    "timm": (vit, lambda m: m(IMAGES)),
    "bert": (bert, lambda m: m(**text_batch()).last_hidden_state),
    "meter": (meter, lambda m: m(*meter_batch())),
}


def perturb(model: nn.Module, scale: float = 0.5) -> None:
    """Trimmer weights away from their initialisation, so they must come from the file."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.trimkit.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def untouched(model: nn.Module) -> None:
    assert not trimkit.is_applied(model) and "trimkit" not in model._modules
    assert not trimkit.pruned_heads(model)
    for m in model.modules():
        assert "forward" not in m.__dict__


# ---------------------------------------------------------------------------- round trips

#: (family, recipe, options, heads pruned first)
CASES = [
    ("timm", "tome", dict(r=4, schedule="decreasing", track_source=True), None),
    ("timm", "attn_prune", dict(keep_ratio=0.5, fuse=True), None),
    ("timm", "smarttrim", dict(stable_init=False), None),
    ("timm", "tome", dict(r=3), {"image.0": [1, 3], "image.2": [0]}),
    ("bert", "tome", dict(r=2, mode="masked"), None),
    ("bert", "smarttrim", dict(stable_init=False, layers=[0, 1]), {"text.1": [2]}),
    ("meter", "pumer", dict(prune_ratio=0.3), None),
    ("meter", "smarttrim", dict(stable_init=False, budget={("image", 2): (0.5, 1.0)}), None),
    ("meter", "attn_prune", dict(stream="text", layers=[1], keep_ratio=0.5),
     {"image.1": [0], "text.0": [1], "image.3.cross": [0]}),
]


@pytest.mark.parametrize("family,recipe,options,pruned", CASES,
                         ids=[f"{c[0]}-{c[1]}{'-pruned' if c[3] else ''}" for c in CASES])
def test_load_reproduces_outputs_bit_for_bit_and_remove_gives_the_base(
        tmp_path, family, recipe, options, pruned):
    build, run = FAMILIES[family]
    model = build(0)
    if pruned:
        trimkit.apply(model, "prune_heads", heads=pruned)
    trimkit.apply(model, recipe, **options)
    if recipe == "smarttrim":
        perturb(model)
    with torch.no_grad():
        ref = run(model)
    stats = [s.tokens_out.tolist() for s in trimkit.last_stats(model).layers]
    assert any(len(set(s)) > 1 or s != stats[0] for s in stats)  # something was trimmed
    trimkit.save(model, tmp_path)

    loaded = trimkit.load(lambda: build(1), tmp_path)  # other seed: weights from the file
    assert trimkit.is_applied(loaded) and trimkit.pruned_heads(loaded) == (pruned or {})
    ctx, saved = trimkit.api._applied(loaded).ctx, trimkit.api._applied(model).ctx
    assert (ctx.mode, ctx.track_source) == (saved.mode, saved.track_source)
    with torch.no_grad():
        assert torch.equal(run(loaded), ref)
    assert [s.tokens_out.tolist() for s in trimkit.last_stats(loaded).layers] == stats
    states, saved_states = trimkit.last_states(loaded), trimkit.last_states(model)
    for name, state in states.items():  # which entry tokens each token covers
        other = saved_states[name].source
        assert (state.source is None) == (other is None)
        assert state.source is not None or not ctx.track_source
        assert state.source is None or torch.equal(state.source, other)
    same_state(loaded, model)

    trimkit.remove(model)
    trimkit.remove(loaded)
    same_state(loaded, model)
    with torch.no_grad():
        assert torch.equal(run(loaded), run(model))
    for m in loaded.modules():
        assert "forward" not in m.__dict__
    if not pruned:  # the base: a freshly built model given the saved weights
        base = build(2)
        base.load_state_dict(load_file(tmp_path / "model.safetensors"))
        same_state(loaded, base)
        with torch.no_grad():
            assert torch.equal(run(loaded), run(base))


def test_fine_tuned_weights_and_trained_trimmers_come_back(tmp_path):
    """`trimkit.train` changes the base weights and the trimmers: both are saved."""
    g = torch.Generator().manual_seed(5)
    batch = meter_batch()
    data = TensorDataset(*batch, torch.randint(0, 7, (3,), generator=g))
    loader = DataLoader(data, batch_size=3)
    model = trimkit.apply(meter(0, tasks=("vqa",)), "smarttrim", ratio=0.5, init_logit=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trimkit.train(model, loader, lambda out, b: nn.functional.cross_entropy(out, b[-1]),
                  steps=2, lr=1e-2, progress=False, seed=0, cpu=True)
    after = model.state_dict()
    key = "trimkit.image_2.pre.0.bias"
    assert not torch.equal(before[key], after[key])
    assert any(not torch.equal(before[k], after[k]) for k in after if not k.startswith("trimkit."))
    model.eval()
    with torch.no_grad():
        ref = model(*batch)
    trimkit.save(model, tmp_path)
    loaded = trimkit.load(lambda: meter(1, tasks=("vqa",)), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(*batch), ref)
    trimkit.remove(model)
    trimkit.remove(loaded)
    same_state(loaded, model)


def test_weights_trimmers_keeps_the_models_own_base_weights(tmp_path):
    model = trimkit.apply(vit(0), "smarttrim", stable_init=False)
    perturb(model)
    with torch.no_grad():
        ref = model(IMAGES)
    trimkit.save(model, tmp_path, weights="trimmers")
    assert not (tmp_path / "model.safetensors").exists()
    assert read_meta(tmp_path)["weights"] == "trimmers"
    loaded = trimkit.load(vit(0), tmp_path)  # the user built it with the right weights
    with torch.no_grad():
        assert torch.equal(loaded(IMAGES), ref)
    other = trimkit.load(vit(1), tmp_path)
    assert torch.equal(other.trimkit.state_dict()["image_1.pre.0.bias"],
                       model.trimkit.state_dict()["image_1.pre.0.bias"])
    assert not torch.equal(other.pos_embed, model.pos_embed)
    with pytest.raises(ValueError, match="weights must be one of"):
        trimkit.save(model, tmp_path, weights="none")
    # a compiled (or DDP-wrapped) model is saved as the model inside
    trimkit.save(torch.compile(model), tmp_path / "compiled")
    assert read_meta(tmp_path / "compiled")["recipe"]["name"] == "smarttrim"
    assert set(load_file(tmp_path / "compiled" / "model.safetensors")) == \
        set(trimkit.tools.persist._base_state(model))


def test_head_pruning_alone_is_saved_as_the_heads_not_how_they_were_ranked(tmp_path):
    model = vit(0)
    data = [(IMAGES[:2],), (IMAGES[1:],)]
    trimkit.apply(model, "prune_heads", ratio=0.5, data=data, layers=[0, 1],
                  loss_fn=lambda out, batch: out.logsumexp(-1).sum())
    with torch.no_grad():
        ref = model(IMAGES)
    trimkit.save(model, tmp_path)
    meta = read_meta(tmp_path)
    assert meta["recipe"] is None and meta["pruned_heads"] == trimkit.pruned_heads(model)
    assert meta["architecture"]["streams"]["image"]["heads"] == [4, 4, 4, 4]
    assert any("pruned_heads" in n for n in meta["notes"])
    loaded = trimkit.load(lambda: vit(1), tmp_path)
    assert not trimkit.is_applied(loaded)
    assert trimkit.pruned_heads(loaded) == trimkit.pruned_heads(model)
    with torch.no_grad():
        assert torch.equal(loaded(IMAGES), ref)


def test_tied_weights_are_written_once(tmp_path):
    model = trimkit.apply(bert(0, cls=BertForMaskedLM), "tome", r=2)
    with torch.no_grad():
        ref = model(**text_batch()).logits
    trimkit.save(model, tmp_path)
    aliases = read_meta(tmp_path)["model"]["aliases"]
    assert aliases["cls.predictions.decoder.weight"] == "bert.embeddings.word_embeddings.weight"
    assert "cls.predictions.decoder.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = trimkit.load(lambda: bert(1, cls=BertForMaskedLM), tmp_path)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        assert torch.equal(loaded(**text_batch()).logits, ref)


# ---------------------------------------------------------------------------- mismatches


@pytest.mark.parametrize("build,message", [
    (lambda: vit(1, depth=3), "stream 'image' has 3 layers, the file says 4"),
    (lambda: vit(1, heads=2), "stream 'image' layer 0 has width 32, the file says 64"),
    (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4,
                               embed_dim=64, depth=4, num_heads=8, num_classes=5),
     "stream 'image' layer 0 has 8 heads, the file says 4"),
    (lambda: bert(1), "'timm-vit' adapter, which does not recognise this BertModel"),
])
def test_wrong_architecture_names_the_mismatch_and_changes_nothing(tmp_path, build, message):
    model = trimkit.apply(vit(0), "tome", r=2)
    trimkit.save(model, tmp_path)
    target = build()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(trimkit.ArchitectureMismatchError, match=message) as err:
        trimkit.load(target, tmp_path)
    assert "nothing was changed" in str(err.value)
    untouched(target)
    same = target.state_dict()
    assert list(same) == list(before) and all(torch.equal(same[k], before[k]) for k in same)


def test_cross_attention_head_counts_are_checked(tmp_path):
    model = trimkit.apply(meter(0), "pumer")
    trimkit.save(model, tmp_path)
    with pytest.raises(trimkit.ArchitectureMismatchError,
                       match="stream 'image' layer 0 has 4 heads, the file says 2"):
        trimkit.load(meter(1, vision_heads=4), tmp_path)


def test_tensors_that_do_not_fit_undo_the_pruning_and_the_recipe(tmp_path):
    """A failure after heads were pruned and the recipe applied puts everything back."""
    model = meter(0)
    trimkit.apply(model, "prune_heads", heads={"image.1": [0], "text.0": [1]})
    trimkit.apply(model, "smarttrim", stable_init=False)
    trimkit.save(model, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["text_transformer.embeddings.word_embeddings.weight"] = torch.zeros(3, 3)
    save_file(weights, str(tmp_path / "model.safetensors"))
    target = meter(1)
    modules = dict(target.named_modules())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(trimkit.SaveFormatError,
                       match=r"shape mismatch for text_transformer.embeddings.word_embeddings"
                             r".weight \(\(3, 3\) in the file.*nothing was changed"):
        trimkit.load(target, tmp_path, verify=False)  # the file was edited on purpose
    untouched(target)
    assert dict(target.named_modules()) == modules
    after = target.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in after)
    assert trimkit.describe(target).streams["image"].layers[1].num_heads == 2


def test_load_needs_an_untrimmed_model(tmp_path):
    model = trimkit.apply(vit(0), "tome", r=2)
    trimkit.save(model, tmp_path)
    with pytest.raises(ValueError, match="already has recipe 'tome' applied"):
        trimkit.load(model, tmp_path)
    pruned = vit(1)
    trimkit.apply(pruned, "prune_heads", heads={"image.0": [0]})
    with pytest.raises(trimkit.ArchitectureMismatchError, match="already has heads pruned"):
        trimkit.load(pruned, tmp_path)


# ---------------------------------------------------------------------------- versions


def _rewrite(path: Path, edit: Callable[[dict], dict]) -> None:
    file = path / "trimkit.json"
    file.write_text(json.dumps(edit(json.loads(file.read_text()))))


def test_a_newer_format_says_to_upgrade(tmp_path):
    trimkit.save(trimkit.apply(vit(0), "tome", r=2), tmp_path)
    _rewrite(tmp_path, lambda m: {**m, "format": 99, "trimkit_version": "9.0"})
    with pytest.raises(trimkit.SaveFormatError,
                       match="file format 99, written by trimkit 9.0; .* reads formats up "
                             f"to {trimkit.tools.persist.FORMAT}: upgrade trimkit"):
        trimkit.load(vit(1), tmp_path)


def test_an_older_format_is_migrated(tmp_path):
    """Format 0: the recipe's name, options and mode at the top level, no architecture
    summary, no ``weights`` field, no tensor index (written by hand here)."""
    model = trimkit.apply(vit(0), "smarttrim", stable_init=False)
    perturb(model)
    with torch.no_grad():
        ref = model(IMAGES)
    trimkit.save(model, tmp_path)
    meta = read_meta(tmp_path)
    (tmp_path / "trimkit.json").write_text(json.dumps({
        "format": 0, "trimkit_version": "0.0.9", "adapter": "timm-vit",
        "recipe": "smarttrim", "options": meta["recipe"]["options"], "mode": "auto"}))
    loaded = trimkit.load(lambda: vit(1), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IMAGES), ref)
    assert any("format 0" in n for n in read_meta(tmp_path)["notes"])


def test_an_older_file_that_cannot_load_says_why(tmp_path):
    trimkit.save(trimkit.apply(vit(0), "tome", r=2), tmp_path)
    meta = read_meta(tmp_path)
    old = {"format": 0, "trimkit_version": "0.0.9", "adapter": "timm-vit", "recipe": "tome",
           "options": {**meta["recipe"]["options"], "ratio": 0.5}}
    (tmp_path / "trimkit.json").write_text(json.dumps(old))
    with pytest.raises(trimkit.SaveFormatError,
                       match="option 'ratio' of recipe 'tome', which this trimkit .* does "
                             "not have \\(the file is from trimkit 0.0.9\\)"):
        trimkit.load(vit(1), tmp_path)
    (tmp_path / "trimkit.json").write_text(json.dumps({**old, "format": -1}))
    with pytest.raises(trimkit.SaveFormatError, match="no migration from format -1"):
        trimkit.load(vit(1), tmp_path)
    (tmp_path / "trimkit.json").write_text(json.dumps({"recipe": "tome"}))
    with pytest.raises(trimkit.SaveFormatError, match="no integer 'format' field"):
        trimkit.load(vit(1), tmp_path)
    with pytest.raises(trimkit.SaveFormatError, match="holds no trimkit.json"):
        trimkit.load(vit(1), tmp_path / "elsewhere")


# ---------------------------------------------------------------------------- options


def test_options_round_trip_through_json():
    value = {("image", 2): (0.5, 1.0), "x": {1, 2}, "y": [float("inf"), None, "s"],
             "z": {"__tuple__": 1}}
    data = encode_option(value)
    assert decode_option(json.loads(json.dumps(data))) == value
    with pytest.raises(TypeError, match="torch.Tensor"):
        encode_option(torch.zeros(2))


def _default_key(state):
    return state.x.norm(dim=-1)


class _KeyedPrune(Recipe):
    """A recipe whose option is a function (here only checked, as a plan would use it)."""

    name = "persist_test_keyed"
    summary = "test recipe"
    options = {"key": Option(_default_key, "a function of the state"),
               "keep": Option(0.5, "fraction kept")}

    def plan(self, desc, options):
        if not callable(options["key"]):
            raise ValueError("key must be callable")
        return {("image", 1): SitePlan(post=[PruneByQueryScore(options["keep"])])}


@pytest.fixture
def keyed_recipe():
    """`_KeyedPrune` registered for one test (other tests list every registered recipe)."""
    trimkit.list_recipes()  # the built-ins first
    saved = dict(RECIPES)
    register_recipe(_KeyedPrune)
    yield
    RECIPES.clear()
    RECIPES.update(saved)


def test_options_that_are_not_json_are_refused_or_omitted_and_given_back(tmp_path,
                                                                        keyed_recipe):
    model = trimkit.apply(vit(0), "persist_test_keyed")  # a function left at its default
    trimkit.save(model, tmp_path / "a")
    assert any("'key'" in n and "default" in n for n in read_meta(tmp_path / "a")["notes"])
    trimkit.load(vit(1), tmp_path / "a")

    model = trimkit.apply(vit(0), "persist_test_keyed", key=lambda s: s.x.sum(-1))
    with pytest.raises(TypeError, match=r"option 'key' .* is a function.*omit=\['key'\]"):
        trimkit.save(model, tmp_path / "b")
    trimkit.save(model, tmp_path / "b", omit=["key"])
    meta = read_meta(tmp_path / "b")
    assert meta["recipe"]["omitted"] == ["key"] and "key" not in meta["recipe"]["options"]
    with pytest.raises(ValueError, match=r"saved without option 'key'.*options=\{'key'"):
        trimkit.load(vit(1), tmp_path / "b")
    loaded = trimkit.load(vit(1), tmp_path / "b", options={"key": _default_key})
    assert trimkit.api._applied(loaded).options["key"] is _default_key
    with pytest.raises(ValueError, match="omit names 'nope'"):
        trimkit.save(model, tmp_path / "c", omit=["nope"])


# ---------------------------------------------------------------------------- Hugging Face


def test_save_pretrained_and_from_pretrained(tmp_path):
    model = trimkit.apply(bert(0), "smarttrim", stable_init=False)
    perturb(model)
    with torch.no_grad():
        ref = model(**text_batch()).last_hidden_state
    trimkit.save_pretrained(model, tmp_path)
    assert {"config.json", "model.safetensors", "trimkit.json",
            "trimmers.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    assert not any(k.startswith("trimkit.") for k in load_file(tmp_path / "model.safetensors"))
    loaded = trimkit.from_pretrained(BertModel, tmp_path)
    assert type(loaded) is BertModel and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(**text_batch()).last_hidden_state, ref)
    # transformers alone loads the base model; trimkit.load reads the directory too
    plain = BertModel.from_pretrained(tmp_path).eval()
    trimkit.remove(loaded)
    same_state(loaded, plain)
    again = trimkit.load(lambda: bert(1), tmp_path)
    with torch.no_grad():
        assert torch.equal(again(**text_batch()).last_hidden_state, ref)


def test_from_pretrained_of_a_head_pruned_model(tmp_path):
    """transformers 5 keeps no record of pruned heads in the config, so its own
    ``from_pretrained`` cannot build the smaller attentions: trimkit builds the model at full
    size from the config, prunes the saved heads and loads the checkpoint into it."""
    model = bert(0, cls=BertForMaskedLM)
    trimkit.apply(model, "prune_heads", heads={"text.0": [1, 2], "text.1": [0]})
    trimkit.apply(model, "tome", r=2)
    with torch.no_grad():
        ref = model(**text_batch()).logits
    trimkit.save_pretrained(model, tmp_path)
    with pytest.raises(RuntimeError):
        BertForMaskedLM.from_pretrained(tmp_path)
    loaded = trimkit.from_pretrained(BertForMaskedLM, tmp_path)
    assert trimkit.pruned_heads(loaded) == {"text.0": [1, 2], "text.1": [0]}
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(**text_batch()).logits, ref)
    factory = trimkit.from_pretrained(lambda: bert(3, cls=BertForMaskedLM), tmp_path)
    with torch.no_grad():
        assert torch.equal(factory(**text_batch()).logits, ref)
    with pytest.raises(TypeError, match="no save_pretrained method"):
        trimkit.save_pretrained(vit(0), tmp_path / "timm")
    trimkit.save(model, tmp_path / "plain")
    with pytest.raises(trimkit.SaveFormatError, match="use trimkit.load"):
        trimkit.from_pretrained(BertForMaskedLM, tmp_path / "plain")


@pytest.mark.parametrize("recipe,options", [("pumer", dict(prune_ratio=0.3)),
                                            ("smarttrim", dict(stable_init=False))])
def test_blip_two_streams_round_trip_through_save_pretrained(tmp_path, recipe, options):
    """BLIP's image tokens only serve as the text encoder's keys there (keys-only layers)."""
    model = trimkit.apply(blip("itm"), recipe, **options)
    if recipe == "smarttrim":
        perturb(model, 0.2)
    x = blip_inputs("itm", batch=3, seq=7, padded=True)
    with torch.no_grad():
        ref = model(*x).itm_score
    trimkit.save_pretrained(model, tmp_path)
    loaded = trimkit.from_pretrained(BlipForImageTextRetrieval, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(*x).itm_score, ref)
    trimkit.remove(model)
    trimkit.remove(loaded)
    same_state(loaded, model)
