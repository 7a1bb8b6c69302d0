"""prunebench's embedded zero-shot tasks, built from the held-out Lee documents gensim ships
(documents 200-299, never the calibration documents 0-199). No network, no data dir; items are
fixed by a seed, so they are part of the benchmark, not of a run. lm-eval scores them from
tasks/pb_lee_*.yaml through the `*_dataset` hooks below.

* pb_lee_next_word: the embedded preset's task. Cloze: given the start of a sentence, pick the
  true next word among four.
* pb_lee_next_sentence: the earlier embedded task (pick the true next sentence among four);
  kept by name for comparison with older records, no longer in the preset.
"""
from __future__ import annotations

import functools
import random
import re
from collections import Counter
from prunebench.data import windows

SEED = 1234  # fixed for every embedded task
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=[\"'A-Z0-9])")


def sentences(doc: str) -> list[str]:
    doc = re.sub(r"\s+", " ", doc).strip()
    return [s.strip() for s in _SENTENCE_END.split(doc) if s.strip()]


def _eval_documents() -> list[str]:
    return windows.embedded_documents("eval")  # disjoint from the calibration documents


def _dataset(items):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(list(items))})


# ---------------------------------------------------------------------------------------------
# pb_lee_next_word
#
# Why this shape: the choices are single words, and lm-eval (HFLM, group_by="contexts") scores
# all choices whose context + continuation[:-1] coincide with one forward pass, so an item whose
# four words are single tokens costs one forward of its context instead of four of context +
# choice: ~17 tokens per item here against ~220 for pb_lee_next_sentence.
#
# The items do not depend on any tokenizer (so every model is scored on the same items): words
# are plain alphabetic words that occur at least NEXT_WORD_MIN_COUNT times in the held-out text.
# Frequent words are mostly single tokens in English BPE vocabularies (97% of the choices here are
# one SmolLM2 token), so the saving holds without tying the items to one tokenizer; a multi-token
# choice is still scored exactly, it only costs its own forward.
#
# Distractors are word occurrences drawn from the same eligible pool (other documents), so gold
# and distractors come from the same frequency distribution: a model that ignores the context
# (a unigram prior, a collapsed pruned model) scores chance, 25%.
#
# Size and context, measured on SmolLM2-135M (acc, percent +- stderr; cost as SmolLM2 tokens
# through the model at lm-eval batch 16, and as time relative to pb_lee_next_sentence, which takes
# ~23 s per cell on 2 cores in the committed demo records):
#   context = the sentence's own prefix, one gap in every held-out sentence that has one:
#     873 items, 14.8k tokens, 0.89x the time (~21 s): dense 77.7 +- 1.4,
#     wanda 50% 71.6 +- 1.5, magnitude 60% 38.7 +- 1.7                              <- chosen
#   previous sentence + prefix, 600 items: 29.3k tokens, ~1.8x (~41 s): dense 84.3 +- 1.5,
#     wanda 50% 78.5 +- 1.7, magnitude 60% 38.3 +- 2.0
#   (pb_lee_next_sentence, 80 items, 17.8k tokens: dense 45.0 +- 5.6, magnitude 60% 36.2 +- 5.4)
# The previous sentence doubles the cost and separates dense from wanda 50% no better
# (5.8 vs 6.1 points), so the task uses the prefix alone; stderr <= sqrt(.25/873) = 1.7 points
# at any accuracy.
NEXT_WORD_ITEMS = None            # None: one item per eligible held-out sentence (873)
NEXT_WORD_CONTEXT_SENTENCES = 0   # sentences of the document before the gap's sentence
NEXT_WORD_MIN_PREFIX_WORDS = 2    # words of the sentence itself before the gap
NEXT_WORD_MIN_COUNT = 3           # occurrences in the held-out text for a word to be eligible
NEXT_WORD_CHOICES = 4
_WORD = re.compile(r"(?<!\S)[A-Za-z]+(?=[.,;:!?\"')]*(?:\s|$))")  # a whole word, trailing punctuation left out


