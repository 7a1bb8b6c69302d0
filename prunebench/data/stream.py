"""A training stream of token windows for end-to-end mask learning at paper scale.

LEAP and PATCH train their masks on 512k unique 4096-token windows of SlimPajama-6B: far more
text than any cached corpus holds, and a learned per-weight mask overfits text it sees twice.
So the corpus is read as a stream of documents (Hugging Face `datasets` streaming, or local
shards in a --data-dir), tokenised on the fly and cut into consecutive non-overlapping windows.
A window is served at most once per pass, windows that overlap the evaluation text are dropped
(training on the perplexity text would flatter the result), and running out of text is an error
unless repeats are allowed, in which case the number of passes is recorded.

Window i of a stream is a pure function of (source, tokenizer, seqlen, exclusion text), so a
resumed run asks for its windows by index and gets exactly the ones it would have seen.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import json
from collections import deque
from pathlib import Path

import torch

from prunebench.data.windows import DOC_SEPARATOR, _check_data_dir, encode
from prunebench.errors import UserError
from prunebench.hashing import file_sha256, sha256_json, sha256_text
from prunebench.modeling.sequence_start import check_prefix_fits, sequence_start_ids
from prunebench import registry

# The streamed corpora.  `local` is where their shards sit under a --data-dir laid out like
# shared/data (see its MANIFEST.md).  No SlimPajama sample exists locally: the RedPajama-1T sample
# (the corpus SlimPajama was deduplicated from) stands in for it, and says so in its name.
REDPAJAMA_SAMPLE_GLOB = "slimpajama/redpajama1t_sample_llmshearing/*/*.jsonl"
STREAM_SOURCES: dict[str, dict] = {
    "slimpajama": {"hub_id": "DKYoon/SlimPajama-6B", "config": None, "text_field": "text",
                   "local_glob": REDPAJAMA_SAMPLE_GLOB, "local_name": "redpajama-1t-sample (standing in for slimpajama)"},
    "c4": {"hub_id": "allenai/c4", "config": "en", "text_field": "text",
           "local_glob": "c4/*.jsonl", "local_name": "c4-en-train-sample"},
    "redpajama": {"hub_id": "togethercomputer/RedPajama-Data-1T-Sample", "config": None, "text_field": "text",
                  "local_glob": REDPAJAMA_SAMPLE_GLOB, "local_name": "redpajama-1t-sample"},
}
HUB_SPLIT = "train"
LOCAL_TEXT_FIELD = "text"  # every jsonl shard in shared/data keeps its document in "text"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
TEXT_SUFFIX = ".txt"  # a whole .txt file is one document, as in prunebench.data.windows
DOCUMENT_SUFFIXES = JSONL_SUFFIXES + (TEXT_SUFFIX,)

DEFAULT_SHINGLE = 32  # tokens: a shared span this long is copied text, not a common phrase
# Whole windows are hashed and checked in batches of at least this many (vectorised work per
# batch, Python work per window), so the buffer holds at most about this many windows of text.
WINDOWS_PER_BATCH = 16

# The 64-bit content hash: two polynomial hashes modulo primes below 2**31, so every product
# (< 2**62) fits in int64 without overflow; together they give a 62-bit hash.
HASH_MODULI = (2_147_483_647, 2_147_483_629)
HASH_BASES = (911_382_323, 972_663_749)
HASH_HALF_BITS = 31

REPEATS_HINT = "allow repeats (allow_stream_repeats) or use a larger corpus"
_END = object()  # end of a pass's documents (a hub row may hold None)


# ---------------------------------------------------------------------------------------------
# Documents

class DocumentSource:
    """A re-iterable stream of documents (str): every iter() starts again at the first document,
    in the same order.  `name` says what it is; `fingerprint` is a sha256 of what it reads."""

    name: str

    def __iter__(self):
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError


class LocalDocuments(DocumentSource):
    """Documents of local files, in the order given: each jsonl row's text, each .txt file whole."""

    def __init__(self, name: str, files):
        self.name = name
        self.files = [Path(f) for f in files]

    @functools.cached_property
    def fingerprint(self) -> str:
        # the files' contents in reading order, never their paths
        return sha256_json([file_sha256(f) for f in self.files])

    def __iter__(self):
        for path in self.files:
            if path.name.endswith(TEXT_SUFFIX):
                yield path.read_text(encoding="utf-8")
            else:
                yield from _jsonl_texts(path)


