"""The plan: what `kmx run` will do, as data with a schema version, and three renderers of
that same data (text for people, JSON for tools, DOT for Graphviz). docs/plan-format.md
documents the JSON schema."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from karmixlang.io.hffolder import DEFAULT_SHARD
from karmixlang.plan.groups import group_keys
from karmixlang.plan.layermap import layer_map, render as render_layer_map
from karmixlang.ir.graph import Graph, KeyMap
from karmixlang.resources import data_dir
from karmixlang.units import human_bytes
from karmixlang.plan.rebasin import describe as describe_permutation, phase_one_bytes
from karmixlang.plan.schedule import (COMPUTE_ITEMSIZE, HEAP_BLOCK_LIMIT, HEAP_RELEASE_ABOVE,
                                       IDENTICAL, THREAD_OVERHEAD, Schedule)

SCHEMA_VERSION = 1


@dataclass
class Plan:
    data: dict  # the JSON document; the text and DOT renderers read only this

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=False)


def _attr_json(v):
    if isinstance(v, KeyMap):
        return {"keymap": v.describe()}
    if isinstance(v, tuple):
        return [_attr_json(x) for x in v]
    return v


@lru_cache(maxsize=1)
def _stdlib() -> str:
    return os.path.abspath(str(data_dir("stdlib")))  # once: a plan may have many nodes


def _rel(path: str, base: str) -> str:
    """A path as the user would write it: `std/...` for the stdlib, relative to the recipe
    when inside its folder, else absolute."""
    stdlib = _stdlib()
    if path.startswith(stdlib + os.sep):
        return "std/" + os.path.relpath(path, stdlib)
    rel = os.path.relpath(path, base)
    return path if rel.startswith("..") else rel


def _view(v) -> dict:
    """An input read through a view (plan/views.py): how, for `inputs[].view`."""
    if v is None:
        return {}
    return {"view": {"naming": v.source, "read_as": v.target, "renamed": v.renamed,
                     "fused": v.fused, "reshaped": v.reshaped, "transposed": v.transposed,
                     "dropped": len(v.dropped), "dropped_examples": list(v.dropped[:5])}}


def _vocabulary(v, base: str) -> dict:
    """A save that matches embedding rows by token (plan/vocab.py), for `saves[].vocabulary`."""
    if v is None:
        return {}
    return {"vocabulary": {
        "mode": v.mode, "source": _rel(v.file, base), "tokens": v.tokens, "rows": v.rows,
        "added": len(v.added), "files": [name for name, _ in v.files],
        "inputs": [{"path": _rel(i.path, base), "vocabulary": _rel(i.file, base),
                    "tokens": i.tokens, "rows": i.rows, "lacking": i.lacking,
                    "keys": list(i.keys)} for i in v.inputs]}}


def _vocabulary_text(v: dict) -> list[str]:
    what = "the union vocabulary" if v["mode"] == "union" else "the vocabulary"
    added = f" + {v['added']} added" if v["added"] else ""
    out = [f"    rows matched by token: {what} of {v['source']}{added}, {v['tokens']} tokens "
           f"in {v['rows']} rows"]
    for i in v["inputs"]:
        keys = ", ".join(i["keys"]) or "no key"
        out.append(f"      {i['path']}: {i['tokens']} tokens in {i['rows']} rows, lacks "
                   f"{i['lacking']} (its mean row there); {keys}")
    return out


def _renames(n) -> dict:
    """The recipe's renames of an input, for `inputs[].renamed_by` ([pattern, replacement])."""
    steps = [list(s[1:]) for s in n.attr("view", ()) if s[0] == "rename"]
    return {"renamed_by": steps} if steps else {}


def _slices(n) -> dict:
    """The layer steps of an input (`layers`, `stack`), for `inputs[].layer_steps`
    ([start, end, offset, others])."""
    steps = [list(s[1:]) for s in n.attr("view", ()) if s[0] == "layers"]
    return {"layer_steps": steps} if steps else {}


