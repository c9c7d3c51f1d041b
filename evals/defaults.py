"""Which settings should be mergekit-fw's defaults (issue 17): every candidate against
the supervised layer-wise baseline, per experiment cell, on the seeds where both ran.

    python -m evals.defaults [--quick]

Reads the per-seed records of experiments 1 to 6 and 9 (``evals/results/seeds/``) and
writes ``evals/results/defaults[_quick].md``: per cell and method, the normalised score
(mean ± std over its seeds), the paired difference to the supervised baseline (mean
over the seeds both ran, and on how many of them the method is at or above it), what
it spent (forward-pass equivalents, a gradient pass counting 3), its calibration loss,
and the mean weight it gives the members that should get none: experiment 2's irrelevant
adapters, experiment 4's misinitialised ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Callable

from evals.experiments.seeds import shown
from evals.methods import units

RESULTS = Path(__file__).parent / "results"
REFERENCE = "supervised"
# the rows compared: the baseline at its own and at FW's budget, the current defaults,
# and every candidate for new defaults
METHODS = (
    "supervised", "supervised_fw_budget", "task_arithmetic", "fw_hard_layer", "fw_hard_layer_init_ta_calibrated",
    "fw_box", "fw_box_30", "fw_box_pairwise_30", "fw_box_pairwise_30_init_ta_calibrated", "fw_box_arc_30", "fw_box_arc_adaptive_30", "fw_scaled_hull_2",
    "fw_scaled_hull_4", "fw_pairwise", "pg_box", "pg_hull", "sfw_box", "sfw_hull",
    "fw_rank", "fw_auto", "fw_rank_wp0.3", "fw_box_arc_adaptive_30_wp0.3",
)
EXPERIMENTS: dict[str, Callable[[dict], str]] = {  # stem -> how a record names its cell
    "exp1_main": lambda r: "14 members, 4 asked",
    "exp6_ablations": lambda r: "14 members, 4 asked",
    "exp2_irrelevant": lambda r: f"{len(r['cell']['asked'])} asked + {len(r['cell']['members']) - len(r['cell']['asked'])} irrelevant",
    "exp3_relevant": lambda r: f"asked = pool = {len(r['cell']['asked'])}",
    "exp4_noisy": lambda r: f"{len(r['cell']['members'])} members, 4 asked"
    + (f" (+ {len(r['outsiders'])} noisy)" if r.get("outsiders") else ""),
    "exp5_data": lambda r: f"14 members, 4 asked, {r['cell']['per_task']} rows a task",
    "exp9_relevant_all": lambda r: f"{len(r['cell']['members'])} adapters, all {len(r['cell']['asked'])} tasks asked",
}


def load(stem: str, quick: bool) -> dict[int, list[dict]]:
    """Each seed's records; a record of a cell with members that should get no weight
    names them under ``outsiders`` (experiment 2: the members no asked task is for;
    experiment 4: the misinitialised adapters)."""
    suffix = "_quick" if quick else ""
    out = {}
    for path in sorted((RESULTS / "seeds").glob(f"{stem}{suffix}_seed*.json")):
        seed = int(path.stem.rsplit("seed", 1)[1])
        data = json.loads(path.read_text())
        if "records" in data:
            records = data["records"]
        else:  # experiment 4: the main pool, then the main pool and the noisy adapters
            records = data["clean"] + [{**r, "outsiders": data["noisy_members"]} for r in data["noisy"]]
        if stem == "exp2_irrelevant":
            records = [{**r, "outsiders": [m for m in r["cell"]["members"] if m not in r["cell"]["asked"]]}
                       for r in records]
        out[seed] = records
    return out


def final_loss(record: dict) -> float | None:
    info = record.get("info", {})
    trace = info.get("trace") or {}
    return trace.get("final_loss", info.get("loss_final"))


def outsiders_weight(record: dict) -> float | None:
    """The mean coefficient of the members that should get none (None where the cell has
    no such members or the method reports no coefficients)."""
    members = record["cell"]["members"]
    values = list(record.get("info", {}).get("mean_coefficients", {}).values())
    others = [v for name, v in zip(members, values) if name in record.get("outsiders", ())]
    if len(values) < len(members) or not others:
        return None
    return sum(others) / len(others)


def cells(quick: bool) -> dict[tuple[str, str], dict[str, dict[int, dict]]]:
    """(experiment, cell) -> method -> seed -> record; experiment 6's cell is experiment 1's."""
    table: dict[tuple[str, str], dict[str, dict[int, dict]]] = {}
    for stem, name_of in EXPERIMENTS.items():
        shown_as = "exp1_main" if stem == "exp6_ablations" else stem
        for seed, records in load(stem, quick).items():
            for record in records:
                if record["method"] in METHODS:
                    key = (shown_as, name_of(record))
                    table.setdefault(key, {}).setdefault(record["method"], {}).setdefault(seed, record)
    return table


def _mean(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f}" if values else ""


def report(quick: bool) -> str:
    lines = [
        f"# Candidate defaults against the supervised baseline ({'quick' if quick else 'full'} testbed)",
        "",
        "Written by `python -m evals.defaults" + (" --quick" if quick else "") + "` from the per-seed records of "
        "experiments 1 to 6 and 9 (experiment 6's cell is experiment 1's). vs supervised: the mean over the seeds "
        "both ran of (method - supervised), and on how many of those the method is at or above it. Spend: "
        "forward-pass equivalents over the calibration set (a gradient pass counts 3), mean over seeds.",
        "",
    ]
    for (stem, cell), methods in sorted(cells(quick).items()):
        reference = methods.get(REFERENCE, {})
        lines += [f"## {stem}: {cell}", "",
                  "| method | seeds | normalised | vs supervised | at or above | spend | calibration loss | "
                  "irrelevant or noisy members' weight |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name in METHODS:
            by_seed = methods.get(name)
            if not by_seed:
                continue
            seeds = sorted(by_seed)
            scores = [by_seed[s]["normalized"] for s in seeds]
            common = [s for s in seeds if s in reference]
            diffs = [by_seed[s]["normalized"] - reference[s]["normalized"] for s in common]
            spend = [units(by_seed[s].get("spend") or by_seed[s]["info"].get("spend") or {}) for s in seeds]
            losses = [v for v in (final_loss(by_seed[s]) for s in seeds) if v is not None]
            weights = [v for v in (outsiders_weight(by_seed[s]) for s in seeds) if v is not None]
            versus = f"{statistics.fmean(diffs):+.1f}" if diffs and name != REFERENCE else ""
            above = f"{sum(d >= 0 for d in diffs)}/{len(diffs)}" if diffs and name != REFERENCE else ""
            lines.append(f"| {by_seed[seeds[0]]['title']} | {','.join(map(str, seeds))} | {shown(scores)} | {versus} | "
                         f"{above} | {statistics.fmean(spend):.0f} | {_mean(losses)} | {_mean(weights)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick testbed's records")
    args = parser.parse_args()
    text = report(args.quick)
    path = RESULTS / f"defaults{'_quick' if args.quick else ''}.md"
    path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
