"""`prunebench run --dry-run`: a grid's cells on any machine, offline, each done, todo or pending.

A cell's key hashes the texts it calibrates and evaluates on and the model's resolved revision
(config.CellSpec.identity), so listing keys used to download WikiText-2 and C4, and failed on a
machine without network or without the grid's GPU.  Here the network is shut for the whole dry
run (offline()), every input of a key is first looked for on this machine, and a key is computed
only when all of them are here; otherwise the cell is pending, with what is missing: a key is
never guessed.  The key computation itself is config.CellSpec.identity, unchanged (committed
records depend on it).  What only running a cell needs (the model's weights, a GPU, zero-shot
task data, a training stream) makes a cell with a known key pending too, unless it is done.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from prunebench.errors import UserError
from prunebench.evaluate.local_tasks import LOCAL_TASKS, stock_root
from prunebench.store.records import load_records
from prunebench.data.stream import check_grid_supply
from prunebench.run.hub_models import GATED_PREFIXES, hub_cache, is_hub_model, snapshot_complete
from prunebench.run.plan import plan_grid
from prunebench.run.validate import check_grid, check_results_dir
from prunebench.modeling.models import _cached_hub_commit
from prunebench.data.windows import text_fingerprint
from prunebench.run.validate import check_device
from prunebench.evaluate.zeroshot import EMBEDDED_TASKS, resolve_tasks
from prunebench.data.stream import STREAM_SOURCES, open_documents
from prunebench import registry

LOCAL_HOSTS = (None, "", "localhost", "127.0.0.1", "::1")
NO_KEY = "(no key yet)"  # as wide as the 12 key characters the other lines show


class NetworkBlocked(ConnectionError):
    """Raised when anything tries to reach the network during a dry run."""


# Connections refused during the last offline() block ("host:port"), so a caller (and a test)
# can tell that nothing tried.
BLOCKED: list[str] = []

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


@contextlib.contextmanager
def offline():
    """No network inside: the Hugging Face libraries in offline mode (their environment variables,
    and the flags of those already imported, which read the variables once), and every outside
    connection or name lookup refused with NetworkBlocked, so a path they miss fails at once
    instead of downloading or waiting on DNS."""
    import huggingface_hub.constants as hub_constants

    saved_env = {name: os.environ.get(name) for name in _OFFLINE_ENV}
    datasets_loaded = "datasets.config" in sys.modules
    flags = [(hub_constants, "HF_HUB_OFFLINE")]
    if datasets_loaded:
        flags += [(sys.modules["datasets.config"], "HF_HUB_OFFLINE"), (sys.modules["datasets.config"], "HF_DATASETS_OFFLINE")]
    saved_flags = [(module, attr, getattr(module, attr)) for module, attr in flags if hasattr(module, attr)]
    sock_cls = socket.socket
    saved_sock = {name: sock_cls.__dict__.get(name) for name in ("connect", "connect_ex")}
    real_connect, real_connect_ex, real_getaddrinfo = sock_cls.connect, sock_cls.connect_ex, socket.getaddrinfo

    def refuse(what):
        BLOCKED.append(what)
        raise NetworkBlocked(f"network access during a dry run refused: {what}")

    def outside(sock, address) -> bool:
        return sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOCAL_HOSTS

    def connect(sock, address):
        if outside(sock, address):
            refuse(f"{address[0]}:{address[1]}")
        return real_connect(sock, address)

    def connect_ex(sock, address):
        if outside(sock, address):
            refuse(f"{address[0]}:{address[1]}")
        return real_connect_ex(sock, address)

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in LOCAL_HOSTS:
            refuse(f"{host}:{port}")
        return real_getaddrinfo(host, port, *args, **kwargs)

    BLOCKED.clear()
    try:
        for name in _OFFLINE_ENV:
            os.environ[name] = "1"
        for module, attr, _ in saved_flags:
            setattr(module, attr, True)
        sock_cls.connect, sock_cls.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
        yield
    finally:
        socket.getaddrinfo = real_getaddrinfo
        for name, value in saved_sock.items():
            if value is None:
                delattr(sock_cls, name)
            else:
                setattr(sock_cls, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for module, attr, value in saved_flags:
            setattr(module, attr, value)
        if not datasets_loaded and "datasets.config" in sys.modules:
            # imported inside, it read the offline environment: give it what it would read now
            # (datasets' own rule: HF_DATASETS_OFFLINE when set, else the hub's flag)
            config = sys.modules["datasets.config"]
            value = hub_constants.HF_HUB_OFFLINE if os.environ.get("HF_DATASETS_OFFLINE") is None \
                else _env_true("HF_DATASETS_OFFLINE")
            config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = value


@dataclass(frozen=True)
class Missing:
    """One thing this machine lacks: `what` names it on a cell's line, `detail` says why and what
    to do (one line), `blocks_key` when the cell's key cannot be computed without it."""

    what: str
    detail: str
    blocks_key: bool


