"""docs/adapters.md runs: its ```python blocks, in order, in one namespace, and each block's
output matches the ```text block right after it (where there is one).

In an expected output, ``…`` stands for anything; the rest must appear in order, compared
with runs of whitespace collapsed (so the page may wrap long lines).
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

import trimkit
from trimkit.registry import ADAPTERS, RECIPES

DOC = Path(__file__).resolve().parents[1] / "docs" / "adapters.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.M | re.S)


def fenced_blocks(text: str) -> list[tuple[str, str, int, int, int]]:
    """``(language, body, first body line, start offset, end offset)`` of each fenced block."""
    return [(m[1], m[2], text.count("\n", 0, m.start(2)) + 1, m.start(), m.end())
            for m in FENCE.finditer(text)]


def examples(text: str) -> list[tuple[str, int, str | None]]:
    """``(code, first line, expected output or None)`` of each ```python block."""
    blocks = fenced_blocks(text)
    out = []
    for i, (lang, body, line, _, end) in enumerate(blocks):
        if lang != "python":
            continue
        expected = None
        if i + 1 < len(blocks):
            nlang, nbody, _, nstart, _ = blocks[i + 1]
            if nlang == "text" and not text[end:nstart].strip():
                expected = nbody
        out.append((body, line, expected))
    return out


def squash(s: str) -> str:
    return " ".join(s.split())


def assert_output(got: str, expected: str, line: int) -> None:
    """Every ``…``-separated part of ``expected`` appears in ``got``, in order."""
    pos, flat = 0, squash(got)
    for part in (squash(p) for p in expected.split("…")):
        found = flat.find(part, pos)
        if found < 0:
            pytest.fail(f"docs/adapters.md, the block at line {line} printed:\n{got}\n"
                        f"which does not match its text block (missing {part!r}); update the "
                        f"page if the new output is right")
        pos = found + len(part)


@pytest.fixture
def registry_restored():
    """The registry as it was: the page's adapter does not outlive the test."""
    trimkit.list_adapters()
    adapters, recipes = dict(ADAPTERS), dict(RECIPES)
    yield
    ADAPTERS.clear()
    ADAPTERS.update(adapters)
    RECIPES.clear()
    RECIPES.update(recipes)


def test_the_page_has_the_steps():
    blocks = fenced_blocks(DOC.read_text())
    langs = [lang for lang, *_ in blocks]
    assert "toml" in langs and langs.count("python") >= 8
    code = "\n".join(body for lang, body, *_ in blocks if lang == "python")
    for step in ("@trimkit.register_adapter", "UnsupportedModelError", '"tome"', '"pumer"',
                 '"smarttrim"', "last_stats", "check_adapter(make_model, make_inputs",
                 "HeadLayout", "num_protected", "padded=True", "mask_arg", "cross_attention",
                 "cross_stream", 'prefix="text"', "hooks.EntryOutput", "seed=0",
                 "install_decoder", '"fastv"'):
        assert step in code, step
    toml = next(body for lang, body, *_ in blocks if lang == "toml")
    assert '[project.entry-points."trimkit.adapters"]' in toml


def test_the_page_runs(registry_restored):
    text = DOC.read_text()
    namespace: dict = {"__name__": "docs_adapters"}
    for code, line, expected in examples(text):
        # blank lines in front, so a traceback gives the page's line numbers
        compiled = compile("\n" * (line - 1) + code, str(DOC), "exec")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compiled, namespace)
        if expected is not None:
            assert_output(out.getvalue(), expected, line)
    assert type(ADAPTERS["pictext"]).__module__ == "docs_adapters"
    model = namespace["make_model"]()
    assert trimkit.find_adapter(model).name == "pictext"
    assert not trimkit.is_applied(model)
