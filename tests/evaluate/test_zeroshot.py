"""Zero-shot evaluation: local tasks are lm-eval's tasks with only the documents' source changed,
the embedded task is well formed, and a tiny model runs end to end without the network."""
import os

# Offline before datasets / huggingface_hub are imported (they read these at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from prunebench.errors import UserError  # noqa: E402
from prunebench.evaluate import embedded_tasks as et  # noqa: E402
from prunebench.evaluate import zeroshot as zs  # noqa: E402
from prunebench.evaluate import local_tasks as lt  # noqa: E402

from conftest import SHARED_DATA as DATA_DIR  # noqa: E402
needs_data = pytest.mark.skipif(not (DATA_DIR / "tasks").is_dir(), reason=f"no task data at {DATA_DIR}")

# Rows exactly as the HF datasets lm-eval loads hold them (the first rows of each eval split),
# written out by hand so the converters are checked against the HF layout, not against themselves.
HF_ROWS = {
    "arc_easy": [
        {"id": "Mercury_417466",
         "question": "Which statement best explains why photosynthesis is the foundation of most food webs?",
         "choices": {"text": ["Sunlight is the source of energy for nearly all ecosystems.",
                              "Most ecosystems are found on land instead of in water.",
                              "Carbon dioxide is more available than other gases.",
                              "The producers in all ecosystems are plants."],
                     "label": ["A", "B", "C", "D"]},
         "answerKey": "A"},
        {"id": "Mercury_7081673",
         "question": "Which piece of safety equipment is used to keep mold spores from entering the respiratory system?",
         "choices": {"text": ["safety goggles", "breathing mask", "rubber gloves", "lead apron"], "label": ["A", "B", "C", "D"]},
         "answerKey": "B"},
    ],
    "winogrande": [
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"},
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "1"},
    ],
    "mmlu_abstract_algebra": [
        {"question": "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
         "subject": "abstract_algebra", "choices": ["0", "4", "2", "6"], "answer": 1},
    ],
}
# What lm-eval's arc_easy renders for the first row (its YAML: "Question: {{question}}\nAnswer:").
ARC_FIRST_PROMPT = "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
DATA_KEYS = {"dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split", "test_split",
             "fewshot_split"}


@pytest.fixture(autouse=True)
def _hermetic(tmp_path_factory, monkeypatch):
    """A private cache, one thread, and no network: any connection attempt fails the test."""
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "pb_cache"))
    torch.set_num_threads(1)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _local_manager(task):
    return zs.task_manager_for([task], DATA_DIR)


