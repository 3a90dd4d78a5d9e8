"""The ``trimkit`` command and the benchmark helpers, on a tiny ViT (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from trimkit.api import list_recipes
from trimkit.tools.bench import (
    build_model,
    format_table,
    parse_spec,
    parse_value,
    probe_in_subprocess,
)
from trimkit.tools.cli import main, parse_overrides

TINY = "timm:vit_tiny_patch16_224?img_size=64&depth=2"


def test_parse_value():
    assert parse_value("13") == 13 and isinstance(parse_value("13"), int)
    assert parse_value("0.5") == 0.5
    assert parse_value("true") is True and parse_value("False") is False
    assert parse_value("none") is None
    assert parse_value("3,6,9") == [3, 6, 9]
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("decreasing") == "decreasing"


def test_parse_overrides():
    got = parse_overrides(["--r", "13", "--keep-ratio=0.5", "--layers", "3,6,9", "--fuse",
                           "--stream", "image", "--neg", "-1"])
    assert got == {"r": 13, "keep_ratio": 0.5, "layers": [3, 6, 9], "fuse": True,
                   "stream": "image", "neg": -1}


def test_parse_spec_and_build():
    assert parse_spec(TINY) == ("timm", "vit_tiny_patch16_224", {"img_size": 64, "depth": 2})
    model, make_inputs = build_model(TINY)
    assert not model.training and len(model.blocks) == 2
    (x,) = make_inputs(3)
    assert x.shape == (3, 3, 64, 64)
    with pytest.raises(ValueError, match="nosuch"):
        build_model("nosuch:thing")


def test_bench_json(capsys):
    code = main(["bench", "--model", TINY, "--recipe", "tome", "--r", "2", "--batch-size", "2",
                 "--repeats", "1", "--warmup", "0", "--json", "--no-memory"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1
    row = rows[0]
    assert row["batch_size"] == 2 and row["options"] == {"r": 2} and row["recipe"] == "tome"
    assert row["flops_ratio"] > 1
    assert row["gflops_base"] > row["gflops_trim"] > 0
    assert row["ips_base"] > 0 and row["ips_trim"] > 0
    assert row["mem_base_mb"] is None
    assert "efficiency" in row and "speedup" in row


def test_bench_table(capsys):
    code = main(["bench", "--model", TINY, "--recipe", "attn_prune", "--keep-ratio", "0.5",
                 "--layers", "0,1", "--batch-size", "1", "2", "--repeats", "1", "--warmup", "0",
                 "--no-memory", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "attn_prune" in lines[0] and "keep_ratio" in lines[0]
    assert "FLOPs ratio" in lines[1] and "speedup" in lines[1]
    assert len(lines) == 4
    assert format_table([]) == "(no rows)"


def test_unknown_recipe_option(capsys):
    code = main(["bench", "--model", TINY, "--recipe", "tome", "--r", "2", "--bogus-knob", "3",
                 "--batch-size", "1", "--no-memory"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "bogus_knob" in err
    assert "Traceback" not in err


def test_bad_option_value_and_recipe(capsys):
    assert main(["bench", "--model", TINY, "--recipe", "tome", "--r", "100", "--strict", "true",
                 "--no-memory"]) == 2
    assert "r=100" in capsys.readouterr().err
    assert main(["bench", "--model", TINY, "--recipe", "nope", "--no-memory"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err
    assert main(["bench", "--model", "bogus", "--recipe", "tome", "--no-memory"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["bench", "stats"])
def test_recipe_is_required(capsys, command):
    """The engine favours no recipe, and neither does the command: without --recipe it says
    which recipes there are, before building anything."""
    assert main([command, "--model", TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --recipe NAME is required")
    assert all(name in err for name in list_recipes())
    assert "Traceback" not in err


def test_recipes_and_adapters(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "tome:" in out and "attn_prune:" in out
    assert "--keep-ratio (default 0.7)" in out and "--r (default 8)" in out
    assert main(["adapters"]) == 0
    assert "timm-vit" in capsys.readouterr().out


@pytest.mark.parametrize("command", [[], ["bench"], ["stats"], ["recipes"], ["adapters"],
                                     ["demo"], ["bench-vqa"], ["bench-minilm"]])
def test_help_has_examples(capsys, command):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "example" in out and f"trimkit {' '.join(command)}".strip() in out


def test_usage_errors(capsys):
    assert main([]) == 2
    assert main(["recipes", "--extra"]) == 2
    assert main(["bench", "--model", TINY, "--recipe", "tome", "--batch-size", "0"]) == 2
    assert main(["bench", "--model", TINY, "--recipe", "tome", "stray"]) == 2
    capsys.readouterr()


def test_memory_probe_positive():
    peak = probe_in_subprocess(TINY, "tome", {"r": 2}, batch_size=8, threads=1)
    assert peak > 0


def test_registered_commands_appear_in_the_cli(capsys):
    """Commands shipped beside the engine register themselves: bench-vqa has its help."""
    assert main(["bench-vqa", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--targets" in out and "--baseline-epochs" in out and "meter-base" in out
    assert main(["bench-vqa", "--bogus"]) == 2


def test_stats_per_layer(capsys):
    """`trimkit stats` runs one trimmed forward: per-layer live tokens follow the recipe (PuMer
    on a tiny METER: 16 patches + CLS pruned and merged at fusion layers 0 and 1)."""
    assert main(["stats", "--model", "meter-tiny", "--recipe", "pumer", "--batch-size", "2",
                 "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["batch_size"] == 2 and stats["gflops_trim"] < stats["gflops_base"]
    rows = {(r["stream"], r["layer"]): r for r in stats["layers"]}
    n = 16
    for layer in (2, 3):  # the image stream's fusion layers (after the 2-block tower)
        kept = max(n - round(0.2 * n), 1)
        n = kept - min(round(0.2 * n), kept // 2)
        assert rows[("image", layer)]["tokens_in"] == n + 1
    assert main(["stats", "--model", "meter-tiny", "--recipe", "pumer"]) == 0
    out = capsys.readouterr().out
    assert "tokens in" in out and "FLOPs ratio" in out
    assert main(["stats", "--model", "meter-tiny", "--recipe", "pumer", "--layers", "9"]) == 2
    assert "layers must be indices" in capsys.readouterr().err


def test_bench_json_resize_keys_and_default_batch_sizes(capsys):
    """By default bench times batch 1 (latency) and 16 (throughput) with the resize baseline;
    --no-resize leaves its keys None."""
    args = ["bench", "--model", TINY, "--recipe", "tome", "--r", "2", "--repeats", "1",
            "--warmup", "0", "--json", "--no-memory"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["batch_size"] for r in rows] == [1, 16]
    for row in rows:
        assert row["resize_side"] in (16, 32, 48)  # below 64 px, in 16 px patches
        assert row["gflops_base"] > row["gflops_resize"] > 0
        assert row["ips_resize"] > 0 and row["speedup_resize"] > 0
    assert main([*args, "--no-resize", "--batch-size", "2"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert all(row[k] is None for k in ("resize_side", "gflops_resize", "ips_resize",
                                        "speedup_resize"))


def test_bench_help_explains_resize(capsys):
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--no-resize" in out and "speedup resize" in out and "default: 1 16" in out
    assert "--json" in out.split("examples:")[-1]

