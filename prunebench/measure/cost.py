"""What a mask buys: storage of the pruned weights per format, and FLOPs per token.

Pure arithmetic on (shape, kept weights, pattern) per linear, so it applies to a live model, to
saved masks and to a record's per-layer sparsity alike.  Formats (../shared/METHODS.md section 4),
for n weights of which nnz are kept, values in `value_bytes` (2: bf16):

    dense            n * v
    bitmask          nnz * v + n / 8                (one bit per position)
    csr              nnz * (v + 4) + 4 * (rows + 1) (int32 column index per value, row pointers)

and a pattern's own, from its file in prunebench/sparsity/ (Pattern.storage_formats):

    N:M packed       nnz * v + nnz * ceil(log2 M) / 8   (2:4: 1.125 bytes per weight at bf16)
    dense|2:4 tiles  dense tiles n_d * v, 2:4 tiles packed, plus one bit per tile

A mask can be stored in the formats it satisfies: any mask as dense, bitmask or CSR, a mask made
at a pattern also in that pattern's formats.  The smallest is reported.

FLOPs per token (multiply-adds counted as 2): 2 * nnz per linear (what a kernel that skips the
zeros computes; a pattern may count otherwise, Pattern.flops_per_token), the output head
2 * vocab * hidden, and attention's scores and weighted sum 2 * 2 * context * hidden per layer at
a stated context length.  Embeddings and norms are negligible and not counted.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from prunebench.errors import UserError
from prunebench.modeling.models import all_prunable
from prunebench.sparsity.pattern_base import FLOPS_PER_KEPT_WEIGHT
from prunebench.sparsity.pattern_registry import pattern_of
from prunebench.sparsity.patterns import SparsitySpec

VALUE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DEFAULT_VALUE_DTYPE = "bfloat16"  # what a deployed checkpoint stores
INDEX_BYTES = 4  # int32 CSR indices
# Attention FLOPs depend on the context; the cost table states the one it used.
DEFAULT_CONTEXT = 512


@dataclass
class LinearCost:
    name: str
    rows: int
    cols: int
    kept: int
    spec: SparsitySpec | None  # the pattern the mask follows; None: stored as a plain (dense or any) mask
    formats: dict = field(default_factory=dict)  # format -> bytes (the valid ones)
    best: str = "dense"
    flops_per_token: int = 0

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def best_bytes(self) -> int:
        return self.formats[self.best]

    # What tells two linears' layouts apart (report/cost.py shares a speed measurement by them).
    @property
    def pattern(self) -> str:
        return "dense" if self.spec is None else self.spec.pattern

    @property
    def nm(self) -> tuple | None:
        return (self.spec.n, self.spec.m) if self.spec is not None and self.spec.m else None

    @property
    def tile(self) -> int | None:
        return (self.spec.tile or None) if self.spec is not None else None


def dense_bytes(n: int, value_bytes: int) -> int:
    return n * value_bytes


def bitmask_bytes(n: int, nnz: int, value_bytes: int) -> int:
    return nnz * value_bytes + math.ceil(n / 8)


def csr_bytes(rows: int, nnz: int, value_bytes: int) -> int:
    return nnz * (value_bytes + INDEX_BYTES) + INDEX_BYTES * (rows + 1)


def linear_cost(name: str, rows: int, cols: int, kept: int, spec: SparsitySpec | None = None, *,
                mask=None, sparsity: float | None = None,
                value_bytes: int = VALUE_BYTES[DEFAULT_VALUE_DTYPE]) -> LinearCost:
    """The valid formats of one linear and the smallest.  `spec`: the pattern its mask follows,
    whose own formats count too; the pattern reads its layout from `mask` (bool [out, in]) where
    there is one, else from `sparsity`, the linear's sparsity in a record."""
    n = rows * cols
    formats = {"dense": dense_bytes(n, value_bytes)}
    if kept < n:
        formats["bitmask"] = bitmask_bytes(n, kept, value_bytes)
        formats["csr"] = csr_bytes(rows, kept, value_bytes)
    flops = FLOPS_PER_KEPT_WEIGHT * kept
    if spec is not None:
        pattern = pattern_of(spec.pattern)
        formats.update(pattern.storage_formats(spec, rows, cols, kept, value_bytes, mask=mask, sparsity=sparsity))
        flops = pattern.flops_per_token(kept)
    # on a tie the structured format wins (what hardware accelerates), then bitmask, CSR, dense
    rank = {"dense": 3, "csr": 2, "bitmask": 1}
    best = min(formats, key=lambda k: (formats[k], rank.get(k, 0)))
    return LinearCost(name, rows, cols, kept, spec, formats, best, flops)


