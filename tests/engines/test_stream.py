"""The training stream: unique windows, disjoint from the evaluation text, resumable by index."""
import gzip
import json
import random
import subprocess
import sys
import types

import pytest
import torch

from prunebench.errors import UserError
from prunebench.data.stream import STREAM_SOURCES, WindowStream, open_documents, shingle_hashes, window_hashes

SEQLEN = 64
SHINGLE = 32


def random_text(rng: random.Random, n_chars: int) -> str:
    """ASCII words (one byte token each for the tiny tokenizer), exactly n_chars long."""
    words = []
    while sum(len(w) + 1 for w in words) < n_chars:
        words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))))
    return " ".join(words)[:n_chars]


EVAL_TEXT = random_text(random.Random(100), 2000)


def corpus_documents() -> list[str]:
    """Documents of whole windows (a document plus its EOS is a multiple of SEQLEN bytes), so an
    exact duplicate document lines up with the first copy and gives identical windows."""
    rng = random.Random(0)
    boilerplate = ("0123456789abcdef" * 40)[:10 * SEQLEN - 1]  # ten windows, the first nine identical (8 repeats)
    doc_a = random_text(rng, 5 * SEQLEN - 1)
    prefix, suffix = random_text(rng, 90), random_text(rng, 6 * SEQLEN - 1 - 90 - 200)
    with_eval_passage = prefix + EVAL_TEXT[300:500] + suffix
    doc_c = random_text(rng, 4 * SEQLEN - 1)
    with_short_passage = random_text(rng, 150) + EVAL_TEXT[1000:1040] + random_text(rng, 3 * SEQLEN - 1 - 190)
    doc_e = random_text(rng, 7 * SEQLEN + 20)  # the stream's tail: less than a window is left over
    return [boilerplate, doc_a, with_eval_passage, doc_a, doc_c, with_short_passage, doc_e]


@pytest.fixture()
def corpus_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t, "meta": {}}) + "\n" for t in corpus_documents()))
    return path


def expected_windows(tokenizer, docs, seqlen, exclude_text=None, shingle=SHINGLE) -> list[tuple]:
    """The stream's windows worked out in plain Python: documents joined with EOS, cut into
    windows, later copies dropped, windows sharing a shingle with the excluded text dropped."""
    ids = []
    for i, doc in enumerate(docs):
        if i:
            ids.append(tokenizer.eos_token_id)
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    raw = [tuple(ids[i:i + seqlen]) for i in range(0, len(ids) - seqlen + 1, seqlen)]
    banned = set(spans(tokenizer(exclude_text, add_special_tokens=False)["input_ids"], shingle)) if exclude_text else set()
    out, seen = [], set()
    for w in raw:
        if w in seen or banned & set(spans(w, shingle)):
            continue
        seen.add(w)
        out.append(w)
    return out


def spans(ids, width):
    return [tuple(ids[i:i + width]) for i in range(len(ids) - width + 1)]


def rows(t: torch.Tensor) -> list[tuple]:
    return [tuple(r) for r in t.tolist()]


def test_window_hashes_agree_with_shingle_hashes_and_tell_rows_apart():
    windows = torch.randint(0, 50_000, (200, 48))
    windows[7] = windows[3]
    h = window_hashes(windows)
    assert h.dtype == torch.long and h.shape == (200,)
    assert torch.equal(h, shingle_hashes(windows, 48)[:, 0])
    assert h[7] == h[3] and len(set(h.tolist())) == 199
    assert torch.equal(shingle_hashes(windows[0], 5), torch.stack([window_hashes(windows[0, i:i + 5][None])[0]
                                                                   for i in range(44)]))


