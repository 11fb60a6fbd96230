"""The kernel of every op that has one (ops.OPS: `OpSpec.kernel`), and the split of every
Gram method for out-of-core keys (`Chunk.GRAM`). The executor finds kernels here, never by
name lookup on a module; tests/project/test_opspec.py checks both tables against the op specs and
the kernels' signatures against the builtins' parameters."""

from __future__ import annotations

from karmixlang.runtime.kernels import (GramSplit, add_difference, breadcrumbs, clamp, dare, della,
                                        elect, geometric_median, geometric_median_center,
                                        geometric_median_solve, iso, karcher, karcher_solve,
                                        lerp, mean, median, members_rows, model_stock,
                                        model_stock_center, model_stock_solve, pair_rows, slerp,
                                        slerp_solve, sum_, ties, ties_merge, train_difference,
                                        trim, uncentred, zeros_like)

KERNELS = {
    "lerp": lerp,
    "slerp": slerp,
    "add_difference": add_difference,
    "train_difference": train_difference,
    "mean": mean,
    "sum_": sum_,
    "median": median,
    "geometric_median": geometric_median,
    "model_stock": model_stock,
    "karcher": karcher,
    "ties_merge": ties_merge,
    "trim": trim,
    "dare": dare,
    "della": della,
    "breadcrumbs": breadcrumbs,
    "clamp": clamp,
    "iso": iso,
    "elect": elect,
    "ties": ties,
    "zeros_like": zeros_like,
}

GRAM_SPLITS = {
    "slerp": GramSplit(pair_rows, uncentred, slerp_solve),
    "geometric_median": GramSplit(members_rows, geometric_median_center, geometric_median_solve),
    "model_stock": GramSplit(members_rows, model_stock_center, model_stock_solve),
    "karcher": GramSplit(members_rows, uncentred, karcher_solve),
}
