"""Checkpoints of the mask-learning engine never run code (issue 29 item 1): they are safetensors
with strict-JSON metadata (prunebench.engines.state_files); a planted pickle is never opened, a damaged
or mismatched checkpoint is named in one line and the cell starts from scratch, and the optimizer
state survives the round trip exactly."""
import json
import os
import pickle
import re
import struct

import pytest
import torch

from prunebench.engines import masklearn, masklearn_checkpoint
from prunebench import registry
from prunebench.engines.distributed import DataParallel
from prunebench.modeling.models import all_prunable, load_tiny, weight_matrix
from prunebench.contract import PruneContext
from prunebench.sparsity.patterns import SparsitySpec
from prunebench.engines.state_files import (
    StateFileError, decode_optimizer, encode_optimizer, read_state, strict_json, write_state
)

CONFIG = {"preset": "tiny", "steps": 4, "checkpoint_every": 2}


class Planted:
    """What a hostile results directory holds: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _ctx(loaded, calib, work_dir):
    return PruneContext(sparsity=SparsitySpec.parse("0.5"), calibration=calib, seed=0, progress=False,
                        registry=registry, tokenizer=loaded.tokenizer, calibration_dataset="lee", work_dir=work_dir)


def _prune(calib, work_dir):
    loaded = load_tiny("llama")
    report = registry.create("leap", CONFIG).prune(loaded.model, _ctx(loaded, calib, work_dir))
    return {n: (weight_matrix(m) != 0).clone() for n, m in all_prunable(loaded.model).items()}, report


@pytest.fixture(scope="module")
def learned(calib_windows, tmp_path_factory):
    """An uninterrupted run's masks and the checkpoint a run preempted at step 2 left."""
    tmp = tmp_path_factory.mktemp("state")
    masks, _ = _prune(calib_windows, tmp / "full")
    original = masklearn.LearnedMaskPruner._save_state

    def preempt(self, path, *args):
        original(self, path, *args)
        raise KeyboardInterrupt("preempted")

    masklearn.LearnedMaskPruner._save_state = preempt
    try:
        with pytest.raises(KeyboardInterrupt):
            _prune(calib_windows, tmp / "cut")
    finally:
        masklearn.LearnedMaskPruner._save_state = original
    return masks, (tmp / "cut" / "leap_state.safetensors").read_bytes()


def _same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


def _ignored_line(report, path):
    lines = [w for w in report.warnings if "ignored" in w]
    assert len(lines) == 1 and "\n" not in lines[0] and str(path) in lines[0], report.warnings
    return lines[0]


def test_a_valid_checkpoint_resumes_to_the_uninterrupted_mask(calib_windows, learned, tmp_path):
    masks, checkpoint = learned
    (tmp_path / "leap_state.safetensors").write_bytes(checkpoint)
    resumed, report = _prune(calib_windows, tmp_path)
    assert report.stats["resumed_from_step"] == 2 and not any("ignored" in w for w in report.warnings)
    assert _same(resumed, masks)


def test_a_planted_pickle_is_never_opened(calib_windows, learned, tmp_path):
    masks, _ = learned
    marker = tmp_path / "pwned"
    for name in ("leap_state.pt", "leap_state.safetensors"):  # the old name and the current one
        with open(tmp_path / name, "wb") as f:
            pickle.dump({"run_key": "x", "payload": Planted(marker)}, f)
    torch.save({"payload": Planted(marker)}, tmp_path / "other.pt")  # torch's zip format too
    os.replace(tmp_path / "other.pt", tmp_path / "leap_state.pt")
    result, report = _prune(calib_windows, tmp_path)
    assert not marker.exists(), "a pickle from the results directory was unpickled"
    assert "resumed_from_step" not in report.stats and _same(result, masks)
    assert any("old-format" in w and "never loaded" in w for w in report.warnings), report.warnings
    assert all("\n" not in w for w in report.warnings)
    assert not (tmp_path / "leap_state.pt").exists()  # a finished cell clears its work folder


