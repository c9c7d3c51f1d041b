"""Results over several seeds (the testbed rebuilt per seed: base, adapters, data):
means with the spread beside them, whether a claim holds on every seed, and figures
with one colour and marker per method and the spread drawn as bands or error bars.

Every experiment keeps its records per seed (``evals/results/seeds/``); the tables
and figures are drawn from all the seeds found there.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

# 30 colours a reader tells apart (tab10, Dark2 and Set1 without near-duplicates, then tab20's light half)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#000000",
           "#ffd92f", "#4daf4a", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
           "#dbdb8d", "#9edae5", "#393b79")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8", "H", "1", "2", "3", "4", "x")
DISTINCT_STYLES = math.lcm(len(PALETTE), len(MARKERS))


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaNs are left out."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return float("nan"), float("nan")
    return statistics.fmean(kept), (statistics.stdev(kept) if len(kept) > 1 else 0.0)


def shown(values: Sequence[float], digits: int = 1) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return ""
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


@dataclass
class Stats:
    """One method at one point of an experiment, over seeds."""

    method: str
    title: str
    family: str
    x: object = None
    seeds: List[int] = field(default_factory=list)
    normalized: List[float] = field(default_factory=list)
    scores: Dict[str, List[float]] = field(default_factory=dict)
    spend: Dict[str, List[float]] = field(default_factory=dict)
    records: List[dict] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return mean_std(self.normalized)[0]

    @property
    def std(self) -> float:
        return mean_std(self.normalized)[1]

    def by_seed(self) -> Dict[int, float]:
        return dict(zip(self.seeds, self.normalized))


def collect(per_seed: Mapping[int, Sequence[dict]], x_of: Optional[Callable[[dict], object]] = None) -> List[Stats]:
    """Records of every seed grouped by (method, x), in first-seen order."""
    grouped: Dict[Tuple[str, object], Stats] = {}
    for seed in sorted(per_seed):
        for record in per_seed[seed]:
            x = x_of(record) if x_of else None
            key = (record["method"], x)
            stats = grouped.setdefault(key, Stats(record["method"], record["title"], record["family"], x))
            stats.seeds.append(seed)
            stats.normalized.append(record["normalized"])
            stats.records.append(record)
            for task, value in record["scores"].items():
                stats.scores.setdefault(task, []).append(value)
            for kind, value in record.get("spend", {}).items():
                stats.spend.setdefault(kind, []).append(float(value))
    return list(grouped.values())


def spend_cells(stats: Stats) -> str:
    """Passes over the calibration set (forward-only / gradient) and merge seconds, mean over
    seeds. A Frank-Wolfe row whose solve was read back from the solve cache (another row with
    the same fingerprint made it) spent the passes its trace counts, but its seconds are the
    read-back's: the cell says so."""
    seconds = mean_std(stats.spend.get("seconds") or [float(r.get("merge_seconds", 0.0)) for r in stats.records])[0]
    read_back = sum(bool(((r.get("info") or {}).get("trace") or {}).get("reused_cached_solve")) for r in stats.records)
    if read_back:
        whose = "solve" if read_back == len(stats.records) else f"{read_back} of {len(stats.records)} solves"
        seconds_cell = f"{seconds:.0f} ({whose} read back from the cache)"
    else:
        seconds_cell = f"{seconds:.0f}"
    if not stats.spend and stats.family != "reference":
        return f"not recorded | {seconds_cell}"  # records made before spend was counted
    forward = mean_std(stats.spend.get("forward", [0.0]))[0]
    gradient = mean_std(stats.spend.get("gradient", [0.0]))[0]
    decode = mean_std(stats.spend.get("decode", [0.0]))[0]
    passes = f"{forward:.0f} / {gradient:.0f}" + (f" + {decode:.0f} decodes" if decode else "")
    return f"{passes} | {seconds_cell}"


def bar_table(rows: Sequence[Stats], asked: Sequence[str]) -> str:
    """Methods x asked tasks (means), the normalised mean ± std, each seed, and the spend."""
    seeds = sorted({s for r in rows for s in r.seeds})
    head = ("| method | family | " + " | ".join(asked) + " | normalised (mean ± std) | "
            + " | ".join(f"seed {s}" for s in seeds) + " | passes fwd / grad | merge s |")
    lines = [head, "| --- | --- |" + " ---: |" * (len(asked) + 1 + len(seeds) + 2)]
    for r in rows:
        tasks = " | ".join(f"{mean_std(r.scores.get(t, []))[0]:.3f}" for t in asked)
        each = " | ".join(f"{r.by_seed()[s]:.1f}" if s in r.by_seed() else "" for s in seeds)
        lines.append(f"| {r.title} | {r.family} | {tasks} | **{shown(r.normalized)}** | {each} | {spend_cells(r)} |")
    return "\n".join(lines) + "\n"


