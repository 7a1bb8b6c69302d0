"""Corpora -> token windows, for calibration, end-to-end training and perplexity.

Datasets:
  lee        the Lee news corpus that gensim ships (the embedded default); the first
             CALIBRATION_DOCS documents are for calibration/training, the rest for evaluation
  wikitext2  WikiText-2 raw (test split for perplexity, train split for calibration)
  c4         allenai/c4 en: train shard 00000 for calibration, validation shard 00000 for perplexity
  redpajama  the RedPajama-1T sample (stand-in for SlimPajama; only through --data-dir)

With `data_dir` (laid out like ../shared/data, see its MANIFEST.md) files are read from disk;
without it wikitext2 and c4 come through `datasets` from the hub (HF_DATASETS_OFFLINE is honoured
by `datasets` itself).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from prunebench.errors import UserError
from prunebench.cache import cache_root
from prunebench.modeling.sequence_start import check_prefix_fits, sequence_start_ids

DATASETS = ("lee", "wikitext2", "c4", "redpajama")
LEE_FILE = "lee_background.cor"
# Lee has 300 documents (about 75k SmolLM2 tokens); the last 100 (about 25k tokens) are held out
# for evaluation, which leaves at least 20k tokens of whole windows for perplexity.
CALIBRATION_DOCS = 200
DOC_SEPARATOR = "\n\n"  # the perplexity protocol joins documents with a blank line


def lee_documents() -> list[str]:
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise UserError("the embedded corpus needs gensim", hint="pip install gensim (or pip install prunebench[demo])") from None
    with open(datapath(LEE_FILE), encoding="latin-1") as f:
        return [line.strip() for line in f if line.strip()]


def embedded_documents(split: str) -> list[str]:
    """The Lee documents of one split: 'calibration' (also LEAP's training stream) or 'eval'."""
    docs = lee_documents()
    if split == "calibration":
        return docs[:CALIBRATION_DOCS]
    if split == "eval":
        return docs[CALIBRATION_DOCS:]
    raise ValueError(f"unknown split {split!r}")


def _check_data_dir(data_dir) -> Path:
    path = Path(data_dir)
    if not path.is_dir() or not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"data directory {str(data_dir)!r} is not a readable directory",
                        hint="point --data-dir at a folder laid out like shared/data (see its MANIFEST.md)")
    return path


def _need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{what} not found at {path}", hint="see shared/data/MANIFEST.md for the expected layout")
    return path


def _read_jsonl_texts(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _wikitext_rows_from_raw(path: Path) -> list[str]:
    # The HF rows of wikitext-2-raw-v1 are the raw file's lines, with empty lines as "" (not " \n").
    with open(path, encoding="utf-8", newline="") as f:
        return [line if line.strip() else "" for line in f.read().splitlines(keepends=True)]


TEXT_SUFFIX = ".txt"


def is_text_path(dataset: str) -> bool:
    """A dataset named by a path: a text file, or a folder of .txt files (one document each)."""
    return isinstance(dataset, str) and (dataset.endswith(TEXT_SUFFIX) or "/" in dataset or os.sep in dataset
                                         or Path(dataset).exists()) and dataset not in DATASETS


def text_files(dataset: str) -> list[Path]:
    path = Path(dataset).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob(f"*{TEXT_SUFFIX}") if p.is_file())
        if not files:
            raise UserError(f"the folder {dataset!r} holds no {TEXT_SUFFIX} files", hint="name a text file or a folder of .txt files")
        return files
    raise UserError(f"no such text file or folder: {dataset!r}",
                    hint=f"name one of {', '.join(DATASETS)}, a .txt file, or a folder of .txt files")


def _read_text_files(dataset: str, encoding: str) -> list[str]:
    docs = []
    for path in text_files(dataset):
        try:
            docs.append(path.read_text(encoding=encoding))
        except UnicodeDecodeError as exc:
            raise UserError(f"{path} is not valid {encoding} text (byte {exc.start})",
                            hint="pass --encoding with the file's encoding, e.g. latin-1") from None
        except LookupError:
            raise UserError(f"unknown text encoding {encoding!r}", hint="e.g. utf-8, latin-1, cp1252") from None
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}") from None
    return docs


def check_dataset_name(dataset, what: str) -> None:
    if not isinstance(dataset, str) or not dataset.strip():
        raise UserError(f"{what} must be a dataset name or a text path, got {dataset!r}",
                        hint=f"use one of {', '.join(DATASETS)}, a .txt file or a folder of .txt files")
    if dataset in DATASETS:
        return
    if is_text_path(dataset):
        text_files(dataset)
        return
    raise UserError(f"unknown dataset {dataset!r} for {what}",
                    hint=f"use one of {', '.join(DATASETS)}, a .txt file or a folder of .txt files")