def _step_line(step: list) -> str:
    start, end, offset, others = step
    if end is None:
        return f"stacked from layer {offset} (its keys outside the layer stack left out)"
    if end == start:
        return "without its layer keys (the fallback of a layer stack)"
    return f"sliced by layers({start}, {end})"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_plan(recipe: str, graph: Graph, sched: Schedule, threads: int = 1,
               compute: str = "fp32", executor: str = "local") -> Plan:
    base = os.path.dirname(os.path.abspath(recipe))
    order = graph.topo()
    ids = {n: i + 1 for i, n in enumerate(order)}
    consumers = Counter(id(i) for n in order for i in n.inputs)
    inputs = []
    for n in [n for n in order if n.op == "load"] + list(sched.phase_one):
        h = sched.headers[n]
        inputs.append({
            "node": ids.get(n), "name": graph.display_name(n), "role": n.attr("role"),
            "path": _rel(n.attr("path"), base), "files": len(h.files), "keys": len(h.tensors),
            "dtypes": dict(sorted(Counter(t.dtype for t in h.tensors.values()).items())),
            "bytes": h.total_bytes,
            "outside_recipe_folder": os.path.relpath(n.attr("path"), base).startswith(".."),
        } | _view(sched.views.get(n)) | _renames(n) | _slices(n)
            | ({"read_by": "permutation"} if n in sched.phase_one else {}))
    nodes = []
    for n in order:
        spans = graph.origins.get(n, [])
        nodes.append({
            "id": ids[n], "op": n.op, "inputs": [ids[i] for i in n.inputs],
            "attrs": {k: _attr_json(v) for k, v in n.attrs if k != "path"},
            "name": graph.names.get(n),
            "origins": [f"{_rel(s.file, base)}:{s.line}:{s.col}" for s in spans],
            "consumers": consumers[id(n)],
        })
    saves = []
    for i, s in enumerate(graph.saves):
        reasons = Counter(_reason_kind(r) for r in sched.copied[i].values())
        saves.append({
            "path": _rel(s.path, base), "node": ids[s.expr],
            "fallback": ids[s.fallback] if s.fallback is not None else None,
            "fallback_reason": s.fallback_reason or None,
            "dtype": s.dtype, "shard": s.shard, "delta": s.delta,
            "keys": sched.save_keys[i],
            "computed": sched.save_keys[i] - len(sched.copied[i]),
            "copied": len(sched.copied[i]),
            "copied_reasons": dict(sorted(reasons.items())),
            "copied_examples": [{"key": k, "reason": r}
                                for k, r in list(sched.copied[i].items())[:5]],
            "bytes_written": sched.bytes_written[i],
            "lora": sched.extractions[i].report() if i in sched.extractions else None,
            "layer_map": layer_map(graph, s, sched.headers),
        } | _vocabulary(sched.vocab.get(i), base) | _folder(sched.folders.get(i), s.shard, base))
    data = {
        "schema_version": SCHEMA_VERSION,
        "recipe": os.path.basename(recipe),
        "compute_dtype": compute,
        "inputs": inputs,
        "nodes": nodes,
        "saves": saves,
        "optimizer": graph.notes,
        "totals": {
            "inputs": len(inputs), "nodes": len(nodes), "operations_written": graph.built,
            "keys": len(sched.jobs),
            "bytes_read": sched.bytes_read,
            "bytes_written": sum(sched.bytes_written),
            **_peak_memory(sched, threads, compute),
            "peak_memory_per_key_bytes": sched.peak_bytes,
            "threads": threads,
            "estimate": True,
        },
    }
    if sched.loras:
        data["loras"] = [{"node": ids[n], "name": graph.display_name(n),
                          "path": _rel(n.attr("path"), base), **p.report()}
                         for n, p in sched.loras.items()]
    if sched.executable.permutations:
        data["permutations"] = [_permutation_json(p, base)
                                for p in sched.executable.permutations]
    ooc = out_of_core(sched)
    if ooc:
        data["totals"]["out_of_core"] = ooc
    if executor == "ray":  # the Ray executor's unit of work (groups.py, docs/ray.md)
        data["groups"] = [{"keys": len(g.keys), "first": g.keys[0], "last": g.keys[-1],
                           "bytes_read": g.bytes_read} for g in group_keys(sched.jobs)]
    return Plan(data)


def out_of_core(sched: Schedule) -> dict | None:
    """The keys that run in chunks (outofcore.py) and what that costs; None when none do."""
    jobs = [j for j in sched.jobs if j.ooc is not None]
    if not jobs:
        return None
    return {
        "keys": len(jobs),
        "over_limit": sum(1 for j in jobs if j.ooc.over_limit),
        "memory_limit": sched.memory_limit,
        "extra_read_bytes": sum(j.ooc.extra_read_bytes for j in jobs),
        "largest_spill_bytes": max(j.ooc.spill_bytes for j in jobs),
        "examples": [{"key": j.key, "chunk_elements": j.ooc.chunk_elems,
                      "chunks": j.ooc.chunks, "extra_passes": j.ooc.passes,
                      "spilled": j.ooc.spilled, "spill_bytes": j.ooc.spill_bytes,
                      "extra_read_bytes": j.ooc.extra_read_bytes,
                      "in_memory_bytes": j.mem_bytes}
                     for j in sorted(jobs, key=lambda j: -j.mem_bytes)[:5]],
    }


