"""`trimkit demo` end to end on a slice of easy-VQA (tests/test_demo_scenes.py tests its scenes
parts), and the in-process activation peak."""

import json

import torch

from trimkit.tools.bench import activation_peak
from trimkit.tools.cli import main


def test_activation_peak_counts_tensors_alive_together():
    def two(n):
        a = torch.ones(n, 2**18)  # n MiB
        b = a * 2  # another n MiB, alive with a
        return float(b[0, 0])

    def chain(n):
        x = torch.ones(n, 2**18)
        for _ in range(3):
            x = x + 1  # each step frees the one before: at most two alive
        return x

    assert activation_peak(two, 16) == 32.0
    assert activation_peak(chain, 8) == 16.0
    w = torch.ones(2**20)
    assert activation_peak(lambda: w.view(2, -1).t()) == 0.0  # views of older memory
    assert activation_peak(lambda: w.add_(1)) == 0.0  # in place


def test_demo_writes_the_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRIMKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report"
    code = main(["demo", "--task", "easy-vqa", "--out", str(out), "--questions", "64",
                 "--steps", "2",
                 "--repeats", "1", "--flops-examples", "2", "--threads", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    recipes = [r["recipe"] for r in rows]
    assert recipes[0] == "untrimmed"
    for name in ("resize", "tome", "attn_prune", "pumer", "smarttrim"):
        assert name in recipes
    base = rows[0]
    assert base["flops_ratio"] == 1.0 and base["image_tokens"] == 65.0
    for r in rows[1:]:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["flops_ratio"] > 1.0 or r["recipe"] == "smarttrim"  # 2 steps may trim nothing
        assert r["speedup_1"] > 0 and r["speedup_32"] > 0
        # what the trimmed model would spend padded at batch 32, beside what it spends
        padded = r["gflops_padded_32"]
        assert (padded is None) == (r["recipe"] == "resize")
        assert padded is None or padded > 0
    assert base["gflops_padded_32"] is None
    # more merging and pruning, fewer FLOPs and tokens
    tome = [r for r in rows if r["recipe"] == "tome"]
    assert [r["gflops"] for r in tome] == sorted((r["gflops"] for r in tome), reverse=True)
    assert tome[-1]["image_tokens"] < tome[0]["image_tokens"] < 65
    assert 0 < tome[-1]["peak_mib_32"] < base["peak_mib_32"]  # fewer tokens, less memory
    resize = [r for r in rows if r["recipe"] == "resize"]
    assert all(r["image_tokens"] is None for r in resize)
    assert [r["gflops"] for r in resize] == sorted((r["gflops"] for r in resize), reverse=True)
    # the picture's examples carry every shown model's answer
    assert len(data["examples"]) == 4
    assert {"question", "true", "untrimmed", "tome r=8"} <= set(data["examples"][0])
    for name in ("results.md", "accuracy_vs_speedup.png", "kept_tokens.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "kept_tokens.png").read_bytes()[:4] == b"\x89PNG"
    assert "| tome | r=8 |" in printed and "| tome | r=8 |" in (out / "results.md").read_text()


def test_demo_refuses_bad_arguments(capsys):
    assert main(["demo", "--questions", "5"]) == 2
    assert "--questions" in capsys.readouterr().err
    assert main(["demo", "--task", "easy-vqa", "--steps", "0"]) == 2
