"""What a mask buys: storage of the pruned weights per format, and FLOPs per token.

Pure arithmetic on (shape, kept weights, pattern) per linear, so it applies to a live model, to
saved masks and to a record's per-layer sparsity alike.  Formats (../shared/METHODS.md section 4),
for n weights of which nnz are kept, values in `value_bytes` (2: bf16):

    dense            n * v
    bitmask          nnz * v + n / 8                (one bit per position)
    csr              nnz * (v + 4) + 4 * (rows + 1) (int32 column index per value, row pointers)
    N:M packed       nnz * v + nnz * ceil(log2 M) / 8   (2:4: 1.125 bytes per weight at bf16)
    dense|2:4 tiles  dense tiles n_d * v, 2:4 tiles packed, plus one bit per tile

A pattern can be stored in the formats it satisfies: any mask as dense, bitmask or CSR; a valid
N:M mask also N:M-packed; a hybrid mask as mixed tiles.  The smallest is reported.

FLOPs per token (multiply-adds counted as 2): 2 * nnz per linear (what a kernel that skips the
zeros computes), the output head 2 * vocab * hidden, and attention's scores and weighted sum
2 * 2 * context * hidden per layer at a stated context length.  Embeddings and norms are
negligible and not counted.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from prunebench.sparsity.patterns import hybrid_tiles, tile_sums
from prunebench.modeling.models import all_prunable

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
    pattern: str  # "dense", "unstructured", "N:M", "hybrid"
    formats: dict = field(default_factory=dict)  # format -> bytes (the valid ones)
    best: str = "dense"
    nm: tuple | None = None  # (N, M) of an N:M pattern or of a hybrid mask's N:M tiles
    tile: int | None = None  # a hybrid mask's tile side

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def best_bytes(self) -> int:
        return self.formats[self.best]


def dense_bytes(n: int, value_bytes: int) -> int:
    return n * value_bytes


def bitmask_bytes(n: int, nnz: int, value_bytes: int) -> int:
    return nnz * value_bytes + math.ceil(n / 8)


def csr_bytes(rows: int, nnz: int, value_bytes: int) -> int:
    return nnz * (value_bytes + INDEX_BYTES) + INDEX_BYTES * (rows + 1)


def nm_packed_bytes(nnz: int, m: int, value_bytes: int) -> int:
    """Kept values plus each one's position inside its group of m (ceil(log2 m) bits)."""
    return nnz * value_bytes + math.ceil(nnz * max(1, math.ceil(math.log2(m))) / 8)


