"""Records are validated on read (prunebench.store.records.RECORD_SCHEMA): a record cut down, with a
wrong type, from a newer schema version or holding NaN is named with its reason, counts as not
done (the runner recomputes its cell and moves the bad file to rejected/), and the report still
builds from the other records."""
import copy
import io
import json
import shutil

import pandas as pd
import pytest

from prunebench.cli.command import main
from prunebench.store.records import (
    REJECTED_DIR, SCHEMA_VERSION, InvalidRecord, load_records, ok_keys, parse_record_text, read_record,
    record_files
)

from conftest import REPO

COMMITTED = REPO / "results"
TINY = ["--models", "tiny:llama", "--methods", "magnitude", "--sparsities", "0.5", "--calibration", "lee",
        "--n-samples", "4", "--seqlen", "64", "--ppl", "lee", "--tasks", "none", "--max-ppl-windows", "16",
        "--seeds", "0", "-q"]


def _cut_down(rec):
    return json.dumps({"key": rec["key"], "status": "ok"})


def _wrong_types(rec):
    rec = copy.deepcopy(rec)
    rec["model"] = rec["model"]["id"]  # a string where every reader expects an object
    return json.dumps(rec)


def _future_version(rec):
    rec = copy.deepcopy(rec)
    rec["schema_version"] = SCHEMA_VERSION + 1
    return json.dumps(rec)


def _nan(rec):
    rec = copy.deepcopy(rec)
    dataset = next(iter(rec["eval"]["perplexity"]))
    rec["eval"]["perplexity"][dataset]["value"] = float("nan")
    return json.dumps(rec)  # json writes a bare NaN unless told allow_nan=False


# name -> (the bad text made from a valid record, what the reason says)
BAD = {
    "cut-down": (_cut_down, "missing schema_version"),
    "wrong-types": (_wrong_types, "model is string, expected object"),
    "future-version": (_future_version, f"written by a newer prunebench (schema_version {SCHEMA_VERSION + 1}"),
    "nan": (_nan, "not strict JSON: NaN"),
}


def _committed(pattern):
    path = sorted((COMMITTED / "records").glob(pattern))[0]
    return path, json.loads(path.read_text())


def test_every_committed_record_validates():
    folders = sorted(COMMITTED.glob("**/records"))
    assert folders
    for folder in folders:
        records, skipped = load_records(folder.parent)
        assert skipped == [], folder
        assert len(records) == len(record_files(folder.parent)) > 0, folder
        for attempt in sorted((folder / "attempts").glob("*.json")):
            read_record(attempt)


@pytest.mark.parametrize("name", BAD)
def test_a_bad_record_is_refused_with_its_reason(name):
    make, reason = BAD[name]
    _, rec = _committed("smollm2-135m__wanda__0.5__*.json")
    with pytest.raises(InvalidRecord) as info:
        parse_record_text(make(rec))
    assert reason in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("text,reason", [
    ('{"schema_version": 1, "key": "k", "status": "ok", "x": Infinity}', "not strict JSON: Infinity"),
    ('{"schema_version": 1, "key": "k", "status": "ok", "status": "failed"}', "'status' twice"),
    ('[1, 2]', "not an object"),
    ('{"schema_version": 1, "key": "k", "status": "done"', "not valid JSON"),
])
def test_other_strict_json_refusals(text, reason):
    with pytest.raises(InvalidRecord) as info:
        parse_record_text(text)
    assert reason in str(info.value)


def test_unknown_fields_are_allowed_and_types_are_checked_where_they_are():
    _, rec = _committed("smollm2-135m__wanda__0.5__*.json")
    newer = copy.deepcopy(rec)
    newer["reconstruction"] = {"relative_error": 0.12, "per_layer": {"a": [1, 2]}}  # an optional field added later
    newer["eval"]["perplexity"]["lee"]["something_new"] = "x"
    assert parse_record_text(json.dumps(newer))["reconstruction"]["relative_error"] == 0.12
    failed = {k: v for k, v in copy.deepcopy(rec).items() if k != "eval"}
    parse_record_text(json.dumps({**failed, "status": "failed", "error": "RuntimeError: boom"}))  # no eval: fine
    with pytest.raises(InvalidRecord, match="missing eval"):
        parse_record_text(json.dumps(failed))  # an ok record must have been evaluated
    deep = copy.deepcopy(rec)
    deep["eval"]["perplexity"]["lee"]["window_nll"][3] = "12.5"
    with pytest.raises(InvalidRecord, match=r"eval\.perplexity\.lee\.window_nll\[3\] is string"):
        parse_record_text(json.dumps(deep))
    flag = copy.deepcopy(rec)
    flag["seed"] = True  # a bool is not an integer here
    with pytest.raises(InvalidRecord, match="seed is boolean"):
        parse_record_text(json.dumps(flag))