def _peak_memory(sched: Schedule, threads: int, compute: str) -> dict:
    """The larger of the streaming phase's peak and the permutation phase's (which runs
    alone, before the streaming one), and where it is."""
    stream = _stream_peak(sched, threads, compute)
    # (phase one runs on one thread, which has its own few MiB too)
    phase_one = max((phase_one_bytes(p) + THREAD_OVERHEAD
                     for p in sched.executable.permutations), default=0)
    if stream >= phase_one:
        return {"peak_memory_bytes": stream, "peak_memory_key": sched.peak_key}
    return {"peak_memory_bytes": phase_one, "peak_memory_key": "the permutation phase"}


def _stream_peak(sched: Schedule, threads: int, compute: str) -> int:
    """The `threads` largest keys in flight at once, as far as admission under the memory
    limit allows them together (a key over the limit runs alone), plus what each thread's
    heap keeps beside them. Blocks under the allocator's mmap threshold return to the
    thread's heap and stay resident; where the next key's blocks do not fit where they were,
    the heap holds both, so a thread can keep an earlier key's temporaries (what it allocated
    beyond the thread's reused read buffers) beside the key it runs. Each key runs once, so
    those are other keys than the ones in flight: the next `threads` largest. After a key
    over HEAP_RELEASE_ABOVE the runtime returns the heaps' free pages, so such keys leave
    nothing. Each thread also has a little memory of its own (THREAD_OVERHEAD). This holds
    with glibc's small-block cache off, as `kmx run` runs (karmixlang/__main__.py); with it,
    a thread's heap can walk to several times that (docs/benchmarks.md)."""
    threads = max(1, threads)
    item = COMPUTE_ITEMSIZE[compute]
    jobs = sorted(sched.jobs, key=lambda j: j.est_bytes, reverse=True)
    live = [j.est_bytes for j in jobs[:threads]]
    if not live:
        return 0
    kept = sorted((j.est_bytes - _read_buffers(j) for j in jobs[threads:]
                   if math.prod(j.outputs[0].shape) * item < HEAP_BLOCK_LIMIT
                   and j.est_bytes <= HEAP_RELEASE_ABOVE), reverse=True)[:threads]
    return min(sum(live), max(sched.memory_limit, live[0])) + sum(kept) + \
        threads * THREAD_OVERHEAD


def _read_buffers(job) -> int:
    """The thread's reused read buffers in the key's estimate: a chunked key's read a chunk."""
    numel = max(1, math.prod(job.outputs[0].shape))
    share = min(1.0, job.ooc.chunk_elems / numel) if job.ooc else 1.0
    return int(job.scratch_bytes * share)


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split(" in ")[0].split(" (")[0]


# ------------------------------------------------------------------ text

def _folder(folder, shard: str | None, base: str) -> dict:
    """A save into a folder: its shard size, where its side files come from
    (plan-format.md)."""
    if folder is None:
        return {}
    return {"folder": {"source": _rel(folder.source, base), "shard": shard or DEFAULT_SHARD,
                       "files": [{"name": f.name, "from": f.origin} for f in folder.files]}}


def _folder_text(folder: dict) -> list[str]:
    out = [f"    a Hugging Face model folder: model.safetensors in shards of {folder['shard']} "
           f"at most, config and tokenizer from {folder['source']}, and:"]
    width = max(len(f["name"]) for f in folder["files"])
    return out + [f"      {f['name']:<{width}}  {f['from']}" for f in folder["files"]]


def _extraction_text(x: dict, tensors: int, size: int) -> list[str]:
    conv = f", 3×3 convs rank {x['conv_rank']}" if x["conv_rank"] else ", no 3×3 convs"
    out = [f"    a LoRA ({x['arch']}, kohya names), rank {x['rank']}{conv}: {x['modules']} "
           f"modules, {tensors} tensors; writes {human_bytes(size)}"]
    if x["left_out"]:
        out.append(f"      {len(x['left_out'])} key(s) left out")
    for ex in x["left_out"][:5]:
        out.append(f"      e.g. {ex['key']}: {ex['reason']}")
    return out


