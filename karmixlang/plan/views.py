"""Which input is read through which view (docs/layouts.md, "The reference layout").

For each save, the reference naming is the one of its fallback (its base), or of the first
input of its expression when it has none. Every other input of the same architecture whose
naming differs but is recognised is read in the reference naming: a component file (a
prefix-less UNet, a diffusers UNet/VAE/Flux transformer, a standalone VAE, an HF text
encoder) gets the single-file prefix and names; under a prefix-less reference, a single-file
input is read without the prefix (its other components left out). Inputs of two
architectures in one save are K0312; an input that cannot be read as the reference (a
diffusers reference, another component) K0315; an input that two saves would read under two
namings K0316. Inputs whose naming is not recognised are read as they are.
"""

from __future__ import annotations

from karmixlang.diagnostics import KmxError, error
from karmixlang.io.header import CheckpointHeader
from karmixlang.io.layouts import PREFIX, Naming, detect
from karmixlang.io.layouts.llm import Slice, containers
from karmixlang.io.views import ViewReport, canonical, keep, naming_text, rename, slice_layers
from karmixlang.ir.graph import Graph, Node, match_key, reachable

ARCHS = ("sd1", "sdxl", "flux", "sd2")
_CANONICAL_FORMS = {("unet", "ldm"), ("unet", "bfl"), ("vae", "ldm"), ("clip_l", "hf"),
                    ("clip_g", "openclip"), ("t5", "hf")}


def naming_of(header: CheckpointHeader) -> Naming:
    return detect({k: t.shape for k, t in header.tensors.items()})


def apply_views(graph: Graph, headers: dict[Node, CheckpointHeader]
                ) -> tuple[dict[Node, CheckpointHeader], dict[Node, ViewReport]]:
    """The headers as each load is read, and a report per load read through a view."""
    headers = {n: _explicit(n, h, graph) for n, h in headers.items()}
    for save in graph.saves:
        _one_container(graph, save, headers)
    namings = {n: naming_of(h) for n, h in headers.items()}
    targets: dict[Node, tuple[tuple[str, str] | None, int]] = {}
    order = {n: i for i, n in enumerate(graph.topo())}
    for i, save in enumerate(graph.saves):
        loads = save_loads(graph, save, order)
        if not loads:
            continue
        arch = _arch(loads, namings, headers, save.span)
        ref = loads[0]
        for n in loads:
            target = _target(namings[ref], namings[n], arch, n, ref, headers, save.span)
            if n in targets and targets[n][0] != target:
                other = graph.saves[targets[n][1]].written
                raise KmxError([error(
                    "K0316", f"`{headers[n].path}` would be read as {_text(target)} by this "
                    f"save and as {_text(targets[n][0])} by the save of `{other}`", save.span,
                    label="in this save", help="give these saves bases of one naming "
                    "(docs/layouts.md, \"The reference layout\")")])
            targets[n] = (target, i)
    out, reports = dict(headers), {}
    for n, (target, _) in targets.items():
        if target is not None:
            spans = graph.origins.get(n) or [None]
            out[n], reports[n] = canonical(headers[n], namings[n], target[0], spans[0],
                                           target[1])
    return out, reports


def _explicit(n: Node, header: CheckpointHeader, graph: Graph) -> CheckpointHeader:
    """The recipe's own renames and layer slices (and the selects below them), in order
    (ir/optimize.views)."""
    spans = graph.origins.get(n) or [None]
    for step in n.attr("view", ()):
        if step[0] == "rename":
            header = rename(header, step[1], step[2], spans[-1])
        elif step[0] == "layers":
            header = slice_layers(header, Slice(*step[1:]), spans[-1])
        else:
            pats, select = step[1], step[0] == "select"
            header = keep(header, lambda k: any(match_key(p, k) for p in pats) == select)
    return header


def _one_container(graph: Graph, save, headers: dict[Node, CheckpointHeader]) -> None:
    """K0352: the slices of one save name their layers alike (a stack of `model.layers` and
    `transformer.h` would be two half-models)."""
    found: dict[str, Node] = {}
    for n in save_loads(graph, save):
        if any(step[0] == "layers" for step in n.attr("view", ())):
            for stack in containers(headers[n].tensors):
                found.setdefault(stack, n)
    if len(found) > 1:
        (s1, n1), (s2, n2) = list(found.items())[:2]
        raise KmxError([error(
            "K0352", f"the slices of this save have layers under `{s1}` "
            f"(`{headers[n1].path}`) and `{s2}` (`{headers[n2].path}`)", save.span,
            label="in this save", help="rename one side's layers to the other's container "
            "first: `rename(x, \"^transformer\\\\.h\\\\.\", \"model.layers.\")`")])


def _text(target: tuple[str, str] | None) -> str:
    return "it is" if target is None else naming_text(*target)


def save_loads(graph: Graph, save, order: dict[Node, int] | None = None) -> list[Node]:
    """The save's loads, the reference first: its fallback's, else its expression's.
    `order`: each node's place in graph.topo(), when the caller has it (it costs a sort)."""
    roots = ([save.fallback] if save.fallback is not None else []) + [save.expr]
    order = order or {n: i for i, n in enumerate(graph.topo())}
    out: list[Node] = []
    for root in roots:
        found = sorted((x for x in reachable([root]) if x.op == "load"), key=order.get)
        out += [x for x in found if x not in out]
    return out


def _arch(loads, namings, headers, span) -> str | None:
    """The save's architecture: the first concrete one; two of them are K0312."""
    first = None
    for n in loads:
        naming = namings[n]
        if not naming.known:
            continue
        if first is None and naming.arch in ARCHS:
            first = n
    if first is None:  # only VAEs / text encoders: the first architecture all of them fit
        known = [namings[n] for n in loads if namings[n].known]
        return next((a for a in ARCHS if known and all(k.fits(a) for k in known)), None)
    arch = namings[first].arch
    for n in loads:
        if namings[n].known and not namings[n].fits(arch):
            raise KmxError([error(
                "K0312", f"inputs of different architectures in one save: "
                f"`{headers[first].path}` is {namings[first].describe()}, "
                f"`{headers[n].path}` is {namings[n].describe()}", span, label="in this save",
                help="merge models of one architecture; docs/layouts.md lists the namings "
                     "kmx recognises")])
    return arch


def _target(ref: Naming, naming: Naming, arch: str | None, n: Node, ref_node: Node,
            headers, span) -> tuple[str, str] | None:
    """(architecture, prefix to strip) to read `naming` as `ref`, or None: read as is."""
    if arch is None or not (ref.known and naming.known) or naming == ref:
        return None
    if ref.style == "single-file":
        return None if naming.style == "single-file" else (arch, "")
    canonical_ref = (ref.component, ref.form) in _CANONICAL_FORMS
    prefix = PREFIX.get(arch, {}).get(ref.component)
    same = naming.style == "single-file" or naming.component == ref.component
    if canonical_ref and prefix and same:
        return (arch, prefix)
    raise KmxError([error(
        "K0315", f"`{headers[n].path}` ({naming.describe()}) cannot be read in the naming of "
        f"`{headers[ref_node].path}` ({ref.describe()})", span, label="in this save",
        help="make the single-file (or LDM-named) model the base: kmx reads other namings "
             "as that one (docs/layouts.md)")])
