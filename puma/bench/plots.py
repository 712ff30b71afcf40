"""PNG plots from the benchmark JSON: bytes by op type, accuracy vs fraction bits, cost vs length,
latency by model site."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

#: pphlo ops grouped into the categories the plot shows.
OP_GROUPS = {
    "comparisons": (
        "pphlo.less",
        "pphlo.greater",
        "pphlo.less_equal",
        "pphlo.greater_equal",
        "pphlo.equal",
        "pphlo.not_equal",
        "pphlo.reduce",
        "pphlo.maximum",
        "pphlo.minimum",
    ),
    "selects": ("pphlo.select",),
    "multiplications": ("pphlo.multiply",),
    "matrix products": ("pphlo.dot", "pphlo.dot_general"),
    "exp / reciprocal / rsqrt": (
        "pphlo.exponential",
        "pphlo.reciprocal",
        "pphlo.rsqrt",
        "pphlo.divide",
        "pphlo.sqrt",
        "pphlo.tanh",
        "pphlo.logistic",
    ),
}


def _group(op: str) -> str:
    for group, ops in OP_GROUPS.items():
        if op in ops:
            return group
    return "other"


def bytes_by_op(costs: dict, cell_prefix: str, path: str) -> str | None:
    """Grouped bars: MB per op category for each set of ``cell_prefix`` (e.g. ``bert-base/128``)."""
    cells = {k.split("/")[-1]: v for k, v in costs["cells"].items() if k.startswith(cell_prefix + "/")}
    if not cells:
        return None
    groups = list(OP_GROUPS) + ["other"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(cells)
    for i, (name, cell) in enumerate(sorted(cells.items())):
        totals = {g: 0.0 for g in groups}
        for op, v in cell["per_op"].items():
            totals[_group(op)] += v["bytes_sent"] / 1e9
        ax.barh([j + i * width for j in range(len(groups))], [totals[g] for g in groups], height=width, label=name)
    ax.set_yticks([j + width * (len(cells) - 1) / 2 for j in range(len(groups))], groups)
    ax.set_xlabel("GB sent by all parties")
    ax.set_title(f"Where the bytes go: {cell_prefix} (ABY3)")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def fxp_series(sweep: dict) -> dict[str, list[dict]]:
    """The fraction-bits sweep split by ring, each sorted by bits: a line never joins FM64 to
    FM128 (the ring changes more than the bits); points the calibration preflight refused have
    no measurement and are left out."""
    series: dict[str, list[dict]] = {}
    for point in sweep.values():
        if "refused" in point:
            continue
        series.setdefault(point["field"], []).append(point)
    return {field: sorted(points, key=lambda p: p["fxp_bits"]) for field, points in sorted(series.items())}


def accuracy_vs_bits(accuracy: dict, path: str) -> str | None:
    """MiniLM cosine (min) and stories260K perplexity change against fraction bits, one line per
    ring and measure, with one legend for both axes."""
    sweep = accuracy.get("results", {}).get("fxp")
    if not sweep:
        return None
    series = fxp_series(sweep)
    exact = next(p for p in sweep.values() if "refused" not in p)["stories_perplexity_exact"]
    fig, left = plt.subplots(figsize=(7.5, 4.2))
    right = left.twinx()
    markers = dict(zip(series, "os^D"))
    for field, points in series.items():
        bits = [p["fxp_bits"] for p in points]
        left.plot(
            bits,
            [max(1.0 - p["minilm_cosine_min"], 1e-12) for p in points],
            marker=markers[field],
            linestyle="-",
            color="tab:blue",
            label=f"1 - MiniLM cosine (min), {field}",
        )
        right.plot(
            bits,
            [abs((p["stories_perplexity"] or float("nan")) / exact - 1.0) for p in points],
            marker=markers[field],
            linestyle="--",
            color="tab:red",
            label=f"|stories260K perplexity change|, {field}",
        )
    all_bits = sorted({p["fxp_bits"] for points in series.values() for p in points})
    left.set_xticks(all_bits, [str(b) for b in all_bits])
    left.set_yscale("log")
    right.set_yscale("log")
    left.set_xlabel("fraction bits (FM64: 64-bit ring, FM128: 128-bit ring)")
    left.set_ylabel("1 - cosine with exact", color="tab:blue")
    right.set_ylabel("|relative perplexity change|", color="tab:red")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], fontsize="small", loc="upper right")
    left.set_title("Accuracy against fixed-point precision")
    fig.tight_layout()
    return _save(fig, path)


def cost_vs_length(costs: dict, row: str, path: str) -> str | None:
    """GB against input length for each set of ``row``."""
    series: dict[str, list] = {}
    for key, cell in costs["cells"].items():
        parts = key.split("/")
        if parts[0] != row or len(parts) != 3:
            continue
        length = int(parts[1].split("+")[0])
        series.setdefault(parts[2], []).append((length, cell["bytes_sent"] / 1e9))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    ax.set_xlabel("tokens")
    ax.set_ylabel("GB sent by all parties")
    ax.set_title(f"Cost against input length: {row}")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def latency_sites(latency: dict, model: str, path: str) -> str | None:
    """One decode step of ``model`` by site: the busiest party's send actions (left) and the slowest
    party's seconds (right) per site, one bar group per set (the ``puma bench latency`` cells
    ``model/set``); the legend gives each set's sum over the sites and the measured step."""
    cells = {
        k.split("/")[1]: v
        for k, v in latency["cells"].items()
        if k.startswith(model + "/") and k.count("/") == 1 and "sites" in v.get("sites", {})
    }
    if not cells:
        return None
    sites = list(dict.fromkeys(s for c in cells.values() for s in c["sites"]["sites"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(sites) + 2.2 + 0.2 * len(cells)), sharey=True)
    height = 0.8 / len(cells)
    for i, (name, cell) in enumerate(cells.items()):
        found = cell["sites"]
        label = f"{name} ({cell['role']})" if cell.get("role") else name
        rows = [j + i * height for j in range(len(sites))]
        for ax, key, unit in ((axes[0], "max_party_send_actions", ""), (axes[1], "max_party_s", " s")):
            values = [found["sites"].get(s, {}).get("per_step", {}).get(key, 0) for s in sites]
            ax.barh(
                rows,
                values,
                height=height,
                label=f"{label}: sites {found['sum'][key]:.4g}{unit}, "
                f"step measured {found['measured_step'][key]:.4g}{unit}",
            )
    axes[0].set_yticks([j + height * (len(cells) - 1) / 2 for j in range(len(sites))], sites)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("busiest party's send actions per decode step")
    axes[1].set_xlabel("slowest party's seconds per decode step (sim)")
    for ax in axes:
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.14 - 0.5 / len(sites)))
    fig.suptitle(f"One decode step by model site: {model} (ABY3)")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
