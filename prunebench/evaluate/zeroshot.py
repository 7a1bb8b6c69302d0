"""Zero-shot accuracy through lm-eval, on an in-memory (possibly pruned) model.

Three sources of task documents, one code path (lm-eval's own tasks and metrics):

* no data dir: lm-eval's stock tasks, which download from the Hugging Face hub;
* ``data_dir`` (laid out like shared/data, see its MANIFEST.md): the *same* lm-eval tasks, with
  only the place the documents come from changed. Each local file is converted once into the
  column layout of the HF dataset lm-eval would have loaded, cached as jsonl, and a generated
  task YAML ``include``s lm-eval's own YAML and overrides just dataset_path / dataset_kwargs and
  the split names. Prompts, choices, targets, process_docs and metrics stay lm-eval's, and the
  task keeps its lm-eval name, so local and hub results are directly comparable;
* prunebench's embedded tasks (embedded_tasks.py, tasks/pb_lee_*.yaml), built from the held-out
  Lee documents gensim ships: ``pb_lee_next_word`` (the ``embedded`` preset: pick the true next
  word among four) and ``pb_lee_next_sentence`` (pick the true next sentence among four). No
  network, no data dir.

Every task is scored with metric ``acc`` (not acc_norm), as the LEAP paper does; MMLU is
reported as lm-eval's ``mmlu`` group value.
"""
from __future__ import annotations

import bz2
import csv
import difflib
import functools
import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .embedded_tasks import (lee_next_sentence_dataset, lee_next_sentence_docs,  # noqa: F401  (re-exported)
                             lee_next_word_dataset, lee_next_word_docs)
from prunebench.cache import cache_root
from prunebench.modeling.sequence_start import sequence_start_ids

log = logging.getLogger("prunebench")

METRIC = "acc"
PAPER_TASKS = ("mmlu", "piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa")  # LEAP paper
WANDA_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")  # Wanda paper
# prunebench's own tasks (embedded_tasks.py). The embedded preset runs the next-word task alone:
# 873 items, stderr <= 1.7 points, ~21 s per cell on 2 cores (the old 80-item task, stderr ~5.5,
# took ~23 s); pb_lee_next_sentence stays runnable by name for comparison with older records.
EMBEDDED_TASK = "pb_lee_next_word"
EMBEDDED_TASKS = (EMBEDDED_TASK, "pb_lee_next_sentence")
PRESETS = {"paper": PAPER_TASKS, "wanda": WANDA_TASKS, "embedded": (EMBEDDED_TASK,)}

TASKS_DIR = Path(__file__).parent / "tasks"  # prunebench's own task YAMLs (the embedded tasks)
RESULTS_FILE = "lm_eval_results.json"
# Bootstrap is only used for stderrs of non-mean metrics (e.g. lambada's perplexity); acc's
# stderr is analytic. lm-eval's default of 100k resamples costs minutes on CPU for nothing here.
BOOTSTRAP_ITERS = 1000
# lm-eval scores a batch from its full float32 logits and then their log-softmax (two [rows x
# tokens x vocabulary] tensors, plus the model's own copy): a fixed row count that fits SmolLM2's
# 49k vocabulary takes Gemma-3's 262k past this machine's memory (16 rows of MMLU: > 17 GB,
# killed). So each batch is held to this many bytes of logits, and longer requests get fewer rows.
LOGITS_BYTES_PER_BATCH = 512 << 20
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
# Resolving --tasks

