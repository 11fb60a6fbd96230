"""How deep and how large a recipe may get, in one place. The parser bounds one expression,
the checker bounds evaluation through `let` names and `def` calls, in depth and in steps
(K0004 beyond any of them), and every recursive pass runs with the Python recursion limit
these bounds need: what `kmx check` accepts, lowering, optimizing and scheduling can handle."""

from __future__ import annotations

import sys
from contextlib import contextmanager

MAX_EXPR_DEPTH = 200  # nesting of one expression as written (parser)
MAX_IMPORT_DEPTH = 100  # files importing files importing files... (loader)
# Nesting of evaluation: an expression's levels, plus those of every def body it calls and of
# every let of a def body it reaches, counted by the checker. Top-level lets do not add up:
# they are evaluated in dependency order, each from the top.
MAX_EVAL_DEPTH = 1_000
# Evaluation steps of the whole recipe with every def call expanded (one step per expression
# node evaluated). More than a recipe within the 4 MiB size limit can spell out, so only defs
# calling defs reach it: two calls a level double the work at each level.
MAX_EVAL_STEPS = 5_000_000
# Python frames one evaluation level may take in the deepest pass (checker, lowering,
# formatter), with room for the callers.
_FRAMES_PER_LEVEL = 8
RECURSION_LIMIT = _FRAMES_PER_LEVEL * MAX_EVAL_DEPTH + 2_000


@contextmanager
def recursion_room():
    """Run a recursive pass with the recursion limit the depth bounds above need."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, RECURSION_LIMIT))
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)