def _jsonl_texts(path: Path):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)[LOCAL_TEXT_FIELD]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path} line {line_number} is not a JSON object with a {LOCAL_TEXT_FIELD!r} field",
                                hint="each line of a .jsonl shard must be a JSON object holding one document") from None


class HubDocuments(DocumentSource):
    """A Hugging Face dataset read with streaming=True: nothing is downloaded up front."""

    def __init__(self, name: str, spec: dict):
        self.name = name
        self.spec = spec

    @property
    def fingerprint(self) -> str:
        # a hub stream cannot be hashed without reading it all: its identity is what it names
        return sha256_json({"hub_id": self.spec["hub_id"], "config": self.spec["config"], "split": HUB_SPLIT,
                            "text_field": self.spec["text_field"]})

    def __iter__(self):
        try:
            from datasets import load_dataset
        except ImportError:
            raise UserError("streaming a corpus from the hub needs the datasets package",
                            hint="pip install datasets, or pass --data-dir with local shards") from None
        config = (self.spec["config"],) if self.spec["config"] else ()
        for row in load_dataset(self.spec["hub_id"], *config, split=HUB_SPLIT, streaming=True):
            yield row[self.spec["text_field"]]


def _document_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(DOCUMENT_SUFFIXES))


def open_documents(source: str, data_dir=None) -> DocumentSource:
    """The documents of a streamed corpus: a name in STREAM_SOURCES (its local shards under
    data_dir, or the hub stream without one), or a path to a .jsonl / .jsonl.gz / .txt file or a
    folder of them (read in sorted order)."""
    names = ", ".join(STREAM_SOURCES)
    if source in STREAM_SOURCES:
        spec = STREAM_SOURCES[source]
        if data_dir is None:
            return HubDocuments(source, spec)
        root = _check_data_dir(data_dir)
        files = sorted(p for p in root.glob(spec["local_glob"]) if p.is_file())
        if not files:
            raise UserError(f"no {source} shards match {spec['local_glob']} under {root}",
                            hint="see shared/data/MANIFEST.md for the layout, or drop --data-dir to stream from the hub")
        return LocalDocuments(spec["local_name"], files)
    path = Path(str(source)).expanduser()
    if path.is_file():
        if not path.name.endswith(DOCUMENT_SUFFIXES):
            raise UserError(f"cannot read documents from {path}: not a {', '.join(DOCUMENT_SUFFIXES)} file",
                            hint=f"name one of {names}, or a .jsonl, .jsonl.gz or .txt file or a folder of them")
        return LocalDocuments(str(source), [path])
    if path.is_dir():
        files = _document_files(path)
        if not files:
            raise UserError(f"the folder {str(source)!r} holds no {', '.join(DOCUMENT_SUFFIXES)} files",
                            hint="name a folder of .jsonl, .jsonl.gz or .txt files")
        return LocalDocuments(str(source), files)
    raise UserError(f"unknown training stream {source!r}: not a corpus name, file or folder",
                    hint=f"name one of {names}, or a .jsonl, .jsonl.gz or .txt file or a folder of them")


# ---------------------------------------------------------------------------------------------
# Hashing token spans

def _power_table(base: int, modulus: int, n: int) -> torch.Tensor:
    """[n] int64: base**i mod modulus, built by doubling (log2(n) vectorised steps)."""
    table = torch.ones(1, dtype=torch.long)
    while table.numel() < n:
        table = torch.cat([table, table * pow(base, table.numel(), modulus) % modulus])
    return table[:n]


