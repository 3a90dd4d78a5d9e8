"""The version of trimkit, in a module of its own so that any module (`trimkit.tools.persist`
writes it into saved models) can read it without importing the package's ``__init__``.
Kept equal to ``version`` in ``pyproject.toml`` (`tests/test_packaging.py` checks it)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
