"""The LoRAs of a graph, planned from headers (docs/lora.md): each `lora` node's modules are
mapped onto the keys of the checkpoints it is combined with (the other inputs of every save
that uses it), and its key table is every float key of those checkpoints: a key no module
changes is a zero delta, not a missing key. An unmatched module is an error (K0322) unless
each save that uses the LoRA says `with unmatched="warn"`."""

from __future__ import annotations

from dataclasses import dataclass

from karmixlang.diagnostics import Diagnostic, KmxError, error, warning
from karmixlang.io.dtypes import DTYPES
from karmixlang.io.header import CheckpointHeader
from karmixlang.io.lora import LoraFile, parse_lora, rank_of
from karmixlang.io.lora_map import Mapping, guess_arch, map_modules
from karmixlang.ir.graph import Graph, Node, reachable
from karmixlang.plan.executable import LoraTerm


@dataclass
class PlannedLora:
    file: LoraFile
    arch: str
    mapping: Mapping
    shapes: dict[str, tuple]  # the partners' float keys -> (shape, dtype)
    terms: dict[str, tuple[LoraTerm, ...]]  # key -> the modules that change it

    def report(self) -> dict:
        m = self.mapping
        return {"format": self.file.format, "arch": self.arch,
                "modules": len(self.file.modules), "matched": len(m.matches),
                "keys": len(self.terms), "bytes": self.file.nbytes,
                "unmatched": sorted(x.name for x in m.unmatched)}


def _shown(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names[:3]) + \
        (f" and {len(names) - 3} more" if len(names) > 3 else "")


def plan_loras(graph: Graph, headers: dict[Node, CheckpointHeader]
               ) -> tuple[dict[Node, PlannedLora], list[Diagnostic]]:
    """Every lora node planned, and the warnings (unmatched modules a save lets pass).
    Raises KmxError for what cannot be run."""
    nodes = [n for n in graph.topo() if n.op == "lora"]
    if not nodes:
        return {}, []
    users: dict[Node, list[int]] = {n: [] for n in nodes}
    partners: dict[Node, list[Node]] = {n: [] for n in nodes}
    for si, s in enumerate(graph.saves):
        roots = [s.expr] + ([s.fallback] if s.fallback is not None else [])
        seen = set(reachable(roots))
        loads = sorted((x for x in seen if x.op == "load"), key=lambda x: x.attr("path"))
        for n in nodes:
            if n in seen:
                users[n].append(si)
                partners[n] += [x for x in loads if x not in partners[n]]
    planned, diags, warns = {}, [], []
    for n in nodes:
        span = (graph.origins.get(n) or [None])[0]
        try:
            bases = {graph.saves[si].fallback for si in users[n]}
            planned[n] = _plan_one(graph, n, headers, partners[n], span,
                                   bases.pop() if len(bases) == 1 else None)
        except KmxError as exc:
            diags += exc.diagnostics
            continue
        unmatched = sorted(m.name for m in planned[n].mapping.unmatched)
        if not unmatched:
            continue
        msg = (f"{len(unmatched)} of {len(planned[n].file.modules)} module(s) of lora "
               f"`{graph.display_name(n)}` match no key of the checkpoints it is combined "
               f"with: {_shown(unmatched)}")
        strict = [si for si in users[n] if graph.saves[si].unmatched != "warn"]
        if strict:
            diags.append(error("K0322", msg, graph.saves[strict[0]].span, label="in this save",
                               help='check that the LoRA is for this model family; '
                                    '`with unmatched="warn"` merges the modules that match'))
        else:
            warns.append(warning("K0322", msg, span, label="this lora"))
    if diags:
        raise KmxError(diags)
    return planned, warns


def _plan_one(graph: Graph, n: Node, headers, partners: list[Node], span,
              base: Node | None) -> PlannedLora:
    """`base`: the fallback of every save that uses the LoRA (None: none, or not one), the
    weight a DoRA's modules are normalised against."""
    lora = parse_lora(headers[n], n.attr("path"), span)
    if not partners:
        raise KmxError([error("K0325", f"lora `{graph.display_name(n)}` is not combined with "
                              "any checkpoint: nothing tells which keys its modules change",
                              span, label="this lora",
                              help="add it to a model (`base + lora`), or give the save a "
                                   "`fallback=` model")])
    dora = [m.name for m in lora.modules if "dora_scale" in m.roles]
    if dora and (base is None or base.op != "load"):
        raise KmxError([error("K0324", f"lora `{graph.display_name(n)}` is a DoRA "
                              f"({len(dora)} module(s) with `dora_scale`: {_shown(dora)}), "
                              "and its saves do not name one base checkpoint to apply it to",
                              span, label="this lora",
                              help="a DoRA's change depends on the weight it is applied to: "
                                   "use it in saves with one `base` (or the same "
                                   "`fallback=MODEL`)")])
    shapes: dict[str, tuple] = {}
    for p in partners:
        for k, t in headers[p].tensors.items():
            if DTYPES[t.dtype].is_float:
                shapes.setdefault(k, (t.shape, t.dtype))
    mapping = map_modules(lora, {k: v[0] for k, v in shapes.items()})
    if mapping.misfits:
        shown = "; ".join(f"`{m.name}` onto `{k}`: {why}" for m, k, why in mapping.misfits[:3])
        more = f" and {len(mapping.misfits) - 3} more" if len(mapping.misfits) > 3 else ""
        raise KmxError([error("K0323", f"{len(mapping.misfits)} module(s) of lora "
                              f"`{graph.display_name(n)}` do not fit the key they name: "
                              f"{shown}{more}", span, label="this lora",
                              help="the LoRA was trained for another model of this family "
                                   "(another width or depth)")])
    terms: dict[str, list[LoraTerm]] = {}
    for key, matches in mapping.by_key().items():
        terms[key] = tuple(LoraTerm(m.module.kind, _with_base(m.module, headers, base, key),
                                    rank_of(m.module), m.rows) for m in matches)
    return PlannedLora(lora, guess_arch(lora), mapping, shapes, terms)


def _with_base(m, headers, base: Node | None, key: str) -> tuple:
    """A DoRA module's tensors with the base weight it is normalised against (role `base`)."""
    if "dora_scale" not in m.roles:
        return m.tensors
    if key not in headers[base].tensors:
        raise KmxError([error("K0324", f"DoRA module `{m.name}` changes `{key}`, which its "
                              "base lacks", None, help="apply the DoRA to the model it was "
                              "trained for")])
    return tuple(sorted(m.tensors + (("base", headers[base].tensors[key]),)))