def series(stats: Sequence[Stats]) -> Dict[str, Dict[object, Stats]]:
    out: Dict[str, Dict[object, Stats]] = {}
    for s in stats:
        out.setdefault(s.title, {})[s.x] = s
    return out


def fewer_seeds(seeds: Sequence[int], every: Sequence[int]) -> str:
    """A cell's note when it averages fewer seeds than its table has: a row run on seed
    0 alone is not read as a mean beside rows over several."""
    if set(seeds) >= set(every):
        return ""
    return f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, sorted(seeds)))} only)"


def series_table(stats: Sequence[Stats], header: str, xs: Sequence[object]) -> str:
    """Methods x points: mean ± std over seeds, and the change from the first point to the last;
    a cell over fewer seeds than the table says which it has."""
    every = sorted({s for st in stats for s in st.seeds})
    lines = ["| method | " + " | ".join(f"{header} {x}" for x in xs) + " | change (mean) |",
             "| --- |" + " ---: |" * (len(xs) + 1)]
    for title, row in series(stats).items():
        cells = " | ".join(shown(row[x].normalized) + fewer_seeds(row[x].seeds, every) if x in row else "" for x in xs)
        first, last = row.get(xs[0]), row.get(xs[-1])
        change = f"{last.mean - first.mean:+.1f}" if first and last else ""
        lines.append(f"| {title} | {cells} | {change} |")
    return "\n".join(lines) + "\n"


def holds(per_seed: Mapping[int, bool]) -> str:
    """'every seed' or which seeds it fails on."""
    failed = [s for s, ok in sorted(per_seed.items()) if not ok]
    if not failed:
        return f"holds on every seed ({len(per_seed)})"
    return f"fails on seed{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} of {len(per_seed)}"


def styles(titles: Sequence[str], *, labelled: bool = False) -> Dict[str, Tuple[str, str]]:
    """A colour and a marker per method of a figure: colours distinct for up to 30 methods,
    markers for up to 20, and the pair distinct for up to 60 (the two cycles' least common
    multiple). ``labelled``: every mark carries its method's name (a bar chart's ticks), so
    styles may repeat."""
    if len(titles) > DISTINCT_STYLES and not labelled:
        raise ValueError(f"{len(titles)} methods in one figure; at most {DISTINCT_STYLES} colour-marker pairs are distinct")
    return {t: (PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)]) for i, t in enumerate(titles)}


def _finish(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    from mergekit_fw.output.plots import fit_texts

    fig.tight_layout()
    fit_texts(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def bar_figure(path: Path, rows: Sequence[Stats], title: str) -> None:
    """Bars at the mean, error bars of one std, each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = styles([r.title for r in rows], labelled=True)  # each bar is named on the axis
    fig, ax = plt.subplots(figsize=(max(7.0, 0.6 * len(rows) + 2.5), 4.6))
    for i, r in enumerate(rows):
        colour, marker = style[r.title]
        ax.bar(i, r.mean, color=colour, alpha=0.75, yerr=r.std if len(r.normalized) > 1 else None, capsize=3)
        ax.scatter([i] * len(r.normalized), r.normalized, color="black", marker=marker, s=14, zorder=3)
    ax.set_xticks(range(len(rows)), [r.title for r in rows], rotation=55, ha="right", fontsize=7)
    seeds = len({s for r in rows for s in r.seeds})
    ax.set(ylabel="normalised score (individual = 100)",
           title=f"{title}\nbars: mean over {seeds} seed{'s' if seeds != 1 else ''}; whiskers: ±1 std; dots: seeds")
    ax.axhline(100.0, color="black", linewidth=0.5, linestyle="--")
    _finish(fig, path)


def line_figure(path: Path, stats: Sequence[Stats], xlabel: str, title: str) -> None:
    """One line per method at the mean, a band of ±1 std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = series(stats)
    style = styles(list(rows))
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    for name, row in rows.items():
        xs = sorted(row)
        colour, marker = style[name]
        means = [row[x].mean for x in xs]
        stds = [row[x].std for x in xs]
        dashed = "-" if name.startswith("FW") else "--"
        ax.plot(xs, means, dashed, color=colour, marker=marker, label=name)
        if any(len(row[x].normalized) > 1 for x in xs):
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=colour, alpha=0.12, linewidth=0)
    seeds = len({s for st in stats for s in st.seeds})
    ax.set(xlabel=xlabel, ylabel="normalised score (individual = 100)",
           title=f"{title}\nlines: mean over {seeds} seed{'s' if seeds != 1 else ''}; bands: ±1 std")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _finish(fig, path)