@dataclass
class CellStatus:
    cell: object  # config.CellSpec
    state: str  # done | todo | pending
    key: str | None  # None while a key input is missing
    missing: list = field(default_factory=list)

    def line(self) -> str:
        if self.state != "pending":
            return f"{self.state}  {self.key[:12]}  {self.cell.label}"  # the format dry runs always had
        key = self.key[:12] if self.key else NO_KEY
        return f"pending  {key}  {self.cell.label}  (missing: {', '.join(m.what for m in self.missing)})"


@dataclass
class DryRun:
    cells: list
    blocked: list  # network connections refused while listing (none expected)
    plan: object = None  # plan.Plan: estimates on a named GPU, when asked for or the grid is for CUDA

    def count(self, state: str) -> int:
        return sum(c.state == state for c in self.cells)

    def lines(self) -> list[str]:
        out = [c.line() for c in self.cells]
        pending = [c for c in self.cells if c.state == "pending"]
        if not pending and not self.blocked:
            return out  # nothing missing: the listing is what it always was
        seen = {}
        for c in pending:
            for m in c.missing:
                seen.setdefault(m.what, m)
        out.append("")
        out.append("missing on this machine (a dry run reads nothing from the network):")
        # models, then texts and streams, then the GPU and task data: access before data before hardware
        ranked = sorted(seen.values(), key=lambda m: (not m.what.startswith("model "), not m.blocks_key))
        out += [f"  {m.what}: {m.detail}" for m in ranked]
        if self.blocked:
            where = ", ".join(sorted(set(self.blocked))[:3])
            out.append(f"  network: {len(self.blocked)} connection(s) were attempted and refused ({where}) "
                       "(hint: please report it: a dry run should try none)")
        keyless = sum(c.key is None for c in pending)
        out.append(f"{len(self.cells)} cells: {self.count('done')} done, {self.count('todo')} todo, {len(pending)} pending"
                   + (f" ({keyless} without a key until what they miss is here)" if keyless else ""))
        return out

    def all_lines(self) -> list[str]:
        """The listing, then the plan when there is one."""
        return self.lines() + ([""] + self.plan.lines() if self.plan is not None else [])


def _first_line(exc: Exception, limit: int = 160) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _gated_note(spec: str) -> str:
    if not spec.startswith(GATED_PREFIXES):
        return ""
    try:
        from huggingface_hub import get_token

        token = get_token()  # the environment or the token file: no network
    except Exception:
        token = None
    return (f"; it is gated: its licence must be accepted on the Hub and a token given "
            f"({'a token is set here' if token else 'no Hugging Face token is set here'})")


def _download_hint(spec: str) -> str:
    login = "accept its licence on huggingface.co, `hf auth login`, then " if spec.startswith(GATED_PREFIXES) else ""
    return (f"hint: {login}`hf download {spec}` on a machine with network, into the Hugging Face cache this machine "
            "reads (HF_HOME)")


