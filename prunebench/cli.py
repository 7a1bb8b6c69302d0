"""The `prunebench` command: run | list | report | eval | export.  Thin: parse, call the API."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import UserError

log = logging.getLogger("prunebench")
DEFAULT_RESULTS = "results"


def _csv(text):
    return [s.strip() for s in str(text).split(",") if s.strip()] if text is not None else None


def _add_common(p):
    p.add_argument("--plugin", action="append", default=[], metavar="FILE",
                   help="a Python file that registers extra methods (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunebench", description="Benchmark LLM pruning methods on one footing.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a grid of model x method x sparsity cells")
    _add_common(run)
    run.add_argument("--grid", help="a grid YAML file")
    run.add_argument("--preset", help="a named grid: embedded (default) or paper")
    run.add_argument("--models", help="comma-separated model specs (smollm2-135m, tiny:llama, org/name, dir, x.gguf)")
    run.add_argument("--methods", help="comma-separated method names (see `prunebench list`)")
    run.add_argument("--sparsities", help="comma-separated: 0.5, 0.6, 0.5@layer, 2:4 ...")
    run.add_argument("--calibration", help="calibration dataset: lee, c4, wikitext2, redpajama")
    run.add_argument("--n-samples", type=int, help="calibration windows")
    run.add_argument("--seqlen", type=int, help="calibration and evaluation window length")
    run.add_argument("--ppl", help="comma-separated perplexity datasets (lee, wikitext2, c4)")
    run.add_argument("--tasks", help="zero-shot tasks: paper, wanda, embedded, none, or lm-eval names")
    run.add_argument("--limit", type=int, help="documents per zero-shot task (quick runs)")
    run.add_argument("--batch-size", type=int, help="evaluation batch size")
    run.add_argument("--data-dir", help="local copies of the standard data files (layout of shared/data)")
    run.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    run.add_argument("--dtype", help="float32, bfloat16, float16")
    run.add_argument("--seed", type=int)
    run.add_argument("--no-dense", action="store_true", help="do not add the dense baseline cell")
    run.add_argument("--results", default=DEFAULT_RESULTS, help="results directory (default: results)")
    run.add_argument("--force", action="store_true", help="redo cells that already have ok records")
    run.add_argument("--dry-run", action="store_true", help="list the cells and whether they are done; run nothing")
    run.add_argument("--save-masks", action="store_true",
                     help="write each cell's bit-packed masks (safetensors) beside its record")
    run.add_argument("--lock-timeout", type=float, metavar="SECONDS",
                     help="a cell claim not refreshed for this long is taken over (default 600)")
    ex = run.add_argument_group("executor")
    ex.add_argument("--executor", choices=["local", "slurm"], default="local",
                    help="local: this process (default); slurm: one submitit job array per grid")
    ex.add_argument("--slurm-partition", help="SLURM partition for the array tasks")
    ex.add_argument("--gpus-per-cell", type=int, default=None, help="GPUs per array task (default 0)")
    ex.add_argument("--timeout", type=int, default=None, metavar="MINUTES",
                    help="wall time per array task; a cell that runs out is checkpointed and requeued (default 240)")
    ex.add_argument("--array-parallelism", type=int, help="at most this many array tasks at once")
    ex.add_argument("--cpus-per-cell", type=int, help="CPUs per array task")
    ex.add_argument("--mem-gb", type=int, help="memory per array task (GB)")
    ex.add_argument("--submitit-cluster", default="slurm", choices=["slurm", "local", "debug"],
                    help="submitit backend for --executor slurm (local: subprocesses on this machine, for testing)")
    ex.add_argument("--no-wait", action="store_true", help="submit the job array and return without waiting")

    lst = sub.add_parser("list", help="list methods with their capabilities and config defaults")
    _add_common(lst)
    lst.add_argument("--json", action="store_true")

    rep = sub.add_parser("report", help="tables and plots from the records")
    _add_common(rep)
    rep.add_argument("--results", default=DEFAULT_RESULTS)
    rep.add_argument("--format", choices=["md", "csv", "latex"], default="md", help="what to print to stdout")
    rep.add_argument("--paper", action="store_true", help="rebuild the LEAP paper's tables from its published numbers")
    rep.add_argument("--out", help="where to write tables and plots (default: the results directory)")

    exp = sub.add_parser("export", help="write a cell's pruned model as an HF checkpoint (needs run --save-masks)")
    _add_common(exp)
    exp.add_argument("--results", default=DEFAULT_RESULTS)
    exp.add_argument("--key", help="the cell's key (a unique prefix is enough)")
    exp.add_argument("--model", help="or pick the cell by model, method and sparsity label")
    exp.add_argument("--method")
    exp.add_argument("--sparsity", help="sparsity label as in the record: 0.5, 0.5@layer, 2:4")
    exp.add_argument("--out", required=True, help="output directory for the checkpoint")

    ev = sub.add_parser("eval", help="evaluate a model with saved masks applied (no pruning)")
    _add_common(ev)
    ev.add_argument("--masks", required=True, help="a *.masks.safetensors file written by run --save-masks")
    ev.add_argument("--model", help="model spec (default: the one recorded in the masks file)")
    ev.add_argument("--ppl", default="lee", help="comma-separated perplexity datasets (default: lee)")
    ev.add_argument("--seqlen", type=int, default=2048, help="evaluation window length")
    ev.add_argument("--max-windows", type=int, help="evaluate at most this many windows per dataset")
    ev.add_argument("--batch-size", type=int, default=1)
    ev.add_argument("--data-dir", help="local copies of the standard data files")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", help="default: the dtype recorded in the masks file")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


def main(argv=None) -> int:
    # Only prunebench's own messages at INFO; libraries (gensim, lm-eval, ...) at WARNING and above.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    for noisy in ("transformers", "lm-eval", "lm_eval", "datasets", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "quiet", False):
            os.environ["PRUNEBENCH_NO_PROGRESS"] = "1"
        from . import registry

        for plugin in getattr(args, "plugin", []) or []:
            added = registry.load_plugin(plugin)
            log.info("plugin %s registered: %s", plugin, ", ".join(added) or "(nothing new)")
        return {"run": cmd_run, "list": cmd_list, "report": cmd_report, "export": cmd_export,
                "eval": cmd_eval}[args.command](args)
    except UserError as exc:
        print(f"prunebench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunebench: interrupted", file=sys.stderr)
        return 130


def grid_from_args(args):
    from .config import grid_from_dict, load_grid, preset

    if args.grid and args.preset:
        raise UserError("give either --grid or --preset, not both")
    if args.grid:
        grid = load_grid(args.grid)
    else:
        grid = preset(args.preset or "embedded")
    import dataclasses

    data = dataclasses.asdict(grid)
    overrides = {"models": _csv(args.models), "methods": _csv(args.methods), "sparsities": _csv(args.sparsities),
                 "data_dir": args.data_dir, "device": args.device, "dtype": args.dtype, "seed": args.seed}
    if overrides["methods"] is not None:
        # A method named on the command line keeps the config the grid gives it (e.g. the
        # embedded preset's CPU-sized LEAP), so `--methods leap,admm` stays on that grid's budget.
        from . import registry

        configured = {}
        for entry in data["methods"]:
            if isinstance(entry, dict):
                configured[registry.resolve(entry["name"])] = entry
        overrides["methods"] = [configured.get(registry.resolve(n), n) for n in overrides["methods"]]
    for k, v in overrides.items():
        if v is not None:
            data[k] = v
    if args.no_dense:
        data["include_dense"] = False
    cal = {"dataset": args.calibration, "n_samples": args.n_samples, "seqlen": args.seqlen}
    data["calibration"].update({k: v for k, v in cal.items() if v is not None})
    ev = {"seqlen": args.seqlen, "perplexity": _csv(args.ppl), "limit": args.limit, "batch_size": args.batch_size}
    if args.tasks is not None:
        ev["tasks"] = [] if args.tasks.strip().lower() in ("", "none") else _csv(args.tasks)
    data["eval"].update({k: v for k, v in ev.items() if v is not None})
    if data.get("data_dir"):
        from .data import _check_data_dir

        _check_data_dir(data["data_dir"])
    return grid_from_dict(data, where="command line")


def executor_from_args(args):
    from .executors import make_executor

    if args.lock_timeout is not None and args.lock_timeout <= 0:
        raise UserError(f"--lock-timeout must be positive, got {args.lock_timeout}")
    slurm_only = {"--slurm-partition": args.slurm_partition, "--gpus-per-cell": args.gpus_per_cell,
                  "--timeout": args.timeout, "--array-parallelism": args.array_parallelism,
                  "--cpus-per-cell": args.cpus_per_cell, "--mem-gb": args.mem_gb}
    if args.executor == "local":
        given = [flag for flag, v in slurm_only.items() if v is not None] + (["--no-wait"] if args.no_wait else [])
        if given:
            raise UserError(f"{', '.join(given)} only apply to --executor slurm")
        return make_executor("local")
    return make_executor("slurm", cluster=args.submitit_cluster, partition=args.slurm_partition,
                         gpus_per_cell=args.gpus_per_cell or 0,
                         timeout_min=240 if args.timeout is None else args.timeout,
                         array_parallelism=args.array_parallelism, cpus_per_cell=args.cpus_per_cell,
                         mem_gb=args.mem_gb, wait=not args.no_wait)


def cmd_run(args) -> int:
    from .runner import run_grid

    grid = grid_from_args(args)
    cells = grid.cells()  # validates methods, patterns and configs before anything runs
    if args.dry_run:
        from .records import load_records

        done = {r["key"] for r in load_records(args.results)[0] if r.get("status") == "ok"}
        for c in cells:
            print(f"{'done' if c.key in done else 'todo'}  {c.key[:12]}  {c.label}")
        return 0
    summary = run_grid(grid, args.results, force=args.force, progress=not args.quiet, executor=executor_from_args(args),
                       save_masks=args.save_masks, lock_stale_s=args.lock_timeout, plugins=args.plugin)
    busy = f", {summary.busy} left to another runner" if summary.busy else ""
    print(f"{summary.total} cells: {summary.ok} ran ok, {summary.skipped} skipped (already done), "
          f"{summary.failed} failed{busy}; records in {Path(args.results) / 'records'}")
    if summary.submitted:
        print(f"{summary.submitted} cells submitted as job array {summary.job_ids[0].split('_')[0]}; "
              f"rerun the same command (or `prunebench report`) once they finish")
    if summary.failed:
        for r in summary.records:
            if r["status"] != "ok":
                print(f"  failed: {r['model']['id']} | {r['method']['name']} | {r['sparsity']['label']}: {r['error']}",
                      file=sys.stderr)
    return summary.exit_code


def cmd_list(args) -> int:
    from . import registry

    methods = registry.describe()
    if args.json:
        print(json.dumps(methods, indent=2, default=str))
        return 0
    for m in methods:
        caps = m["capabilities"]
        alias = f" (alias: {', '.join(m['aliases'])})" if m["aliases"] else ""
        print(f"{m['name']}{alias}: {m['summary']}")
        print(f"    patterns: {', '.join(caps['patterns'])}; calibration: {'yes' if caps['needs_calibration'] else 'no'}; "
              f"gradients: {'yes' if caps['needs_gradients'] else 'no'}; statistics: {caps['statistics']}")
        if m["defaults"]:
            print("    defaults: " + ", ".join(f"{k}={v!r}" for k, v in m["defaults"].items()))
    return 0


def cmd_report(args) -> int:
    from .report.build import build_report

    text = build_report(args.results, out_dir=args.out, fmt=args.format, paper=args.paper)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def cmd_export(args) -> int:
    from .artifacts import export_checkpoint

    out = export_checkpoint(args.results, args.out, key=args.key, model=args.model, method=args.method,
                            sparsity=args.sparsity)
    print(f"wrote {out} (HF checkpoint, safetensors) and {out / 'sparsity_report.json'}")
    return 0


def cmd_eval(args) -> int:
    from .artifacts import load_masked_model
    from .data import eval_tokens
    from .evaluate.perplexity import perplexity

    if args.seqlen < 2:
        raise UserError(f"--seqlen must be at least 2, got {args.seqlen}")
    loaded, meta = load_masked_model(args.masks, args.model, dtype=args.dtype)
    loaded.model.to(args.device)
    results = {}
    for dataset in _csv(args.ppl) or []:
        ids = eval_tokens(loaded.tokenizer, dataset, args.data_dir)
        results[dataset] = perplexity(loaded.model, ids, args.seqlen, batch_size=args.batch_size, device=args.device,
                                      progress=not args.quiet, max_windows=args.max_windows)
    if args.json:
        print(json.dumps({"masks": args.masks, "model": args.model or meta["model"], "perplexity": results}, indent=2))
    else:
        for dataset, r in results.items():
            print(f"{dataset}: perplexity {r['value']:.4f} ({r['n_windows']} windows of {r['seqlen']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
