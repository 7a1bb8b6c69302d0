"""`prunebench reproduce`: a fresh run against a reference, from hand-written records; and the lock."""
from __future__ import annotations

import copy
import hashlib
import io
import json
from importlib.metadata import version

import pytest

from prunebench.cli.command import main
from prunebench.provenance.environment_lock import _version_matches, lock_fingerprint, parse_constraints
from prunebench.store.records import atomic_write_json, cell_record_path
from prunebench.report.reproduce import PPL_REL_TOL, Tolerance, compare_runs, render_markdown, reproduce

TASK = "pb_lee_next_sentence"


def _record(method, label, ppl, acc, *, key=None, mask="m" * 64, status="ok"):
    key = key or hashlib.sha256(f"{method}{label}".encode()).hexdigest()
    return {
        "schema_version": 1, "key": key, "status": status, "error": None if status == "ok" else "RuntimeError: boom",
        "model": {"id": "smollm2-135m"}, "method": {"name": method, "config": {}},
        "sparsity": {"label": label, "target": None if label == "dense" else float(label), "mask_sha256": mask},
        "eval": {"perplexity": {"lee": {"value": ppl, "seqlen": 512, "n_tokens": 20440}},
                 "zeroshot": {TASK: {"metric": "acc", "value": acc, "stderr": 0.055, "n": 80}}},
        "created_at": "2026-11-23T16:51:44+00:00",
    }


BASE = [_record("dense", "dense", 29.8956, 0.45), _record("wanda", "0.5", 66.3532, 0.3625),
        _record("leap", "0.5", 43.6715, 0.4)]


def _write(root, records):
    for r in records:
        atomic_write_json(cell_record_path(root, r["model"]["id"], r["method"]["name"], r["sparsity"]["label"], r["key"]), r)
    return root


def _pair(tmp_path, edit=None):
    """(fresh, reference) directories; `edit(records)` changes the fresh side's copies."""
    ref = _write(tmp_path / "reference", BASE)
    fresh_records = copy.deepcopy(BASE)
    if edit:
        fresh_records = edit(fresh_records) or fresh_records
    (tmp_path / "fresh" / "records").mkdir(parents=True)
    return _write(tmp_path / "fresh", fresh_records), ref


def _cell(result, method):
    return next(c for c in result["cells"] if c["method"] == method)


def _rows(result, method):
    return {r["metric"]: r for r in result["rows"] if r["method"] == method}


def test_identical_runs_reproduce(tmp_path, capsys):
    fresh, ref = _pair(tmp_path)
    assert reproduce(fresh, ref) == 0
    out = capsys.readouterr().out
    assert "**REPRODUCED**: 3 of 3 reference cells" in out
    assert ("| Model | Method | Sparsity | Seed | Metric | Fresh | Reference mean ± SD (seeds) | Diff | Allowed | "
            "Masks identical | Within noise |") in out
    assert "| smollm2-135m | wanda | 0.5 | 0 | ppl:lee | 66.3532 | 66.3532 (1) | 0 | 0.0663532 (0.001 relative) | yes | yes |" in out
    data = json.loads((fresh / "report" / "reproduction.json").read_text())
    assert data["exit_status"] == 0 and data["reproduced"] is True
    assert len(data["rows"]) == 6  # 3 cells x (perplexity + accuracy)
    for row in data["rows"]:
        assert {"model", "method", "sparsity", "metric", "fresh", "reference", "rel_diff", "masks_identical",
                "within_tolerance"} <= set(row)
        assert row["within_tolerance"] is True and row["masks_identical"] is True and row["rel_diff"] == 0
    assert (fresh / "report" / "reproduction.md").read_text() == out
    assert not (ref / "report").exists()  # the reference is written only when asked
    assert not list(fresh.glob("report/*.tmp"))


def test_perplexity_beyond_tolerance_fails(tmp_path):
    def edit(recs):
        recs[1]["eval"]["perplexity"]["lee"]["value"] *= 1 + 2 * PPL_REL_TOL

    fresh, ref = _pair(tmp_path, edit)
    result = compare_runs(fresh, ref)
    assert result["exit_status"] == 1
    row = _rows(result, "wanda")["ppl:lee"]
    assert row["within_tolerance"] is False and row["rel_diff"] == pytest.approx(2 * PPL_REL_TOL)
    assert _rows(result, "wanda")[f"acc:{TASK}"]["within_tolerance"] is True
    assert _cell(result, "wanda")["status"] == "differs" and _cell(result, "dense")["status"] == "reproduced"
    assert "**NOT REPRODUCED**" in render_markdown(result)
    assert "| 0.132706 | 0.0663532 (0.001 relative) | yes | **NO** |" in render_markdown(result)
    # A looser tolerance lets the same figures through.
    assert compare_runs(fresh, ref, Tolerance(ppl_rel=1e-2))["exit_status"] == 0