def test_report_names_each_bad_record_and_tables_the_others(tmp_path, capsys, caplog):
    records = tmp_path / "results" / "records"
    records.mkdir(parents=True)
    for pattern in ("smollm2-135m__dense__*.json", "smollm2-135m__wanda__0.5__*.json"):
        path, _ = _committed(pattern)
        shutil.copy(path, records / path.name)
    _, wanda = _committed("smollm2-135m__wanda__0.5__*.json")
    for i, (name, (make, _)) in enumerate(BAD.items()):
        other = copy.deepcopy(wanda)  # another cell each: any of them tabled would add a row
        other["key"] = f"{i}" * 64
        other["method"]["name"] = "magnitude"
        other["sparsity"].update(label=f"0.{i + 6}", target=0.6 + i / 10)
        (records / f"{name}.json").write_text(make(other))
    capsys.readouterr()
    assert main(["report", "--results", str(tmp_path / "results"), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    for name, (_, reason) in BAD.items():
        line = next(x for x in (captured.err + caplog.text).splitlines() if f"{name}.json" in x)
        assert reason in line
    assert sorted(pd.read_csv(io.StringIO(captured.out))["method"]) == ["dense", "wanda"]


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    results = tmp_path_factory.mktemp("schema") / "results"
    assert main(["run", *TINY, "--results", str(results)]) == 0
    return results


@pytest.mark.parametrize("name", BAD)
def test_runner_recomputes_a_bad_record_and_keeps_it_aside(name, tiny_results, tmp_path, capsys, caplog):
    make, reason = BAD[name]
    results = tmp_path / "results"
    shutil.copytree(tiny_results, results)
    (path,) = (results / "records").glob("tiny-llama__magnitude__0.5__*.json")
    good = json.loads(path.read_text())
    bad_text = make(good)
    path.write_text(bad_text)
    assert good["key"] not in ok_keys(results)  # not done
    capsys.readouterr()
    assert main(["run", *TINY, "--results", str(results), "--dry-run"]) == 0
    assert f"todo  {good['key'][:12]}" in capsys.readouterr().out

    assert main(["run", *TINY, "--results", str(results)]) == 0
    captured = capsys.readouterr()
    assert "1 ran ok, 1 skipped" in captured.out
    said = captured.err + caplog.text
    assert any(path.name in line and reason in line for line in said.splitlines())
    (kept,) = (results / REJECTED_DIR).glob("*.json")
    assert kept.read_text() == bad_text  # the bad file is kept as it was, beside its reason
    assert reason in kept.with_name(kept.name + ".reason.txt").read_text()
    assert f"moved to {kept}" in said
    fresh = read_record(path)
    assert fresh["status"] == "ok" and fresh["key"] == good["key"]
    assert good["key"] in ok_keys(results)


def test_dense_relative_fields_are_typed():
    """The dense-relative entry of a perplexity result: optional (older records lack it), but
    typed where present, down to the per-window histogram pairs."""
    _, rec = _committed("smollm2-135m__wanda__0.5__*.json")
    good = copy.deepcopy(rec)
    good["eval"]["perplexity"]["lee"]["dense_relative"] = {
        "kl_mean": 0.12, "kl_p99": 1.5, "top1": 0.8, "k": 64, "window_kl": [10.0, 12.5], "window_top1": [40, 41],
        "window_kl_hist": [[[3, 20], [150, 30]], [[4, 51]]], "summary": {"file": "work/dense/x", "seconds": 1.0}}
    parse_record_text(json.dumps(good))
    for path, bad, where in (
            (("window_top1", 1), 40.5, r"window_top1\[1\] is number"),
            (("window_kl_hist", 0), [[3, "20"]], r"window_kl_hist\[0\]\[0\]\[1\] is string"),
            (("top1",), "0.8", "top1 is string")):
        broken = copy.deepcopy(good)
        target = broken["eval"]["perplexity"]["lee"]["dense_relative"]
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = bad
        with pytest.raises(InvalidRecord, match=where):
            parse_record_text(json.dumps(broken))