def test_windows_are_unique_and_exactly_the_deduplicated_stream(tiny_tokenizer, corpus_file):
    docs = corpus_documents()
    stream = WindowStream(open_documents(str(corpus_file)), tiny_tokenizer, SEQLEN)
    expected = expected_windows(tiny_tokenizer, docs, SEQLEN)
    got = stream.take(0, len(expected))
    assert got.dtype == torch.long and got.shape == (len(expected), SEQLEN)
    assert len(set(rows(got))) == len(expected)  # no two windows served are equal
    assert rows(got) == expected
    stats = stream.stats
    assert stats["duplicates_skipped"] == 8 + 5  # the boilerplate's repeated windows and the copied document
    assert stats["windows_served"] == len(expected) and stats["documents_read"] == len(docs)
    assert stats["passes"] == 1 and stats["repeats"] == 0.0 and stats["excluded_windows"] == 0
    assert stats["seqlen"] == SEQLEN and stats["source"] == str(corpus_file) and len(stats["fingerprint"]) == 64


def test_windows_overlapping_the_evaluation_text_are_dropped(tiny_tokenizer, corpus_file):
    eval_ids = tiny_tokenizer(EVAL_TEXT, add_special_tokens=False)["input_ids"]
    banned = set(spans(eval_ids, SHINGLE))
    docs = open_documents(str(corpus_file))

    # control: without the exclusion the copied passages reach the stream
    plain = rows(WindowStream(docs, tiny_tokenizer, SEQLEN).take(0, len(expected_windows(tiny_tokenizer, corpus_documents(), SEQLEN))))
    assert any(banned & set(spans(w, SHINGLE)) for w in plain)

    expected = expected_windows(tiny_tokenizer, corpus_documents(), SEQLEN, exclude_text=EVAL_TEXT)
    stream = WindowStream(docs, tiny_tokenizer, SEQLEN, exclude_text=EVAL_TEXT)
    got = rows(stream.take(0, len(expected)))
    assert got == expected
    assert not any(banned & set(spans(w, SHINGLE)) for w in got)
    # the 200-token passage touches 4-5 windows, the 40-token one 1-2
    assert stream.stats["excluded_windows"] >= 5
    assert stream.stats["excluded_text_sha256"] and stream.stats["shingle"] == SHINGLE
    assert len(plain) - len(got) == stream.stats["excluded_windows"]


def test_take_is_a_pure_function_of_the_index(tiny_tokenizer, corpus_file):
    docs = open_documents(str(corpus_file))
    stream = WindowStream(docs, tiny_tokenizer, SEQLEN, exclude_text=EVAL_TEXT)
    first, second = stream.take(0, 10), stream.take(10, 5)
    assert torch.equal(stream.take(3, 4), first[3:7])  # behind the cursor: restarts and skips forward
    assert torch.equal(stream.take(12, 3), second[2:])
    assert stream.take(5, 0).shape == (0, SEQLEN)
    resumed = WindowStream(open_documents(str(corpus_file)), tiny_tokenizer, SEQLEN, exclude_text=EVAL_TEXT)
    assert torch.equal(resumed.take(12, 3), second[2:])  # a resumed run starts mid-stream
    assert torch.equal(resumed.take(0, 15), torch.cat([first, second]))
    assert stream.stats == resumed.stats


def test_an_exhausted_stream_raises_unless_repeats_are_allowed(tiny_tokenizer, corpus_file):
    docs = open_documents(str(corpus_file))
    n_unique = len(expected_windows(tiny_tokenizer, corpus_documents(), SEQLEN))
    stream = WindowStream(docs, tiny_tokenizer, SEQLEN)
    stream.take(0, n_unique)
    with pytest.raises(UserError) as exc:
        stream.take(n_unique - 2, 5)
    assert f"gave {n_unique} unique windows" in exc.value.message and f"but {n_unique + 3} were asked" in exc.value.message
    assert "allow_stream_repeats" in exc.value.hint

    repeating = WindowStream(docs, tiny_tokenizer, SEQLEN, allow_repeats=True)
    got = repeating.take(0, n_unique + 3)
    assert torch.equal(got[n_unique:], got[:3])  # the second pass serves the text again, in order
    stats = repeating.stats
    assert stats["passes"] == 2 and stats["windows_per_pass"] == n_unique
    assert stats["repeats"] == pytest.approx(3 / n_unique, abs=1e-6)
    assert stats["documents_read"] > len(corpus_documents())