def test_perplexity_within_tolerance_passes(tmp_path):
    def edit(recs):
        recs[1]["eval"]["perplexity"]["lee"]["value"] *= 1 + PPL_REL_TOL / 10

    result = compare_runs(*_pair(tmp_path, edit))
    assert result["exit_status"] == 0
    assert 0 < _rows(result, "wanda")["ppl:lee"]["rel_diff"] < PPL_REL_TOL


def test_accuracy_must_be_equal(tmp_path):
    def edit(recs):
        recs[2]["eval"]["zeroshot"][TASK]["value"] = 0.4125  # one item of 80 flipped

    result = compare_runs(*_pair(tmp_path, edit))
    assert result["exit_status"] == 1
    assert _rows(result, "leap")[f"acc:{TASK}"]["within_tolerance"] is False


def test_changed_mask_is_flagged(tmp_path):
    def edit(recs):
        recs[1]["sparsity"]["mask_sha256"] = "f" * 64
        del recs[2]["sparsity"]["mask_sha256"]

    fresh, ref = _pair(tmp_path, edit)
    result = compare_runs(fresh, ref)
    assert {r["masks_identical"] for r in _rows(result, "wanda").values()} == {False}
    assert {r["masks_identical"] for r in _rows(result, "leap").values()} == {"unknown"}
    assert result["mask_mismatches"] == [{"model": "smollm2-135m", "method": "wanda", "sparsity": "0.5"}]
    # Same figures: listed, not a failure, unless identical masks are required.
    assert result["exit_status"] == 0
    md = render_markdown(result)
    assert "## Masks differ" in md and "| 66.3532 | 66.3532 (1) | 0 | 0.0663532 (0.001 relative) | no | yes |" in md
    assert "| unknown | yes |" in md
    assert compare_runs(fresh, ref, require_identical_masks=True)["exit_status"] == 1


def test_missing_and_extra_cells(tmp_path):
    def edit(recs):
        return [recs[0], recs[1], _record("sparsegpt", "0.5", 52.41, 0.375)]  # leap missing, sparsegpt extra

    result = compare_runs(*_pair(tmp_path, edit))
    assert result["exit_status"] == 1
    assert result["missing_in_fresh"] == [{"model": "smollm2-135m", "method": "leap", "sparsity": "0.5"}]
    assert result["only_in_fresh"] == [{"model": "smollm2-135m", "method": "sparsegpt", "sparsity": "0.5"}]
    md = render_markdown(result)
    assert "## Missing in the fresh run" in md and "- smollm2-135m | leap | 0.5" in md
    assert "## Only in the fresh run" in md


def test_diverged_cell(tmp_path):
    def diverge(rec):
        rec["eval"]["perplexity"]["lee"].update(value=None, diverged=True)

    fresh, ref = _pair(tmp_path, lambda recs: diverge(recs[2]))
    result = compare_runs(fresh, ref)
    row = _rows(result, "leap")["ppl:lee"]
    assert row["fresh"] == "diverged" and row["rel_diff"] is None and row["within_tolerance"] is False
    assert result["exit_status"] == 1
    assert "| diverged | 43.6715 (1) | - | - |" in render_markdown(result)
    # A record holding a bare Infinity is not strict JSON: it is named with its reason, never read
    # as a figure, and the reproduction's own JSON stays strict.
    old = copy.deepcopy(BASE[2])
    old["eval"]["perplexity"]["lee"]["value"] = float("inf")
    path = cell_record_path(ref, "smollm2-135m", "leap", "0.5", old["key"])
    path.write_text(json.dumps(old))  # Python's json writes Infinity; prunebench's writer never does
    out = io.StringIO()
    assert reproduce(fresh, ref, out=out) == 1
    text = (fresh / "report" / "reproduction.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in reproduction.json"))
    assert path.name in text
    # Diverged on both sides: the outcome reproduced.
    ref_recs = copy.deepcopy(BASE)
    diverge(ref_recs[2])
    _write(ref, ref_recs)
    assert compare_runs(fresh, ref)["exit_status"] == 0


def test_failed_cell_in_fresh_run(tmp_path):
    def edit(recs):
        recs[1].update(status="failed", error="RuntimeError: boom")
        recs[1]["eval"] = {}

    result = compare_runs(*_pair(tmp_path, edit))
    assert result["exit_status"] == 1
    assert result["failed"] == [{"model": "smollm2-135m", "method": "wanda", "sparsity": "0.5", "side": "fresh",
                                 "seed": 0, "error": "RuntimeError: boom"}]
    assert _cell(result, "wanda")["status"] == "failed in fresh"
    assert "## Failed cells" in render_markdown(result)


