"""Where packaged data lives: the stdlib recipes and the error pages.

In a wheel they are the packages `karmixlang.stdlib` and `karmixlang.errors` (mapped from the
top-level `stdlib/` and `docs/errors/` in pyproject.toml). In a source checkout imported
directly, those mapped packages do not exist, so we read the folders themselves.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_CHECKOUT = {"stdlib": ("stdlib",), "errors": ("docs", "errors")}


def data_dir(name: str):
    """A Traversable for the packaged folder `name` ("stdlib" or "errors")."""
    try:
        return resources.files(f"karmixlang.{name}")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent.joinpath(*_CHECKOUT[name])


def template_text(name: str) -> str:
    """A starter recipe for `kmx new` (package data `data/template-NAME.kmx`)."""
    return resources.files("karmixlang").joinpath("data", f"template-{name}.kmx").read_text(
        encoding="utf-8")