def resolve_tasks(spec: str | Sequence[str], *, data_dir=None) -> list[str]:
    """Turn a --tasks value into task names: presets (paper, wanda, embedded) and/or
    comma-separated lm-eval task names. Unknown names raise UserError.

    With a data dir only the tasks prunebench can read locally (and the embedded task) are
    allowed; without one any lm-eval task or group name is accepted (looked up in lm-eval's
    index only when the name is not one prunebench knows).
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            for name in PRESETS.get(part.lower(), (part,)):
                if name not in names:
                    names.append(name)
    if not names:
        raise UserError("no zero-shot tasks given", hint=f"use a preset ({', '.join(PRESETS)}) or task names, comma-separated")
    known = set(LOCAL_TASKS) | set(EMBEDDED_TASKS)
    unknown = [n for n in names if n not in known]
    if unknown and data_dir is None:
        everything = set(_task_manager(True, ()).all_tasks)  # lm-eval's whole index (slow: ~7 s)
        known |= everything
        unknown = [n for n in unknown if n not in everything]
    if unknown:
        close = sorted({m for n in unknown for m in difflib.get_close_matches(n, sorted(known), n=3)})
        where = "readable from a data directory" if data_dir is not None else "known to lm-eval"
        hint = f"presets: {', '.join(PRESETS)}"
        if data_dir is not None:
            hint += f"; with --data-dir: {', '.join(sorted(LOCAL_TASKS) + list(EMBEDDED_TASKS))}"
        if close:
            hint += f"; did you mean {', '.join(close)}?"
        raise UserError(f"unknown zero-shot task(s) {', '.join(map(repr, unknown))} (not {where})", hint=hint)
    return names


# ---------------------------------------------------------------------------------------------
# Generated task folders for local data

def _stock_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _lm_eval_version() -> str:
    import lm_eval

    return getattr(lm_eval, "__version__", "unknown")


def _cache_dir() -> Path:
    return cache_root()


def _fingerprint(task: str, inputs: list[Path]) -> str:
    # The content of every input file, the converter version and the lm-eval install the YAMLs
    # include: a change to any of them gives a new folder (no stale conversions).
    h = hashlib.sha256(json.dumps([task, CONVERTER_VERSION, _lm_eval_version(), str(_stock_root())]).encode())
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
                _override(_stock_root() / spec.stock_yaml, {spec.eval_split: final / name}, spec.eval_split))


def _build_mmlu(inputs: list[Path], out: Path, final: Path) -> None:
    test_dir, dev_dir = inputs
    stock_dir = _stock_root() / "mmlu" / "default"
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


# ---------------------------------------------------------------------------------------------
# Running lm-eval

@functools.lru_cache(maxsize=8)
def _task_manager(include_defaults: bool, include_paths: tuple[str, ...]):
    # Indexing lm-eval's ~14k stock task names takes several seconds: build each index once per
    # process. Without the defaults the index holds only our folders and is instant.
    from lm_eval.tasks import TaskManager

    # Our generated folders deliberately reuse stock names (arc_easy, mmlu_*...): silence the
    # per-name "overrides existing task" warnings.
    index_log = logging.getLogger("lm_eval.tasks._index")
    level = index_log.level
    index_log.setLevel(logging.ERROR)
    try:
        return TaskManager(include_path=list(include_paths) or None, include_defaults=include_defaults)
    finally:
        index_log.setLevel(level)


def task_manager_for(tasks: Sequence[str], data_dir=None):
    """The lm-eval TaskManager that makes `tasks` resolve to the right documents."""
    paths = [str(TASKS_DIR)]
    needs_stock = False
    for t in tasks:
        if t in EMBEDDED_TASKS:
            continue
        if data_dir is not None:
            paths.append(str(prepare_local_task(t, data_dir)))
        else:
            needs_stock = True
    return _task_manager(needs_stock, tuple(paths))


def rows_per_batch(tokens: int, vocab: int, most: int, budget: int = LOGITS_BYTES_PER_BATCH) -> int:
    """Rows of `tokens` tokens whose float32 logits over `vocab` fit `budget` bytes: at least 1,
    at most `most` (the batch size asked for)."""
    return max(1, min(most, budget // max(1, tokens * vocab * 4)))


def batches_by_length(lengths: Sequence[int], vocab: int, most: int, budget: int = LOGITS_BYTES_PER_BATCH) -> dict:
    """{rows per batch: [request indices]}: each request goes to the row count its own length
    allows, so a batch (padded to its longest request) stays within the budget."""
    tiers: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        tiers.setdefault(rows_per_batch(n, vocab, most, budget), []).append(i)
    return tiers


def _make_lm(model, tokenizer, batch_size: int, max_length: int | None):
    from lm_eval.models.huggingface import HFLM

    class InMemoryHFLM(HFLM):
        # HFLM would ask the hub for the "sha" of `pretrained`, which here is a model object.
        def get_model_info(self) -> dict:
            return {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                    "model_dtype": str(getattr(self._model, "dtype", ""))}

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            # Requests of each length tier are scored at that tier's row count (LOGITS_BYTES_PER_BATCH);
            # HFLM returns answers in its input order, so each tier's answers go back to their places.
            vocab = self._model.get_output_embeddings().weight.shape[0]
            lengths = [min(len(ctx) + len(cont), self.max_length + 1) for _, ctx, cont in requests]
            asked = self.batch_size_per_gpu
            answers: list = [None] * len(requests)
            try:
                for rows, indices in sorted(batches_by_length(lengths, vocab, int(asked)).items()):
                    self.batch_size_per_gpu = rows
                    part = super()._loglikelihood_tokens([requests[i] for i in indices], disable_tqdm, override_bs)
                    for i, a in zip(indices, part):
                        answers[i] = a
            finally:
                self.batch_size_per_gpu = asked
            return answers


    # The sequence-start rule (prunebench.modeling.sequence_start) for lm-eval: a tokenizer that starts
    # sequences with <bos> (Gemma) gets add_bos_token=True, so every context and every
    # context-plus-continuation is encoded with its special tokens (<bos> first); one that starts
    # with nothing (SmolLM2) keeps lm-eval's default (None: the tokenizer's own encoding, which adds
    # nothing). An empty context is lm-eval's own case: it puts prefix_token_id (the BOS id) before it.
    add_bos = True if sequence_start_ids(tokenizer) else None
    return InMemoryHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                        add_bos_token=add_bos)


def _leaf_tasks(name: str, group_subtasks: dict) -> list[str]:
    subs = group_subtasks.get(name)
    if not subs:
        return [name]
    return [leaf for s in subs for leaf in _leaf_tasks(s, group_subtasks)]


def _float_or_none(v):
    try:
        return float(v)
    except (TypeError, ValueError):  # lm-eval writes "N/A" when it has no stderr
        return None


def _leaf_items(samples: list[dict], metric: str) -> str | None:
    """One leaf task's logged samples -> '0'/'1' per document in doc_id order; None when the
    metric is not a per-document 0/1 (then no paired comparison is possible)."""
    if not samples:
        return None
    first_filter = samples[0].get("filter")
    by_doc = {}
    for s in samples:
        if s.get("filter") == first_filter and "doc_id" in s:
            by_doc.setdefault(int(s["doc_id"]), s.get(metric))
    bits = []
    for doc_id in sorted(by_doc):
        v = by_doc[doc_id]
        if isinstance(v, bool) or (isinstance(v, (int, float)) and v in (0, 1)):
            bits.append("1" if v else "0")
        else:
            return None
    return "".join(bits)


def chance_accuracy(results: dict, leaves: list[str]) -> float | None:
    """The accuracy of guessing uniformly among each document's choices, averaged over the scored
    documents (ARC items have 3 to 5 choices); None unless every leaf is multiple choice."""
    samples = results.get("samples") or {}
    odds = []
    for leaf in leaves:
        docs = {}
        for s in samples.get(leaf) or []:
            if "doc_id" in s and s.get("arguments"):
                docs.setdefault(int(s["doc_id"]), 1.0 / len(s["arguments"]))
        if not docs or results.get("configs", {}).get(leaf, {}).get("output_type") != "multiple_choice":
            return None
        odds.extend(docs.values())
    return sum(odds) / len(odds)


def _per_item(results: dict, leaves: list[str], metric: str) -> tuple[str, list[list]] | None:
    """Per-document correctness of a task (leaves concatenated in sorted name order) and
    [[leaf, n], ...]; None when lm-eval logged no usable samples for one of the leaves."""
    samples = results.get("samples") or {}
    parts = []
    for leaf in sorted(leaves):
        bits = _leaf_items(samples.get(leaf), metric)
        if bits is None:
            return None
        parts.append((leaf, bits))
    return "".join(b for _, b in parts), [[leaf, len(b)] for leaf, b in parts]


def summarize(results: dict, tasks: Sequence[str], *, sources: dict | None = None) -> dict:
    """prunebench's view of an lm-eval results dict: {task: {metric, value, stderr, n, version}},
    plus `per_item` ('0'/'1' per document, doc_id order) when lm-eval logged samples, and for a
    group task `per_item_tasks` ([[leaf, n], ...], the order of the leaves in `per_item`)."""
    res, nsamp = results["results"], results.get("n-samples", {})
    groups = results.get("group_subtasks", {})
    out: dict = {}
    for t in tasks:
        r = res[t]
        metric = METRIC
        if f"{metric},none" not in r:  # a task without acc (only possible for arbitrary lm-eval tasks)
            metric = next(k.split(",")[0] for k in r if "," in k and "_stderr" not in k)
            log.warning("zero-shot task %s has no %r metric; reporting %r", t, METRIC, metric)
        leaves = _leaf_tasks(t, groups)
        n = sum(int(nsamp[leaf]["effective"]) for leaf in leaves if leaf in nsamp)
        out[t] = {"metric": metric, "value": float(r[f"{metric},none"]), "stderr": _float_or_none(r.get(f"{metric}_stderr,none")),
                  "n": n, "version": results.get("versions", {}).get(t)}
        chance = chance_accuracy(results, leaves)
        if chance is not None:  # what guessing scores: the report marks tasks the dense model is near
            out[t]["chance"] = round(chance, 6)
        items = _per_item(results, leaves, metric) if results.get("samples") else None
        if items is not None and len(items[0]) == n:  # a count mismatch would pair the wrong documents
            out[t]["per_item"] = items[0]
            if leaves != [t]:
                out[t]["per_item_tasks"] = items[1]
        elif results.get("samples"):
            log.warning("zero-shot task %s: no per-item %r in lm-eval's samples; no interval for it", t, metric)
        if sources:
            out[t]["source"] = sources.get(t)
    out["lm_eval_version"] = _lm_eval_version()
    return out


def _write_results_json(output_dir, results: dict) -> Path:
    from lm_eval.utils import handle_non_serializable

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    # The logged samples hold every document and response (megabytes for MMLU); the record keeps
    # the per-item correctness, so the file keeps only the aggregates.
    results = {k: v for k, v in results.items() if k != "samples"}
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{RESULTS_FILE}.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _network_error(exc: BaseException) -> bool:
    # Walk the cause chain for the errors datasets / huggingface_hub raise when the hub is
    # unreachable or offline mode forbids it.
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        mod, name = type(exc).__module__, type(exc).__name__
        if isinstance(exc, ConnectionError) or name in ("OfflineModeIsEnabled", "DatasetNotFoundError", "LocalEntryNotFoundError") \
                or mod.startswith(("requests", "urllib3", "httpx", "huggingface_hub")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def limit_groups(names: Sequence[str], limit) -> dict:
    """{limit: [task names]}: one lm-eval run per distinct limit (lm-eval takes one limit per run);
    `limit` is one number for every task, or a mapping task -> number (a task it leaves out: None)."""
    groups: dict = {}
    for name in names:
        groups.setdefault(limit.get(name) if isinstance(limit, dict) else limit, []).append(name)
    return groups


def _merge_runs(runs: list) -> dict:
    """lm-eval's results dicts of several runs as one (tasks never repeat between them)."""
    merged = dict(runs[0])
    for key in ("results", "versions", "n-samples", "configs", "higher_is_better", "n-shot", "group_subtasks", "samples"):
        parts = [r[key] for r in runs if isinstance(r.get(key), dict)]
        if parts:
            merged[key] = {k: v for part in parts for k, v in part.items()}
    return merged


