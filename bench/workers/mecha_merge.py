"""Run one benchmark merge with sd-mecha 1.1.8 (in its venv): python mecha_merge.py SPEC.json

SPEC: {"merge": NAME, "base": PATH, "models": [PATH, ...], "out": PATH, "seed": INT}.
Each merge is written with sd-mecha's own recipe API, as its documentation shows, with its
defaults (fp32 merge dtype, fp16 output, its default thread count). The kmx recipe each one
mirrors is in bench/run.py (KMX_RECIPES); where the definitions differ, it says so there.
"""

import json
import sys

import sd_mecha
import torch
from sd_mecha.extensions.builtin.merge_methods import linear
from sd_mecha.extensions.builtin.merge_methods import ties as _ties

# sd-mecha 1.1.8's DELLA divides by the element count, so the empty float keys of SDXL
# (v_pred, ztsnr: shape [0]) stop the whole merge with ZeroDivisionError. Patch that one
# helper to keep empty tensors as they are (no effect on timing or on any other key).
_find_della_dropout = _ties.find_della_dropout


def _find_della_dropout_nonempty(delta, probability, della_eps, generator):
    if delta.numel() == 0:
        return torch.ones_like(delta)
    return _find_della_dropout(delta, probability, della_eps, generator)


_ties.find_della_dropout = _find_della_dropout_nonempty


def recipe(merge: str, base, models: list, seed: int, n: int):
    # linear.add_difference, not the sd_mecha.add_difference wrapper: the wrapper compares
    # merge spaces that are not inferred yet for a merge method's output and fails.
    deltas = [sd_mecha.subtract(m, base) for m in models]
    if merge.startswith("tf-"):
        return ties_family(merge, base, models, deltas, seed)
    if merge == "ws":  # mean(pool)
        return sd_mecha.n_average(*models)
    if merge == "ad":  # base + 0.3·Σ(θi − base): n_average of the deltas, scaled back by N
        return linear.add_difference(base, sd_mecha.n_average(*deltas), alpha=0.3 * n)
    if merge == "ties":  # trim to density 0.2, sign elected by mass, disjoint mean
        return linear.add_difference(base, sd_mecha.ties_sum(*deltas, k=0.2, vote_sgn=True))
    # add_ties_with_dare: apply_stock=True means t = 1 (plain TIES); False would scale by
    # Model Stock's t. k=1.0 keeps every entry before the election.
    ties = dict(k=1.0, vote_sgn=True, apply_stock=True, seed=seed)
    if merge == "dare":  # DARE p = 0.9 with rescale, then TIES
        return sd_mecha.add_ties_with_dare(base, *models, probability=0.9, rescale=True, **ties)
    if merge == "della":  # MAGPRUNE p = 0.5, eps 0.1 in kmx's convention = 0.2 in sd-mecha's
        return sd_mecha.add_ties_with_dare(base, *models, probability=0.5, della_eps=0.2,
                                           rescale=True, **ties)
    if merge == "gm":  # geometric_median(pool), Weiszfeld eps 1e-6, maxiter 100, ftol 1e-20
        return sd_mecha.geometric_median(*models)
    if merge == "ms":  # Model Stock (sd-mecha: cosines per row, consecutive pairs only)
        return sd_mecha.n_model_stock(base, *models)
    if merge == "dgmla":
        # DELLA p = 0.1, eps −0.1 (sd-mecha's convention), no rescale, mass election, then
        # the geometric median with the base as one extra zero vote (base − base).
        return sd_mecha.add_ties_with_dare(
            base, *models, base, probability=0.1, della_eps=-0.1, rescale=False,
            apply_median=True, eps=1e-6, maxiter=100, ftol=1e-20, k=1.0, vote_sgn=True,
            seed=seed)
    raise SystemExit(f"unknown merge {merge}")


def ties_family(merge: str, base, models: list, deltas: list, seed: int):
    """bench/sweep.py's settings, named tf-FILTER-VALUE-RULE. sd-mecha's vote_sgn=True elects
    by the sum of the deltas (kmx's "mass"), False by the sum of their signs ("count")."""
    _, filter_, value, rule = merge.split("-")
    v, mass = float(value), rule == "mass"
    if filter_ in ("trim", "ties"):  # ties(…, rule) then ties_merge: the same election
        return linear.add_difference(base, sd_mecha.ties_sum(*deltas, k=v, vote_sgn=mass))
    ties = dict(k=1.0, vote_sgn=mass, apply_stock=True, rescale=True, seed=seed)
    if filter_ == "dare":
        return sd_mecha.add_ties_with_dare(base, *models, probability=v, **ties)
    if filter_ == "della":  # eps 0.1 in kmx's convention = 0.2 in sd-mecha's
        return sd_mecha.add_ties_with_dare(base, *models, probability=v, della_eps=0.2, **ties)
    raise SystemExit(f"unknown sweep merge {merge}")


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    base = sd_mecha.model(spec["base"])
    models = [sd_mecha.model(p) for p in spec["models"]]
    r = recipe(spec["merge"], base, models, spec["seed"], len(models))
    sd_mecha.merge(r, fallback_model=base, merge_dtype=torch.float32,
                   output_dtype=getattr(torch, {"fp16": "float16", "fp32": "float32"}[
                       spec.get("out_dtype", "fp16")]), output=spec["out"])


if __name__ == "__main__":
    main()
