"""The plot of a bench_peers.py run: passkeys found and perplexity per method at each KV fraction.

Reads the rows bench_peers.py wrote with --json; runs in either venv (matplotlib only).

    python benchmarks/peers/plot_peers.py benchmarks/peers/results.json docs/img/peers_passkeys.png
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="the --json file of bench_peers.py")
    parser.add_argument("out", help="the PNG to write")
    args = parser.parse_args()
    with open(args.results, encoding="utf-8") as file:
        run = json.load(file)
    rows = run["rows"]
    exact = {r["method"]: r for r in rows if r["fraction"] is None}
    fractions = sorted({r["fraction"] for r in rows if r["fraction"] is not None}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["fraction"] is not None))
    by = {(r["method"], r["fraction"]): r for r in rows}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (found_axis, ppl_axis) = plt.subplots(1, 2, figsize=(14, 4.5))
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        xs = [f + (m - (len(methods) - 1) / 2) * width for f in range(len(fractions))]
        found = [100 * by[method, f]["found"] / by[method, f]["keys"] for f in fractions]
        ppl = [by[method, f]["perplexity"] for f in fractions]
        found_axis.bar(xs, found, width, label=method)
        ppl_axis.bar(xs, ppl, width, label=method)
    for axis, field, unit in ((found_axis, "found", "passkeys found, %"), (ppl_axis, "perplexity", "perplexity")):
        axis.set_xticks(range(len(fractions)), [f"{f:.1%} of the KV read" for f in fractions])
        axis.set_ylabel(unit)
        reference = exact.get("transformers exact")
        if reference is not None:
            value = 100 * reference["found"] / reference["keys"] if field == "found" else reference["perplexity"]
            axis.axhline(value, color="black", linestyle="--", linewidth=1, label="exact (100%)")
    found_axis.set_ylim(0, 105)
    handles, labels = found_axis.get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=8, loc="center right")
    keys = rows[0]["keys"]
    figure.suptitle(f"SmolLM2-135M: {keys} passkeys in a ~1.9K-token haystack, and perplexity, at equal KV fractions")
    figure.tight_layout(rect=(0, 0, 0.84, 1))
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
