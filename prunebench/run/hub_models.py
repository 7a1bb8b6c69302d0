"""Hub models as this machine sees them, offline: which model specs name a hub repository, which
are gated, and whether a cached snapshot is complete.  The dry run (dryrun.py) and the plan and
its access checks (plan.py) ask the same questions here.
"""
from __future__ import annotations

import json
from pathlib import Path

from prunebench.modeling.models import EMBEDDED_MODELS

# Hub models that are gated (a token and an accepted licence) as of 2025: a planning hint only,
# since whether a repo is gated cannot be asked offline.
GATED_PREFIXES = ("meta-llama/", "google/gemma")


def is_hub_model(spec: str) -> bool:
    return not (spec in EMBEDDED_MODELS or spec.startswith("tiny:") or spec.endswith(".gguf") or Path(spec).is_dir())


def hub_cache() -> Path:
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE)


def snapshot_complete(repo_id: str, commit: str) -> bool:
    """config, tokenizer and every weight file of a cached model snapshot are on disk."""
    snap = hub_cache() / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit
    if not (snap / "config.json").is_file():
        return False
    if not any((snap / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return False
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (snap / index).is_file():
            try:
                shards = set(json.loads((snap / index).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError):
                return False
            return all((snap / shard).is_file() for shard in shards)
    return any(p.is_file() for pattern in ("*.safetensors", "pytorch_model*.bin") for p in snap.glob(pattern))