def _combine(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    return (high << HASH_HALF_BITS) | low


def window_hashes(windows: torch.Tensor) -> torch.Tensor:
    """[n] int64 content hash of each row of an [n, length] id tensor: the polynomial
    sum(id_i * base**(length-1-i)) mod each modulus.  Equals shingle_hashes(windows, length)[:, 0]."""
    ids = windows.to(torch.long)
    halves = [(ids * _power_table(base, modulus, ids.shape[-1]).flip(0) % modulus).sum(dim=-1) % modulus
              for base, modulus in zip(HASH_BASES, HASH_MODULI)]
    return _combine(*halves)


def shingle_hashes(ids: torch.Tensor, width: int) -> torch.Tensor:
    """[..., n - width + 1] int64 hash of every span of `width` consecutive ids along the last dim
    (the window_hashes polynomial of each span).

    A rolling hash from prefix sums, a fixed handful of tensor operations whatever the width:
    with a_i = id_i * base**(n-1-i), the span starting at j sums to hash_j * base**(n-width-j), so
    multiplying by the inverse power recovers hash_j.  The prefix sums of values below 2**31 stay
    exact in int64 for texts of up to 2**32 tokens."""
    ids = ids.to(torch.long)
    n = ids.shape[-1]
    n_spans = n - width + 1
    if n_spans <= 0:
        return ids.new_empty(ids.shape[:-1] + (0,))
    halves = []
    for base, modulus in zip(HASH_BASES, HASH_MODULI):
        weighted = ids * _power_table(base, modulus, n).flip(0) % modulus
        prefix = torch.nn.functional.pad(weighted.cumsum(dim=-1), (1, 0))
        span_sums = (prefix[..., width:] - prefix[..., :n_spans]) % modulus
        inverse_base = pow(base, modulus - 2, modulus)  # the moduli are prime (Fermat)
        unshift = _power_table(inverse_base, modulus, n_spans).flip(0)  # inverse**(n-width-j)
        halves.append(span_sums * unshift % modulus)
    return _combine(*halves)


# ---------------------------------------------------------------------------------------------
# Windows

class _Cursor:
    """One reading position in the stream: where the next window comes from and what was
    counted on the way.  A fresh cursor starts at window 0 of pass 1."""

    def __init__(self):
        self.next_index = 0  # stream index of the next window this cursor yields
        self.pass_number = 0  # 0 until the first pass starts
        self.documents = None  # iterator over the current pass's documents
        self.pending = []  # tokens read but not yet cut into windows (list of 1-D tensors)
        self.pending_tokens = 0
        self.ready = deque()  # accepted windows not yet yielded
        self.seen = set()  # hashes of this pass's windows
        self.pass_windows = 0  # windows accepted in the current pass
        self.pass_has_text = False  # a separator goes before every document but a pass's first
        self.documents_read = 0
        self.duplicates_skipped = 0
        self.excluded_windows = 0

    def counts(self) -> dict:
        return {"documents_read": self.documents_read, "duplicates_skipped": self.duplicates_skipped,
                "excluded_windows": self.excluded_windows}


class WindowStream:
    """Consecutive non-overlapping windows of seqlen tokens over a document stream.

    Documents are tokenised one at a time and joined with the tokenizer's EOS id (or the
    DOC_SEPARATOR text without one).  Within a run a window is never served twice; with
    exclude_text, no window shares a span of `shingle` tokens with it.  take(start, count) is a
    pure function of the index: reading forward is incremental, and an index behind the cursor
    restarts the pass and skips forward (how a resumed run gets its windows back).

    Each window is the tokenizer's sequence start (prunebench.modeling.sequence_start) followed by the
    next seqlen - len(start) tokens of text; uniqueness and the overlap check look at the text.
    """

    def __init__(self, documents, tokenizer, seqlen: int, *, exclude_text: str | None = None,
                 allow_repeats: bool = False, shingle: int = DEFAULT_SHINGLE):
        if iter(documents) is documents:
            raise TypeError("documents must be re-iterable (a DocumentSource or a list), not a one-shot iterator")
        if not isinstance(seqlen, int) or seqlen < 1:
            raise UserError(f"the window length must be a positive number of tokens, got {seqlen!r}",
                            hint="set seqlen to e.g. 2048 or 4096")
        if not isinstance(shingle, int) or shingle < 1:
            raise UserError(f"the overlap span must be a positive number of tokens, got {shingle!r}",
                            hint=f"the default is {DEFAULT_SHINGLE}")
        self.prefix = sequence_start_ids(tokenizer)
        check_prefix_fits(self.prefix, seqlen, "training")
        self.text_len = seqlen - len(self.prefix)  # text tokens per window
        if exclude_text is not None and shingle > self.text_len:
            raise UserError(f"a window of {self.text_len} text tokens cannot be checked for {shingle}-token spans of the "
                            "evaluation text", hint=f"use a shingle of at most {self.text_len} tokens")
        self.documents = documents
        self.tokenizer = tokenizer
        self.seqlen = seqlen
        self.allow_repeats = allow_repeats
        self.shingle = shingle
        self.name = getattr(documents, "name", None) or type(documents).__name__
        fingerprint = getattr(documents, "fingerprint", None)
        if fingerprint is None and isinstance(documents, (list, tuple)):
            fingerprint = sha256_json(list(documents))
        self.fingerprint = fingerprint
        eos = getattr(tokenizer, "eos_token_id", None)
        self.separator = (torch.tensor([eos], dtype=torch.long) if eos is not None
                          else encode(tokenizer, DOC_SEPARATOR))
        # Sorted unique hashes of every shingle of the evaluation text, tokenised once.  Documents
        # are tokenised one by one, so a passage copied into a document can tokenise differently
        # at its edges; its interior spans still match.
        self.excluded_shingles = None
        self.excluded_text_sha256 = sha256_text(exclude_text) if exclude_text is not None else None
        if exclude_text is not None:
            self.excluded_shingles = torch.unique(shingle_hashes(encode(tokenizer, exclude_text), shingle))
        self.windows_per_pass = None  # known once a pass has been read to its end
        self.windows_served = 0  # highest index served + 1
        self._cursor = _Cursor()
        self._furthest_counts = self._cursor.counts()  # counters of the furthest reading position
        self._furthest_index = 0

    # -- reading --------------------------------------------------------------------------------

    def _start_pass(self, cursor: _Cursor) -> None:
        cursor.pass_number += 1
        cursor.documents = iter(self.documents)
        cursor.pending, cursor.pending_tokens = [], 0
        cursor.seen = set()  # a new pass may repeat the text: only repeats within a pass are skipped
        cursor.pass_windows = 0
        cursor.pass_has_text = False

    def _overlaps_eval(self, windows: torch.Tensor) -> torch.Tensor:
        """[n] bool: the window shares a `shingle`-token span with the evaluation text."""
        if self.excluded_shingles is None or self.excluded_shingles.numel() == 0:
            return torch.zeros(len(windows), dtype=torch.bool)
        spans = shingle_hashes(windows, self.shingle)
        where = torch.searchsorted(self.excluded_shingles, spans).clamp_(max=self.excluded_shingles.numel() - 1)
        return (self.excluded_shingles[where] == spans).any(dim=-1)

    def _accept(self, cursor: _Cursor, windows: torch.Tensor) -> None:
        excluded = self._overlaps_eval(windows).tolist()
        for window, content_hash, is_excluded in zip(windows, window_hashes(windows).tolist(), excluded):
            # Uniqueness costs 8 bytes of hash per window, about 70 bytes as an entry of a Python
            # set: some 36 MB at the papers' 512k windows.
            if content_hash in cursor.seen:
                cursor.duplicates_skipped += 1
            elif is_excluded:
                cursor.excluded_windows += 1
            else:
                cursor.seen.add(content_hash)
                cursor.ready.append(window)
                cursor.pass_windows += 1

    def _fill(self, cursor: _Cursor) -> bool:
        """Read documents until a batch of whole windows is cut; False when the pass has ended."""
        batch_tokens = WINDOWS_PER_BATCH * self.text_len
        exhausted = False
        while cursor.pending_tokens < batch_tokens:
            document = next(cursor.documents, _END)
            if document is _END:
                exhausted = True
                break
            cursor.documents_read += 1
            ids = encode(self.tokenizer, document) if document else None
            if ids is None or ids.numel() == 0:
                continue
            if cursor.pass_has_text:
                cursor.pending.append(self.separator)
                cursor.pending_tokens += self.separator.numel()
            cursor.pending.append(ids)
            cursor.pending_tokens += ids.numel()
            cursor.pass_has_text = True
        n_windows = cursor.pending_tokens // self.text_len
        if n_windows:
            tokens = torch.cat(cursor.pending)
            cut = n_windows * self.text_len
            cursor.pending = [tokens[cut:]]
            cursor.pending_tokens = tokens.numel() - cut
            self._accept(cursor, tokens[:cut].view(n_windows, self.text_len))
        return not exhausted or bool(n_windows)

    def _next_window(self, cursor: _Cursor, asked_for: int) -> torch.Tensor:
        if cursor.pass_number == 0:
            self._start_pass(cursor)
        while not cursor.ready:
            if self._fill(cursor):
                continue
            # the pass has ended: its tail (less than a window) is dropped
            self.windows_per_pass = cursor.pass_windows
            if not self.allow_repeats or cursor.pass_windows == 0:
                raise UserError(f"the {self.name} stream gave {cursor.pass_windows} unique windows of {self.seqlen} "
                                f"tokens ({cursor.duplicates_skipped} duplicates and {cursor.excluded_windows} "
                                f"overlapping the evaluation text dropped) but {asked_for} were asked for",
                                hint=REPEATS_HINT if cursor.pass_windows else "use a larger corpus or a shorter seqlen")
            self._start_pass(cursor)
        cursor.next_index += 1
        return cursor.ready.popleft()

    def take(self, start: int, count: int) -> torch.Tensor:
        """[count, seqlen] int64: windows start .. start + count - 1 of the stream."""
        if start < 0 or count < 0:
            raise ValueError(f"take needs start >= 0 and count >= 0, got {start}, {count}")
        if start < self._cursor.next_index:
            self._cursor = _Cursor()  # behind the cursor: read the pass again from its start
        cursor = self._cursor
        try:
            while cursor.next_index < start:
                self._next_window(cursor, start + count)
            rows = [self._next_window(cursor, start + count) for _ in range(count)]
        finally:
            if cursor.next_index >= self._furthest_index:
                self._furthest_index, self._furthest_counts = cursor.next_index, cursor.counts()
        if count:
            self.windows_served = max(self.windows_served, start + count)
        if not rows:
            return torch.empty(0, self.seqlen, dtype=torch.long)
        windows = torch.stack(rows)
        if self.prefix:  # the sequence start before each window's text
            windows = torch.cat([torch.tensor(self.prefix, dtype=windows.dtype).expand(len(rows), len(self.prefix)),
                                 windows], dim=1)
        return windows

    # -- what was served ------------------------------------------------------------------------

    @property
    def stats(self) -> dict:
        """What the stream served: counters are those at the furthest point read in this run.
        passes is the pass that holds the last window served (1: no text repeated); repeats is how
        far past one full pass the windows served reach (0.5: half the unique windows twice)."""
        per_pass = self.windows_per_pass
        repeated = bool(per_pass) and self.windows_served > per_pass
        return {"source": self.name, "fingerprint": self.fingerprint, "seqlen": self.seqlen,
                "windows_served": self.windows_served, **self._furthest_counts,
                "windows_per_pass": per_pass, "shingle": self.shingle, "excluded_text_sha256": self.excluded_text_sha256,
                "passes": (self.windows_served - 1) // per_pass + 1 if repeated else 1,
                "repeats": round(self.windows_served / per_pass - 1, 6) if repeated else 0.0}


# ---------------------------------------------------------------------------------------------
# How many tokens a source can supply, known before reading it

# What each hub corpus holds as its publisher states it.  Token counts depend on the tokenizer, so
# these are estimates for any other one; they are only used to refuse a run that asks for clearly
# more (a run that still runs short stops where the stream ends, as before).
HUB_TOKENS = {
    "slimpajama": (6_000_000_000, "a 6B-token sample of SlimPajama-627B, as its name and card say"),
    "c4": (175_000_000_000, "RedPajama-1T's count of its C4 slice (LLaMA tokenizer)"),
    "redpajama": (1_000_000_000, "a 1B-token sample, as its dataset card says"),
}
# Local text: every token covers at least one byte of text (byte-level BPE; SentencePiece with
# byte fallback), so a file's bytes bound its tokens.  A jsonl row's JSON wrapper ({"text": ""},
# 12 bytes or more) covers the few tokens a document adds (BOS, a leading space, the separator);
# a .txt file is one document, so it gets them added.
EXTRA_TOKENS_PER_DOCUMENT = 3


@dataclasses.dataclass(frozen=True)
class Supply:
    """The most tokens a source can give, or None when that is unknown before reading it."""

    name: str
    tokens: int | None
    how: str  # where the number comes from, in words
    bound: bool  # True: an upper bound from the bytes on disk; False: a documented estimate


def stream_supply(source: str, data_dir=None) -> Supply:
    """What a training stream can supply, from sizes alone: no document is read, nothing is
    downloaded (a hub stream's size is the documented one)."""
    documents = open_documents(source, data_dir)
    if isinstance(documents, HubDocuments):
        tokens, how = HUB_TOKENS.get(source, (None, "no documented size"))
        return Supply(f"{source} ({documents.spec['hub_id']})", tokens, how, False)
    files = getattr(documents, "files", [])
    if any(f.name.endswith(".gz") for f in files):
        return Supply(documents.name, None, "compressed shards: their text size is unknown before reading", True)
    total = sum(f.stat().st_size + (EXTRA_TOKENS_PER_DOCUMENT if f.name.endswith(TEXT_SUFFIX) else 0) for f in files)
    return Supply(documents.name, total, f"{len(files)} file(s) of {total:,} bytes, at most one token per byte", True)


def windows_needed(config) -> int:
    """Windows a learned method's run reads from its stream: every step's sequences, once each,
    and the held-out windows first."""
    return config.steps * config.batch_size + (config.heldout_windows or 0)


def check_supply(config, data_dir=None, what: str = "a learned method") -> None:
    """Refuse, with the arithmetic, a streamed run whose source cannot supply its tokens (unless
    it allows repeats).  Called for every learned cell before a grid runs or is listed."""
    if not getattr(config, "streaming", False) or getattr(config, "allow_stream_repeats", False):
        return
    supply = stream_supply(config.dataset, data_dir)
    needed = windows_needed(config) * config.seqlen
    if supply.tokens is None or needed <= supply.tokens:
        return
    held = f" + {config.heldout_windows} held-out windows" if config.heldout_windows else ""
    limit = "at most" if supply.bound else "about"
    raise UserError(f"{what} reads {config.steps} steps x {config.batch_size} sequences{held} = "
                    f"{windows_needed(config):,} windows x {config.seqlen} tokens = {needed:,} unique tokens, but the "
                    f"{supply.name} stream holds {limit} {supply.tokens:,} ({supply.how}): "
                    f"{needed / supply.tokens:.1f}x what it can supply",
                    hint=f"{REPEATS_HINT} (a larger --data-dir copy, or the hub stream), or fewer steps")


def check_grid_supply(cells, data_dir=None) -> None:
    """check_supply for every streamed learned cell of a grid, each configuration once."""
    seen = set()
    for cell in cells:
        config = registry.create(cell.method, cell.method_config).config
        if not hasattr(config, "streaming"):
            continue  # not a mask-training method
        key = (cell.method, getattr(config, "dataset", None), getattr(config, "steps", None),
               getattr(config, "batch_size", None), getattr(config, "seqlen", None))
        if key in seen:
            continue
        seen.add(key)
        preset = getattr(config, "preset", None)
        check_supply(config, data_dir, f"{cell.method}" + (f" (preset {preset})" if preset else ""))
