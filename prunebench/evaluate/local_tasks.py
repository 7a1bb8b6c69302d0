"""Zero-shot task documents from local files: the same lm-eval tasks, read from a data directory.

Given ``data_dir`` (laid out like shared/data, see its MANIFEST.md), each task's local files are
converted once into the column layout of the HF dataset lm-eval would have loaded, cached as
jsonl, and a generated task YAML ``include``s lm-eval's own YAML and overrides only
dataset_path / dataset_kwargs and the split names. Prompts, choices, targets, process_docs and
metrics stay lm-eval's, and the task keeps its lm-eval name, so local and hub results are
directly comparable. A new local task is one converter and one row of LOCAL_TASKS.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prunebench.cache import cache_root
from prunebench.errors import UserError

log = logging.getLogger("prunebench")

# Bump when a converter's output changes, so cached conversions are rebuilt.
CONVERTER_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Local files -> rows in the HF dataset's column layout (one function per task family)

def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_jsonl(path: Path) -> list[dict]:
    with _open_text(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_labels(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _need(path: Path, task: str) -> Path:
    if not path.is_file():
        raise UserError(f"zero-shot task {task!r}: local file not found: {path}",
                        hint="see shared/data/MANIFEST.md for the expected layout, or run without --data-dir "
                             "(with network access) to use the hub copy")
    return path


def _qa_choices(question: dict) -> dict:
    # ARC / OpenBookQA originals hold a list of {text, label}; HF holds {text: [...], label: [...]}.
    return {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}


def _arc(path: Path) -> list[dict]:
    # HF allenai/ai2_arc: id, question, choices {text, label}, answerKey
    return [{"id": r["id"], "question": r["question"]["stem"], "choices": _qa_choices(r["question"]),
             "answerKey": r["answerKey"]} for r in _read_jsonl(path)]


def _openbookqa(path: Path) -> list[dict]:
    # HF allenai/openbookqa (main): id, question_stem, choices {text, label}, answerKey
    return [{"id": r["id"], "question_stem": r["question"]["stem"], "choices": _qa_choices(r["question"]),
             "answerKey": r["answerKey"]} for r in _read_jsonl(path)]


def _paired(rows: list[dict], labels: list[str], what: str) -> None:
    if len(rows) != len(labels):
        raise UserError(f"{what}: {len(rows)} rows but {len(labels)} labels", hint="the .jsonl and .lst files must match")


def _piqa(path: Path, labels: Path) -> list[dict]:
    # HF piqa: goal, sol1, sol2, label (int)
    rows, lab = _read_jsonl(path), _read_labels(labels)
    _paired(rows, lab, "piqa")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)} for r, y in zip(rows, lab)]


def _winogrande(path: Path, labels: Path) -> list[dict]:
    # HF winogrande (winogrande_xl): sentence, option1, option2, answer as the string "1"/"2"
    rows, lab = _read_jsonl(path), _read_labels(labels)
    _paired(rows, lab, "winogrande")
    return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": str(r.get("answer", y))}
            for r, y in zip(rows, lab)]


def _bool_label(v) -> int:
    if isinstance(v, bool):
        return int(v)
    s = str(v).strip().lower()
    if s in ("true", "1"):
        return 1
    if s in ("false", "0"):
        return 0
    raise UserError(f"boolq: unexpected label {v!r}", hint="labels must be true/false")


def _boolq(path: Path) -> list[dict]:
    # HF super_glue/boolq: question, passage, idx, label (0 = False, 1 = True); the local copy
    # stores the label as the string "true"/"false".
    return [{"question": r["question"], "passage": r["passage"], "idx": int(r["idx"]), "label": _bool_label(r["label"])}
            for r in _read_jsonl(path)]


def _rte(directory: Path) -> list[dict]:
    # HF nyu-mll/glue (rte): sentence1, sentence2, label (0 entailment, 1 not_entailment), idx.
    # The GLUE parquet is exactly that; the SuperGLUE jsonl is a fallback (it strips the quotes
    # around 6 of the 277 sentences, see MANIFEST.md).
    parquet = directory / "glue_rte_validation-00000-of-00001.parquet"
    if parquet.is_file():
        import pyarrow.parquet as pq

        return [{"sentence1": r["sentence1"], "sentence2": r["sentence2"], "label": int(r["label"]), "idx": int(r["idx"])}
                for r in pq.read_table(parquet).to_pylist()]
    rows = _read_jsonl(_need(directory / "superglue_RTE_val.jsonl", "rte"))
    log.warning("rte: GLUE parquet not found, using the SuperGLUE jsonl (6 rows differ in quoting)")
    lab = {"entailment": 0, "not_entailment": 1}
    return [{"sentence1": r["premise"], "sentence2": r["hypothesis"], "label": lab[r["label"]], "idx": int(r["idx"])}
            for r in rows]


def _lambada(path: Path) -> list[dict]:
    # HF EleutherAI/lambada_openai (default): text
    return [{"text": r["text"]} for r in _read_jsonl(path)]


HELLASWAG_ORIGINALS = ("hellaswag_val.jsonl", "hellaswag_val.jsonl.gz", "hellaswag_val.jsonl.bz2")


def _hellaswag(directory: Path) -> list[dict]:
    # lm-eval's hellaswag process_docs needs activity_label, ctx_a, ctx_b (it capitalises ctx_b)
    # and the raw endings: only the original rowanz/hellaswag jsonl has them. The derived llama.cpp
    # text file in shared/data has ctx_a and ctx_b merged and the endings already preprocessed
    # differently, so lm-eval's prompts cannot be rebuilt from it exactly: refuse it clearly.
    for name in HELLASWAG_ORIGINALS:
        if (directory / name).is_file():
            keep = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split", "split_type")
            return [{**{k: r[k] for k in keep if k in r}, "label": str(r["label"])}  # HF stores label as a string
                    for r in _read_jsonl(directory / name)]
    derived = directory / "hellaswag_val_full.txt.bz2"
    raise UserError(
        "zero-shot task 'hellaswag': the data directory has no original-format HellaSwag validation file"
        + (" (only the derived llama.cpp text format, which loses ctx_a/ctx_b and lm-eval's preprocessing)"
           if derived.is_file() else ""),
        hint=f"put rowanz/hellaswag data/hellaswag_val.jsonl (10,042 rows, sha256 0aa3b888...) at {directory / HELLASWAG_ORIGINALS[0]}, "
             "drop hellaswag from --tasks, or run without --data-dir (with network access)")


def _mmlu_rows(path: Path, subject: str) -> list[dict]:
    # HF cais/mmlu: question, subject, choices [4], answer (0-3). The authors' CSVs have no header,
    # fields may contain newlines, so read them with a CSV parser.
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    out = []
    for r in rows:
        if len(r) != 6 or r[5].strip() not in ("A", "B", "C", "D"):
            raise UserError(f"mmlu: malformed row in {path}: {r[:1]!r}...", hint="expected question,A,B,C,D,answer")
        out.append({"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5].strip())})
    return out


# ---------------------------------------------------------------------------------------------
# The local-task table: which lm-eval YAML, which files, how to convert them

@dataclass(frozen=True)
class LocalTask:
    stock_yaml: str                            # lm-eval's task YAML, relative to lm_eval/tasks/
    inputs: tuple[str, ...]                    # files or folders relative to <data_dir>/tasks/
    convert: Callable[..., list[dict]] | None  # (*input paths) -> rows in the HF layout
    eval_split: str                            # the split lm-eval scores on (must match the stock YAML)


LOCAL_TASKS: dict[str, LocalTask] = {
    "arc_easy": LocalTask("arc/arc_easy.yaml", ("arc_easy/ARC-Easy-Test.jsonl",), _arc, "test"),
    "arc_challenge": LocalTask("arc/arc_challenge.yaml", ("arc_challenge/ARC-Challenge-Test.jsonl",), _arc, "test"),
    "openbookqa": LocalTask("openbookqa/openbookqa.yaml", ("openbookqa/test.jsonl",), _openbookqa, "test"),
    "piqa": LocalTask("piqa/piqa.yaml", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa, "validation"),
    "winogrande": LocalTask("winogrande/default.yaml", ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"),
                            _winogrande, "validation"),
    "boolq": LocalTask("super_glue/boolq/default.yaml", ("boolq/val.jsonl",), _boolq, "validation"),
    "rte": LocalTask("glue/rte/default.yaml", ("rte",), _rte, "validation"),
    "hellaswag": LocalTask("hellaswag/hellaswag.yaml", ("hellaswag",), _hellaswag, "validation"),
    "lambada_openai": LocalTask("lambada/lambada_openai.yaml", ("lambada_openai/lambada_test.jsonl",), _lambada, "test"),
    # MMLU is a group of 57 subject tasks: handled by _build_mmlu (test split, dev for few-shot).
    "mmlu": LocalTask("mmlu/default/_mmlu.yaml", ("mmlu/test", "mmlu/dev"), None, "test"),
}


def local_task_names() -> list[str]:
    """Tasks that can be read from a data directory (plus the embedded ones, which need none)."""
    return sorted(LOCAL_TASKS)



# ---------------------------------------------------------------------------------------------
# Generated task folders for local data

def stock_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def lm_eval_version() -> str:
    import lm_eval

    return getattr(lm_eval, "__version__", "unknown")


def _cache_dir() -> Path:
    return cache_root()


def _fingerprint(task: str, inputs: list[Path]) -> str:
    # The content of every input file, the converter version and the lm-eval install the YAMLs
    # include: a change to any of them gives a new folder (no stale conversions).
    h = hashlib.sha256(json.dumps([task, CONVERTER_VERSION, lm_eval_version(), str(stock_root())]).encode())
    for p in inputs:
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _write_yaml(path: Path, cfg: dict) -> None:
    import yaml

    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False, allow_unicode=True)


def _override(stock: Path, files: dict[str, Path], eval_split: str, fewshot_split: str | None = None) -> dict:
    # Only where the documents come from changes: lm-eval's YAML is included as is, then the
    # dataset becomes the converted jsonl and the split names point at what it holds. Splits we
    # do not have (train, and validation for test-scored tasks) are switched off so nothing
    # tries to load them.
    return {
        "include": str(stock),
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
        "training_split": None,
        "validation_split": eval_split if eval_split == "validation" else None,
        "test_split": eval_split if eval_split == "test" else None,
        "fewshot_split": fewshot_split,
    }


# The builders write into `out` (a temporary folder) but the YAMLs name the data files by their
# path in `final`, the folder `out` is renamed to once complete.

def _build_simple(task: str, spec: LocalTask, inputs: list[Path], out: Path, final: Path) -> None:
    rows = spec.convert(*inputs)
    if not rows:
        raise UserError(f"zero-shot task {task!r}: no rows in {inputs[0]}", hint="check the data directory")
    name = f"{task}.{spec.eval_split}.jsonl"
    _write_jsonl(out / name, rows)
    _write_yaml(out / f"{task}.yaml",
                _override(stock_root() / spec.stock_yaml, {spec.eval_split: final / name}, spec.eval_split))


def _build_mmlu(inputs: list[Path], out: Path, final: Path) -> None:
    test_dir, dev_dir = inputs
    stock_dir = stock_root() / "mmlu" / "default"
    # The group YAMLs (mmlu -> mmlu_stem/... -> tag mmlu_*_tasks) are wrapped unchanged so the
    # group and its size-weighted average are lm-eval's own.
    for group_yaml in sorted(stock_dir.glob("_mmlu*.yaml")):
        _write_yaml(out / group_yaml.name, {"include": str(group_yaml)})
    subject_yamls = sorted(stock_dir.glob("mmlu_*.yaml"))
    if not subject_yamls:
        raise UserError(f"lm-eval's MMLU task files were not found under {stock_dir}", hint="reinstall lm-eval")
    for sy in subject_yamls:
        subject = sy.stem[len("mmlu_"):]
        test = _need(test_dir / f"{subject}_test.csv", "mmlu")
        dev = _need(dev_dir / f"{subject}_dev.csv", "mmlu")
        files = {}
        for split, src in (("test", test), ("dev", dev)):
            name = f"mmlu_{subject}.{split}.jsonl"
            _write_jsonl(out / name, _mmlu_rows(src, subject))
            files[split] = final / name
        _write_yaml(out / sy.name, _override(sy, files, "test", fewshot_split="dev"))


def prepare_local_task(task: str, data_dir) -> Path:
    """Convert one task's local files and write its lm-eval task folder (cached); return it."""
    if task not in LOCAL_TASKS:
        raise UserError(f"zero-shot task {task!r} cannot be read from a data directory",
                        hint=f"local tasks: {', '.join(sorted(LOCAL_TASKS))}")
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"data directory {str(data_dir)!r} is not a directory",
                        hint="point --data-dir at a folder laid out like shared/data (see its MANIFEST.md)")
    spec = LOCAL_TASKS[task]
    inputs = [root / "tasks" / rel for rel in spec.inputs]
    for p in inputs:
        if not p.exists():
            _need(p, task)
    final = _cache_dir() / "zeroshot_tasks" / f"{task}-{_fingerprint(task, inputs)}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling and rename: a concurrent run never sees a half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=final.parent))
    try:
        if task == "mmlu":
            _build_mmlu(inputs, tmp, final)
        else:
            _build_simple(task, spec, inputs, tmp, final)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # someone else won the race if it exists now
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
