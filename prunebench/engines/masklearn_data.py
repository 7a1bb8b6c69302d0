"""The text learned masks train on: every window of the training text once with a seeded few held
out, or the papers' stream of unique windows read on the fly; and each optimizer step's batch, a
pure function of (seed, step)."""
from __future__ import annotations

import torch

from prunebench.data.stream import WindowStream, open_documents
from prunebench.data.windows import eval_text, stream_windows, tokenizer_fingerprint
from prunebench.engines.masklearn_config import MaskTrainingConfig
from prunebench.errors import UserError
from prunebench.hashing import sha256_json
from prunebench.modeling import sequence_start as starts


class StreamedBatches:
    """A WindowStream seen from the training loop: window i of training is the stream's window
    offset + i (the first `offset` are the held-out ones)."""

    def __init__(self, stream, offset: int):
        self.stream, self.offset = stream, offset

    def take(self, start: int, count: int) -> torch.Tensor:
        return self.stream.take(self.offset + start, count)

    @property
    def stats(self) -> dict:
        return self.stream.stats


def split_training_windows(config: MaskTrainingConfig, ctx, who: str):
    """(dataset, train windows, held-out windows, stream fingerprint): every window of the
    training text once, a seeded few of them held out.  With `streaming`, train is a
    WindowStream whose first windows are the held-out ones.  Every window starts with the
    tokenizer's sequence start (prunebench.modeling.sequence_start); the loss predicts every position
    after the first, so a start of more than one token would be predicted: refused."""
    dataset = config.dataset or ctx.calibration_dataset
    if ctx.tokenizer is None:
        raise UserError(f"{who} draws its own training stream and needs the tokenizer in the context",
                        hint="the runner passes it; in scripts set PruneContext(tokenizer=...)")
    start = starts.sequence_start_ids(ctx.tokenizer)
    if len(start) > 1:
        raise UserError(f"{who}: the tokenizer starts every sequence with {len(start)} tokens "
                        f"{start}; the training loss would predict all but the first of them",
                        hint="learned masks train on tokenizers that start a sequence with at most one token")
    if config.streaming:
        return stream_training_windows(config, ctx, dataset)
    windows, fingerprint = stream_windows(ctx.tokenizer, dataset, config.seqlen, ctx.data_dir)
    gen = torch.Generator().manual_seed(ctx.seed)
    order = torch.randperm(len(windows), generator=gen)
    n_heldout = min(config.heldout_windows, max(len(windows) - config.batch_size, 0))
    return dataset, windows[order[n_heldout:]], windows[order[:n_heldout]], fingerprint


def stream_training_windows(config: MaskTrainingConfig, ctx, dataset: str):
    """The papers' stream: unique windows read on the fly, none overlapping the cell's
    evaluation text; the first `heldout_windows` are held out, training reads on from there."""
    exclude = "\n\n".join(eval_text(d, ctx.data_dir) for d in ctx.eval_datasets) or None
    stream = WindowStream(open_documents(dataset, ctx.data_dir), ctx.tokenizer, config.seqlen, exclude_text=exclude,
                          allow_repeats=config.allow_stream_repeats)
    heldout = (stream.take(0, config.heldout_windows) if config.heldout_windows
               else torch.zeros(0, config.seqlen, dtype=torch.long))
    what = {"stream": stream.stats["fingerprint"], "tok": tokenizer_fingerprint(ctx.tokenizer),
            "seqlen": config.seqlen, "excluded": stream.stats.get("excluded_text_sha256")}
    if stream.prefix:  # windows that start with the tokenizer's sequence start are other windows
        what["start"] = stream.prefix
    fingerprint = sha256_json(what)[:16]
    return dataset, StreamedBatches(stream, len(heldout)), heldout, fingerprint


def step_batch(train, step: int, seed: int, batch_size: int) -> torch.Tensor:
    """The sequences of optimizer step `step`: consecutive slices of a seeded permutation of
    the whole stream, reshuffled (seed, epoch) when it runs out; a pure function of the step.
    A streamed source: the step's consecutive windows of the stream."""
    if isinstance(train, StreamedBatches):
        return train.take(step * batch_size, batch_size)
    n = len(train)
    epoch, index = divmod(step, n // batch_size)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return train[order[index * batch_size:(index + 1) * batch_size]]
