"""The tokens a model's every sequence must begin with, as its tokenizer says, and the window rule.

Gemma's tokenizer starts every encoded sequence with <bos> (its GGUF says
tokenizer.ggml.add_bos_token = true), and gemma-3-270m's perplexity on text windows without it is
about ten times higher; SmolLM2's says false. Windows cut from one long token stream carry no such
start, so every window prunebench makes follows one rule:

    a window of seqlen tokens is the prefix (sequence_start_ids(tokenizer)) followed by
    seqlen - len(prefix) text tokens.

The prefix is context only, never a predicted target: a perplexity window scores its text tokens
(all of them when there is a prefix; all but the first without one, as before), and consecutive
perplexity windows step seqlen - len(prefix) text tokens, so every scored text token is scored
once. With an empty prefix (SmolLM2, the tiny models) every window is exactly what it was before
the rule. Calibration windows (prunebench.data.windows.calibration_windows), perplexity windows
(prunebench.evaluate.perplexity), the learned-mask training stream and its held-out windows
(prunebench.data.windows.stream_windows, prunebench.data.stream.WindowStream) apply it; lm-eval encodes its
contexts with the tokenizer's special tokens, so it prepends the same prefix
(prunebench.evaluate.zeroshot). A cell's key and record carry the prefix ids
(`sequence_start` in the calibration and evaluation specs), known before the model loads from
`model_sequence_start`; the runner checks the loaded tokenizer agrees.
"""
from __future__ import annotations

import functools
from prunebench.errors import UserError
from prunebench.modeling import models
from prunebench.modeling.models import EMBEDDED_MODELS, check_gguf, embedded_gguf_path

# Text the probe encodes: what the tokenizer adds around it is what it adds to any sequence.
_PROBE = "a"


def sequence_start_ids(tokenizer) -> list[int]:
    """The token ids an encoded sequence begins with before its text: the BOS token for a tokenizer
    that adds one (add_bos_token), nothing for one that does not.

    Two witnesses, either enough: the add_bos_token flag (set from a GGUF's
    tokenizer.ggml.add_bos_token when transformers converts its tokenizer), and what encoding with
    special tokens actually prepends. The second is needed because transformers 5 drops
    add_bos_token when it saves a tokenizer, so one reloaded from a saved copy (prunebench's model
    cache) reports False while its post-processor still prepends <bos>."""
    start = _prepended(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    if getattr(tokenizer, "add_bos_token", False) is True and bos is not None and bos not in start:
        start = [int(bos)] + start
    return start


def _prepended(tokenizer) -> list[int]:
    """The ids encoding with special tokens puts before the text's own ids."""
    with_special = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    if not plain:
        return []
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i:i + len(plain)] == plain:
            return [int(t) for t in with_special[:i]]
    return []  # the text's ids do not appear unchanged: claim nothing rather than guess


def check_prefix_fits(prefix, seqlen: int, what: str, who: str = "the tokenizer") -> None:
    """Refuse, in one line, a window with no room for text after the prefix."""
    if len(prefix) >= seqlen:
        raise UserError(f"{who} starts every sequence with {len(prefix)} token(s) {list(prefix)}, which fills the "
                        f"{what} window of {seqlen} tokens: no text token would fit",
                        hint=f"use a {what} seqlen above {len(prefix)}")


@functools.lru_cache(maxsize=32)
def model_sequence_start(spec: str, trust_remote_code: bool = False) -> list[int] | None:
    """A model spec's sequence start without loading its weights, for the cell's key: the GGUF's
    tokenizer.ggml.add_bos_token and bos_token_id (an embedded model, a .gguf file), the tiny
    tokenizer, or a folder's / cached hub id's tokenizer. None when the tokenizer is not here (a
    hub id not yet downloaded, whose key is unresolved anyway). The runner checks the tokenizer it
    loads agrees (`sequence_start_ids`)."""
    from pathlib import Path


    if spec.startswith("tiny:"):
        return sequence_start_ids(models.tiny_tokenizer())  # looked up at call time: tests replace it
    if spec in EMBEDDED_MODELS or spec.endswith(".gguf"):
        meta = check_gguf(embedded_gguf_path(spec) if spec in EMBEDDED_MODELS else Path(spec))
        bos = meta.get("tokenizer.ggml.bos_token_id")
        return [int(bos)] if meta.get("tokenizer.ggml.add_bos_token") is True and isinstance(bos, int) else []
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception:  # not available offline: the load itself will say why
        return None
    return sequence_start_ids(tokenizer)
