"""Where a run's wall time went, by stage, from its records.

Every record carries the seconds of its cell's stages (`timing`: load, calibration, prune, the
output checks, evaluation). Summed over the cells of a results folder, beside the wall time of
the whole command (`--wall`, e.g. from `time make demo`), the rest is what happens outside the
cells: set-up, process start, the report and the reproduction table.

    /usr/bin/time -f %e make demo 2> wall.txt
    python benchmarks/demo_stages.py --results runs/demo --wall "$(tail -1 wall.txt)"
"""
from __future__ import annotations

import argparse

from prunebench.store.records import load_records

STAGES = ("load_s", "calibration_s", "prune_s", "checks_s", "eval_s")


def stage_seconds(records) -> dict:
    """{stage: seconds summed over the ok records} (a stage a cell did not have counts 0)."""
    totals = dict.fromkeys(STAGES, 0.0)
    for record in records:
        if record.get("status") != "ok":
            continue
        for stage in STAGES:
            totals[stage] += float(record.get("timing", {}).get(stage) or 0.0)
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, help="the results folder the run wrote")
    ap.add_argument("--wall", type=float, help="the whole command's wall seconds")
    args = ap.parse_args()
    records, _ = load_records(args.results)
    totals = stage_seconds(records)
    cells = sum(totals.values())
    n_ok = sum(r.get("status") == "ok" for r in records)
    print(f"{args.results}: {n_ok} ok cells of {len(records)} records")
    print(f"{'stage':<16}{'seconds':>10}{'share':>8}")
    whole = args.wall if args.wall else cells
    for stage, seconds in totals.items():
        print(f"{stage[:-2]:<16}{seconds:>10.1f}{seconds / whole:>8.1%}")
    if args.wall:
        print(f"{'outside cells':<16}{args.wall - cells:>10.1f}{(args.wall - cells) / whole:>8.1%}"
              "  (set-up, process start, report, reproduce)")
        print(f"{'total':<16}{args.wall:>10.1f}")


if __name__ == "__main__":
    main()
