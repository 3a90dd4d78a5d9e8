"""Registration: the decorators, and adapters and recipes from other installed packages
through the ``trimkit.adapters`` / ``trimkit.recipes`` entry point groups.

Each test builds a fake installed distribution (a ``*.dist-info`` folder and its module) in
a temporary folder on ``sys.path``, lets trimkit load the entry points again, and restores
the registry afterwards.
"""

from __future__ import annotations

import importlib.metadata
import sys
import warnings
from pathlib import Path

import pytest
import torch

import trimkit
from trimkit import registry
from trimkit.registry import ADAPTERS, RECIPES, RegistrationWarning
from trimkit.tools.cli import main

#: a plugin module: a tiny single-stream model (CLS + patch tokens, pre-norm blocks) and
#: its adapter, decorated or not (``{decorate}``), plus a recipe that merges one token a layer
PLUGIN = '''
import torch
import torch.nn.functional as F
from torch import nn

import trimkit
from trimkit.recipes.tome import ToMe

NOT_AN_ADAPTER = 42


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class PluginNet(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2, depth: int = 2):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))

    def forward(self, patches):
        x = torch.cat([self.cls.expand(patches.shape[0], -1, -1), patches], 1)
        for block in self.blocks:
            x = block(x)
        return x[:, 0]


{decorate}
class PluginAdapter(trimkit.Adapter):
    """A test plugin's model."""

    name = "{name}"

    def detect(self, model):
        return isinstance(model, PluginNet)

    def describe(self, model):
        layers = tuple(trimkit.LayerDesc(block=f"blocks.{{i}}", attention="attn",
                                         num_heads=model.heads, dim=model.dim)
                       for i in range(len(model.blocks)))
        stream = trimkit.StreamDesc("image", layers, num_protected=1)
        return trimkit.ModelDescription("plugin-net", {{"image": stream}})


class MergeOne(ToMe):
    """Merge one token per layer."""

    name = "plugin_merge_one"
    options = {{**ToMe.options, "r": trimkit.Option(1, "tokens merged per layer")}}
'''


def write_dist(root: Path, dist: str, modules: dict[str, str],
               groups: dict[str, dict[str, str]]) -> None:
    """An installed distribution ``dist`` 1.0 under ``root``: ``modules`` (name -> source)
    and the entry points ``groups`` (group -> {name: value})."""
    for name, source in modules.items():
        (root / f"{name}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n"
        for group, eps in groups.items()))


def plugin(name: str = "plugin-net", decorate: bool = True) -> str:
    return PLUGIN.format(name=name, decorate="@trimkit.register_adapter" if decorate else "")


@pytest.fixture
def site_dir(tmp_path, monkeypatch):
    """A folder on ``sys.path`` for fake distributions; the registry, the entry points'
    once-flag and the modules imported from there are restored afterwards."""
    trimkit.list_adapters()  # the built-ins (and any real plugins) are in first, as ever
    adapters, recipes = dict(ADAPTERS), dict(RECIPES)
    origins, clashes = dict(registry._ORIGINS), list(registry._CLASHES)
    modules = set(sys.modules)
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    ADAPTERS.clear()
    ADAPTERS.update(adapters)
    RECIPES.clear()
    RECIPES.update(recipes)
    registry._ORIGINS.clear()
    registry._ORIGINS.update(origins)
    registry._CLASHES[:] = clashes
    for name in set(sys.modules) - modules:
        if name.startswith("fake_trimkit_"):
            del sys.modules[name]


