"""Dense-or-N:M tiles (PATCH's hybrid pattern): each matrix is cut into tile x tile blocks, each
either dense or 2:4, and the target (at most 0.5) is the effective sparsity over all layers
together.  Also the tile arithmetic PATCH and the mask-learning engine share.

Written 'hybrid:0.35' (the paper's tile, 128) or 'hybrid:0.35/64'.  Stored as mixed tiles: dense
tiles dense, 2:4 tiles N:M-packed, one bit per tile saying which.
"""
from __future__ import annotations

import math
import re

import torch

from prunebench.errors import UserError
from prunebench.sparsity.n_of_m import nm_mask, nm_packed_bytes
from prunebench.sparsity.pattern_base import PERCENT, Pattern

HYBRID = "hybrid"
# The paper's default tile.  The effective sparsity is 0.5 x the fraction of 2:4 tiles, so 0 to 50%.
HYBRID_DEFAULT_TILE = 128
HYBRID_N, HYBRID_M = 2, 4
# The pattern's name in records, and its storage format's.
DENSE_OR_NM_TILES = "dense|2:4 tiles"
# Its label: 'hybrid:<effective sparsity>/<tile>'.
LABEL = re.compile(r"hybrid:([0-9.]+)/(\d+)")
# What CLI and grid text may write: a percent, spaces, no tile.
SPEC_TEXT = re.compile(r"hybrid\s*:\s*([0-9.]+)(%?)(?:\s*/\s*(\d+))?")


# A dense tile may hold the dense model's own exact zeros (a quantised checkpoint has a few), but
# a tile with more zeros than this that is not 2:4 is neither of the hybrid pattern's two kinds.
HYBRID_DENSE_MAX_ZEROS = 0.05