def _stock_dataset_path(task: str) -> str | None:
    """The Hub dataset an lm-eval task reads, from its installed YAML (following `include`; a
    group's subtasks share the folder's _default_template_yaml); None when not found."""
    if task not in LOCAL_TASKS:
        return None
    path = stock_root() / LOCAL_TASKS[task].stock_yaml
    for _ in range(4):  # an include chain is short
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return None
        value = {k.strip(): v.strip().strip("'\"") for k, _, v in (ln.partition(":") for ln in lines if not ln.startswith(" "))}
        if value.get("dataset_path"):
            return value["dataset_path"]
        if value.get("include"):
            path = path.parent / value["include"]
        elif (path.parent / "_default_template_yaml").is_file() and path.name != "_default_template_yaml":
            path = path.parent / "_default_template_yaml"
        else:
            return None
    return None


def _dataset_cached(dataset_path: str) -> bool:
    """Whether a Hub dataset has a copy in the local caches (the hub's file cache, where datasets
    downloads to, or datasets' own prepared cache)."""
    try:
        from datasets.config import HF_DATASETS_CACHE
    except ImportError:
        HF_DATASETS_CACHE = Path.home() / ".cache" / "huggingface" / "datasets"
    return (hub_cache() / f"datasets--{dataset_path.replace('/', '--')}").is_dir() or \
        (Path(HF_DATASETS_CACHE) / dataset_path.replace("/", "___")).is_dir()


# Which (dataset, role) texts a --data-dir can hold (prunebench.data.windows.documents).
_DATA_DIR_TEXTS = {("wikitext2", "eval"), ("c4", "calibration"), ("redpajama", "eval"), ("redpajama", "calibration")}