def test_differing_key_is_flagged_and_still_compared(tmp_path):
    def edit(recs):
        recs[0]["key"] = "0" * 64

    result = compare_runs(*_pair(tmp_path, edit))
    assert result["exit_status"] == 0
    assert [k["method"] for k in result["key_mismatches"]] == ["dense"]
    assert {r["keys_match"] for r in _rows(result, "dense").values()} == {False}
    assert "## Keys differ" in render_markdown(result)


def test_stale_record_in_the_same_cell_is_not_picked(tmp_path):
    # A leftover record of the same cell under other settings: the one sharing the reference key wins.
    stale = _record("wanda", "0.5", 999.0, 0.1, key="1" * 64)
    stale["created_at"] = "2027-01-01T00:00:00+00:00"
    result = compare_runs(*_pair(tmp_path, lambda recs: recs + [stale]))
    assert result["exit_status"] == 0 and not result["key_mismatches"]


def test_cli_exit_codes_and_reference_report(tmp_path, capsys):
    fresh, ref = _pair(tmp_path)
    assert main(["reproduce", "--fresh", str(fresh), "--reference", str(ref), "--write-reference-report"]) == 0
    assert json.loads((ref / "report" / "reproduction.json").read_text())["reproduced"] is True
    assert (ref / "report" / "reproduction.md").exists()

    bad, _ = _pair(tmp_path / "bad", lambda recs: recs[1]["eval"]["perplexity"]["lee"].update(value=70.0))
    assert main(["reproduce", "--fresh", str(bad), "--reference", str(ref)]) == 1
    assert main(["reproduce", "--fresh", str(bad), "--reference", str(ref), "--tolerance-ppl", "0.1"]) == 0
    assert main(["reproduce", "--fresh", str(tmp_path / "nowhere"), "--reference", str(ref)]) == 2
    assert "**NOT REPRODUCED**" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the lock

def test_lock_fingerprint(tmp_path):
    pytest_version = version("pytest")
    good = tmp_path / "good.txt"
    good.write_text(f"# a comment\n\npytest=={pytest_version}\nPyYAML=={version('pyyaml')}  # trailing\n")
    fp = lock_fingerprint(good)
    assert fp == {"file": str(good), "sha256": hashlib.sha256(good.read_bytes()).hexdigest(), "matches": True,
                  "mismatches": []}

    bad = tmp_path / "bad.txt"
    bad.write_text(f"pytest==0.0.1\nno-such-package-xyz==1.0\npyyaml=={version('pyyaml')}\n")
    fp = lock_fingerprint(bad)
    assert fp["matches"] is False and fp["mismatches"] == ["no-such-package-xyz", "pytest"]

    # Computed once per process: a later edit of the same file is not re-read.
    bad.write_text(f"pytest=={pytest_version}\n")
    assert lock_fingerprint(bad)["matches"] is False

    absent = lock_fingerprint(tmp_path / "absent.txt")
    assert absent["sha256"] is None and absent["matches"] is False


def test_version_matching_follows_pip():
    assert _version_matches("2.13.0+cpu", "2.13.0")  # a pin without a local label accepts any build
    assert not _version_matches("2.13.0", "2.13.0+cpu")
    assert not _version_matches("2.13.1", "2.13.0")
    assert _version_matches("1.0", "1.0.0")


def test_repository_lock_pins_every_line():
    from prunebench.provenance.environment_lock import DEFAULT_LOCK

    if not DEFAULT_LOCK.exists():
        pytest.skip("not a source checkout")
    lines = [ln for ln in DEFAULT_LOCK.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    pins = parse_constraints(DEFAULT_LOCK.read_text())
    assert len(pins) == len(lines)  # nothing unpinned or unparsable
    assert pins["torch"] == "2.13.0" and "transformers" in pins and "lm-eval" in pins
    assert lock_fingerprint()["file"] == "constraints.txt"


def test_a_different_machine_is_named_beside_the_differences(tmp_path):
    def other_cpu(records):
        for r in records:
            r["env"] = {"cpu": "Other CPU", "cpu_capability": "AVX2", "torch": "2.13.0"}

    fresh, ref = _pair(tmp_path, other_cpu)
    for path in (ref / "records").glob("*.json"):  # the reference ran elsewhere
        r = json.loads(path.read_text())
        r["env"] = {"cpu": "AMD EPYC", "cpu_capability": "AVX512", "torch": "2.13.0"}
        atomic_write_json(path, r)
    result = compare_runs(fresh, ref)
    assert {f for f, _, _ in result["environment_differences"]} == {"cpu", "cpu_capability"}
    text = render_markdown(result)
    assert "## Environment differs" in text and "cpu: fresh Other CPU; reference AMD EPYC" in text
    same = compare_runs(ref, ref)
    assert same["environment_differences"] == [] and "Environment differs" not in render_markdown(same)