def _render_loras(loras: list[dict]) -> list[str]:
    if not loras:
        return []
    out = ["", f"LoRAs ({len(loras)}):"]
    for x in loras:
        out.append(f"  #{x['node']:<3} lora  {x['name']:<18} {x['path']}  {x['format']}, "
                   f"{x['arch']}: {x['matched']} of {x['modules']} modules onto {x['keys']} "
                   f"keys, {human_bytes(x['bytes'])}")
        if x["unmatched"]:
            more = len(x["unmatched"]) - 10
            out.append(f"       {len(x['unmatched'])} unmatched: " + ", ".join(x["unmatched"][:10])
                       + (f" and {more} more" if more > 0 else ""))
    return out


def _permutation_json(p, base: str) -> dict:
    d = describe_permutation(p)
    return d | {k: _rel(d[k], base) for k in ("model", "to", "spec") if os.path.isabs(d[k])}


def _permutations_text(perms: list[dict], shown: int = 6) -> list[str]:
    """The permutation phase (re-basin phase one), run before the keys (docs/rebasin.md)."""
    out = []
    for p in perms:
        sizes = Counter((g["size"], g["blocks"], g["inner"]) for g in p["groups"])
        out += ["", f"Permutation phase: {p['model']} aligned to {p['to']}, spec "
                    f"{p['spec']} ({len(p['groups'])} groups, seed {p['seed']}, at most "
                    f"{p['iterations']} passes)"]
        for (size, blocks, inner), count in sorted(sizes.items())[:shown]:
            kind = f", {blocks} blocks (inner {inner})" if blocks > 1 else ""
            out.append(f"  {count} group(s) of {size} units{kind}")
        if len(sizes) > shown:
            out.append(f"  ... {len(sizes) - shown} more sizes")
        if p["skipped"]:
            out.append(f"  {len(p['skipped'])} group(s) skipped, none of their keys in the "
                       f"model: " + ", ".join(p["skipped"][:5])
                       + (", ..." if len(p["skipped"]) > 5 else ""))
        reads = ("each key read once and kept in memory" if p["resident"] else
                 f"keys read again at each visit: {p['reads_per_pass']} reads per pass")
        out.append(f"  reads {p['keys']} keys of each model ({human_bytes(p['bytes_keys'])}); "
                   f"{reads}")
        out.append(f"  memory ~{human_bytes(p['bytes_cost_max'])} for the largest group's costs"
                   + (f" + {human_bytes(p['bytes_keys'])} of keys kept" if p["resident"] else ""))
    return out


def _view_line(v: dict) -> str:
    done = [f"{v[k]} {k}" for k in ("renamed", "fused", "reshaped", "transposed") if v[k]]
    line = f"read as {v['read_as']} from {v['naming']}: " + (", ".join(done) or "as is")
    if v["dropped"]:
        line += (f"; {v['dropped']} key(s) with no place there not read ("
                 + ", ".join(f"`{k}`" for k in v["dropped_examples"])
                 + (", ..." if v["dropped"] > len(v["dropped_examples"]) else "") + ")")
    return line


