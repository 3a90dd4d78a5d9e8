"""What trimkit guarantees under faults and bad input (docs/guarantees.md), one reproducer
per case: atomic saves, checksums, load and resume errors that name the file and the field,
training that stops at the first non-finite loss or gradient, recipe options checked before
anything is touched, trimmers that follow the model's dtype, empty batches, and command-line
errors without a traceback."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertModel

import trimkit
import trimkit.tools.objectives
import trimkit.tools.persist
from trimkit import CheckpointError, NonFiniteLossError
from trimkit.recipe import Option
from trimkit.registry import RECIPES
from trimkit.tools.persist import read_meta


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                             patch_size=4, embed_dim=64, depth=4, num_heads=4,
                             num_classes=5).eval()


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=32,
                                max_position_embeddings=24, attn_implementation="sdpa")).eval()


IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def trimmed(seed: int) -> nn.Module:
    """A smarttrim ViT whose weights and trimmers depend on ``seed``."""
    model = trimkit.apply(vit(), "smarttrim", stable_init=False)
    perturb(model, seed)
    return model


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IMAGES)


def staging_left(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".trimkit-" in p.name]


# ---------------------------------------------------------------------------- atomic saves


class DiskFull:
    """Make the ``fail``-th file write (0-based, over the safetensors writer and the JSON
    writer) write half its bytes and raise ``OSError(28)``, as a full disk does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: int):
        self.fail, self.calls = fail, 0
        real_tensors, real_text = trimkit.tools.persist.save_file, trimkit.tools.persist._write_text

        def tensors(state, file, *a, **kw):
            self._write(lambda: real_tensors(state, file, *a, **kw), Path(file))

        def text(file, data):
            self._write(lambda: real_text(file, data), Path(file))

        monkeypatch.setattr(trimkit.tools.persist, "save_file", tensors)
        monkeypatch.setattr(trimkit.tools.persist, "_write_text", text)

    def _write(self, write, file: Path) -> None:
        n, self.calls = self.calls, self.calls + 1
        write()
        if n == self.fail:
            data = file.read_bytes()
            file.write_bytes(data[:len(data) // 2])
            raise OSError(28, "No space left on device")


@pytest.mark.parametrize("fail", [0, 1, 2], ids=["trimmers", "model", "trimkit.json"])
def test_a_save_that_fails_at_any_file_leaves_the_old_save_whole(tmp_path, monkeypatch, fail):
    target = tmp_path / "run"
    old = trimmed(1)
    trimkit.save(old, target)
    (target / "tokenizer.json").write_text("{}")  # not trimkit's: must survive every save
    with monkeypatch.context() as m:
        disk = DiskFull(m, fail)
        with pytest.raises(OSError, match="No space left"):
            trimkit.save(trimmed(2), target)
        assert disk.calls == fail + 1
    assert staging_left(tmp_path) == []
    assert torch.equal(outputs(trimkit.load(vit, target).eval()), outputs(old))
    assert (target / "tokenizer.json").read_text() == "{}"
    new = trimmed(2)
    trimkit.save(new, target)  # and the next save goes through
    assert torch.equal(outputs(trimkit.load(vit, target).eval()), outputs(new))
    assert (target / "tokenizer.json").read_text() == "{}"
    assert staging_left(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_a_save_that_fails_at_the_swap_leaves_the_old_save_whole(tmp_path, monkeypatch,
                                                                 exchange):
    target = tmp_path / "run"
    old = trimmed(1)
    trimkit.save(old, target)

    def fail(*args):
        raise OSError(28, "No space left on device")

    if exchange:
        monkeypatch.setattr(trimkit.tools.persist, "_exchange", fail)
    else:  # a system without an atomic swap: the old folder goes aside, the new one fails
        monkeypatch.setattr(trimkit.tools.persist, "_exchange", lambda a, b: False)
        real = trimkit.tools.persist.os.rename
        calls = []

        def rename(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                fail()
            real(src, dst)

        monkeypatch.setattr(trimkit.tools.persist.os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        trimkit.save(trimmed(2), target)
    monkeypatch.undo()
    assert staging_left(tmp_path) == []
    assert torch.equal(outputs(trimkit.load(vit, target).eval()), outputs(old))


def test_save_without_an_atomic_swap_still_replaces_the_old_save(tmp_path, monkeypatch):
    monkeypatch.setattr(trimkit.tools.persist, "_exchange", lambda a, b: False)
    trimkit.save(trimmed(1), tmp_path / "run")
    new = trimmed(2)
    trimkit.save(new, tmp_path / "run")
    assert torch.equal(outputs(trimkit.load(vit, tmp_path / "run").eval()), outputs(new))
    assert staging_left(tmp_path) == []


def test_save_pretrained_that_fails_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    target = tmp_path / "bert"
    batch = dict(input_ids=torch.randint(3, 38, (2, 7), generator=torch.Generator()
                                         .manual_seed(0)))
    old = trimkit.apply(bert(1), "tome", r=1)
    trimkit.save_pretrained(old, target)
    with torch.no_grad():
        ref = old(**batch).last_hidden_state
    new = trimkit.apply(bert(2), "tome", r=1)
    real = new.save_pretrained

    def crash_after_writing(directory, **kw):  # the model's own files, then the disk fills
        real(directory, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(new, "save_pretrained", crash_after_writing)
    with pytest.raises(OSError, match="No space left"):
        trimkit.save_pretrained(new, target)
    with monkeypatch.context() as m:
        DiskFull(m, 0)  # trimkit's own files, after the model's
        with pytest.raises(OSError, match="No space left"):
            trimkit.save_pretrained(trimkit.apply(bert(3), "tome", r=1), target)
    assert staging_left(tmp_path) == []
    loaded = trimkit.from_pretrained(BertModel, target).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, ref)


# ---------------------------------------------------------------------------- checksums


def flip_a_byte(file: Path) -> None:
    """Corrupt one byte of a safetensors file's data, leaving its header intact."""
    data = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[(start + len(data)) // 2] ^= 0x10
    file.write_bytes(bytes(data))


def test_a_corrupted_tensor_file_is_refused_naming_it(tmp_path):
    model = trimmed(1)
    trimkit.save(model, tmp_path)
    meta = read_meta(tmp_path)
    assert set(meta["sha256"]) == {"model.safetensors", "trimmers.safetensors"}
    flip_a_byte(tmp_path / "model.safetensors")
    fresh = vit(5)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(trimkit.SaveFormatError,
                       match=r"model\.safetensors is corrupted: its sha256 .*verify=False"):
        trimkit.load(fresh, tmp_path)
    assert not trimkit.is_applied(fresh)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
    # verify=False skips the check: the flipped value loads, so the outputs differ
    loaded = trimkit.load(vit, tmp_path, verify=False).eval()
    assert not torch.equal(outputs(loaded), outputs(model))


def test_a_checkpoint_from_hugging_face_style_saves_is_checked_too(tmp_path):
    trimkit.save_pretrained(trimkit.apply(bert(1), "tome", r=1), tmp_path)
    assert "model.safetensors" in read_meta(tmp_path)["sha256"]
    flip_a_byte(tmp_path / "model.safetensors")
    with pytest.raises(trimkit.SaveFormatError, match=r"model\.safetensors is corrupted"):
        trimkit.from_pretrained(BertModel, tmp_path)


def test_a_format_1_save_without_checksums_still_loads(tmp_path):
    model = trimmed(1)
    trimkit.save(model, tmp_path)
    meta = json.loads((tmp_path / "trimkit.json").read_text())
    del meta["sha256"]
    (tmp_path / "trimkit.json").write_text(json.dumps({**meta, "format": 1}))
    assert torch.equal(outputs(trimkit.load(vit, tmp_path).eval()), outputs(model))
    assert any("format 1" in n for n in read_meta(tmp_path)["notes"])


# ---------------------------------------------------------------------------- load errors


def rewrite(path: Path, edit) -> None:
    file = path / "trimkit.json"
    meta = json.loads(file.read_text())
    edit(meta)
    file.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["architecture"]["streams"]["image"].update(dims=[64, 64]),
     r"'architecture\.streams\.image\.dims' must be a list of 4 ints"),
    (lambda m: m["architecture"]["streams"]["image"].update(layers="4"),
     r"'architecture\.streams\.image\.layers' must be a number of layers"),
    (lambda m: m.update(pruned_heads={"image.1": 3}),
     r"'pruned_heads\.image\.1' must be a list of head indices, got 3"),
    (lambda m: m.update(pruned_heads=3), r"'pruned_heads' must be an object"),
    (lambda m: m["recipe"].update(omitted="ratio"), r"'recipe\.omitted' must be a list"),
    (lambda m: m.update(sha256={"model.safetensors": 7}), r"'sha256' must map file names"),
])
def test_a_hand_edited_trimkit_json_names_the_file_and_the_field(tmp_path, edit, match):
    trimkit.save(trimkit.apply(vit(), "tome", r=2), tmp_path)
    rewrite(tmp_path, edit)
    fresh = vit(1)
    with pytest.raises(trimkit.SaveFormatError, match=r"trimkit\.json: " + match):
        trimkit.load(fresh, tmp_path)
    assert not trimkit.is_applied(fresh)


def test_pruned_heads_that_do_not_fit_name_the_field(tmp_path):
    trimkit.save(trimkit.apply(vit(), "tome", r=2), tmp_path)
    rewrite(tmp_path, lambda m: m.update(pruned_heads={"image.9": [0]}))
    fresh = vit(1)
    with pytest.raises(trimkit.ArchitectureMismatchError,
                       match=r"trimkit\.json: 'pruned_heads' do not fit this model.*nothing "
                             r"was changed"):
        trimkit.load(fresh, tmp_path)
    assert not trimkit.is_applied(fresh) and not trimkit.pruned_heads(fresh)


# ---------------------------------------------------------------------------- training


def regression(nan_batch: int | None = None) -> TensorDataset:
    """24 samples (6 batches of 4, in order); ``nan_batch`` holds a NaN input."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=g)
    y = x @ torch.randn(4, 2, generator=g)
    if nan_batch is not None:
        x[4 * nan_batch + 1, 2] = math.nan
    return TensorDataset(x, y)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


def mse(out: torch.Tensor, batch) -> torch.Tensor:
    return F.mse_loss(out, batch[-1])


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


QUIET = dict(progress=False, seed=0, lr=1e-2)


def test_a_nan_batch_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    model = mlp()
    with pytest.raises(NonFiniteLossError,
                       match=r"the loss is not finite at step 3: loss \(the task loss\) = nan"
                             r".*the last checkpoint, .*step_3, is intact") as err:
        trimkit.train(model, DataLoader(regression(nan_batch=3), batch_size=4), mse, epochs=1,
                      checkpoint_dir=tmp_path, save_every=1, **QUIET)
    assert err.value.step == 3 and math.isnan(err.value.terms["loss"])
    assert err.value.checkpoint == tmp_path / "step_3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_2", "step_3"]
    assert torch.isfinite(flat(model)).all()
    # the model holds the last good step, which is the intact checkpoint's
    saved = load_file(tmp_path / "step_3" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    # and that checkpoint resumes
    resumed = trimkit.train(mlp(), DataLoader(regression(), batch_size=4), mse, epochs=1,
                            checkpoint_dir=tmp_path, resume=True, **QUIET)
    assert resumed.step == 6


def test_skipping_nan_batches_trains_on_the_others():
    model = mlp()
    res = trimkit.train(model, DataLoader(regression(nan_batch=3), batch_size=4), mse,
                        epochs=1, on_nonfinite="skip", **QUIET)
    assert res.skipped == [3] and res.step == 6
    assert torch.isfinite(flat(model)).all()
    assert all(math.isfinite(h["loss"]) for h in res.history if "loss" in h)
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        trimkit.train(mlp(), DataLoader(regression(), batch_size=4), mse,
                      on_nonfinite="ignore", **QUIET)


def test_a_non_finite_gradient_stops_training_naming_the_parameter():
    model = mlp()
    model[0].weight.register_hook(lambda g: g * math.inf)
    before = flat(model).clone()
    with pytest.raises(NonFiniteLossError,
                       match=r"the gradient is not finite at step 0, in 0\.weight, while the "
                             r"loss and its terms are finite \(loss = "):
        trimkit.train(model, DataLoader(regression(), batch_size=4), mse, steps=2, **QUIET)
    assert torch.equal(flat(model), before)


def _nan(*args, **kwargs) -> torch.Tensor:
    return torch.tensor(math.nan, requires_grad=True)


@pytest.mark.parametrize("part, patch, match", [
    ("task", None, r"task \(the trimmed pass's task loss\) = nan"),
    ("sd", "distillation_loss", r"sd \(the self-distillation KL\) = nan"),
    ("cost", "cost_loss", r"cost \(the cost loss\) = nan"),
])
def test_smarttrim_training_names_the_part_of_the_loss_that_went_non_finite(
        monkeypatch, part, patch, match):
    model = trimkit.apply(vit(), "smarttrim")
    data = TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)))

    def loss_fn(out, batch):
        task = F.cross_entropy(out, batch[-1])
        return task * math.nan if part == "task" else task

    if patch is not None:
        monkeypatch.setattr(trimkit.tools.objectives, patch, _nan)
    with pytest.raises(NonFiniteLossError, match=r"at step 0: .*" + match) as err:
        trimkit.train(model, DataLoader(data, batch_size=4), loss_fn, steps=1, **QUIET)
    assert part in err.value.terms
    assert all(math.isfinite(v) or k in ("task", "full", "sd", "cost", "loss")
               for k, v in err.value.terms.items())


# ---------------------------------------------------------------------------- resume errors


def test_resuming_an_empty_trainer_state_names_the_file_and_the_field(tmp_path):
    trimkit.train(mlp(), DataLoader(regression(), batch_size=4), mse, steps=1,
                  checkpoint_dir=tmp_path, **QUIET)
    (tmp_path / "step_1" / "trainer_state.json").write_text("{}")
    model = mlp()
    before = flat(model).clone()
    with pytest.raises(CheckpointError,
                       match=r"step_1/trainer_state\.json: field 'step' is missing"):
        trimkit.train(model, DataLoader(regression(), batch_size=4), mse, steps=2,
                      checkpoint_dir=tmp_path, resume=True, **QUIET)
    (tmp_path / "step_1" / "trainer_state.json").write_text(
        json.dumps({"step": 1, "epoch": 0, "position": 1, "data_seed": "x"}))
    with pytest.raises(CheckpointError, match=r"field 'data_seed' must be an int >= 0"):
        trimkit.train(model, DataLoader(regression(), batch_size=4), mse, steps=2,
                      checkpoint_dir=tmp_path, resume=True, **QUIET)
    assert torch.equal(flat(model), before)


@pytest.mark.parametrize("legacy", [False, True], ids=["recipe-field", "no-recipe-field"])
def test_resuming_a_smarttrim_checkpoint_into_a_tome_model_is_refused(tmp_path, legacy):
    data = TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)))

    def loss_fn(out, batch):
        return F.cross_entropy(out, batch[-1])

    trimkit.train(trimkit.apply(vit(), "smarttrim"), DataLoader(data, batch_size=4), loss_fn,
                  steps=1, checkpoint_dir=tmp_path, **QUIET)
    state = tmp_path / "step_1" / "trainer_state.json"
    meta = json.loads(state.read_text())
    assert meta["recipe"] == "smarttrim"
    if legacy:  # a checkpoint from before the field: its weights' names say it
        del meta["recipe"]
        state.write_text(json.dumps(meta))
    model = trimkit.apply(vit(1), "tome", r=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    match = (r"model\.safetensors does not fit this model \(unexpected trimkit\." if legacy
             else r"saved from a model with recipe 'smarttrim' \(field 'recipe' of .*"
                  r"trainer_state\.json\); this model has recipe 'tome'")
    with pytest.raises(CheckpointError, match=match):
        trimkit.train(model, DataLoader(data, batch_size=4), loss_fn, steps=2,
                      checkpoint_dir=tmp_path, resume=True, **QUIET)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------- options


def snapshot(model: nn.Module) -> tuple[dict, set]:
    return {k: v.clone() for k, v in model.state_dict().items()}, set(model.__dict__)


def assert_untouched(model: nn.Module, snap: tuple[dict, set]) -> None:
    state, attrs = snap
    assert not trimkit.is_applied(model) and "trimkit" not in model._modules
    assert set(model.__dict__) == attrs
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("options, match", [
    (dict(layers={"bogus": [1]}), r"layers names stream 'bogus', which this 'timm-vit' "
                                  r"model does not have; its streams are \['image'\]"),
    (dict(init_logit=math.nan), r"init_logit must be a finite number, got nan"),
    (dict(tau=math.nan), r"tau must be a finite number > 0, got nan"),
    (dict(span=math.inf), r"span must be a finite number > 0 or None, got inf"),
    (dict(hidden=0), r"hidden must be an int >= 1 or None, got 0"),
    (dict(rank=2.5), r"rank must be an int >= 1 or None, got 2\.5"),
    (dict(budget={("bogus", 1): 0.5}), r"budget has the key \('bogus', 1\)"),
    (dict(stable_init="yes"), r"stable_init must be True or False"),
    (dict(lambda_cost=-1.0), r"lambda_cost must be a finite number >= 0"),
    (dict(warmup=1.5), r"warmup must be a number in \[0, 1\]"),
])
def test_smarttrim_refuses_bad_options_before_touching_the_model(options, match):
    model = vit()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        trimkit.apply(model, "smarttrim", **options)
    assert_untouched(model, snap)


BUILTIN = ("attn_prune", "prune_heads", "pumer", "smarttrim", "tome")


def test_every_builtin_option_declares_what_it_takes():
    trimkit.list_recipes()
    for recipe in BUILTIN:
        for name, option in RECIPES[recipe].options.items():
            assert option.kind is not None or option.choices, f"{recipe}.{name}"
            assert option.check(name, option.default) == option.default  # defaults fit


@pytest.mark.parametrize("recipe", BUILTIN)
def test_every_option_refuses_a_wrong_type_and_non_finite_numbers_by_name(recipe):
    trimkit.list_recipes()
    model = vit()
    snap = snapshot(model)
    for name, option in RECIPES[recipe].options.items():
        bad = [object()]
        kinds = option.kind if isinstance(option.kind, tuple) else (option.kind,)
        if float in kinds:
            bad += [math.nan, math.inf, -math.inf]
        for value in bad:
            with pytest.raises(ValueError, match=rf"^{name} must be .*, got "):
                trimkit.apply(model, recipe, **{name: value})
            assert_untouched(model, snap)


def test_an_option_declaration_checks_in_one_place():
    ratio = Option(0.5, "kept", kind=float, low=0, high=1, low_open=True)
    assert ratio.check("ratio", 1) == 1.0 and isinstance(ratio.check("ratio", 1), float)
    assert ratio.describe() == "a number in (0, 1]"
    for bad in (0, 1.5, True, "0.5", math.nan, None):
        with pytest.raises(ValueError, match=r"ratio must be a number in \(0, 1\], got"):
            ratio.check("ratio", bad)
    mode = Option("a", "mode", choices=("a", "b", "c"))
    with pytest.raises(ValueError, match=r"mode must be one of 'a', 'b' or 'c', got 'd'"):
        mode.check("mode", "d")
    anything = Option(None, "undeclared: anything finite")
    assert anything.check("x", [1, "a"]) == [1, "a"]
    with pytest.raises(ValueError, match="x must be a finite value"):
        anything.check("x", math.nan)


# ---------------------------------------------------------------------------- dtype, batch 0


@pytest.mark.parametrize("recipe", ["smarttrim", "tome", "attn_prune"])
def test_trimmers_follow_the_models_dtype_at_apply(recipe):
    model = trimkit.apply(vit().bfloat16(), recipe)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = model(IMAGES.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    model.double()  # and casts after apply, as every submodule does
    assert {p.dtype for p in model.trimkit.parameters()} <= {torch.float64}
    with torch.no_grad():
        assert model(IMAGES.double()).dtype == torch.float64


EMPTY = [("tome", {}), ("attn_prune", {}), ("pumer", {}), ("smarttrim", {}),
         ("smarttrim", dict(budget=0.5, heads=False)),
         ("prune_heads", dict(heads={"image.0": [1]}))]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("recipe, options", EMPTY, ids=[f"{r}{'-' if o else ''}{'-'.join(o)}"
                                                         for r, o in EMPTY])
def test_an_empty_batch_runs_with_every_recipe(recipe, options, training):
    model = trimkit.apply(vit(), recipe, **options).train(training)
    out = model(torch.randn(0, 3, 32, 32))
    assert out.shape == (0, 5)



# ---------------------------------------------------------------------------- command line

TINY = "timm:vit_tiny_patch16_224?img_size=32&depth=1"
FAST = ["--batch-size", "1", "--repeats", "1", "--warmup", "0", "--no-memory", "--no-resize",
        "--json"]
BENCH = ["bench", "--model", TINY, "--recipe", "tome", "--r", "1"]


@pytest.mark.parametrize("argv, match", [
    ([*BENCH, *FAST, "--threads", "-1"], r"threads must be an int >= 1"),
    ([*BENCH, *FAST, "--threads", "0"], r"threads must be an int >= 1"),
    ([*BENCH, *FAST, "--compile", "bogusmode"], r"compile mode must be one of default, "),
    ([*BENCH, *FAST, "--device", "bogus"], r"device must be 'cpu', 'cuda' or 'cuda:N'"),
    ([*BENCH, *FAST, "--device", "cuda:99"], r"device 'cuda:99': "),
    ([*BENCH, *FAST, "--batch-size", "0"], r"--batch-size and --repeats must be >= 1"),
    ([*BENCH, *FAST, "--repeats", "0"], r"--batch-size and --repeats must be >= 1"),
    ([*BENCH, *FAST, "--warmup", "-1"], r"--warmup >= 0"),
    ([*BENCH, "--batch-size", "abc"], r"argument --batch-size: invalid int value: 'abc' "
                                      r"\(see trimkit bench --help\)"),
    ([*BENCH, *FAST, "stray"], r"unexpected argument 'stray'"),
    (["bench", "--model", "nospec", "--recipe", "tome", *FAST], r"model spec must look like"),
    (["bench", "--model", "nosuch:thing", "--recipe", "tome", *FAST], r"unknown model kind"),
    (["bench", "--model", TINY, "--recipe", "nope", *FAST], r"unknown recipe 'nope'"),
    (["bench", "--model", TINY, "--recipe", "tome", "--r", "nan", *FAST],
     r"r must be an int >= 0 or a list of them, got nan"),
    (["bench", "--model", TINY, "--recipe", "tome", "--frobnicate", "1", *FAST],
     r"recipe 'tome' has no option 'frobnicate'"),
    (["stats", "--model", TINY, "--recipe", "tome", "--batch-size", "0"],
     r"--batch-size must be >= 1"),
    (["stats", "--model", TINY, "--recipe", "tome", "--device", "bogus"], r"device must be"),
    (["stats", "--model", TINY, "--recipe", "smarttrim", "--layers", '{"bogus": [1]}'],
     r"layers names stream 'bogus'"),
    (["recipes", "--extra"], r"unrecognized arguments: --extra"),
    (["frobnicate"], r"argument COMMAND: invalid choice: 'frobnicate'"),
])
def test_every_command_line_error_is_one_line_with_status_2(capsys, argv, match):
    from trimkit.tools.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    assert re.search(match, err), err


def test_an_unexpected_failure_is_one_line_too(capsys, monkeypatch):
    from trimkit.tools import bench
    from trimkit.tools.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("something inside\nbroke")

    monkeypatch.setattr(bench, "benchmark", broken)
    monkeypatch.delenv("TRIMKIT_TRACEBACK", raising=False)
    assert main([*BENCH, *FAST]) == 1
    err = capsys.readouterr().err
    assert err == ("error: RuntimeError: something inside broke (TRIMKIT_TRACEBACK=1 shows "
                   "where)\n")
    monkeypatch.setenv("TRIMKIT_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="something inside"):
        main([*BENCH, *FAST])


def test_the_installed_command_prints_no_traceback():
    out = subprocess.run([sys.executable, "-m", "trimkit.tools.cli", *BENCH, *FAST, "--threads",
                          "-1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: threads must be an int >= 1 (or None: torch's default), got -1"]
