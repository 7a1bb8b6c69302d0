"""Text for calibration and evaluation: the embedded corpus's disjoint splits, cached and
fingerprinted windows, a data directory's files (other text under a dataset's name is another
cell), any text file or folder as evaluation data, and a token cache that is never unpickled."""
from pathlib import Path

import torch

from prunebench.data.windows import (
    WindowSpec, _wikitext_rows_from_raw, calibration_windows, embedded_documents, eval_tokens,
    stream_windows, token_fingerprint
)
from prunebench.store.records import load_records

from tiny_runs import by_method, run


def test_embedded_splits_are_disjoint_and_large_enough(tiny_tokenizer):
    cal, ev = embedded_documents("calibration"), embedded_documents("eval")
    assert cal and ev and not set(cal) & set(ev)
    assert len(ev) >= 80


def test_calibration_windows_are_cached_and_fingerprinted(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path))
    a, fa = calibration_windows(tiny_tokenizer, WindowSpec("lee", 3, 32, 7))
    b, fb = calibration_windows(tiny_tokenizer, WindowSpec("lee", 3, 32, 7))
    c, fc = calibration_windows(tiny_tokenizer, WindowSpec("lee", 3, 32, 8))
    assert a.shape == (3, 32) and torch.equal(a, b) and fa == fb == token_fingerprint(a)
    assert fc != fa
    assert list((tmp_path / "calibration").glob("*.safetensors"))


def test_stream_windows_never_repeat(tiny_tokenizer):
    ids, _ = stream_windows(tiny_tokenizer, "lee", 128, max_windows=50)
    rows = {tuple(r.tolist()) for r in ids}
    assert len(rows) == ids.shape[0]


def test_wikitext_from_data_dir_matches_the_hf_rows(data_dir, tiny_tokenizer):
    rows = _wikitext_rows_from_raw(data_dir / "wikitext2" / "wiki.test.raw")
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    ids = eval_tokens(tiny_tokenizer, "wikitext2", data_dir=data_dir)
    assert ids.numel() > 1_000_000  # bytes, for the byte-level tiny tokenizer


def test_c4_calibration_from_data_dir(data_dir, tiny_tokenizer):
    ids, fp = calibration_windows(tiny_tokenizer, WindowSpec("c4", 4, 256, 0), data_dir=data_dir)
    assert ids.shape == (4, 256) and fp


def test_the_token_cache_is_never_unpickled(tmp_path, monkeypatch):
    """Cached windows are safetensors: a pickle planted where the old cache kept them is never
    opened, and a damaged entry is rebuilt to the same windows."""
    import pickle

    from prunebench.data.windows import WindowSpec, calibration_windows
    from prunebench.modeling.models import tiny_tokenizer

    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "planted-code-ran"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    spec = WindowSpec("lee", 4, 64, 0)
    ids, fp = calibration_windows(tiny_tokenizer(), spec)
    (entry,) = (tmp_path / "cache" / "calibration").glob("*.safetensors")
    entry.with_suffix(".pt").write_bytes(pickle.dumps(Planted()))
    entry.write_bytes(b"not a safetensors file")
    again, fp_again = calibration_windows(tiny_tokenizer(), spec)
    assert torch.equal(again, ids) and fp_again == fp
    assert not marker.exists()
    third, _ = calibration_windows(tiny_tokenizer(), spec)  # from the rebuilt entry
    assert torch.equal(third, ids)


# ---------------------------------------------------------------------------------------------
# Other text under the same dataset name is another cell

def _wikitext_dir(root: Path, text: str) -> Path:
    (root / "wikitext2").mkdir(parents=True)
    (root / "wikitext2" / "wiki.test.raw").write_text(text)
    return root


def test_other_text_in_the_data_directory_makes_a_new_cell(tmp_path, capsys):
    from prunebench.data.windows import lee_documents

    docs = lee_documents()
    a = _wikitext_dir(tmp_path / "a", "\n".join(docs[200:230]))
    b = _wikitext_dir(tmp_path / "b", "\n".join(docs[230:260]))
    a_copy = _wikitext_dir(tmp_path / "a_copy", "\n".join(docs[200:230]))
    results = tmp_path / "results"
    base = ["--models", "tiny:llama", "--methods", "magnitude", "--sparsities", "0.5", "--results", str(results),
            "--calibration", "lee", "--n-samples", "4", "--seqlen", "64", "--ppl", "wikitext2", "--tasks", "none", "-q"]
    assert run(*base, "--data-dir", str(a)) == 0
    capsys.readouterr()
    assert run(*base, "--data-dir", str(a_copy), "--dry-run") == 0  # same content elsewhere: same cells
    assert all(line.startswith("done") for line in capsys.readouterr().out.strip().splitlines())
    assert run(*base, "--data-dir", str(b), "--dry-run") == 0  # other text, same name: new cells
    assert all(line.startswith("todo") for line in capsys.readouterr().out.strip().splitlines())
    assert run(*base, "--data-dir", str(b)) == 0
    recs, _ = load_records(results)
    assert len(recs) == 4
    shas = {r["eval"]["perplexity"]["wikitext2"]["text"]["sha256"] for r in recs}
    assert len(shas) == 2


def test_any_text_file_or_folder_as_evaluation_data(tmp_path):
    from prunebench.data.windows import lee_documents

    docs = lee_documents()
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, d in enumerate(docs[250:270]):
        (folder / f"doc{i:02d}.txt").write_text(d)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(("Caf\xe9 na\xefve " + " ".join(docs[270:280])).encode("latin-1"))
    results = tmp_path / "results"
    assert run("--models", "tiny:llama", "--methods", "magnitude", "--sparsities", "0.5", "--results", str(results),
               "--calibration", "lee", "--n-samples", "4", "--seqlen", "64", "--ppl", f"{folder},{latin}",
               "--encoding", "latin-1", "--tasks", "none", "-q") == 0
    rec = by_method(results)[("magnitude", "0.5")]
    ppl = rec["eval"]["perplexity"]
    assert ppl[str(folder)]["text"]["n_documents"] == 20 and len(ppl[str(folder)]["text"]["files"]) == 20
    assert ppl[str(latin)]["text"]["encoding"] == "latin-1" and ppl[str(latin)]["value"] > 0
    assert "windows of 64 tokens" in ppl[str(latin)]["scored"]