def render_text(plan: Plan) -> str:
    """Plain text (the CLI prints it through rich with markup off)."""
    d = plan.data
    t = d["totals"]
    out = [f"Plan for {d['recipe']} (compute {d['compute_dtype']}; estimates marked ~)", ""]
    out.append(f"Inputs ({len(d['inputs'])}):")
    for i in d["inputs"]:
        dtypes = ", ".join(f"{k}×{v}" for k, v in i["dtypes"].items())
        flag = "  [outside the recipe folder]" if i["outside_recipe_folder"] else ""
        shards = f", {i['files']} shards" if i["files"] > 1 else ""
        node = f"#{i['node']}" if i["node"] is not None else "-"
        out.append(f"  {node:<4} {i['role']:<5} {i['name']:<18} {i['path']}  "
                   f"{i['keys']} keys ({dtypes}{shards}), {human_bytes(i['bytes'])}{flag}")
        if i.get("read_by") == "permutation":
            out.append("       read by the permutation phase only (no save reads it)")
        for step in i.get("renamed_by", ()):
            out.append(f"       renamed by rename({_quote(step[0])}, {_quote(step[1])})")
        out += [f"       {_step_line(step)}" for step in i.get("layer_steps", ())]
        if "view" in i:
            out.append("       " + _view_line(i["view"]))
    out += _render_loras(d.get("loras", []))
    out += _permutations_text(d.get("permutations", []))
    out += ["", f"Graph ({t['nodes']} nodes after optimization; the recipe spells out "
                f"{t['operations_written']} operations):"]
    for n in d["nodes"]:
        if n["op"] == "load":
            continue
        args = ", ".join(f"#{i}" for i in n["inputs"])
        attrs = ", ".join(f"{k}={_short(v)}" for k, v in n["attrs"].items())
        label = f"  [{n['name']}]" if n["name"] else ""
        shared = f"  shared by {n['consumers']} consumers" if n["consumers"] > 1 else ""
        where = f"  at {n['origins'][0]}" if n["origins"] else ""
        call = f"{n['op']}({args}{'; ' + attrs if attrs else ''})"
        out.append(f"  #{n['id']:<3} {call}{label}{where}{shared}")
    if d["optimizer"]:
        out += ["", "Optimizer:"] + [f"  - {note}" for note in d["optimizer"]]
    out += ["", "Saves:"]
    for s in d["saves"]:
        fb = f"fallback #{s['fallback']} ({s['fallback_reason']})" if s["fallback"] else \
            "no fallback"
        out.append(f"  {s['path']} = #{s['node']}  {fb}, dtype {s['dtype'] or 'as input'}"
                   + (f", shards of {s['shard']}" if s["shard"] else "")
                   + (", delta" if s["delta"] else ""))
        if s.get("lora"):
            out += _extraction_text(s["lora"], s["keys"], s["bytes_written"])
            continue
        if "vocabulary" in s:
            out += _vocabulary_text(s["vocabulary"])
        source = "from the fallback" if s["fallback"] is not None else "as is"
        out.append(f"    {s['keys']} keys: {s['computed']} computed, {s['copied']} copied "
                   f"{source}; writes {human_bytes(s['bytes_written'])}")
        for reason, count in s["copied_reasons"].items():
            out.append(f"      {count} copied: {reason}")
        for ex in s["copied_examples"]:
            out.append(f"      e.g. {ex['key']}: {ex['reason']}")
        if s.get("layer_map"):
            out += render_layer_map(s["layer_map"])
        if s.get("folder"):
            out += _folder_text(s["folder"])
    if "sweep" in d:
        out += [""] + _sweep_text(d["sweep"], d["saves"], t["bytes_read"])
    if "out_of_core" in t:
        out += [""] + _out_of_core_text(t["out_of_core"])
    out += ["", f"Reads {human_bytes(t['bytes_read'])}, writes {human_bytes(t['bytes_written'])}, "
                f"peak memory ~{human_bytes(t['peak_memory_bytes'])} "
                f"(~{human_bytes(t['peak_memory_per_key_bytes'])} per key in flight, largest at "
                f"{t['peak_memory_key']}; {t['threads']} thread(s))", ""]
    if "groups" in d:
        out += _groups_text(d["groups"]) + [""]
    out.append(summary_line(plan))
    return "\n".join(out)


def _sweep_text(sweep: dict, saves: list[dict], bytes_read: int) -> list[str]:
    """The grid: each point's --set values and the files it writes; what reading once saves."""
    points = sweep["points"]
    grid = " × ".join(f"{p['name']} ({len(p['values'])})" for p in sweep["params"])
    files = sum(len(p["saves"]) for p in points)
    out = [f"Sweep ({grid}: {len(points)} points, {files} files):"]
    for p in points:
        values = " ".join(f"{k}={v}" for k, v in p["set"].items())
        out.append(f"  {values}  " + ", ".join(saves[i]["path"] for i in p["saves"]))
    out.append(f"  every input read once for all points: {human_bytes(bytes_read)} (as "
               f"{len(points)} single runs: {human_bytes(sweep['bytes_read_separately'])})")
    return out


