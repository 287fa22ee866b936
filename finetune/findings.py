"""The study's answer: per-arm fits of cross-entropy against N, the CPT gain and its crossover N* with bootstrap
intervals (over evaluation items and seeds), the controls (English CPT at the same budget, swapped sources, reference
points for the generation metrics), compute per stage; written as results.csv, results.json, study.png and
report.md, which states what the data shows and what it cannot."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from finetune import fits


def _ce(stats: np.ndarray) -> float:
    return float(stats[:, 0].sum() / max(stats[:, 1].sum(), 1))


def analyse(rows: list[dict], items: dict[tuple, np.ndarray], cfg) -> dict:
    """`rows`: one per cell (arm, kind, steps, n, seed, ce, ...); `items`: (arm, n, seed) -> (items x 2) NLL sums
    and tokens, the same items in the same order in every cell."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    kind = {r["arm"]: r["kind"] for r in rows}
    steps = {r["arm"]: r["steps"] for r in rows}
    sizes = sorted({r["n"] for r in rows if r["n"] > 0})
    seeds = sorted({r["seed"] for r in rows if r["n"] > 0})
    key_n = {r["n"]: r["n_key"] for r in rows}

    def ce_table(item_idx=None, seed_idx=None) -> dict[str, dict[int, float]]:
        table: dict[str, dict[int, float]] = {}
        for arm in arms:
            table[arm] = {}
            for n in [0, *sizes]:
                picked = range(len(seeds)) if seed_idx is None else seed_idx
                # N=0 trains nothing: one cell, under whichever seed the grid gave it
                chosen = [k[2] for k in items if k[:2] == (arm, 0)] if n == 0 else [seeds[i] for i in picked]
                values = []
                for s in chosen:
                    stats = items.get((arm, key_n.get(n, n), s))
                    if stats is not None:
                        values.append(_ce(stats if item_idx is None else stats[item_idx]))
                if values:
                    table[arm][n] = float(np.mean(values))
        return table

    point = ce_table()
    fitted = {}
    for arm in arms:
        ns = [n for n in sizes if n in point[arm]]
        if len(ns) >= 3:
            fitted[arm] = fits.fit_power_law(ns, [point[arm][n] for n in ns], cfg.fit.starts, cfg.fit.huber_delta)
    base = next(a for a in arms if kind[a] == "base")
    targets = [a for a in arms if kind[a] == "cpt"]
    others = [a for a in arms if a != base]
    n_min, n_max = sizes[0], sizes[-1]
    crossovers = {
        a: fits.crossover(fitted[base], fitted[a], cfg.fit.tolerance, n_min, n_max)
        for a in others
        if a in fitted and base in fitted
    }

    # Bootstrap: items (and seeds) resampled together for every cell, so the arms stay paired
    n_items = len(next(iter(items.values())))
    rng = np.random.default_rng(cfg.data.seed)
    boot_gain = {a: {n: [] for n in [0, *sizes]} for a in others}
    boot_star = {a: [] for a in crossovers}
    boot_net = {a: {n: [] for n in [0, *sizes]} for a in targets}
    for _ in range(cfg.fit.bootstrap):
        idx = rng.integers(0, n_items, n_items)
        seed_idx = rng.integers(0, len(seeds), len(seeds))
        table = ce_table(idx, seed_idx)
        for a in others:
            for n in boot_gain[a]:
                if n in table[a] and n in table[base]:
                    boot_gain[a][n].append(table[base][n] - table[a][n])
        for a in targets:
            control = f"cpt-control-{steps[a]}"
            for n in boot_net[a]:
                if control in table and n in table[a] and n in table[control]:
                    boot_net[a][n].append(table[control][n] - table[a][n])
        refit = {}
        for a in [base, *crossovers] if crossovers else []:
            ns = [n for n in sizes if n in table[a]]
            refit[a] = fits.fit_power_law(ns, [table[a][n] for n in ns], 1, cfg.fit.huber_delta, fitted[a])
        for a in crossovers:
            c = fits.crossover(refit[base], refit[a], cfg.fit.tolerance, n_min, n_max)
            boot_star[a].append(c.n_star if c.status != "never" else math.inf)

    def interval(values):
        return fits.percentile_interval(values)

    gains = {}
    for a in others:
        observed = {
            n: {"gain": point[base][n] - point[a][n], "ci95": interval(boot_gain[a][n])}
            for n in [0, *sizes]
            if n in point[a] and n in point[base]
        }
        entry = {"kind": kind[a], "steps": steps[a], "observed": observed}
        if a in crossovers:
            c, stars = crossovers[a], boot_star[a]
            finite = [s for s in stars if math.isfinite(s)]
            low_high = np.percentile(stars, [2.5, 97.5]).tolist() if len(stars) >= 2 else None  # inf: never crosses
            entry["crossover"] = {
                "n_star": c.n_star,
                "status": c.status,
                "asymptotic_gain": c.asymptote,
                "ci95": low_high,
                "median": float(np.median(stars)) if stars else None,
                "share_never": (len(stars) - len(finite)) / len(stars) if stars else None,
                "share_beyond_data": sum(s > n_max for s in stars) / len(stars) if stars else None,
            }
        control = f"cpt-control-{steps[a]}"
        if a in targets and control in point:  # the new language's data against more training alone
            entry["net_of_control"] = {
                n: {"gain": point[control][n] - point[a][n], "ci95": interval(boot_net[a][n])}
                for n in [0, *sizes]
                if n in point[a] and n in point[control]
            }
        gains[a] = entry
    return {
        "sizes": sizes,
        "seeds": seeds,
        "items": n_items,
        "tolerance": cfg.fit.tolerance,
        "ce": point,
        "fits": {a: vars(f) for a, f in fitted.items()},
        "gains": gains,
    }


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def write_table(rows: list[dict], out: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], analysis: dict, references: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = analysis["sizes"]
    zero_x = sizes[0] / 3  # N=0 drawn left of the smallest N, on its own tick
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    arms = list(analysis["ce"])
    grid = np.logspace(math.log10(sizes[0]), math.log10(sizes[-1] * 3), 200)
    for i, arm in enumerate(arms):
        color = colors[i % len(colors)]
        table = analysis["ce"][arm]
        ns = [n for n in sizes if n in table]
        left.plot(ns, [table[n] for n in ns], "o", color=color, label=arm)
        if 0 in table:
            left.plot([zero_x], [table[0]], "s", color=color, fillstyle="none")
        if arm in analysis["fits"]:
            f = fits.PowerLaw(**analysis["fits"][arm])
            left.plot(grid, f(grid), "-", color=color, alpha=0.6)
        gain = analysis["gains"].get(arm, {}).get("crossover")
        if gain and gain["n_star"] and gain["status"] in ("within", "extrapolated"):
            if gain["n_star"] < grid[-1]:
                left.axvline(gain["n_star"], color=color, linestyle=":")
                if gain["ci95"]:
                    left.axvspan(*[min(max(v, grid[0]), grid[-1]) for v in gain["ci95"]], color=color, alpha=0.08)
            else:  # beyond the plot: said in words, at the curve's end
                label = f"N* ~ {gain['n_star']:,.0f} (beyond the data)"
                left.annotate(label, (grid[-1], f(grid[-1])), color=color, fontsize=8, ha="right", va="bottom")
        chrf = {r["n"]: r["chrf"] for r in rows if r["arm"] == arm and r.get("chrf") is not None}
        xs = sorted(chrf)
        right.plot([zero_x if n == 0 else n for n in xs], [chrf[n] for n in xs], "o-", color=color, label=arm)
    for j, (name, value) in enumerate(references.items()):
        right.axhline(value["chrf"], color="gray", linestyle=["--", ":", "-."][j % 3], label=f"{name} (reference)")
    for ax, label in ((left, "response cross-entropy (nats per token)"), (right, "chrF of greedy generations")):
        ax.set_xscale("log")
        ax.set_xticks([zero_x, *sizes])
        ax.set_xticklabels(["0", *[str(n) for n in sizes]])
        ax.set_xlabel("fine-tuning examples N")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    left.set_title(f"CE vs N, fits L(N) = E + A/N^alpha; dotted: N* (gain < {analysis['tolerance']})")
    right.set_title("generation metric, with reference points")
    fig.tight_layout()
    path = out / "study.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ci(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[n/a]"


