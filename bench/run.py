#!/usr/bin/env python3
"""kmx against sd-mecha 1.1.8, mergekit 0.1.5 and the I/O floor, on the same merges.

    python bench/run.py                      # the quick preset (< 10 min once inputs exist)
    python bench/run.py --preset full        # every merge, N = 4 and 16, SD1.5 and SDXL/4
    python bench/run.py --suites sd15 --merges ws,ad --n 4,16 --tools kmx,floor

Inputs (bench/data.py) and the peers' venvs (bench/peers.py) are built on first use into the
cache folder and reused. Each tool runs in its own subprocess; its wall time, CPU time
(user + sys) and peak RSS come from os.wait4. Before every timed run the previous outputs are
deleted, dirty pages synced, and the run's inputs read once (warm page cache: every tool starts
from the same, hot, cache when the inputs fit in RAM). After every run `sync` is timed and
added to the wall time, so a tool that leaves its output in the page cache pays for writing it
like kmx and the floor, which fsync. Results accumulate in CACHE/results.json; the table is
printed and written to CACHE/results.md, the plot to --plot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import data  # noqa: E402
import peers  # noqa: E402
import sweep  # noqa: E402

SEED = 250608
TOOLS = ("kmx", "sd-mecha", "mergekit", "floor")
# name -> (title, kmx expression, mergekit (method, per-model parameters) or None,
#          peers whose definition is the same as kmx's, so their outputs are compared)
MERGES = {
    "ws": ("weighted sum", "mean(pool)", ("linear", {"weight": 1.0}), {"sd-mecha", "mergekit"}),
    "ad": ("add difference", "std.task_arithmetic(pool, b, scale=0.3)",
           ("task_arithmetic", {"weight": 0.3}), {"sd-mecha", "mergekit"}),
    "ties": ("TIES", "std.ties_merging(pool, b, density=0.2)",
             ("ties", {"weight": 1.0, "density": 0.2}), {"sd-mecha", "mergekit"}),
    "dare": ("DARE-TIES", "std.dare_ties(pool, b, seed, p=0.9)",
             ("dare_ties", {"weight": 1.0, "density": 0.1}), set()),
    "della": ("DELLA-TIES", "std.della_ties(pool, b, seed, p=0.5, eps=0.1)",
              ("della", {"weight": 1.0, "density": 0.5, "epsilon": 0.1}), set()),
    "gm": ("geometric median", "geometric_median(pool)", None, {"sd-mecha"}),
    "ms": ("Model Stock", "model_stock(pool, b)", ("model_stock", {}), {"mergekit"}),
    "dgmla": ("DGMLA", "std.dgmla(pool, b, seed)", None, set()),
}
MERGES.update(sweep.merges())  # tf-FILTER-VALUE-RULE: the TIES family's settings (sweep.py)
USES_BASE = {"ad", "ties", "dare", "della", "ms", "dgmla", *sweep.merges()}
# Why a peer does not run a case (printed, and kept in the results).
SKIP_WHY = {
    ("mergekit", "sd"): "mergekit reads Hugging Face model folders (config.json + a known "
                        "architecture) only; it cannot load SD single-file checkpoints",
    ("sd-mecha", "llm"): "sd-mecha has no model config for LLaMA keys",
    ("mergekit", "gm"): "mergekit has no geometric median",
    ("mergekit", "dgmla"): "mergekit has no geometric median (DGMLA needs one)",
}
BASIC = [m for m in MERGES if not m.startswith("tf-")]
PRESETS = {
    # (suites, n, merges, tools) triples; the quick one finishes in < 10 min on 2 cores
    "quick": [(["sdxl-r"], [4], [m for m in BASIC if m != "della"],
               ["kmx", "sd-mecha", "floor"]),
              (["sd15"], [4], ["ws", "ad"], ["kmx", "sd-mecha", "floor"]),
              (["llm"], [4], ["ws", "ms"], ["kmx", "mergekit", "floor"])],
    "full": [(["sdxl-r", "sd15"], [4, 16], BASIC, ["kmx", "sd-mecha", "floor"]),
             (["llm"], [4, 16], BASIC, ["kmx", "mergekit", "floor"])],
    **sweep.PRESETS,
}


def kmx_version() -> str:
    """The commit kmx ran at (+dirty when karmixlang/ or stdlib/ has local changes)."""
    def git(*a):
        return subprocess.run(["git", "-C", str(HERE.parent), *a], capture_output=True,
                              text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "karmixlang", "stdlib") else "")


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- a case and its commands

class Case:
    def __init__(self, args, suite: str, n: int, merge: str):
        self.args, self.suite, self.n, self.merge = args, data.SUITES[suite], n, merge
        self.cache = args.cache
        self.dtype = args.out_dtype
        self.name = f"{suite}-n{n}-{merge}" + ("" if self.dtype == "fp16" else f"-{self.dtype}")
        self.dir = self.cache / "runs" / self.name
        self.base = self.suite.path(self.cache, None)
        self.models = [self.suite.path(self.cache, i) for i in range(n)]

    def input_files(self) -> list[Path]:
        ids = ([None] if self.merge in USES_BASE else []) + list(range(self.n))
        return [f for i in ids for f in self.suite.files(self.cache, i)]

    def output_bytes(self) -> int:
        """The output's size: the base's keys, floats in the output dtype."""
        total = 0
        for f in self.suite.files(self.cache, None):
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            for k, v in header.items():
                if k != "__metadata__":
                    size = v["data_offsets"][1] - v["data_offsets"][0]
                    total += size * 2 if v["dtype"] == "F16" and self.dtype == "fp32" else size
        return total

    def out(self, tool: str) -> Path:
        if tool == "mergekit":
            return self.dir / "mergekit-out"
        name = "model.safetensors" if self.suite.sharded else "out.safetensors"
        return self.dir / tool / name

    def skip_reason(self, tool: str) -> str | None:
        family = "llm" if self.suite.sharded else "sd"
        return SKIP_WHY.get((tool, family)) or SKIP_WHY.get((tool, self.merge))

    def command(self, tool: str, py: Path | None) -> list[str]:
        out = self.out(tool)
        out.parent.mkdir(parents=True, exist_ok=True)
        if tool == "kmx":
            recipe = self.dir / "merge.kmx"
            pool = ",\n    ".join(f'"{m}"' for m in self.models)
            recipe.write_text(
                'import "std/recipes.kmx" as std\n\n'
                f"param seed = {SEED}\n\n"
                f'base b = "{self.base}"\n'
                f"cluster pool = [\n    {pool},\n]\n\n"
                f'save "{out}" = {MERGES[self.merge][1]} with dtype="{self.dtype}", fallback=b\n')
            return [sys.executable, "-m", "karmixlang", "run", str(recipe), "--force", "-q"]
        if tool == "floor":
            return [sys.executable, str(HERE / "floor.py"), "--out", str(out),
                    "--size", str(self.output_bytes()), *map(str, self.input_files())]
        if tool == "sd-mecha":
            spec = self.dir / "sd-mecha.json"
            spec.write_text(json.dumps({"merge": self.merge, "base": str(self.base),
                                        "models": list(map(str, self.models)),
                                        "out": str(out), "seed": SEED,
                                        "out_dtype": self.dtype}))
            return [str(py), str(HERE / "workers" / "mecha_merge.py"), str(spec)]
        if tool == "mergekit":
            method, params = MERGES[self.merge][2]
            cfg = {"merge_method": method, "dtype": "float32",
                   "out_dtype": {"fp16": "float16", "fp32": "float32"}[self.dtype],
                   "models": [{"model": str(m), **({"parameters": params} if params else {})}
                              for m in self.models]}
            if self.merge in USES_BASE:
                cfg["base_model"] = str(self.base)
            path = self.dir / "mergekit.yml"
            path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
            return [str(py.parent / "mergekit-yaml"), str(path), str(out), "--random-seed",
                    str(SEED), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
        raise ValueError(tool)


# ---------------------------------------------------------------- measuring

def clean(case: Case, tools=TOOLS) -> None:
    for tool in tools:
        p = case.out(tool)
        if tool == "mergekit":
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def warm(files: list[Path]) -> float:
    """Read every input once, so that each tool starts from the same page cache."""
    t0 = time.perf_counter()
    buf = bytearray(64 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def measure(cmd: list[str], logfile: Path, timeout: float, env: dict | None = None) -> dict:
    """Run cmd in its own process group; wall, CPU and peak RSS of that child (os.wait4)."""
    with open(logfile, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        timed_out = False
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                timed_out = True
                _, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it ourselves
    t1 = time.perf_counter()
    os.sync()
    return {"rc": proc.returncode, "timed_out": timed_out, "wall_s": wall,
            "sync_s": time.perf_counter() - t1, "cpu_s": ru.ru_utime + ru.ru_stime,
            "rss_bytes": ru.ru_maxrss * 1024}


def run_tool(case: Case, tool: str, args) -> dict:
    rec = {"case": case.name, "suite": case.suite.name, "n": case.n, "merge": case.merge,
           "tool": tool, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "kmx_commit": args.commit}
    why = case.skip_reason(tool)
    if why:
        return rec | {"status": "skipped", "why": why}
    py = None
    if tool in ("sd-mecha", "mergekit"):
        try:
            py = peers.ensure(tool, args.cache, log)
        except peers.Unavailable as exc:
            return rec | {"status": "skipped", "why": str(exc)}
    clean(case, [tool])  # a previous run's output; the others stay for the comparison
    os.sync()
    cmd = case.command(tool, py)
    rec["warm_s"] = warm(case.input_files())
    env = os.environ | {"TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    logfile = case.dir / f"{tool}.log"
    m = measure(cmd, logfile, args.timeout, env)
    rec |= m | {"cmd": " ".join(cmd), "log": str(logfile)}
    if m["timed_out"]:
        rec["status"], rec["why"] = "timeout", f"killed after {args.timeout:.0f} s"
    elif m["rc"] != 0:
        tail = logfile.read_text(errors="replace").strip().splitlines()[-3:]
        rec["status"], rec["why"] = "failed", f"exit {m['rc']}: " + " | ".join(tail)[-400:]
    else:
        rec["status"] = "ok"
    return rec


def agreement(case: Case, tool: str) -> dict | None:
    """Max relative error of tool's output against kmx's, where the methods agree."""
    if tool not in MERGES[case.merge][3]:
        return None
    base = str(case.suite.path(case.cache, None))
    r = subprocess.run([sys.executable, str(HERE / "compare.py"), str(case.out("kmx")),
                        str(case.out(tool)), base], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip()[-300:]}
    return json.loads(r.stdout)


def run_case(case: Case, tools: list[str], args) -> list[dict]:
    case.dir.mkdir(parents=True, exist_ok=True)
    order = ["kmx"] + [t for t in tools if t != "kmx"]  # kmx first: the others compare to it
    recs = []
    for tool in order:
        if tool not in tools:
            continue
        rec = run_tool(case, tool, args)
        if rec["status"] == "ok" and tool != "kmx" and recs and recs[0]["status"] == "ok":
            cmp = agreement(case, tool)
            if cmp is not None:
                rec["agreement"] = cmp
        line = f"  {tool:9s} {rec['status']:8s}"
        if "wall_s" in rec:
            line += (f" wall {rec['wall_s'] + rec['sync_s']:7.1f} s  cpu {rec['cpu_s']:7.1f} s"
                     f"  rss {rec['rss_bytes'] / 2**30:6.2f} GiB")
        if "agreement" in rec:
            line += f"  max rel err {rec['agreement'].get('max_rel_err', float('nan')):.2e}"
        if rec.get("why"):
            line += f"  ({rec['why']})"
        log(line)
        recs.append(rec)
    if not args.keep_outputs:
        clean(case)
    return recs


# ---------------------------------------------------------------- report

def wall(r: dict) -> float:
    return r["wall_s"] + r["sync_s"]


def table(results: list[dict]) -> str:
    """Markdown: one row per case and tool; ratios are kmx / that tool."""
    rows = ["| suite | N | merge | tool | wall s | CPU s | peak RSS GiB | wall kmx/tool "
            "| RSS kmx/tool | rel err vs kmx: max per key / global / max of change |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    by_case: dict[str, dict[str, dict]] = {}
    for r in results:
        by_case.setdefault(r["case"], {})[r["tool"]] = r
    for name, recs in by_case.items():
        k = recs.get("kmx")
        for tool in TOOLS:
            r = recs.get(tool)
            if r is None:
                continue
            label = MERGES[r["merge"]][0] + (", fp32 out" if name.endswith("-fp32") else "")
            head = f"| {r['suite']} | {r['n']} | {label} | {tool} "
            if r["status"] != "ok":
                rows.append(head + f"| {r['status']}: {r.get('why', '')[:120]} | | | | | |")
                continue
            kw_ok = k is not None and k["status"] == "ok"
            ratio = f"{wall(k) / wall(r):.2f}" if kw_ok and tool != "kmx" else ""
            rss = (f"{k['rss_bytes'] / r['rss_bytes']:.2f}"
                   if kw_ok and tool not in ("kmx", "floor") else "")
            ag = r.get("agreement")
            err = ""
            if ag:
                err = (f"{ag['max_rel_err']:.1e} / {ag['global_rel_err']:.1e} / "
                       f"{ag['max_rel_err_of_change']:.1e}"
                       if "max_rel_err" in ag else "compare failed")
            elif tool not in ("kmx", "floor") and tool not in MERGES[r["merge"]][3]:
                err = "n/a: defined differently"
            rows.append(head + f"| {wall(r):.1f} | {r['cpu_s']:.1f} | "
                        f"{r['rss_bytes'] / 2**30:.2f} | {ratio} | {rss} | {err} |")
    return "\n".join(rows)


def load_results(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def save_results(path: Path, new: list[dict]) -> list[dict]:
    """Merge new records into the file (the latest per case and tool wins)."""
    old = {(r["case"], r["tool"]): r for r in load_results(path)}
    old.update({(r["case"], r["tool"]): r for r in new})
    merged = list(old.values())
    path.write_text(json.dumps(merged, indent=1))
    return merged


def plot(results: list[dict], out: Path, args) -> None:
    try:
        py = peers.ensure("tools", args.cache, log)
    except peers.Unavailable as exc:
        log(f"[plot] skipped: {exc}")
        return
    tmp = args.cache / "plot-input.json"
    tmp.write_text(json.dumps(results))
    r = subprocess.run([str(py), str(HERE / "plot.py"), str(tmp), str(out)],
                       capture_output=True, text=True)
    log(f"[plot] {out}" if r.returncode == 0 else f"[plot] failed: {r.stderr[-400:]}")


# ---------------------------------------------------------------- main

def selection(args) -> list[tuple[str, int, str, list[str]]]:
    groups = PRESETS[args.preset]
    if args.suites or args.merges or args.n or args.tools:
        groups = [(args.suites or ["sdxl-r"], args.n or [4], args.merges or list(MERGES),
                   args.tools or list(TOOLS))]
    out = []
    for suites, ns, merges, tools in groups:
        for s in suites:
            suite = data.SUITES[s]
            if suite.layout == "sdxl" and suite.scale == 1.0 and not args.full_sdxl:
                log(f"[skip] suite {s} (full size, 6.9 GB per input) needs --full-sdxl")
                continue
            for n in ns:
                out += [(s, n, m, tools) for m in merges]
    return out


def csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="merges: " + ", ".join(
                                     f"{k} ({v[0]})" for k, v in MERGES.items())
                                 + "\nsuites: " + ", ".join(data.SUITES))
    ap.add_argument("--cache", type=Path, default=Path("/tmp/kmx-bench"),
                    help="inputs, venvs, runs and results (default: %(default)s)")
    ap.add_argument("--preset", choices=list(PRESETS), default="quick")
    ap.add_argument("--suites", type=csv(str), help="comma list (overrides the preset)")
    ap.add_argument("--merges", type=csv(str), help="comma list (overrides the preset)")
    ap.add_argument("--n", type=csv(int), help="pool sizes, e.g. 4,16 (overrides the preset)")
    ap.add_argument("--tools", type=csv(str), help=f"comma list of {', '.join(TOOLS)}")
    ap.add_argument("--out-dtype", choices=("fp16", "fp32"), default="fp16",
                    help="output dtype of every tool; fp32 measures agreement without fp16 "
                         "rounding (cases are named ...-fp32)")
    ap.add_argument("--full-sdxl", action="store_true", help="allow the full-size SDXL suite")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per tool run")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the merged files")
    ap.add_argument("--plot", type=Path, help="write the plot (PNG) of the results here")
    ap.add_argument("--report-only", action="store_true",
                    help="print the table and plot from CACHE/results.json, run nothing")
    args = ap.parse_args()
    for name in (args.suites or []) + (args.merges or []) + (args.tools or []):
        if name not in {*data.SUITES, *MERGES, *TOOLS}:
            ap.error(f"unknown name {name!r}")
    args.cache.mkdir(parents=True, exist_ok=True)
    args.commit = kmx_version()
    results_path = args.cache / "results.json"
    if args.report_only:
        results = load_results(results_path)
    else:
        cases = selection(args)
        need: dict[str, int] = {}
        for s, n, _, _ in cases:
            need[s] = max(need.get(s, 0), n)
        for s, n in need.items():
            data.build(data.SUITES[s], args.cache, n, log)
        log(f"[bench] kmx at {args.commit}; {len(cases)} case(s); inputs warmed (read once) before every run; "
            f"wall includes a sync after the tool exits")
        results = []
        for s, n, m, tools in cases:
            case = Case(args, s, n, m)
            log(f"[{case.name}] {MERGES[m][0]}, N = {n}")
            results += run_case(case, tools, args)
            save_results(results_path, results)
    md = table(results)
    (args.cache / "results.md").write_text(md + "\n")
    print("\n" + md)
    if args.plot:
        plot(results, args.plot, args)


if __name__ == "__main__":
    main()