def documents(dataset: str, split: str, data_dir=None, encoding: str = "utf-8") -> list[str]:
    """Raw documents of a dataset split ('calibration' / 'train' or 'eval' / 'test').

    A dataset named by a path (a .txt file or a folder of them) is the user's own text: all of it,
    for whichever role it is named in.
    """
    role = "calibration" if split in ("calibration", "train") else "eval"
    if is_text_path(dataset):
        return _read_text_files(dataset, encoding)
    if dataset == "lee":
        return embedded_documents(role)
    if dataset == "wikitext2":
        if data_dir is not None:
            if role == "calibration":
                raise UserError("WikiText-2 train is not in the data directory",
                                hint="calibrate on c4 or lee, or run with network access")
            return _wikitext_rows_from_raw(_need_file(_check_data_dir(data_dir) / "wikitext2" / "wiki.test.raw", "WikiText-2 test"))
        from datasets import load_dataset

        return list(load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if role == "calibration" else "test")["text"])
    if dataset == "c4":
        if data_dir is not None:
            if role == "eval":
                raise UserError("the C4 validation shard is not in the data directory",
                                hint="evaluate perplexity on wikitext2 or lee instead")
            return _read_jsonl_texts(_need_file(_check_data_dir(data_dir) / "c4" / "c4-train.00000-of-01024.first1000.jsonl", "C4 sample"))
        from datasets import load_dataset

        if role == "calibration":
            ds = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
        else:
            ds = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation")
        return list(ds["text"])
    if dataset == "redpajama":
        if data_dir is None:
            raise UserError("redpajama is read only from a data directory", hint="pass --data-dir")
        root = _check_data_dir(data_dir) / "slimpajama" / "redpajama1t_sample_llmshearing"
        files = sorted(root.glob("*/*.jsonl"))
        if not files:
            raise UserError(f"no RedPajama sample under {root}", hint="see shared/data/MANIFEST.md")
        docs = [t for f in files for t in _read_jsonl_texts(f)]
        # a fixed split: every 10th document is held out
        return [d for i, d in enumerate(docs) if (i % 10 == 0) == (role == "eval")]
    raise UserError(f"unknown dataset {dataset!r}", hint=f"use one of {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------
# Token ids

def tokenizer_fingerprint(tokenizer) -> str:
    cached = getattr(tokenizer, "_prunebench_fingerprint", None)
    if cached:
        return cached
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab], ensure_ascii=True).encode()).hexdigest()[:16]
    try:
        tokenizer._prunebench_fingerprint = digest
    except AttributeError:
        pass
    return digest


