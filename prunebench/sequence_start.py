"""The tokens a model's every sequence must begin with, as its tokenizer says.

Gemma's tokenizer starts every encoded sequence with <bos> (its GGUF says
tokenizer.ggml.add_bos_token = true), and gemma-3-270m's perplexity on text windows without it is
about ten times higher; SmolLM2's says false. Windows cut from one long token stream carry no such
start, so the window builder will need these ids. Not wired in yet: prunebench/data.py decides
the windows and is keyed.
"""
from __future__ import annotations

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