def run_tome(module: str) -> trimkit.ForwardStats:
    """Trim the plugin's model with its own recipe; the per-layer statistics."""
    net = sys.modules[module].PluginNet().eval()
    x = torch.randn(2, 9, 16)
    ref = net(x)
    trimkit.apply(net, "plugin_merge_one")
    with torch.no_grad():
        out = net(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert trimkit.describe(net).family == "plugin-net"
    stats = trimkit.last_stats(net)
    trimkit.remove(net)
    assert torch.equal(net(x), ref)
    return stats


@pytest.mark.parametrize("form", ["module", "class"])
def test_entry_point_adapter_is_listed_and_used(site_dir, form, capsys):
    """An entry point naming a module (registers by decorator) or the class itself."""
    mod = f"fake_trimkit_ok_{form}"
    adapter = mod if form == "module" else f"{mod}:PluginAdapter"
    write_dist(site_dir, "fake-plugin", {mod: plugin(decorate=form == "module")},
               {"trimkit.adapters": {"plugin-net": adapter},
                "trimkit.recipes": {"merge-one": f"{mod}:MergeOne"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RegistrationWarning)
        assert "plugin-net" in trimkit.list_adapters()
    assert "plugin_merge_one" in trimkit.list_recipes()
    assert type(ADAPTERS["plugin-net"]).__module__ == mod
    assert registry.origin("adapter", "plugin-net") == "fake-plugin 1.0"
    assert registry.origin("recipe", "plugin_merge_one") == "fake-plugin 1.0"
    assert registry.origin("adapter", "timm-vit") == "built-in"

    stats = run_tome(mod)
    assert [(s.stream, int(s.tokens_in[0]), int(s.tokens_out[0])) for s in stats.layers] == \
        [("image", 10, 9), ("image", 9, 8)]

    assert main(["adapters"]) == 0
    out = capsys.readouterr().out
    assert "plugin-net: A test plugin's model. [from fake-plugin 1.0]" in out
    assert "timm-vit:" in out and "timm-vit: [from" not in out


def test_entry_points_load_once_per_process(site_dir, monkeypatch):
    calls = []
    real = importlib.metadata.entry_points

    def counting(**kw):
        calls.append(kw["group"])
        return real(**kw)

    monkeypatch.setattr(registry.importlib.metadata, "entry_points", counting)
    trimkit.list_adapters()
    trimkit.list_recipes()
    trimkit.find_adapter(torch.nn.Linear(2, 2), "timm-vit")
    assert calls == ["trimkit.adapters", "trimkit.recipes"]


def test_broken_entry_points_warn_and_the_rest_works(site_dir):
    """Each broken entry point warns with its name, its distribution and the error; the
    good one beside them loads, and trimkit works."""
    good = "fake_trimkit_good"
    write_dist(site_dir, "fake-broken", {
        good: plugin(),
        "fake_trimkit_boom": "raise RuntimeError('boom at import')\n",
        "fake_trimkit_empty": "X = 1\n",
    }, {
        "trimkit.adapters": {
            "missing": "fake_trimkit_not_there",
            "boom": "fake_trimkit_boom",
            "wrong-object": f"{good}:NOT_AN_ADAPTER",
            "no-attr": f"{good}:Nope",
            "empty": "fake_trimkit_empty",
            "a-recipe": f"{good}:MergeOne",
            "good": good,
        },
        "trimkit.recipes": {"an-adapter": f"{good}:PluginAdapter"},
    })
    with pytest.warns(RegistrationWarning) as record:
        names = trimkit.list_adapters()
    assert "plugin-net" in names and "timm-vit" in names
    messages = [str(w.message) for w in record]
    expected = {
        "missing": "ModuleNotFoundError",
        "boom": "RuntimeError: boom at import",
        "wrong-object": "42",
        "no-attr": "AttributeError",
        "empty": "registered no adapter",
        "a-recipe": "not a module nor a subclass of trimkit.Adapter",
        "an-adapter": "not a module nor a subclass of trimkit.Recipe",
    }
    for ep, error in expected.items():
        hits = [m for m in messages if f"entry point {ep} = " in m]
        assert len(hits) == 1, (ep, messages)
        assert "fake-broken 1.0" in hits[0] and error in hits[0], hits[0]
    assert len(messages) == len(expected), messages
    assert "plugin_merge_one" not in trimkit.list_recipes()  # only offered as an adapter
    RECIPES["plugin_merge_one"] = sys.modules[good].MergeOne()
    assert run_tome(good).layers[0].tokens_out[0] == 9


def test_clash_warns_and_keeps_the_builtin(site_dir):
    """A plugin taking a built-in's name loses to it; between plugins, the first wins."""
    write_dist(site_dir, "fake-clash", {
        "fake_trimkit_clash": plugin(name="timm-vit", decorate=False),
        "fake_trimkit_first": plugin(name="shared-name", decorate=False),
        "fake_trimkit_second": plugin(name="shared-name", decorate=False),
    }, {"trimkit.adapters": {"timm-vit": "fake_trimkit_clash:PluginAdapter",
                             "first": "fake_trimkit_first:PluginAdapter",
                             "second": "fake_trimkit_second:PluginAdapter"}})
    with pytest.warns(RegistrationWarning) as record:
        trimkit.list_adapters()
    messages = [str(w.message) for w in record]
    assert len(messages) == 2, messages
    assert "'timm-vit' is taken by trimkit.adapters.timm_vit.TimmViTAdapter" in messages[0]
    assert "fake_trimkit_clash.PluginAdapter is not registered" in messages[0]
    assert "'shared-name' is taken by fake_trimkit_first.PluginAdapter (from fake-clash 1.0)" \
        in messages[1]
    assert type(ADAPTERS["timm-vit"]).__module__ == "trimkit.adapters.timm_vit"
    assert registry.origin("adapter", "timm-vit") == "built-in"
    assert type(ADAPTERS["shared-name"]).__module__ == "fake_trimkit_first"


def make_adapter_class(name: str, module: str = __name__) -> type:
    """A fresh `Adapter` subclass called ``name``, as if defined in ``module``."""
    cls = type("ExampleAdapter", (trimkit.Adapter,), {"name": name, "__module__": module,
                                                      "detect": lambda self, model: False})
    return cls


def test_register_adapter_same_class_is_silent_another_warns(site_dir):
    first = make_adapter_class("example")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trimkit.register_adapter(first) is first
        trimkit.register_adapter(first)
    kept = ADAPTERS["example"]
    other = make_adapter_class("example", module="somewhere_else")
    with pytest.warns(RegistrationWarning, match="'example' is taken by"):
        assert trimkit.register_adapter(other) is other
    assert ADAPTERS["example"] is kept


def test_a_redefined_class_replaces_its_earlier_definition(site_dir):
    """The same module and qualified name (a notebook cell run again) is not a clash."""
    first, again = make_adapter_class("example"), make_adapter_class("example")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trimkit.register_adapter(first)
        trimkit.register_adapter(again)
    assert type(ADAPTERS["example"]) is again


def test_a_builtin_wins_over_an_earlier_third_party_class(site_dir):
    third = make_adapter_class("late-builtin", module="someone.plugin")
    builtin = make_adapter_class("late-builtin", module="trimkit.adapters.late")
    trimkit.register_adapter(third)
    with pytest.warns(RegistrationWarning, match="taken by trimkit.adapters.late"):
        trimkit.register_adapter(builtin)
    assert type(ADAPTERS["late-builtin"]) is builtin
    assert registry.origin("adapter", "late-builtin") == "built-in"


def test_register_rejects_what_it_cannot_register():
    with pytest.raises(TypeError, match="subclass of trimkit.Adapter"):
        trimkit.register_adapter(type("NotAnAdapter", (), {"name": "x"}))
    with pytest.raises(ValueError, match="non-empty string `name`"):
        trimkit.register_adapter(type("Nameless", (trimkit.Adapter,), {}))
    with pytest.raises(TypeError, match="subclass of trimkit.Recipe"):
        trimkit.register_recipe(make_adapter_class("x"))