def _out_of_core_text(ooc: dict) -> list[str]:
    n, over = ooc["keys"], ooc["over_limit"]
    why = (f"{over} too large to hold in memory under the {human_bytes(ooc['memory_limit'])} "
           "limit" if over else "")
    if n > over:
        why += ("; " if why else "") + f"{n - over} large enough that chunks save memory"
    out = [f"Out of core ({n} key{'s' if n != 1 else ''} run in chunks: {why}):"]
    for ex in ooc["examples"]:
        spill = (f", {ex['spilled']} filtered member(s) spilled to "
                 f"{human_bytes(ex['spill_bytes'])} of temporary files") if ex["spilled"] else ""
        gram = f", {ex['extra_passes']} extra pass(es)" if ex["extra_passes"] else ""
        out.append(f"  {ex['key']}: ~{human_bytes(ex['in_memory_bytes'])} in memory -> "
                   f"{ex['chunks']} chunks of {ex['chunk_elements']:,} elements{gram}{spill}; "
                   f"reads {human_bytes(ex['extra_read_bytes'])} more")
    if n > len(ooc["examples"]):
        out.append(f"  … and {n - len(ooc['examples'])} more")
    spills = (f"; temporary files up to {human_bytes(ooc['largest_spill_bytes'])} per key "
              "(next to the output, removed after the key)") if ooc["largest_spill_bytes"] else ""
    out.append(f"  in all: reads {human_bytes(ooc['extra_read_bytes'])} more than once{spills}")
    return out


def _groups_text(groups: list[dict], shown: int = 8) -> list[str]:
    """One line per group (`--executor ray`); the middle elided when there are many."""
    keys = sum(g["keys"] for g in groups)
    out = [f"Ray key groups ({len(groups):,} tasks for {keys:,} keys; each worker reads its "
           "group's keys by path):"]
    rows = [f"  #{i + 1:<4} {g['keys']:>3} {'key ' if g['keys'] == 1 else 'keys'}  reads "
            f"{human_bytes(g['bytes_read']):>9}  "
            f"{g['first']}" + (f" … {g['last']}" if g["keys"] > 1 else "")
            for i, g in enumerate(groups)]
    if len(rows) > shown:
        rows[shown // 2:-(shown // 2)] = [f"  … {len(rows) - shown} more groups"]
    return out + rows


def summary_line(plan: Plan, running: bool = False) -> str:
    """One line: what the plan writes, reads and holds; `running`: said as a run starts."""
    d, t = plan.data, plan.data["totals"]
    n = len(d["saves"])
    if n == 0:
        return "Plan: the recipe has no save statement · nothing to read or write."
    keys = sorted({s["keys"] for s in d["saves"]})
    as_is = sum(s["copied_reasons"].get(_reason_kind(IDENTICAL), 0) for s in d["saves"])
    copied = sum(s["copied"] for s in d["saves"]) - as_is
    key_text = f"{keys[0]:,}" if len(keys) == 1 else f"{keys[0]:,}–{keys[-1]:,}"
    each = " each" if n > 1 else ""
    return (f"Plan: {n} file{'s' if n != 1 else ''} to write ({key_text} keys{each}; {copied:,} "
            f"copied from fallback{f', {as_is:,} copied as is' if as_is else ''}) · reads {human_bytes(t['bytes_read'])} · writes "
            f"{human_bytes(t['bytes_written'])} · peak memory ~{human_bytes(t['peak_memory_bytes'])}"
            f" at {t['peak_memory_key']} · {'running.' if running else 'nothing executed.'}")


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        if len(v) > 4:
            return "[" + ", ".join(_short(x) for x in v[:3]) + f", … {len(v)} in all]"
        return "[" + ", ".join(_short(x) for x in v) + "]"
    if isinstance(v, dict) and "keymap" in v:
        return v["keymap"]
    return json.dumps(v) if isinstance(v, str) else str(v)


# ------------------------------------------------------------------ dot

def render_dot(plan: Plan) -> str:
    d = plan.data
    lines = ["digraph kmx {", "  rankdir=LR;", "  node [shape=box, fontname=\"monospace\"];"]
    for n in d["nodes"]:
        label = n["name"] or n["op"]
        if n["op"] != "load" and n["name"]:
            label = f"{n['op']}\\n{n['name']}"
        shape = "cylinder" if n["op"] == "load" else "box"
        lines.append(f"  n{n['id']} [label={json.dumps(label)}, shape={shape}];")
        for i in n["inputs"]:
            lines.append(f"  n{i} -> n{n['id']};")
    for i, s in enumerate(d["saves"]):
        lines.append(f"  save{i} [label={json.dumps(s['path'])}, shape=note];")
        lines.append(f"  n{s['node']} -> save{i};")
        if s["fallback"]:
            lines.append(f"  n{s['fallback']} -> save{i} [style=dashed, label=\"fallback\"];")
    lines.append("}")
    return "\n".join(lines) + "\n"