def hybrid_bytes(dense_elems: int, nm_elems: int, n_tiles: int, n: int, m: int, value_bytes: int) -> int:
    """Dense tiles stored dense, N:M tiles N:M-packed, one bit per tile saying which."""
    return (dense_elems * value_bytes + nm_packed_bytes(nm_elems * n // m, m, value_bytes)
            + math.ceil(n_tiles / 8))


def linear_cost(name: str, rows: int, cols: int, kept: int, pattern: str, *, nm: tuple | None = None,
                tile: int | None = None, dense_elems: int | None = None,
                value_bytes: int = VALUE_BYTES[DEFAULT_VALUE_DTYPE]) -> LinearCost:
    """The valid formats of one linear and the smallest.  `nm`: (N, M) for an N:M pattern and for
    the 2:4 inside hybrid tiles; `tile`, `dense_elems`: a hybrid mask's tile size and how many
    weights sit in dense tiles."""
    n = rows * cols
    formats = {"dense": dense_bytes(n, value_bytes)}
    if kept < n:
        formats["bitmask"] = bitmask_bytes(n, kept, value_bytes)
        formats["csr"] = csr_bytes(rows, kept, value_bytes)
    if pattern == "N:M" and nm is not None:
        formats[f"{nm[0]}:{nm[1]} packed"] = nm_packed_bytes(kept, nm[1], value_bytes)
    if pattern == "hybrid" and nm is not None and tile and dense_elems is not None:
        n_tiles = math.ceil(rows / tile) * math.ceil(cols / tile)
        formats["dense|2:4 tiles"] = hybrid_bytes(dense_elems, n - dense_elems, n_tiles, nm[0], nm[1], value_bytes)
    # on a tie the structured format wins (what hardware accelerates), then bitmask, CSR, dense
    rank = {"dense": 3, "csr": 2, "bitmask": 1}
    best = min(formats, key=lambda k: (formats[k], rank.get(k, 0)))
    return LinearCost(name, rows, cols, kept, pattern, formats, best, nm=tuple(nm) if nm else None, tile=tile)


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
    flops = 2 * sum(c.kept for c in linears) + head + attention
    dense_flops = 2 * sum(c.numel for c in linears) + head + attention
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


def record_linears(record: dict, shapes: dict, value_bytes: int = VALUE_BYTES[DEFAULT_VALUE_DTYPE]) -> list:
    """LinearCost per prunable linear of a run record, from its per-layer sparsity and pattern.

    shapes: name -> (rows, cols) of the model the record pruned.  A hybrid record's per-layer
    sparsity s puts 2 s of the layer's weights in 2:4 tiles (a 2:4 tile is exactly half zero)."""
    sp = record.get("sparsity") or {}
    per_layer = sp.get("per_layer") or {}
    label = str(sp.get("label") or "")
    pattern_name = str(sp.get("pattern") or "unstructured")
    is_dense = (record.get("method") or {}).get("name") == "dense" or label in ("0", "dense")
    out = []
    for name, (rows, cols) in shapes.items():
        n = rows * cols
        sparsity = 0.0 if is_dense else float(per_layer.get(name, sp.get("achieved") or 0.0))
        kept = n - int(round(sparsity * n))
        vb = {"value_bytes": value_bytes}
        if is_dense or kept == n:
            out.append(linear_cost(name, rows, cols, n, "dense", **vb))
        elif label.startswith("hybrid:"):
            tile = int(label.rsplit("/", 1)[1]) if "/" in label else 128
            in_nm = min(n, int(round(2 * sparsity * n)))
            out.append(linear_cost(name, rows, cols, kept, "hybrid", nm=(2, 4), tile=tile, dense_elems=n - in_nm, **vb))
        elif ":" in pattern_name:
            n_keep, m = (int(x) for x in pattern_name.split(":"))
            out.append(linear_cost(name, rows, cols, kept, "N:M", nm=(n_keep, m), **vb))
        else:
            out.append(linear_cost(name, rows, cols, kept, "unstructured", **vb))
    return out


def linears_for_spec(masks: dict, spec=None, value_bytes: int = VALUE_BYTES[DEFAULT_VALUE_DTYPE]) -> list:
    """linears_from_masks for masks made at a SparsitySpec (None: dense or unknown), which says
    the pattern their storage formats may use."""
    if spec is None:
        return linears_from_masks(masks, value_bytes=value_bytes)
    pattern = {"hybrid": "hybrid", "nm": "N:M"}.get(spec.pattern, "unstructured")
    return linears_from_masks(masks, pattern, nm=(spec.n, spec.m) if spec.m else None, tile=spec.tile or None,
                              value_bytes=value_bytes)


def linears_from_masks(masks: dict, pattern: str = "unstructured", *, nm: tuple | None = None,
                       tile: int | None = None, value_bytes: int = VALUE_BYTES[DEFAULT_VALUE_DTYPE]) -> list:
    """LinearCost per mask (name -> bool [out, in]) of saved masks or a live model's zeros."""
    import torch

    out = []
    for name, mask in masks.items():
        rows, cols = mask.shape
        kept = int(mask.sum())
        if pattern == "hybrid" and tile:
            kinds = hybrid_tiles(mask, tile, *(nm or (2, 4)))
            sizes = tile_sums(torch.ones(mask.shape), tile)
            dense_elems = int(sizes[~kinds["nm"]].sum())
            out.append(linear_cost(name, rows, cols, kept, "hybrid", nm=nm or (2, 4), tile=tile,
                                   dense_elems=dense_elems, value_bytes=value_bytes))
        else:
            out.append(linear_cost(name, rows, cols, kept, pattern if kept < mask.numel() else "dense", nm=nm,
                                   value_bytes=value_bytes))
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