def evaluate_zeroshot(model, tokenizer, tasks: Sequence[str] | str, *, data_dir=None, limit=None,
                      batch_size: int = 8, device: str | None = "cpu", output_dir=None, seed: int = 0,
                      max_length: int | None = None) -> dict:
    """Zero-shot accuracy of an in-memory causal LM with lm-eval.

    Returns {task: {"metric": "acc", "value", "stderr", "n", "version", "source", "per_item"
    [, "per_item_tasks"]}, ..., "lm_eval_version": str} (see `summarize`). `tasks` may hold presets ("paper", "wanda", "embedded"). With
    `data_dir`, documents come from local files (see module docstring). `limit` caps documents
    per (sub)task (MMLU: per subject), one number or a mapping task -> number (`limit_groups`);
    each task's summary says its limit. `max_length` caps the context in tokens (default: the
    model's). If `output_dir` is given lm-eval's own results JSON is written there atomically.
    """
    import lm_eval

    names = resolve_tasks(tasks, data_dir=data_dir)
    tm = task_manager_for(names, data_dir)
    sources = {t: "embedded" if t in EMBEDDED_TASKS else ("local" if data_dir is not None else "hub") for t in names}

    if device is not None:
        import torch

        if getattr(model, "device", None) != torch.device(device):
            model.to(device)
    was_training = getattr(model, "training", False)
    try:
        lm = _make_lm(model, tokenizer, batch_size, max_length)  # HFLM puts the model in eval mode
        try:
            runs = [lm_eval.simple_evaluate(
                model=lm, tasks=group, limit=group_limit, task_manager=tm, log_samples=True,  # per-item acc
                bootstrap_iters=BOOTSTRAP_ITERS, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed)
                for group_limit, group in limit_groups(names, limit).items()]
            results = _merge_runs(runs)
        except Exception as exc:
            if data_dir is None and _network_error(exc):
                raise UserError(f"could not load the zero-shot task data for {', '.join(names)} from the hub: {exc}",
                                hint="pass --data-dir with local copies (see shared/data/MANIFEST.md) "
                                     "or use --tasks embedded") from exc
            raise
    finally:
        if was_training:
            model.train()
    if output_dir is not None:
        _write_results_json(output_dir, results)
    out = summarize(results, names, sources=sources)
    for group_limit, group in limit_groups(names, limit).items():
        for name in group:
            if group_limit is not None:
                out[name]["limit"] = group_limit
    return out