def test_a_planted_pickle_in_a_multi_process_checkpoint_is_never_opened(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "leap_state.safetensors"
    shard_dir = masklearn_checkpoint._shard_dir(path, 2)
    shard_dir.mkdir()
    for rank in range(2):
        for name in (f"rank{rank}.pt", f"rank{rank}.safetensors"):
            (shard_dir / name).write_bytes(pickle.dumps({"payload": Planted(marker)}))
    (shard_dir / ".metadata").write_bytes(pickle.dumps(Planted(marker)))  # what DCP would read
    pruner = registry.create("leap", CONFIG)
    for pointer in ({"run_key": "k", "step": 2, "world": 2, "dir": shard_dir.name},  # the old pointer
                    {"format": masklearn_checkpoint.STATE_FORMAT, "run_key": "k", "step": 2, "world": 2, "dir": shard_dir.name}):
        masklearn_checkpoint._pointer(path).write_text(json.dumps(pointer))
        with pytest.raises(StateFileError) as err:
            pruner._read_checkpoint(path, "k", DataParallel(rank=1, world=2), None)
        assert "\n" not in str(err.value)
    assert "old-format" in str(err.value) and "rank0.safetensors" in str(err.value)
    assert not marker.exists()


def _truncated(data):
    return data[: len(data) // 2]


def _garbled(data):  # a byte of tensor data flipped: the header still parses
    out = bytearray(data)
    out[-40] ^= 0xFF
    return bytes(out)


def _nan_metadata(data):  # non-strict JSON in the header, with the header's length kept consistent
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    inner = json.loads(header["__metadata__"]["prunebench"])
    inner["curves"]["loss"][0] = float("nan")
    header["__metadata__"]["prunebench"] = json.dumps(inner)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


@pytest.mark.parametrize("damage,reason", [(_truncated, "not a readable safetensors file"),
                                           (_garbled, "damaged (checksum)"),
                                           (_nan_metadata, "not strict JSON: NaN")])
def test_a_damaged_checkpoint_is_ignored_with_one_line(calib_windows, learned, tmp_path, damage, reason):
    masks, checkpoint = learned
    path = tmp_path / "leap_state.safetensors"
    path.write_bytes(damage(checkpoint))
    with pytest.raises(StateFileError, match=re.escape(reason)):
        read_state(path)
    result, report = _prune(calib_windows, tmp_path)
    assert "resumed_from_step" not in report.stats and reason in _ignored_line(report, path)
    assert _same(result, masks)


@pytest.mark.parametrize("change", ["shape", "dtype", "missing"])
def test_a_checkpoint_that_does_not_match_the_run_starts_from_scratch(calib_windows, learned, tmp_path, change):
    """Well-formed files whose tensors do not fit the run: refused before or while loading."""
    masks, checkpoint = learned
    path = tmp_path / "leap_state.safetensors"
    path.write_bytes(checkpoint)
    meta, tensors = read_state(path)
    name = next(n for n in tensors if n.startswith("logits/"))
    if change == "shape":
        tensors[name] = tensors[name][:, :-1].clone()
    elif change == "dtype":
        tensors[name] = tensors[name].double()
    else:
        del tensors[name]
    write_state(path, {k: v for k, v in meta.items() if k not in ("format", "version", "crc32")}, tensors)
    result, report = _prune(calib_windows, tmp_path)
    assert "resumed_from_step" not in report.stats
    _ignored_line(report, path)
    assert _same(result, masks)


# -- the format itself -----------------------------------------------------------------------------

def test_metadata_must_be_strict_json():
    with pytest.raises(StateFileError, match="Infinity"):
        strict_json('{"a": Infinity}')
    with pytest.raises(StateFileError, match="twice"):
        strict_json('{"a": 1, "a": 2}')
    with pytest.raises(StateFileError, match="not valid JSON"):
        strict_json('{"a": ')
    with pytest.raises(ValueError):
        write_state("/nonexistent/never", {"x": float("nan")}, {})


def _stepped_adamw(params, fused):
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)  # adds initial_lr, as the engine's does
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return opt


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_state_survives_the_round_trip_exactly(tmp_path, fused):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(5))]
    opt = _stepped_adamw(params, fused)
    meta, tensors = encode_optimizer(opt.state_dict())
    write_state(tmp_path / "s.safetensors", {"optimizer": meta}, tensors)
    meta, tensors = read_state(tmp_path / "s.safetensors")
    clone_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = torch.optim.AdamW(clone_params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 0.5)
    fresh.load_state_dict(decode_optimizer(meta["optimizer"], tensors, fresh))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid, entry in a["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, b["state"][pid][key]) and value.dtype == b["state"][pid][key].dtype, key
    grads = [torch.randn_like(p) for p in params]
    for o, ps in ((opt, params), (fresh, clone_params)):  # and the next step is the same step
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(params, clone_params))


def test_moments_that_do_not_fit_the_parameters_are_refused():
    params = [torch.nn.Parameter(torch.randn(8, 16))]
    meta, tensors = encode_optimizer(_stepped_adamw(params, False).state_dict())
    other = torch.optim.AdamW([torch.nn.Parameter(torch.randn(8, 15))], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1,
                              fused=False)
    torch.optim.lr_scheduler.LambdaLR(other, lambda s: 0.5)
    with pytest.raises(StateFileError, match="its parameter"):
        decode_optimizer(meta, tensors, other)


def test_8bit_moments_survive_the_round_trip_exactly(tmp_path):
    optim = pytest.importorskip("torchao.optim", reason="optimizer adamw-8bit needs torchao")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 128)), torch.nn.Parameter(torch.randn(7))]  # quantised, plain
    opt = optim.AdamW8bit(params, lr=1e-2)
    for p in params:  # the state torchao's first step creates, with values (no compiled step needed)
        state = opt.state[p]
        state["step"] = torch.tensor(3.0)
        state["exp_avg"], state["exp_avg_sq"] = opt._new_buffer(p, True), opt._new_buffer(p, False)
        for key in ("exp_avg", "exp_avg_sq"):
            moment = state[key]
            if hasattr(moment, "codes"):
                moment.codes.copy_(torch.randint(0, 256, moment.codes.shape, dtype=torch.uint8))
                moment.scale.uniform_(0.1, 1.0)
            else:
                moment.uniform_()
    meta, tensors = encode_optimizer(opt.state_dict())
    write_state(tmp_path / "s.safetensors", {"optimizer": meta}, tensors)
    meta, tensors = read_state(tmp_path / "s.safetensors")
    fresh = optim.AdamW8bit([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    fresh.load_state_dict(decode_optimizer(meta["optimizer"], tensors, fresh))
    for p, q in zip(params, fresh.param_groups[0]["params"]):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            a, b = opt.state[p][key], fresh.state[q][key]
            assert type(a) is type(b), key
            if hasattr(a, "codes"):
                assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("codes", "scale", "qmap"))
                assert a.signed == b.signed and a.dtype == b.dtype
            else:
                assert torch.equal(a, b)
    assert torch.equal(fresh.param_groups[0]["lr"], opt.param_groups[0]["lr"])