def tile_grid(shape, tile: int) -> tuple:
    """(tile rows, tile columns) of an [out, in] matrix; edge tiles may be smaller."""
    return -(-shape[0] // tile), -(-shape[1] // tile)


def tile_sums(matrix: torch.Tensor, tile: int) -> torch.Tensor:
    """Sum of each tile of an [out, in] matrix (zero-padded at the edges), [tile rows, tile cols]."""
    rows, cols = tile_grid(matrix.shape, tile)
    padded = torch.nn.functional.pad(matrix.float(), (0, cols * tile - matrix.shape[1], 0, rows * tile - matrix.shape[0]))
    return padded.view(rows, tile, cols, tile).sum(dim=(1, 3))


def expand_tiles(per_tile: torch.Tensor, tile: int, shape) -> torch.Tensor:
    """Broadcast a [tile rows, tile cols] tensor over its tiles, cropped to `shape`."""
    return per_tile.repeat_interleave(tile, dim=0)[:shape[0]].repeat_interleave(tile, dim=1)[:, :shape[1]]


def hybrid_tiles(kept: torch.Tensor, tile: int, n: int = 2, m: int = 4) -> dict:
    """Classify the tiles of a keep-mask [out, in]: 'nm' (every group of m inputs keeps at most
    n), 'dense' (not N:M, at most HYBRID_DENSE_MAX_ZEROS of it zero), or 'invalid' (neither).
    Returns bool [tile rows, tile cols] tensors under those keys, and the count of each."""
    rows, cols = kept.shape
    full = cols - cols % m
    over = torch.zeros(rows, cols)
    if full:
        groups_over = kept[:, :full].reshape(rows, full // m, m).sum(-1) > n  # a group keeping too many
        over[:, :full] = groups_over.repeat_interleave(m, dim=1).float()
    bad_groups = tile_sums(over, tile)
    zeros = tile_sums((~kept).float(), tile) / tile_sums(torch.ones(kept.shape), tile)
    nm = bad_groups == 0
    dense = ~nm & (zeros <= HYBRID_DENSE_MAX_ZEROS)
    invalid = ~nm & ~dense
    return {"nm": nm, "dense": dense, "invalid": invalid,
            "counts": {"nm": int(nm.sum()), "dense": int(dense.sum()), "invalid": int(invalid.sum())}}


def hybrid_bytes(dense_elems: int, nm_elems: int, n_tiles: int, n: int, m: int, value_bytes: int) -> int:
    """Dense tiles stored dense, N:M tiles N:M-packed, one bit per tile saying which."""
    return (dense_elems * value_bytes + nm_packed_bytes(nm_elems * n // m, m, value_bytes)
            + math.ceil(n_tiles / 8))


class HybridTiles(Pattern):
    kind = HYBRID
    syntax = "hybrid:0.35 or hybrid:0.35/64"
    examples = ("hybrid:0.35/16",)
    label_rank = 2.5

    def parse(self, text: str) -> dict | None:
        hybrid = SPEC_TEXT.fullmatch(text)
        if hybrid:
            try:
                value = float(hybrid.group(1))
            except ValueError:
                raise UserError(f"cannot read sparsity {text!r}", hint="write hybrid:0.35 or hybrid:0.35/64") from None
            value = value / 100.0 if hybrid.group(2) else value
            return {"target": value, "pattern": HYBRID, "tile": int(hybrid.group(3) or 0)}
        if text.startswith(HYBRID):
            raise UserError(f"cannot read sparsity {text!r}", hint="write hybrid:<effective sparsity>[/<tile>], "
                            "e.g. hybrid:0.35/64")
        return None

    def settle(self, spec) -> dict:
        self.check_target(spec.target)
        if spec.target > 1.0 - HYBRID_N / HYBRID_M:
            raise UserError(f"a dense-or-2:4 tile pattern reaches at most 50% sparsity, not {spec.target:g}",
                            hint="e.g. hybrid:0.35; for 50% use 2:4")
        if spec.scope is not None:
            raise UserError("a hybrid spec has one budget over all layers and takes no scope", hint="write hybrid:0.35")
        tile = HYBRID_DEFAULT_TILE if spec.tile == 0 else spec.tile
        if not isinstance(tile, int) or tile < HYBRID_M or tile % HYBRID_M:
            raise UserError(f"tile size {tile!r} must be a positive multiple of {HYBRID_M}",
                            hint="e.g. hybrid:0.35/64")
        return {"n": HYBRID_N, "m": HYBRID_M, "tile": tile}

    def label(self, spec) -> str:
        return f"hybrid:{spec.target:g}/{spec.tile}"

    def record_name(self, spec) -> str:
        return DENSE_OR_NM_TILES

    def record_fields(self, spec) -> dict:
        return {"tile": spec.tile}

    def display_label(self, label) -> str | None:
        hybrid = LABEL.fullmatch(str(label))
        if not hybrid:
            return None
        return f"{float(hybrid.group(1)) * PERCENT:g}% tiles/{hybrid.group(2)}"

    def label_sort_key(self, label) -> tuple | None:
        hybrid = LABEL.fullmatch(str(label))
        return None if not hybrid else (self.label_rank, float(hybrid.group(1)), label)

    def reads_record_name(self, name: str) -> bool:
        return name == DENSE_OR_NM_TILES

    def check(self, name: str, kept: torch.Tensor, spec) -> str | None:
        tiles = hybrid_tiles(kept != 0, spec.tile, spec.n, spec.m)
        bad = tiles["counts"]["invalid"]
        if bad:
            r, c = (int(i) for i in tiles["invalid"].nonzero()[0])
            return (f"{name}: {bad} of {tiles['invalid'].numel()} tiles of {spec.tile} x {spec.tile} are neither dense nor "
                    f"{spec.n}:{spec.m} (first: tile row {r}, column {c})")
        return None

    def storage_formats(self, spec, rows: int, cols: int, kept: int, value_bytes: int, *,
                        mask: torch.Tensor | None = None, sparsity: float | None = None) -> dict:
        """From a mask: the weights in its 2:4 tiles.  From a record's per-layer sparsity s: 2 s of
        the layer's weights sit in 2:4 tiles (a 2:4 tile is exactly half zero)."""
        n = rows * cols
        if mask is not None:
            kinds = hybrid_tiles(mask, spec.tile, spec.n, spec.m)
            sizes = tile_sums(torch.ones(mask.shape), spec.tile)
            dense_elems = int(sizes[~kinds["nm"]].sum())
        else:
            dense_elems = n - min(n, int(round(2 * sparsity * n)))
        n_tiles = math.ceil(rows / spec.tile) * math.ceil(cols / spec.tile)
        return {DENSE_OR_NM_TILES: hybrid_bytes(dense_elems, n - dense_elems, n_tiles, spec.n, spec.m, value_bytes)}

    def random_mask(self, spec, kept: int, scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Randomly chosen tiles 2:4, enough of them for the kept count (a 2:4 tile is exactly half
        zero), the rest dense."""
        rows, cols = scores.shape
        tile = spec.tile
        nm_elems = 2 * (rows * cols - kept)
        grid_r, grid_c = -(-rows // tile), -(-cols // tile)
        n_tiles = min(grid_r * grid_c, round(nm_elems / (tile * tile)))
        chosen = torch.randperm(grid_r * grid_c, generator=generator)[:n_tiles]
        in_nm = torch.zeros(grid_r * grid_c, dtype=torch.bool)
        in_nm[chosen] = True
        in_nm = in_nm.view(grid_r, grid_c).repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:rows, :cols]
        return torch.where(in_nm, nm_mask(scores, spec.n, spec.m), torch.ones_like(in_nm))