def test_without_an_eos_token_documents_are_joined_with_the_separator_text():
    class ByteTokenizer:
        eos_token_id = None

        def __call__(self, text, add_special_tokens=False, verbose=False):
            return {"input_ids": list(text.encode("utf-8"))}

    got = WindowStream(["abc", "def"], ByteTokenizer(), 4).take(0, 2)
    assert bytes(got.flatten().tolist()) == b"abc\n\ndef"
    with pytest.raises(TypeError):
        WindowStream(iter(["abc"]), ByteTokenizer(), 4)


def write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_open_documents_reads_the_data_dir_layout(tmp_path):
    write_jsonl(tmp_path / "c4" / "c4-train.00000-of-01024.first1000.jsonl", ["c4 one", "c4 two"])
    with gzip.open(tmp_path / "c4" / "olmo_test_fixture_c4-sample.00000-of-00001.json.gz", "wt") as f:
        f.write(json.dumps({"text": "not a c4 shard of this layout"}) + "\n")
    sample = tmp_path / "slimpajama" / "redpajama1t_sample_llmshearing"
    write_jsonl(sample / "wiki" / "sample_wiki1.jsonl", ["wiki one"])
    write_jsonl(sample / "arxiv" / "sample_arxiv2.jsonl", ["arxiv two"])
    write_jsonl(sample / "arxiv" / "sample_arxiv1.jsonl", ["arxiv one a", "arxiv one b"])

    slim = open_documents("slimpajama", data_dir=tmp_path)
    assert [p.relative_to(sample).as_posix() for p in slim.files] == [
        "arxiv/sample_arxiv1.jsonl", "arxiv/sample_arxiv2.jsonl", "wiki/sample_wiki1.jsonl"]
    assert list(slim) == ["arxiv one a", "arxiv one b", "arxiv two", "wiki one"] == list(slim)  # re-iterable
    assert "standing in for slimpajama" in slim.name
    red = open_documents("redpajama", data_dir=tmp_path)
    assert red.files == slim.files and red.fingerprint == slim.fingerprint
    c4 = open_documents("c4", data_dir=tmp_path)
    assert [p.name for p in c4.files] == ["c4-train.00000-of-01024.first1000.jsonl"] and list(c4) == ["c4 one", "c4 two"]
    assert c4.fingerprint != slim.fingerprint

    write_jsonl(sample / "wiki" / "sample_wiki1.jsonl", ["wiki one, edited"])
    assert open_documents("slimpajama", data_dir=tmp_path).fingerprint != slim.fingerprint  # content, not names

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as exc:
        open_documents("c4", data_dir=empty)
    assert exc.value.hint and "MANIFEST" in exc.value.hint
    with pytest.raises(UserError):
        open_documents("slimpajama", data_dir=tmp_path / "missing")
    with pytest.raises(UserError) as exc:
        open_documents("slim-pajama")
    assert "slimpajama" in exc.value.hint