def _stock_task(stock_yaml, docs, split):
    """lm-eval's own task definition, fed documents from memory instead of the hub."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(stock_yaml)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})
    # only the scored split exists here: switch the others off so nothing looks for them
    cfg["training_split"] = cfg["fewshot_split"] = None
    cfg["validation_split"] = split if split == "validation" else None
    cfg["test_split"] = split if split == "test" else None
    return ConfigurableTask(config=cfg)


def _render(task, doc):
    return task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)


@needs_data
@pytest.mark.parametrize("task,leaf,stock", [
    ("arc_easy", "arc_easy", "arc/arc_easy.yaml"),
    ("winogrande", "winogrande", "winogrande/default.yaml"),
    ("mmlu", "mmlu_abstract_algebra", "mmlu/default/mmlu_abstract_algebra.yaml"),
])
def test_local_task_renders_like_lm_eval(task, leaf, stock):
    stock_yaml = lt.stock_root() / stock
    split = lt.LOCAL_TASKS[task].eval_split
    local = _local_manager(task).load([task])["tasks"][leaf]
    local_docs = list(local.eval_docs)
    expected = HF_ROWS[leaf]
    # the converted documents are the HF rows, column for column
    assert [{k: d[k] for k in expected[0]} for d in local_docs[:len(expected)]] == expected
    assert set(local_docs[0]) == set(expected[0])
    # and lm-eval's own definition renders them the same way as the local task
    reference = _stock_task(stock_yaml, expected, split)
    for doc_local, doc_ref in zip(local_docs, reference.eval_docs):
        assert _render(local, doc_local) == _render(reference, doc_ref)
    if task == "arc_easy":
        assert _render(local, local_docs[0]) == (ARC_FIRST_PROMPT, expected[0]["choices"]["text"], 0)


@needs_data
@pytest.mark.parametrize("task", [t for t in lt.LOCAL_TASKS if t not in ("hellaswag", "mmlu")])
def test_local_yaml_changes_only_the_data_source(task):
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = lt.prepare_local_task(task, DATA_DIR)
    local = load_yaml(folder / f"{task}.yaml", resolve_func=False)
    stock = load_yaml(lt.stock_root() / lt.LOCAL_TASKS[task].stock_yaml, resolve_func=False)
    assert {k: v for k, v in local.items() if k not in DATA_KEYS} == {k: v for k, v in stock.items() if k not in DATA_KEYS}
    # the split that gets scored is the one lm-eval scores on the hub
    scored = lambda c: c.get("test_split") or c.get("validation_split")  # noqa: E731
    assert scored(local) == scored(stock) == lt.LOCAL_TASKS[task].eval_split
    assert local["dataset_path"] == "json"
    assert all(Path(p).is_file() for p in local["dataset_kwargs"]["data_files"].values())


@needs_data
def test_hellaswag_derived_format_is_refused_clearly():
    if any((DATA_DIR / "tasks" / "hellaswag" / n).is_file() for n in lt.HELLASWAG_ORIGINALS):
        pytest.skip("an original-format HellaSwag file is present")
    with pytest.raises(UserError, match="hellaswag") as exc:
        lt.prepare_local_task("hellaswag", DATA_DIR)
    assert exc.value.hint and "hellaswag_val.jsonl" in exc.value.hint


def test_resolve_tasks():
    assert zs.resolve_tasks("paper") == list(zs.PAPER_TASKS)
    assert zs.resolve_tasks("embedded, arc_easy,arc_easy") == ["pb_lee_next_word", "arc_easy"]
    assert zs.resolve_tasks("pb_lee_next_sentence", data_dir=DATA_DIR) == ["pb_lee_next_sentence"]  # still known by name
    assert zs.resolve_tasks(["wanda", "paper"], data_dir=DATA_DIR)[:7] == list(zs.WANDA_TASKS)
    with pytest.raises(UserError, match="arc_easyy") as exc:
        zs.resolve_tasks("arc_easyy", data_dir=DATA_DIR)  # with a data dir: no slow lm-eval index lookup
    assert "arc_easy" in exc.value.hint
    with pytest.raises(UserError):
        zs.resolve_tasks(" , ")


def _held_out_text() -> str:
    from prunebench.data.windows import embedded_documents

    return " ".join(" ".join(et.sentences(d)) for d in embedded_documents("eval"))


def _lm_eval_task(name):
    return zs.task_manager_for([name]).load([name])["tasks"][name]


def test_embedded_next_sentence_items():
    docs = et.lee_next_sentence_docs()
    assert len(docs) == et.LEE_MAX_ITEMS  # enough held-out sentences for the full task
    held_out = _held_out_text()
    for item in docs:
        choices = item["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4
        gold = choices[item["label"]]
        # exactly one choice continues the context inside a held-out document
        assert sum((item["context"] + " " + c) in held_out for c in choices) == 1
        assert (item["context"] + " " + gold) in held_out
    et.lee_next_sentence_docs.cache_clear()
    assert et.lee_next_sentence_docs() == docs  # deterministic
    # and lm-eval builds it as a multiple-choice task from prunebench's YAML
    task = _lm_eval_task("pb_lee_next_sentence")
    doc = task.eval_docs[0]
    assert task.doc_to_choice(doc) == docs[0]["choices"] and task.doc_to_target(doc) == docs[0]["label"]


def test_embedded_next_word_items(monkeypatch):
    import re

    import prunebench.data.windows

    splits = []
    real = prunebench.data.windows.embedded_documents
    monkeypatch.setattr(prunebench.data.windows, "embedded_documents", lambda split: splits.append(split) or real(split))
    et.lee_next_word_docs.cache_clear()
    docs = et.lee_next_word_docs()
    assert splits == ["eval"]  # built from the held-out documents only, never the calibration ones
    assert len(docs) == 873  # one per eligible held-out sentence: the size the stderr (<= 1.7) and timing assume
    held_out = [et.sentences(d) for d in real("eval")]
    seen = set()
    for item in docs:
        choices, context = item["choices"], item["context"]
        assert len(choices) == et.NEXT_WORD_CHOICES and len({c.lower() for c in choices}) == len(choices)
        assert all(re.fullmatch(r"[A-Za-z]+", c) for c in choices)
        # the context is the start of held-out sentence i of document d, and the gold its next word
        _, d, i, start = item["id"].split("-")
        d, i, start = int(d), int(i), int(start)
        sentence, gold = held_out[d][i], choices[item["label"]]
        assert context == sentence[:start].rstrip() and len(context.split()) >= et.NEXT_WORD_MIN_PREFIX_WORDS
        assert re.match(re.escape(gold) + r"(?![A-Za-z])", sentence[start:])
        # distractors are words of *other* held-out documents
        for c in choices:
            if c != gold:
                assert any(re.search(rf"(?<!\S){c}(?![A-Za-z])", " ".join(sents))
                           for od, sents in enumerate(held_out) if od != d)
        seen.add((d, i))
    assert len(seen) == len(docs)  # at most one item per sentence
    assert 0.2 < sum(it["label"] == 0 for it in docs) / len(docs) < 0.3  # gold position uniform
    et.lee_next_word_docs.cache_clear()
    assert et.lee_next_word_docs() == docs  # deterministic
    task = _lm_eval_task("pb_lee_next_word")
    assert len(task.eval_docs) == len(docs)
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc) == docs[0]["context"]
    assert task.doc_to_choice(doc) == docs[0]["choices"] and task.doc_to_target(doc) == docs[0]["label"]


def _tiny_model():
    try:
        from prunebench.modeling.models import load_tiny
    except ImportError:  # prunebench.modeling.models not there: build the same kind of model here
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
        vocab["<eos>"] = len(vocab)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          eos_token_id=vocab["<eos>"], pad_token_id=vocab["<eos>"])
        return LlamaForCausalLM(cfg).eval(), tokenizer
    loaded = load_tiny("llama")
    return loaded.model, loaded.tokenizer


@needs_data
def test_evaluate_zeroshot_end_to_end(tmp_path):
    model, tokenizer = _tiny_model()
    out = zs.evaluate_zeroshot(model, tokenizer, ["arc_easy", "embedded"], data_dir=DATA_DIR, limit=5,
                               batch_size=4, output_dir=tmp_path)
    assert out["lm_eval_version"]
    for task, source in (("arc_easy", "local"), (zs.EMBEDDED_TASK, "embedded")):
        r = out[task]
        assert r["metric"] == "acc" and r["n"] == 5 and r["source"] == source
        assert 0.0 <= r["value"] <= 1.0
    saved = json.loads((tmp_path / zs.RESULTS_FILE).read_text())
    assert saved["results"]["arc_easy"]["acc,none"] == out["arc_easy"]["value"]
    assert not list(tmp_path.glob("*.tmp"))


def test_evaluate_zeroshot_embedded_without_data_dir():
    model, tokenizer = _tiny_model()
    out = zs.evaluate_zeroshot(model, tokenizer, "embedded", limit=5, batch_size=8)
    assert "pb_lee_next_sentence" not in out  # the preset is the next-word task alone
    assert out[zs.EMBEDDED_TASK]["n"] == 5 and 0.0 <= out[zs.EMBEDDED_TASK]["value"] <= 1.0


def test_rows_per_batch_holds_the_logits_budget():
    # 262k vocabulary, 700-token MMLU request: one row's logits are 734 MB, over a 512 MB budget -> 1
    assert zs.rows_per_batch(700, 262144, 16, budget=512 << 20) == 1
    assert zs.rows_per_batch(100, 262144, 16, budget=512 << 20) == 5
    assert zs.rows_per_batch(100, 49152, 16, budget=512 << 20) == 16  # never more than asked
    tiers = zs.batches_by_length([700, 100, 100, 10], 262144, 16, budget=512 << 20)
    assert tiers == {1: [0], 5: [1, 2], 16: [3]}


def test_memory_bounded_batches_score_like_one_batch(monkeypatch):
    # The same requests scored with a budget that splits them into several row counts give the same
    # accuracy per item as one batch of 8 (answers go back to their requests).
    model, tokenizer = _tiny_model()
    whole = zs.evaluate_zeroshot(model, tokenizer, "embedded", limit=12, batch_size=8)
    seen = []
    real = zs.batches_by_length

    def tiny_budget(lengths, vocab, most, budget=zs.LOGITS_BYTES_PER_BATCH):
        # two rows of the longest request per batch: shorter requests get more rows
        tiers = real(lengths, vocab, most, budget=vocab * 4 * 2 * max(lengths))
        seen.append(sorted(tiers))
        return tiers

    monkeypatch.setattr(zs, "batches_by_length", tiny_budget)
    split = zs.evaluate_zeroshot(model, tokenizer, "embedded", limit=12, batch_size=8)
    assert any(len(t) > 1 for t in seen), seen  # really split into several row counts
    a, b = whole[zs.EMBEDDED_TASK], split[zs.EMBEDDED_TASK]
    assert a["per_item"] == b["per_item"] and a["value"] == b["value"]


def test_limit_groups_one_run_per_distinct_limit():
    names = ["mmlu", "piqa", "arc_easy", "winogrande"]
    assert zs.limit_groups(names, 200) == {200: names}
    assert zs.limit_groups(names, None) == {None: names}
    assert zs.limit_groups(names, {"mmlu": 5, "piqa": 200, "arc_easy": 200}) == {
        5: ["mmlu"], 200: ["piqa", "arc_easy"], None: ["winogrande"]}


@needs_data
def test_each_task_gets_its_own_limit_and_says_so():
    model, tokenizer = _tiny_model()
    out = zs.evaluate_zeroshot(model, tokenizer, ["arc_easy", "embedded"], data_dir=DATA_DIR,
                               limit={"arc_easy": 3, zs.EMBEDDED_TASK: 5}, batch_size=4)
    assert out["arc_easy"]["n"] == 3 and out["arc_easy"]["limit"] == 3
    assert out[zs.EMBEDDED_TASK]["n"] == 5 and out[zs.EMBEDDED_TASK]["limit"] == 5
    assert len(out["arc_easy"]["per_item"]) == 3
    # guessing among each item's choices: ARC has 3-5 (these 3 items: 4 each)
    assert out["arc_easy"]["chance"] == pytest.approx(0.25)


def test_chance_is_the_mean_odds_of_each_items_choices():
    results = {"configs": {"a": {"output_type": "multiple_choice"}, "g": {"output_type": "generate_until"}},
               "samples": {"a": [{"doc_id": 0, "arguments": [1, 2]}, {"doc_id": 1, "arguments": [1, 2, 3, 4]}],
                           "g": [{"doc_id": 0, "arguments": [1]}]}}
    assert zs.chance_accuracy(results, ["a"]) == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert zs.chance_accuracy(results, ["g"]) is None  # not multiple choice: no chance level
    assert zs.chance_accuracy(results, ["a", "g"]) is None