def next_word_items(n_items: int | None = NEXT_WORD_ITEMS, context_sentences: int = NEXT_WORD_CONTEXT_SENTENCES,
                    min_prefix_words: int = NEXT_WORD_MIN_PREFIX_WORDS, min_count: int = NEXT_WORD_MIN_COUNT,
                    seed: int = SEED) -> tuple[dict, ...]:
    """Cloze items: context, NEXT_WORD_CHOICES one-word choices (one gold), label. Deterministic;
    at most one item per sentence (n_items of them, None: all)."""
    docs = [sentences(d) for d in _eval_documents()]
    occ = [(d, i, m.start(), m.group()) for d, sents in enumerate(docs) for i, s in enumerate(sents)
           for m in _WORD.finditer(s)]
    count = Counter(w for *_, w in occ)
    pool = [o for o in occ if count[o[3]] >= min_count and len(docs[o[0]][o[1]][:o[2]].split()) >= min_prefix_words]
    by_sentence: dict[tuple[int, int], list] = {}
    for o in pool:
        if o[1] >= context_sentences:
            by_sentence.setdefault((o[0], o[1]), []).append(o)
    rng = random.Random(seed)
    keys = sorted(by_sentence)
    rng.shuffle(keys)
    chosen = sorted(rng.choice(by_sentence[k]) for k in keys[:n_items])
    items = []
    for d, i, start, gold in chosen:
        seen, distractors = {gold.lower()}, []
        while len(distractors) < NEXT_WORD_CHOICES - 1:
            od, _, _, w = pool[rng.randrange(len(pool))]
            if od != d and w.lower() not in seen:
                seen.add(w.lower())
                distractors.append(w)
        label = rng.randrange(NEXT_WORD_CHOICES)
        context = " ".join(docs[d][i - context_sentences:i] + [docs[d][i][:start].rstrip()])
        items.append({"id": f"lee-{d}-{i}-{start}", "context": context,
                      "choices": distractors[:label] + [gold] + distractors[label:], "label": label})
    return tuple(items)


@functools.lru_cache(maxsize=1)
def lee_next_word_docs() -> tuple[dict, ...]:
    """The items of pb_lee_next_word."""
    return next_word_items()


def lee_next_word_dataset(**_metadata):
    """lm-eval `custom_dataset` hook for pb_lee_next_word (lm-eval passes task metadata)."""
    return _dataset(lee_next_word_docs())


# ---------------------------------------------------------------------------------------------
# pb_lee_next_sentence: 80 items x 4 sentence choices, about 220 SmolLM2 tokens through the model
# per item (~23 s per cell on 2 cores); stderr about 5.5 points at its ~45% dense accuracy.
LEE_MAX_ITEMS = 80
LEE_CONTEXT_SENTENCES = 1
LEE_SEED = SEED
LEE_MIN_CHARS, LEE_MAX_CHARS = 25, 300


@functools.lru_cache(maxsize=1)
def lee_next_sentence_docs() -> tuple[dict, ...]:
    """The items of pb_lee_next_sentence: context, 4 choices (one gold), label. Deterministic."""
    docs = [sentences(d) for d in _eval_documents()]
    ok = lambda s: LEE_MIN_CHARS <= len(s) <= LEE_MAX_CHARS  # noqa: E731
    candidates = [(d, i) for d, sents in enumerate(docs) for i in range(1, len(sents)) if ok(sents[i])]
    rng = random.Random(LEE_SEED)
    rng.shuffle(candidates)
    chosen = sorted(candidates[:LEE_MAX_ITEMS])
    pool = [(d, s) for d, sents in enumerate(docs) for s in sents if ok(s)]
    items = []
    for d, i in chosen:
        gold = docs[d][i]
        distractors: list[str] = []
        while len(distractors) < 3:  # sentences of *other* held-out documents
            od, s = pool[rng.randrange(len(pool))]
            if od != d and s != gold and s not in distractors:
                distractors.append(s)
        label = rng.randrange(4)
        choices = distractors[:label] + [gold] + distractors[label:]
        context = " ".join(docs[d][max(0, i - LEE_CONTEXT_SENTENCES):i])
        items.append({"id": f"lee-{d}-{i}", "context": context, "choices": choices, "label": label})
    return tuple(items)


def lee_next_sentence_dataset(**_metadata):
    """lm-eval `custom_dataset` hook for pb_lee_next_sentence (lm-eval passes task metadata)."""
    return _dataset(lee_next_sentence_docs())