def test_open_documents_reads_files_and_folders(tmp_path):
    with gzip.open(tmp_path / "shard.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "gz one"}) + "\n\n" + json.dumps({"text": "gz two"}) + "\n")
    assert list(open_documents(str(tmp_path / "shard.jsonl.gz"))) == ["gz one", "gz two"]
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.txt").write_text("second file\n")
    (folder / "a.txt").write_text("first file\n")
    (folder / "notes.md").write_text("ignored")
    assert list(open_documents(str(folder))) == ["first file\n", "second file\n"]
    (tmp_path / "data.csv").write_text("text\n")
    with pytest.raises(UserError):
        open_documents(str(tmp_path / "data.csv"))
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(UserError) as exc:
        list(open_documents(str(tmp_path / "bad.jsonl")))
    assert "line 1" in exc.value.message


def test_hub_sources_stream_with_datasets_loaded_lazily(monkeypatch):
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return iter([{"text": "hub one"}, {"text": "hub two"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    slim = open_documents("slimpajama")
    assert calls == []  # nothing is fetched until the stream is read
    assert list(slim) == ["hub one", "hub two"] == list(slim)
    assert calls[0] == (("DKYoon/SlimPajama-6B",), {"split": "train", "streaming": True})
    list(open_documents("c4"))
    assert calls[-1] == (("allenai/c4", "en"), {"split": "train", "streaming": True})
    assert open_documents("c4").fingerprint != slim.fingerprint
    assert set(STREAM_SOURCES) == {"slimpajama", "c4", "redpajama"}
    assert STREAM_SOURCES["redpajama"]["hub_id"] == "togethercomputer/RedPajama-Data-1T-Sample"


def test_importing_the_module_does_not_import_datasets():
    code = "import sys, prunebench.data.stream; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_redpajama_sample_streams_unique_windows(data_dir, tiny_tokenizer):
    docs = open_documents("slimpajama", data_dir=data_dir)
    assert len(docs.files) == 13
    stream = WindowStream(docs, tiny_tokenizer, 256)
    windows = stream.take(0, 400)
    assert windows.shape == (400, 256)
    assert len(set(window_hashes(windows).tolist())) == 400 and len(set(rows(windows))) == 400
    stats = stream.stats
    assert stats["documents_read"] >= 1 and stats["passes"] == 1 and stats["fingerprint"] == docs.fingerprint


# -- the engine reading a stream (prunebench.engines.masklearn with streaming) ------------------------------

def _learn_from_stream(corpus_file, eval_file, monkeypatch, **config):
    from prunebench.engines import masklearn_data
    from prunebench import registry
    from prunebench.modeling.models import load_tiny
    from prunebench.contract import PruneContext
    from prunebench.sparsity.patterns import SparsitySpec

    served = []
    original = masklearn_data.StreamedBatches.take

    def spy(self, start, count):
        ids = original(self, start, count)
        served.append(ids)
        return ids

    monkeypatch.setattr(masklearn_data.StreamedBatches, "take", spy)
    loaded = load_tiny("llama")
    ctx = PruneContext(sparsity=SparsitySpec.parse("0.5"), seed=0, progress=False, registry=registry,
                       tokenizer=loaded.tokenizer, calibration_dataset="lee", eval_datasets=(str(eval_file),))
    conf = {"preset": "tiny", "seqlen": SEQLEN, "streaming": True, "dataset": str(corpus_file),
            "heldout_windows": 2, "prior_method": "magnitude", **config}
    report = registry.create("leap", conf).prune(loaded.model, ctx)
    return report, torch.cat(served), loaded.tokenizer


def test_a_streamed_run_trains_on_unique_windows_disjoint_from_the_evaluation_text(corpus_file, tmp_path,
                                                                                    monkeypatch):
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(EVAL_TEXT)
    report, served, tokenizer = _learn_from_stream(corpus_file, eval_file, monkeypatch, steps=3, batch_size=2)
    assert served.shape == (6, SEQLEN)
    assert len(set(window_hashes(served).tolist())) == len(served), "a training window repeats"
    eval_spans = set(spans(tokenizer(EVAL_TEXT, add_special_tokens=False)["input_ids"], SHINGLE))
    assert not any(set(spans(row.tolist(), SHINGLE)) & eval_spans for row in served)
    stream = report.stats["stream"]
    assert stream["excluded_windows"] > 0 and stream["windows_served"] == 2 + 6  # held-out first, then training
    assert report.stats["stream_repeats"] == 0 and not any("read" in w for w in report.warnings)
    differences = report.stats["paper_differences"]  # the record says what departs from the authors' run, and why
    assert differences["steps"] == {"used": 3, "paper": 2000, "why": "set for this run"}
    assert differences["tau_start"]["why"] == "tiny random models in unit tests"
    assert "streaming" not in differences and "grad_clip" in differences


def test_a_streamed_run_that_outgrows_its_corpus_stops_or_records_its_repeats(corpus_file, tmp_path, monkeypatch):
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(EVAL_TEXT)
    with pytest.raises(UserError, match="allow_stream_repeats"):
        _learn_from_stream(corpus_file, eval_file, monkeypatch, steps=20, batch_size=2)
    report, _, _ = _learn_from_stream(corpus_file, eval_file, monkeypatch, steps=20, batch_size=2,
                                      allow_stream_repeats=True)
    assert report.stats["stream_repeats"] > 0 and report.stats["stream"]["passes"] >= 2
    assert any("stream ran out" in w for w in report.warnings)