def _n(value) -> str:
    return "never" if value is None or not math.isfinite(value) else f"{value:,.0f}"


def _n_ci(ci) -> str:
    return f"[{_n(ci[0])}, {_n(ci[1])}]" if ci else "[n/a]"


def _answer(arm: str, analysis: dict) -> list[str]:
    """What the data says of one CPT arm: the gain at the smallest and largest N, its trend, the crossover, the
    controls."""
    sizes, tol = analysis["sizes"], analysis["tolerance"]
    g = analysis["gains"][arm]
    first, last = g["observed"][sizes[0]], g["observed"][sizes[-1]]
    if first["ci95"] and last["ci95"] and last["ci95"][1] < first["ci95"][0]:
        trend = "it shrinks as N grows"
    elif first["ci95"] and last["ci95"] and last["ci95"][0] > first["ci95"][1]:
        trend = "it grows with N"
    else:
        trend = "the data cannot tell whether it shrinks as N grows (the intervals overlap)"
    lines = [
        f"- **{arm}** ({g['steps']} CPT steps): the CPT gain in response cross-entropy is {first['gain']:+.3f} nats "
        f"{_ci(first['ci95'])} at N={sizes[0]} and {last['gain']:+.3f} {_ci(last['ci95'])} at N={sizes[-1]} (95% "
        f"bootstrap intervals over evaluation items and seeds): {trend}."
    ]
    c = g.get("crossover")
    if c is None:
        lines.append("  No crossover was fitted (too few sizes).")
    elif c["status"] == "within":
        lines.append(
            f"  The fitted gain falls below the tolerance of {tol} nats at N* = {c['n_star']:,.0f} "
            f"{_n_ci(c['ci95'])}, inside the data: beyond about that many examples CPT stops paying in this metric."
        )
    elif c["status"] == "extrapolated":
        lines.append(
            f"  At the largest N the gain is still above the tolerance of {tol} nats; the fits put N* at "
            f"{c['n_star']:,.0f} {_n_ci(c['ci95'])} (bootstrap median {_n(c['median'])}), **beyond the data: "
            f"{c['n_star'] / sizes[-1]:,.0f} times the largest N, an extrapolation**; "
            f"{100 * (c['share_never'] or 0):.0f}% of bootstrap fits never fall below the tolerance."
        )
    elif c["status"] == "never":
        lines.append(
            f"  The fitted curves level off with the gain at {c['asymptotic_gain']:+.3f} nats, above the tolerance of "
            f"{tol}: by the fits, no N makes CPT unnecessary. That rests on the fitted floors E, which the data "
            "constrain weakly (see below)."
        )
    else:
        lines.append(
            f"  The gain is under the tolerance of {tol} nats already at the smallest N: at this budget CPT does not "
            "help this task."
        )
    if c is not None and c["ci95"] and c["n_star"] and not c["ci95"][0] <= c["n_star"] <= c["ci95"][1]:
        lines.append(
            "  The point estimate of N* lies outside its bootstrap interval: N* moves a lot with small changes in the "
            f"fitted exponents (three parameters on {len(sizes)} sizes leave {len(sizes) - 3} degree(s) of freedom), "
            "so the interval is not reliable and N* is an order of magnitude at best."
        )
    control = analysis["gains"].get(f"cpt-control-{g['steps']}")
    if control:  # the control's own effect: base - control, shown as control - base (negative: better)
        effects = [
            f"{-co['gain']:+.3f} at N={n}" for n in (0, sizes[0], sizes[-1]) if (co := control["observed"].get(n))
        ]
        lines.append(
            "  The control alone (the same CPT budget on the original language) changes the cross-entropy by "
            + ", ".join(effects)
            + " against the base (negative: better)."
        )
    net = g.get("net_of_control") or {}
    if net:
        n0, n1 = min(net), max(net)
        lines.append(
            f"  Net of the control, the target-language CPT gains {net[n0]['gain']:+.3f} {_ci(net[n0]['ci95'])} at "
            f"N={n0} and {net[n1]['gain']:+.3f} {_ci(net[n1]['ci95'])} at N={n1}: "
            + (
                "the gain is the new language's data, not more training."
                if net[n1]["ci95"] and net[n1]["ci95"][0] > 0
                else "at the largest N the gain is not distinguishable from more training alone."
            )
        )
    return lines


