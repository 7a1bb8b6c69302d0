"""Zero-shot accuracy through lm-eval, on an in-memory (possibly pruned) model.

Three sources of task documents, one code path (lm-eval's own tasks and metrics):

* no data dir: lm-eval's stock tasks, which download from the Hugging Face hub;
* ``data_dir`` (laid out like shared/data, see its MANIFEST.md): the *same* lm-eval tasks, with
  only the place the documents come from changed (local_tasks.py);
* prunebench's embedded tasks (embedded_tasks.py, tasks/pb_lee_*.yaml), built from the held-out
  Lee documents gensim ships: ``pb_lee_next_word`` (the ``embedded`` preset: pick the true next
  word among four) and ``pb_lee_next_sentence`` (pick the true next sentence among four). No
  network, no data dir.

Every task is scored with metric ``acc`` (not acc_norm), as the LEAP paper does; MMLU is
reported as lm-eval's ``mmlu`` group value.
"""
from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from .local_tasks import LOCAL_TASKS, lm_eval_version, prepare_local_task
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
CONVERTER_VERSION = 1


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
    out["lm_eval_version"] = lm_eval_version()
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
