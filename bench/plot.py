"""Plot bench results (run in the bench tools venv): python plot.py RESULTS.json OUT.png

Two panels per suite and N: wall time (log scale) and peak RSS per merge, one bar per tool.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TOOLS = ("kmx", "sd-mecha", "mergekit", "floor")
COLORS = {"kmx": "#1f77b4", "sd-mecha": "#ff7f0e", "mergekit": "#2ca02c", "floor": "#7f7f7f"}


def main() -> None:
    # fp16 outputs only: the fp32-output cases exist to measure agreement
    results = [r for r in json.load(open(sys.argv[1]))
               if r.get("status") == "ok" and not r["case"].endswith("-fp32")]
    groups = sorted({(r["suite"], r["n"]) for r in results})
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 3.6 * len(groups)), squeeze=False)
    for row, (suite, n) in enumerate(groups):
        recs = [r for r in results if (r["suite"], r["n"]) == (suite, n)]
        merges = list(dict.fromkeys(r["merge"] for r in recs))
        tools = [t for t in TOOLS if any(r["tool"] == t for r in recs)]
        width = 0.8 / max(1, len(tools))
        for col, (metric, label) in enumerate((("wall", "wall time (s, log)"),
                                               ("rss", "peak RSS (GiB)"))):
            ax = axes[row][col]
            for i, tool in enumerate(tools):
                if metric == "rss" and tool == "floor":
                    continue
                xs, ys = [], []
                for j, m in enumerate(merges):
                    r = next((r for r in recs if r["merge"] == m and r["tool"] == tool), None)
                    if r is None:
                        continue
                    xs.append(j + (i - (len(tools) - 1) / 2) * width)
                    ys.append(r["wall_s"] + r["sync_s"] if metric == "wall"
                              else r["rss_bytes"] / 2**30)
                ax.bar(xs, ys, width, label=tool, color=COLORS[tool])
            ax.set_xticks(range(len(merges)), merges)
            ax.set_title(f"{suite}, N = {n}: {label}")
            if metric == "wall":
                ax.set_yscale("log")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()
