"""One process of a multi-process cell: `python -m prunebench.cell_worker SPEC.json`.

`prunebench run --nproc-per-node N` starts N of these per learned cell through torchrun
(prunebench.executors.TorchrunExecutor).  Each runs the cell by key; rank 0 writes the record as
any runner does and, beside it, the outcome the launching runner counts.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    from .config import grid_from_dict
    from .records import atomic_write_json
    from .runner import run_cell_by_key

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m prunebench.cell_worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    grid = grid_from_dict(spec["grid"], where="cell worker")
    outcome = run_cell_by_key(grid, spec["results_dir"], spec["key"], **spec["options"])
    if outcome["status"] != "follower":
        atomic_write_json(Path(spec["outcome"]), outcome)
    return 0 if outcome["status"] in ("ok", "skipped", "busy", "follower") else 1


if __name__ == "__main__":
    sys.exit(main())
