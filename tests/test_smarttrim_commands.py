"""``trimkit smarttrim-flops`` and ``trimkit smarttrim-ablation`` end to end, at tiny sizes."""

import re

from trimkit.tools.cli import main


def rows(printed: str, first: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in printed.splitlines() if line.startswith(f"| {first}")]


def test_smarttrim_flops_reaches_each_target_by_the_trimmers_decisions(capsys):
    assert main(["smarttrim-flops", "--models", "meter-tiny", "--iters", "5"]) == 0
    got = rows(capsys.readouterr().out, "meter-tiny")
    assert [r[1] for r in got] == ["0.5", "0.33"]
    for r in got:
        fewer = float(r[4].rstrip("×"))
        assert fewer >= 1 / float(r[1]) - 1e-9  # at most the target's share of the FLOPs
        assert float(r[6]) < float(r[1])  # the placement reaches below it


def test_smarttrim_ablation_prints_every_variant(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRIMKIT_CACHE", str(tmp_path / "cache"))
    code = main(["smarttrim-ablation", "--steps", "1", "--questions", "32",
                 "--flops-examples", "1", "--threads", "2",
                 "--variants", "trimkit", "cross_modal=False", "heads only"])
    assert code == 0
    out = capsys.readouterr().out
    table = {r[0]: r for r in rows(out, "") if r[0] not in ("variant", "---")}
    assert list(table) == ["untrimmed", "trimkit", "cross_modal=False", "heads only"]
    assert table["untrimmed"][5] == "1.00×"
    assert float(table["trimkit"][2]) == 0.5
    assert float(table["heads only"][2]) > 0.5  # heads alone cannot reach 0.5
    for r in table.values():
        assert re.fullmatch(r"\d+\.\d\d%", r[3]) and float(r[6]) > 0
    assert "81.89" in out and "50.85" in out  # the paper's trends beside the table
    assert main(["smarttrim-ablation", "--variants", "nope"]) == 2
