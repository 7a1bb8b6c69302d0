"""The real layer inputs each parity script feeds through both implementations: an embedded
model's calibration windows run up to one decoder block (prunebench's own block pipeline)."""
from __future__ import annotations


def block_at(model_spec: str, block_index: int, names, n_samples: int, seqlen: int, *, dataset: str = "lee",
             windows_per_batch: int | None = None):
    """(block, {name: linear} for `names`, hidden, args, kwargs): the block's inputs over the
    calibration windows (seed 0), ready for prunebench.engines.layerwise.run_block / collect_block_stats."""
    from prunebench.data.windows import WindowSpec, calibration_windows
    from prunebench.engines.layerwise import batch_windows, capture_block_inputs, run_block
    from prunebench.modeling.models import find_blocks, load_model, prunable_linears

    loaded = load_model(model_spec)
    windows, _ = calibration_windows(loaded.tokenizer, WindowSpec(dataset, n_samples, seqlen, 0))
    hidden, args, kwargs = capture_block_inputs(loaded.model, windows, "cpu")
    if windows_per_batch:
        hidden = batch_windows(hidden, windows_per_batch)
    _, blocks = find_blocks(loaded.model)
    for block in blocks[:block_index]:
        hidden = run_block(block, hidden, args, kwargs, "cpu")
    linears = prunable_linears(blocks[block_index])
    missing = [n for n in names if n not in linears]
    if missing:
        raise SystemExit(f"no linear {missing} in block {block_index}; it has {', '.join(linears)}")
    return blocks[block_index], {n: linears[n] for n in names}, hidden, args, kwargs


def record_inputs(block, linears: dict, hidden, args, kwargs) -> dict:
    """{name: [the linear's input of each forward]} from one run of the block."""
    from prunebench.engines.layerwise import run_block

    seen = {n: [] for n in linears}
    handles = [m.register_forward_pre_hook(lambda mod, inp, n=n: seen[n].append(inp[0].detach().float().clone()))
               for n, m in linears.items()]
    try:
        run_block(block, hidden, args, kwargs, "cpu")
    finally:
        for h in handles:
            h.remove()
    return seen
