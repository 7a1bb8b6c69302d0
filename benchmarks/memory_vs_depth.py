"""Peak memory of layer-wise pruning (and streamed perplexity) against model depth.

Builds tiny Llama models of 2, 4, 8 and 16 blocks (random weights, same width), prunes each with
Wanda through the shared layer-wise engine, then evaluates perplexity one block at a time.  Each
depth runs in its own subprocess so high-water marks never mix.  What should stay flat is the
working memory on top of the weights: on a GPU, torch.cuda.max_memory_allocated (the weights
stay on CPU and one block visits the GPU at a time); on CPU, the peak RSS above the RSS measured
once the model and data are loaded.  Not part of the test suite.

    OMP_NUM_THREADS=1 python benchmarks/memory_vs_depth.py
    python benchmarks/memory_vs_depth.py --depths 2,4,8,16,32 --hidden 512 --device cuda
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time


class PeakRSS:
    """Samples this process's RSS in a thread (ru_maxrss cannot be reset between phases)."""

    def __init__(self, interval=0.002):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def run_one(args) -> dict:
    import gc

    import psutil
    import torch
    import transformers as T

    from prunebench import registry
    from prunebench.data.windows import WindowSpec, calibration_windows, eval_tokens
    from prunebench.evaluate.perplexity import perplexity_streamed
    from prunebench.modeling.models import tiny_tokenizer
    from prunebench.contract import PruneContext
    from prunebench.sparsity.patterns import SparsitySpec

    tok = tiny_tokenizer()
    config = T.LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                           num_hidden_layers=args.depth, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=max(512, args.seqlen))
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    calib, _ = calibration_windows(tok, WindowSpec("lee", args.n_samples, args.seqlen, 0))
    ids = eval_tokens(tok, "lee", None)
    gc.collect()
    cuda = args.device.startswith("cuda")
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    base = psutil.Process().memory_info().rss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ctx = PruneContext(sparsity=SparsitySpec(0.5), calibration=calib, device=args.device, progress=False)
    t0 = time.perf_counter()
    with PeakRSS() as prune_peak:
        registry.create("wanda").prune(model, ctx)
    prune_s = time.perf_counter() - t0
    gpu_prune = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as eval_peak:
        ppl = perplexity_streamed(model, ids, args.seqlen, device=args.device, max_windows=args.eval_windows,
                                  chunk_windows=args.eval_windows, progress=False)
    gpu_eval = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {"depth": args.depth, "weights_mb": weights_mb, "block_mb": weights_mb and
            sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters()) / 2**20,
            "prune_rss_extra_mb": (prune_peak.peak - base) / 2**20, "eval_rss_extra_mb": (eval_peak.peak - base) / 2**20,
            "prune_gpu_peak_mb": gpu_prune, "eval_gpu_peak_mb": gpu_eval, "prune_s": prune_s, "ppl": ppl["value"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", default="2,4,8,16")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--n-samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--depth", type=int, help=argparse.SUPPRESS)  # set in the per-depth subprocess
    args = p.parse_args()
    if args.depth:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        cmd = [sys.executable, __file__, "--depth", str(depth), "--hidden", str(args.hidden), "--n-samples",
               str(args.n_samples), "--seqlen", str(args.seqlen), "--eval-windows", str(args.eval_windows),
               "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    gpu = args.device.startswith("cuda")
    head = ["blocks", "weights MB", "1 block MB", "prune extra RSS MB", "eval extra RSS MB", "prune s"]
    head += ["prune GPU peak MB", "eval GPU peak MB"] if gpu else []
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---:" for _ in head) + "|")
    for r in rows:
        cells = [r["depth"], f"{r['weights_mb']:.1f}", f"{r['block_mb']:.2f}", f"{r['prune_rss_extra_mb']:.1f}",
                 f"{r['eval_rss_extra_mb']:.1f}", f"{r['prune_s']:.2f}"]
        if gpu:
            cells += [f"{r['prune_gpu_peak_mb']:.1f}", f"{r['eval_gpu_peak_mb']:.1f}"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print("\nExtra = peak above the memory held once the model and data are loaded; it should not grow "
          "with depth (one block's working set at a time).")


if __name__ == "__main__":
    main()
