"""The TIES-family sweep of issue #18: trim, ties, DARE and DELLA, each followed by
TIES-merging, at every density or p from 0.1 to 0.9 and with both election rules, so that a
margin over sd-mecha that holds at one setting only shows. bench/run.py registers these
merges (names `tf-FILTER-VALUE-RULE`) and the presets below; sd-mecha runs each through
workers/mecha_merge.py, which reads the setting back from the name.

    python bench/run.py --preset ties-sweep                  # SD1.5 and SDXL/4, dense and sparse
    python bench/run.py --preset ties-sweep --full-sdxl      # and full-size SDXL
    python bench/run.py --preset ties-smoke                  # 4 settings on tiny inputs, kmx only

The kmx form of each filter (the stdlib recipes' shape, `b + ties_merge(FILTER(pool − b))`):

    trim   b + ties_merge(trim(pool - b, density=V), rule=R)
    ties   b + ties_merge(ties(pool - b, density=V, rule=R), rule=R)   (the optimizer runs it
           as the trim form: docs/architecture.md, "The algebraic rewrites")
    dare   b + ties_merge(dare(pool - b, p=V, seed=seed), rule=R)
    della  b + ties_merge(della(pool - b, p=V, eps=0.1, seed=seed), rule=R)

sd-mecha 1.1.8: trim/ties are `add_difference(b, ties_sum(deltas, k=V, vote_sgn=...))`,
DARE/DELLA `add_ties_with_dare(b, models, probability=V, k=1, apply_stock=True, ...)` with
della_eps = 2·eps (its convention). Its `vote_sgn=True` elects by the sum of the deltas
(kmx's "mass"), False by the sum of their signs ("count"). trim and ties outputs are compared
with kmx's (same definition up to the order of equal magnitudes at the threshold); DARE and
DELLA draw other random masks, so only their time and memory compare.
"""

from __future__ import annotations

FILTERS = ("trim", "ties", "dare", "della")
VALUES = (0.1, 0.3, 0.5, 0.7, 0.9)  # density for trim/ties, p for DARE/DELLA
RULES = ("mass", "count")
DELLA_EPS = 0.1  # kmx's convention; sd-mecha's della_eps is twice it

_FORMS = {
    "trim": 'b + ties_merge(trim(pool - b, density={v}), rule="{r}")',
    "ties": 'b + ties_merge(ties(pool - b, density={v}, rule="{r}"), rule="{r}")',
    "dare": 'b + ties_merge(dare(pool - b, p={v}, seed=seed), rule="{r}")',
    "della": 'b + ties_merge(della(pool - b, p={v}, eps=' + f"{DELLA_EPS:g}" +
             ', seed=seed), rule="{r}")',
}
_TITLES = {"trim": "TIES", "ties": "TIES (ties form)", "dare": "DARE-TIES",
           "della": "DELLA-TIES"}


def name(filter_: str, value: float, rule: str) -> str:
    return f"tf-{filter_}-{value:g}-{rule}"


def parse(merge: str) -> tuple[str, float, str]:
    """(filter, value, rule) of a sweep merge name."""
    _, filter_, value, rule = merge.split("-")
    return filter_, float(value), rule


def merges() -> dict[str, tuple]:
    """bench/run.py's MERGES entries: name -> (title, kmx expression, mergekit form (none:
    the suites are SD checkpoints), peers whose output is compared)."""
    out = {}
    for f in FILTERS:
        knob = "density" if f in ("trim", "ties") else "p"
        for v in VALUES:
            for r in RULES:
                out[name(f, v, r)] = (f"{_TITLES[f]} {knob} {v:g}, {r}",
                                      _FORMS[f].format(v=v, r=r), None,
                                      {"sd-mecha"} if f in ("trim", "ties") else set())
    return out


SUITES = ["sd15", "sd15-sparse", "sdxl-r", "sdxl-r-sparse", "sdxl", "sdxl-sparse"]
SMOKE = [name("trim", 0.7, "mass"), name("ties", 0.7, "count"), name("dare", 0.9, "count"),
         name("della", 0.5, "mass")]
# bench/run.py's PRESETS entries: (suites, pool sizes, merges, tools)
PRESETS = {
    "ties-sweep": [(SUITES, [4], list(merges()), ["kmx", "sd-mecha"])],
    "ties-smoke": [(["sd15-tiny-sparse"], [2], SMOKE, ["kmx"])],
}