def _ce_table(analysis: dict) -> list[str]:
    sizes = analysis["sizes"]
    lines = [
        "| arm | " + " | ".join(f"N={n}" for n in [0, *sizes]) + " | fit E / A / alpha |",
        "|---" * (len(sizes) + 3) + "|",
    ]
    for arm, table in analysis["ce"].items():
        f = analysis["fits"].get(arm)
        fit = f"{f['E']:.3f} / {f['A']:.2f} / {f['alpha']:.3f}" if f else "-"
        values = " | ".join(f"{table[n]:.3f}" if n in table else "-" for n in [0, *sizes])
        lines.append(f"| {arm} | {values} | {fit} |")
    floors = [a for a, f in analysis["fits"].items() if f["E"] < 0.1 * min(analysis["ce"][a].values())]
    if floors:
        lines += [
            "",
            f"The fits of {', '.join(floors)} put the floor E near zero: with {len(sizes)} sizes the data do not "
            "identify where the curves level off, so each fit is close to a pure power law and N* follows the "
            "ratio of their slopes; more sizes, or larger ones, would pin E down.",
        ]
    return lines


def report(rows: list[dict], analysis: dict, references: dict, context: dict, out: Path) -> Path:
    """report.md: the answer first, then the evidence, the controls, the compute and the limits."""
    lines = ["# Does a large fine-tuning set make continued pretraining unnecessary?", "", "## Answer", ""]
    for arm, g in analysis["gains"].items():
        if g["kind"] == "cpt":
            lines += _answer(arm, analysis)
    swaps = [r for r in rows if r.get("ce_swapped") is not None]
    if swaps:
        largest = max(r["n"] for r in swaps)
        deltas = [r["ce_swapped"] - r["ce"] for r in swaps if r["n"] == largest]
        lines.append(
            f"- **Do the models use the source?** Barely, if at all: with each evaluation source swapped for another "
            f"item's, cross-entropy rises by {min(deltas):+.3f} to {max(deltas):+.3f} nats at N={largest}. The gains "
            "above are in modelling the target text more than in using the input."
            if max(deltas) < 0.1
            else f"- **Do the models use the source?** Yes: swapping the sources raises cross-entropy by "
            f"{min(deltas):+.3f} to {max(deltas):+.3f} nats at N={largest}."
        )
    lines += ["", "## Cross-entropy per cell", "", *_ce_table(analysis), "", "## Controls", ""]
    if swaps:
        lines.append(
            "- **Swapped sources**: each evaluation item scored with another item's source (the same targets): "
            + ", ".join(f"{r['arm']} N={r['n']} {r['ce_swapped'] - r['ce']:+.3f}" for r in swaps if r["n"] == largest)
            + "."
        )
    if references:
        shown = ", ".join(f"{k} chrF {v['chrf']:.1f} / BLEU {v['bleu']:.1f}" for k, v in references.items())
        best = max((r for r in rows if r.get("chrf") is not None), key=lambda r: r["chrf"], default=None)
        lines.append(f"- **Reference points** for the generation metrics: {shown}.")
        if best:
            lines.append(f"  The best cell reaches chrF {best['chrf']:.1f} ({best['arm']}, N={best['n']}).")
    contamination = context.get("contamination") or {}
    if contamination:
        shown = "; ".join(
            f"{k}: {v['items']}" if v["items"] is not None else f"{k}: not checked" for k, v in contamination.items()
        )
        excluded = "; ".join(
            f"{k}: {v['held_out_pages_excluded']} held-out pages and {v['overlapping_documents_excluded']} overlapping "
            "documents excluded"
            for k, v in contamination.items()
            if "held_out_pages_excluded" in v
        )
        removed = {k: v for k, v in context.get("data", {}).items() if k.startswith("eval_items_removed")}
        lines.append(
            f"- **Contamination**: evaluation items that share text with each source after the exclusions: {shown}. "
            f"Excluded to get there: {excluded or 'nothing'}"
            + (f"; evaluation items removed: {removed}" if removed else "")
            + "."
        )
    lines += ["", "## Compute", "", "| stage | tokens | FLOPs |", "|---|---|---|"]
    for stage, value in context["compute"].items():
        tokens = "not counted here" if value["tokens"] is None else f"{value['tokens']:,}"
        flops = "unknown" if value["flops"] is None else f"{value['flops']:.2e}"
        lines.append(f"| {stage} | {tokens} | {flops} |")
    lines += ["", "## What this can and cannot show", "", *[f"- {line}" for line in context["limits"]]]
    lines += ["", "![study](study.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_json(rows: list[dict], analysis: dict, references: dict, context: dict, out: Path) -> None:
    (out / "results.json").write_text(
        json.dumps({"cells": rows, "analysis": analysis, "references": references} | context, indent=2, default=str),
        encoding="utf-8",
    )