def token_fingerprint(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a long text, with no special tokens and no length limit warnings."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_text(dataset: str, data_dir=None, encoding: str = "utf-8") -> str:
    """The evaluation text of a dataset, exactly as it is tokenised for perplexity."""
    docs = documents(dataset, "eval", data_dir, encoding)
    if dataset == "c4":
        # SparseGPT/Wanda protocol: the first 1100 validation documents joined with spaces
        return " ".join(docs[:1100])
    return DOC_SEPARATOR.join(docs)


@functools.lru_cache(maxsize=64)
def text_fingerprint(dataset: str, role: str, data_dir=None, encoding: str = "utf-8") -> dict:
    """Content fingerprint of the text a cell calibrates or evaluates on (not its name or path):
    {"sha256", "n_documents", "n_chars"}.  Part of every cell's key."""
    if role == "eval":
        text, n_docs = eval_text(dataset, data_dir, encoding), len(documents(dataset, "eval", data_dir, encoding))
    else:
        docs = documents(dataset, "calibration", data_dir, encoding)
        text, n_docs = DOC_SEPARATOR.join(docs), len(docs)
    out = {"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "n_documents": n_docs, "n_chars": len(text)}
    if is_text_path(dataset):
        out["files"] = [str(p) for p in text_files(dataset)][:100]
        out["encoding"] = encoding
    return out


def eval_tokens(tokenizer, dataset: str, data_dir=None, max_tokens: int | None = None,
                encoding: str = "utf-8") -> torch.Tensor:
    """The evaluation text of a dataset as one id stream (documents joined with a blank line)."""
    ids = encode(tokenizer, eval_text(dataset, data_dir, encoding))
    return ids[:max_tokens] if max_tokens else ids


@dataclass(frozen=True)
class WindowSpec:
    dataset: str = "lee"
    n_samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    encoding: str = "utf-8"  # for a dataset named by a text path


def _with_prefix(prefix: list[int], text_windows: torch.Tensor) -> torch.Tensor:
    """[n, len(prefix) + L]: each text window after the tokenizer's sequence start (prunebench.
    sequence_start states the rule); an empty prefix returns the windows themselves."""
    if not prefix:
        return text_windows
    start = torch.tensor(prefix, dtype=text_windows.dtype).expand(text_windows.shape[0], len(prefix))
    return torch.cat([start, text_windows], dim=1)


def _cached(kind: str, key: dict, build):
    """A token-id tensor built once and kept in the cache as safetensors (a cache another process
    or user can write is never unpickled); a damaged entry is rebuilt, never trusted."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_root() / kind / f"{digest}.safetensors"
    if path.is_file():
        try:
            stored = load_file(path)
            if set(stored) == {"ids"} and stored["ids"].dtype == torch.int64:
                return stored["ids"]
        except (OSError, SafetensorError, ValueError):
            pass
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file({"ids": value.to(torch.int64).contiguous()}, str(tmp))
    os.replace(tmp, path)
    return value


def calibration_windows(tokenizer, spec: WindowSpec, data_dir=None) -> tuple[torch.Tensor, str]:
    """[n_samples, seqlen] token ids for layer-wise calibration, and their fingerprint.

    The papers' loader (SparseGPT, Wanda): for each sample pick a random document longer than
    seqlen and a random window inside it.  Corpora of short documents (Lee) are joined into one
    stream first, with random windows drawn from the stream.

    Each window is the tokenizer's sequence start followed by seqlen - len(start) text tokens,
    drawn as text windows of that length always were (no start: the windows of before).
    """
    prefix = sequence_start_ids(tokenizer)
    check_prefix_fits(prefix, spec.seqlen, "calibration")
    text_len = spec.seqlen - len(prefix)
    # Keyed by the text's content, so other text under the same name or path is never served stale.
    key = {"tok": tokenizer_fingerprint(tokenizer), "spec": spec.__dict__,
           "text": text_fingerprint(spec.dataset, "calibration", data_dir, spec.encoding)["sha256"], "v": 2}
    if prefix:  # the vocabulary fingerprint does not say whether a tokenizer adds a start
        key["start"] = prefix

    def build():
        docs = documents(spec.dataset, "calibration", data_dir, spec.encoding)
        rng = random.Random(spec.seed)
        windows = []
        if spec.dataset in ("c4", "redpajama"):
            encoded = {}
            for _ in range(spec.n_samples):
                for _attempt in range(100 * len(docs)):
                    i = rng.randint(0, len(docs) - 1)
                    ids = encoded.get(i)
                    if ids is None:
                        ids = encoded[i] = encode(tokenizer, docs[i])
                    if len(ids) > text_len:
                        break
                else:
                    raise UserError(f"no {spec.dataset} document is longer than {text_len} tokens",
                                    hint="use a shorter --seqlen")
                start = rng.randint(0, len(ids) - text_len - 1)
                windows.append(ids[start:start + text_len])
        else:
            stream = encode(tokenizer, DOC_SEPARATOR.join(docs))
            if len(stream) <= text_len:
                raise UserError(f"the {spec.dataset} calibration text has only {len(stream)} tokens",
                                hint=f"use a --seqlen below {len(stream) + len(prefix)}")
            for _ in range(spec.n_samples):
                start = rng.randint(0, len(stream) - text_len - 1)
                windows.append(stream[start:start + text_len])
        return _with_prefix(prefix, torch.stack(windows))

    ids = _cached("calibration", key, build)
    return ids, token_fingerprint(ids)


def stream_windows(tokenizer, dataset: str, seqlen: int, data_dir=None, max_windows: int | None = None,
                   split: str = "calibration") -> tuple[torch.Tensor, str]:
    """Every non-overlapping window of a split's documents (joined), for end-to-end training.

    Unlike calibration_windows this never repeats text: a learned per-weight mask overfits a
    small cycled set (LEAP.md section 6). Each window is the tokenizer's sequence start followed
    by the next seqlen - len(start) tokens of text.
    """
    prefix = sequence_start_ids(tokenizer)
    check_prefix_fits(prefix, seqlen, "training")
    text_len = seqlen - len(prefix)
    key = {"tok": tokenizer_fingerprint(tokenizer), "dataset": dataset, "seqlen": seqlen, "split": split,
           "text": text_fingerprint(dataset, "eval" if split == "eval" else "calibration", data_dir)["sha256"],
           "max": max_windows, "v": 2}
    if prefix:  # the vocabulary fingerprint does not say whether a tokenizer adds a start
        key["start"] = prefix

    def build():
        stream = encode(tokenizer, DOC_SEPARATOR.join(documents(dataset, split, data_dir)))
        n = len(stream) // text_len
        if max_windows:
            n = min(n, max_windows)
        if n == 0:
            raise UserError(f"the {dataset} {split} text is shorter than one window of {seqlen}", hint="use a shorter seqlen")
        return _with_prefix(prefix, stream[: n * text_len].view(n, text_len))

    ids = _cached("stream", key, build)
    return ids, token_fingerprint(ids)
