"""The committed results are what the current code computes: every cell of each committed grid
has an ok record under the key the current code gives it (the key hashes the method's and the
evaluation's source, the model file and the texts), and no record is left from another key.
A change to a method or to the evaluation without regenerating its records fails here, unless
the folder declares its regeneration (prunebench/store/regeneration.py: since which commit, and why);
then its old keys are accepted, and the declaration must go once every record is current."""
import subprocess
from pathlib import Path

import pytest

from prunebench.run.grid import load_grid, preset
from prunebench.store.records import load_records
from prunebench.store.regeneration import PENDING_FILE, REGENERATED_DIR, pending_regeneration

from conftest import REPO, SHARED_DATA


def _grid_file(name, data_dir=False):
    def build():
        grid = load_grid(REPO / "benchmarks" / "grids" / name)
        if data_dir:
            if not SHARED_DATA.is_dir():
                pytest.skip(f"no shared data directory at {SHARED_DATA}")
            grid.data_dir = str(SHARED_DATA)  # where the files are is not identity; their content is
        return grid
    return build


def _committed_grids():
    yield "results", lambda: preset("embedded")
    yield "results/allocation", _grid_file("allocation.yaml")
    yield "results/semistructured", _grid_file("semistructured.yaml")
    yield "results/patch_tile", _grid_file("patch_tile.yaml")
    yield "results/leap_budget", _grid_file("leap_budget.yaml")
    yield "results/paper_tasks_local", _grid_file("paper_tasks_local.yaml", data_dir=True)
    yield "results/paper_tasks_local", _grid_file("paper_tasks_local_mmlu.yaml", data_dir=True)


GRIDS = list(_committed_grids())


@pytest.mark.slow
@pytest.mark.parametrize("folder,build", GRIDS, ids=[f"{g[0]}#{i}" for i, g in enumerate(GRIDS)])
def test_committed_records_are_the_current_codes(folder, build):
    if not (REPO / folder / "records").is_dir():
        pytest.skip(f"{folder} is not committed")
    grid = build()
    keys = {c.key: c.label for c in grid.cells()}
    records, skipped = load_records(REPO / folder)
    assert not skipped, skipped
    ok = {r["key"] for r in records if r["status"] == "ok"}
    missing = [label for key, label in keys.items() if key not in ok]
    pending = pending_regeneration(REPO / folder)
    staged = REPO / folder / REGENERATED_DIR
    if pending is not None:
        assert missing, f"{folder}: every cell is the current code's: remove {folder}/{PENDING_FILE}"
        done, bad = load_records(staged) if staged.is_dir() else ([], [])
        assert not bad, f"{staged}: unreadable records {bad}"
        stale = [Path(r["_path"]).name for r in done if r["key"] not in keys or r["status"] != "ok"]
        assert not stale, f"{staged}: records that are not ok cells of the current code: {stale}"
        if (REPO / ".git").exists():
            found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{pending.since}^{{commit}}"],
                                   capture_output=True)
            assert found.returncode == 0, f"{folder}/{PENDING_FILE}: since {pending.since} is no commit of this repository"
        pytest.skip(f"{folder}: {len(missing)} of {len(keys)} cells to regenerate ({len(done)} done in "
                    f"{REGENERATED_DIR}/). {pending.notice()}")
    assert not missing, f"{folder}: cells whose committed record is not the current code's (regenerate them): {missing}"
    assert not staged.exists(), f"{staged}: nothing is being regenerated; its records belong in {folder}/records"


def test_no_committed_record_is_left_from_another_key():
    grids = {}
    for folder, build in GRIDS:
        try:
            grid = build()
        except pytest.skip.Exception:
            continue
        grids.setdefault(folder, set()).update(c.key for c in grid.cells())
    for folder, keys in grids.items():
        if pending_regeneration(REPO / folder) is not None:
            continue  # its old keys are declared (see above)
        for r in load_records(REPO / folder)[0]:
            assert r["key"] in keys, f"{Path(r['_path']).name} belongs to no committed grid of the current code"