@dataclass
class ModelShape:
    """What the FLOPs and the whole-model size need besides the linears."""

    hidden: int
    vocab: int
    layers: int
    other_params: int  # parameters outside the prunable linears (embeddings, norms, a separate head)
    head_tied: bool  # the output head shares the embedding (counted once in bytes, used in FLOPs)


def model_cost(linears: list, shape: ModelShape, *, context: int = DEFAULT_CONTEXT,
               value_dtype: str = DEFAULT_VALUE_DTYPE) -> dict:
    """Bytes and FLOPs per token of a pruned model, beside the dense model's (the linears' costs
    must have been computed with the same value dtype)."""
    value_bytes = VALUE_BYTES[value_dtype]
    linear_dense = sum(c.formats["dense"] for c in linears)
    linear_best = sum(c.best_bytes for c in linears)
    other = shape.other_params * value_bytes
    head = 2 * shape.vocab * shape.hidden
    attention = 2 * 2 * context * shape.hidden * shape.layers
    flops = sum(c.flops_per_token for c in linears) + head + attention
    dense_flops = FLOPS_PER_KEPT_WEIGHT * sum(c.numel for c in linears) + head + attention
    formats = {}
    for c in linears:
        formats[c.best] = formats.get(c.best, 0) + 1
    return {
        "value_dtype": value_dtype,
        "linear_bytes": linear_best, "linear_bytes_dense": linear_dense,
        "linear_ratio": linear_best / linear_dense,
        "model_bytes": linear_best + other, "model_bytes_dense": linear_dense + other,
        "model_ratio": (linear_best + other) / (linear_dense + other),
        "formats": formats,
        "flops_per_token": flops, "flops_per_token_dense": dense_flops, "flops_ratio": flops / dense_flops,
        "context": context,
        "kept_fraction": sum(c.kept for c in linears) / sum(c.numel for c in linears),
    }


# Labels of a cell that prunes nothing: the dense cell's, and a zero target.
DENSE_LABELS = ("0", "dense")


def spec_of_label(label: str) -> SparsitySpec | None:
    """The spec a record's (or a mask file's) sparsity label names; None for a dense one."""
    return None if not label or label in DENSE_LABELS else SparsitySpec.parse(label)


def record_linears(record: dict, shapes: dict, value_bytes: int = VALUE_BYTES[DEFAULT_VALUE_DTYPE]) -> list:
    """LinearCost per prunable linear of a run record, from its per-layer sparsity and the pattern
    its label names (a label no pattern reads: costed as a plain mask).

    shapes: name -> (rows, cols) of the model the record pruned.  A fully kept linear is dense."""
    sp = record.get("sparsity") or {}
    per_layer = sp.get("per_layer") or {}
    label = str(sp.get("label") or "")
    is_dense = (record.get("method") or {}).get("name") == "dense" or label in DENSE_LABELS
    try:
        spec = None if is_dense else spec_of_label(label)
    except UserError:
        spec = None
    out = []
    for name, (rows, cols) in shapes.items():
        n = rows * cols
        sparsity = 0.0 if is_dense else float(per_layer.get(name, sp.get("achieved") or 0.0))
        kept = n - int(round(sparsity * n))
        if kept == n:
            out.append(linear_cost(name, rows, cols, n, value_bytes=value_bytes))
        else:
            out.append(linear_cost(name, rows, cols, kept, spec, sparsity=sparsity, value_bytes=value_bytes))
    return out


def linears_for_spec(masks: dict, spec: SparsitySpec | None = None,
                     value_bytes: int = VALUE_BYTES[DEFAULT_VALUE_DTYPE]) -> list:
    """LinearCost per mask (name -> bool [out, in]) of saved masks or a live model's zeros, made at
    `spec` (None: dense or unknown), whose pattern says which storage formats they may use."""
    out = []
    for name, mask in masks.items():
        rows, cols = mask.shape
        out.append(linear_cost(name, rows, cols, int(mask.sum()), spec, mask=mask, value_bytes=value_bytes))
    return out


def model_shape(model) -> ModelShape:
    """ModelShape of a transformers causal LM (prunable linears from prunebench.modeling.models)."""
    cfg = model.config
    text = getattr(cfg, "text_config", None) or cfg
    hidden = int(getattr(text, "hidden_size", None) or getattr(text, "n_embd"))
    vocab = int(getattr(text, "vocab_size"))
    layers = int(getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer"))
    prunable = {id(m.weight) for m in all_prunable(model).values()}
    seen, other = set(), 0
    for p in model.parameters():
        if id(p) in prunable or id(p) in seen:
            continue
        seen.add(id(p))
        other += p.numel()
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    return ModelShape(hidden=hidden, vocab=vocab, layers=layers, other_params=other, head_tied=tied)


def as_dict(cost: LinearCost) -> dict:
    d = asdict(cost)
    d["best_bytes"] = cost.best_bytes
    return d