class Probe:
    """What a grid's cells need that this machine lacks, each looked up once, never over the network."""

    def __init__(self, grid):
        self.grid = grid
        self._memo: dict = {}

    def _once(self, key, fn) -> list:
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def model(self, spec: str) -> list:
        return self._once(("model", spec), lambda: self._model(spec))

    def _model(self, spec: str) -> list:
        if not is_hub_model(spec):
            return []  # a file, a folder, tiny or embedded: the key hashes what is here
        commit = _cached_hub_commit(spec, "main")
        if commit is None:
            return [Missing(f"model {spec}", f"not in the local Hugging Face cache, so the revision every key holds is "
                                             f"unknown{_gated_note(spec)} ({_download_hint(spec)})", True)]
        if not snapshot_complete(spec, commit):
            return [Missing(f"model {spec}", f"revision {commit[:12]} is known here but its weights or tokenizer are not "
                                             f"in the local cache{_gated_note(spec)} ({_download_hint(spec)})", False)]
        return []

    def text(self, dataset: str, role: str, encoding: str, blocks_key: bool = True) -> list:
        found = self._once(("text", dataset, role, encoding), lambda: self._text(dataset, role, encoding))
        return [Missing(m.what, m.detail, blocks_key) for m in found]

    def _text(self, dataset: str, role: str, encoding: str) -> list:
        try:
            text_fingerprint(dataset, role, self.grid.data_dir, encoding)
            return []
        except UserError:
            raise  # a mistake in the grid or its --data-dir: as in a real run, one line and exit 2
        except Exception as exc:  # the Hub copy is neither here nor reachable
            part = "calibration" if role == "calibration" else "evaluation"
            if (dataset, role) in _DATA_DIR_TEXTS:
                hint = "pass --data-dir with a local copy laid out like shared/data (see its MANIFEST.md)"
            else:
                other = "c4 or lee" if role == "calibration" else "wikitext2 or lee"
                hint = f"run once with network access to fill the datasets cache, or use {other} with --data-dir"
            return [Missing(f"{dataset} {part} text", f"not available offline here ({type(exc).__name__}: "
                                                       f"{_first_line(exc)}) (hint: {hint})", True)]

    def device(self) -> list:
        return self._once(("device",), self._device)

    def _device(self) -> list:
        try:
            check_device(self.grid.device)
        except UserError as exc:
            return [Missing("GPU", f"{exc.message} (hint: run the grid on a machine with it; the keys listed here "
                                   f"are the ones it will use, which hold the device kind, not the machine)", False)]
        return []

    def tasks(self) -> list:
        return self._once(("tasks",), self._tasks)

    def _tasks(self) -> list:
        ev = self.grid.eval
        if not ev.tasks or self.grid.data_dir is not None:
            return []  # embedded tasks need nothing; local task files were checked with the grid
        absent = []
        for task in resolve_tasks(ev.tasks, data_dir=None):
            if task in EMBEDDED_TASKS:
                continue
            path = _stock_dataset_path(task)
            if path is None or not _dataset_cached(path):
                absent.append(task)
        if not absent:
            return []
        return [Missing("zero-shot task data", f"{', '.join(absent)} read their documents from the Hub when a cell runs "
                                               "and are not in the local datasets cache (hint: pass --data-dir with the "
                                               "task files, see shared/data/MANIFEST.md, or run with network access)", False)]

    def training_stream(self, cell) -> list:
        """A learned method's training text: a Hub stream needs the network while the cell runs."""
        config = cell.method_config if isinstance(cell.method_config, dict) else {}
        if "streaming" not in config or "dataset" not in config:
            return []  # not a mask-training method
        dataset = config.get("dataset") or cell.calibration.dataset
        if not config.get("streaming"):
            # read whole like the calibration text (data.stream_windows), utf-8
            return self.text(dataset, "calibration", "utf-8", blocks_key=False)
        return self._once(("stream", dataset), lambda: self._stream(dataset))

    def _stream(self, dataset: str) -> list:
        if dataset in STREAM_SOURCES and self.grid.data_dir is None:
            return [Missing(f"{dataset} training stream", f"streamed from the Hub ({STREAM_SOURCES[dataset]['hub_id']}) "
                                                          "while the cell runs (hint: run it with network access, or pass "
                                                          "--data-dir with local shards, see shared/data/MANIFEST.md)", False)]
        try:
            open_documents(dataset, self.grid.data_dir)  # local files: only looked up, not read
        except UserError as exc:
            return [Missing(f"{dataset} training stream", str(exc), False)]
        return []

    def cell(self, cell) -> list:
        """What this cell lacks here, key inputs first; each thing named once."""
        found = list(self.model(cell.model))
        if registry.create(cell.method, cell.method_config).capabilities.needs_calibration:
            cs = cell.calibration
            found += self.text(cs.dataset, "calibration", cs.encoding)
        for ds in cell.eval.perplexity:
            found += self.text(ds, "eval", cell.eval.encoding)
        found += self.training_stream(cell) + self.device() + self.tasks()
        merged: dict = {}
        for m in found:  # one entry per thing: it blocks the key if any use of it does
            old = merged.get(m.what)
            merged[m.what] = m if old is None or (m.blocks_key and not old.blocks_key) else old
        return list(merged.values())


def dry_run(grid, results_dir, plan: dict | None = None) -> DryRun:
    """Every cell of the grid, done / todo / pending, with the network shut throughout; with
    `plan` (plan.plan_grid's options: gpu_name, utilisation, nproc) also the grid's plan.
    Raises UserError for a mistake in the grid itself, as a real run would (a streamed learned
    cell whose source cannot supply its tokens included); writes nothing."""
    with offline():
        cells = check_grid(grid, dry_run=True)
        check_grid_supply(cells, grid.data_dir)
        if Path(results_dir).exists():
            check_results_dir(results_dir, create=False)
        done = {r["key"] for r in load_records(results_dir)[0] if r.get("status") == "ok"}
        probe = Probe(grid)
        out = []
        for cell in cells:
            missing = probe.cell(cell)
            key = None
            if not any(m.blocks_key for m in missing):
                try:
                    key = cell.key
                except NetworkBlocked as exc:  # a key input this probe did not foresee: still no guess
                    missing.append(Missing("network", f"its key needs something from the network ({exc})", True))
            if key is not None and key in done:
                state = "done"
            else:
                state = "pending" if missing else "todo"
            out.append(CellStatus(cell, state, key, missing))
        planned = plan_grid(grid, cells, **plan) if plan is not None else None
        return DryRun(out, list(BLOCKED), planned)
