import torch

from prunebench.data.windows import (
    WindowSpec, _wikitext_rows_from_raw, calibration_windows, embedded_documents, eval_tokens,
    stream_windows, token_fingerprint
)


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
