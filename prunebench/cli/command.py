"""The `prunebench` command: run | list | report | eval | export.  Thin: parse, call the API."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from prunebench.errors import UserError

log = logging.getLogger("prunebench")
DEFAULT_RESULTS = "results"
DEFAULT_EVAL_SEQLEN = 2048  # `eval` without a record beside the masks: the LEAP paper's calibration length


def _csv(text):
    return [s.strip() for s in str(text).split(",") if s.strip()] if text is not None else None


def _number(text: str):
    return float(text) if any(c in text for c in ".eE") else int(text)


def _limit_arg(text: str):
    """--limit 200 (every task) or --limit mmlu=5,piqa=200 (each named task its own)."""
    try:
        if "=" not in text:
            return _number(text.strip())
        pairs = [item.split("=", 1) for item in _csv(text)]
        return {task.strip(): _number(value.strip()) for task, value in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of documents or task=number list: {text!r}") from None


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line with a hint (not the usage block), exit 2."""

    def error(self, message):
        sys.stderr.write(f"prunebench: error: {message} (hint: see `{self.prog} --help`)\n")
        raise SystemExit(2)


def _add_common(p):
    p.add_argument("--plugin", action="append", default=[], metavar="FILE",
                   help="a Python file that registers extra methods (repeatable)")
    p.add_argument("--replace", action="append", default=[], metavar="NAME",
                   help="let a plugin take this built-in method's name (its records then carry the plugin's identity)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="prunebench", description="Benchmark LLM pruning methods on one footing.")
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
    run.add_argument("--ppl", help="comma-separated perplexity datasets (lee, wikitext2, c4) or text paths "
                                   "(a .txt file, or a folder of .txt files)")
    run.add_argument("--encoding", help="encoding of text files named by path (default utf-8)")
    run.add_argument("--max-ppl-windows", type=int, help="score at most this many perplexity windows per dataset")
    run.add_argument("--tasks", help="zero-shot tasks: paper, wanda, embedded, none, or lm-eval names")
    run.add_argument("--limit", type=_limit_arg, help="documents per zero-shot task (MMLU: per subject), or per task: "
                                                      "mmlu=5,piqa=200")
    run.add_argument("--batch-size", type=int, help="evaluation batch size")
    run.add_argument("--data-dir", help="local copies of the standard data files (layout of shared/data)")
    run.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    run.add_argument("--dtype", help="float32, bfloat16, float16")
    run.add_argument("--seeds", metavar="S[,S...]",
                     help="comma-separated seeds: one cell per seed for every method the seed changes (the "
                          "calibration draw and the method's own randomness); e.g. 0,1,2")
    run.add_argument("--seed", help=argparse.SUPPRESS)  # the one-seed spelling of --seeds
    run.add_argument("--no-dense", action="store_true", help="do not add the dense baseline cell")
    run.add_argument("--results", default=DEFAULT_RESULTS, help="results directory (default: results)")
    run.add_argument("--force", action="store_true", help="redo cells that already have ok records")
    run.add_argument("--dry-run", action="store_true",
                     help="list the cells, each done, todo or pending (with what this machine lacks for it); offline, "
                          "on any machine; runs, downloads and writes nothing")
    run.add_argument("--plan-gpu", metavar="NAME",
                     help="with --dry-run: the GPU the plan estimates memory and GPU-hours for (default H100-80GB; "
                          "a CUDA grid always gets a plan; see docs/paper-scale.md)")
    run.add_argument("--plan-utilisation", type=float, metavar="X",
                     help="with --dry-run: the fraction of the GPU's dense bf16 peak the plan assumes (default 0.4)")
    run.add_argument("--require-clean", action="store_true",
                     help="refuse to run from code with uncommitted changes (committed reference runs use it: a "
                          "record's commit must be one anybody can check out)")
    run.add_argument("--save-masks", action="store_true",
                     help="write each cell's bit-packed masks (safetensors) beside its record")
    run.add_argument("--lock-timeout", type=float, metavar="SECONDS",
                     help="a cell claim not refreshed for this long is taken over (default 600)")
    ex = run.add_argument_group("executor")
    ex.add_argument("--executor", choices=["local", "slurm"], default="local",
                    help="local: this process (default); slurm: one sbatch job array per grid")
    ex.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                    help="train each learned cell as N processes (torch.distributed; one per GPU, or gloo on CPU): "
                         "local: through torchrun; slurm: N tasks per job")
    ex.add_argument("--slurm-partition", help="SLURM partition for the array tasks")
    ex.add_argument("--gpus-per-cell", type=int, default=None, help="GPUs per array task (default 0)")
    ex.add_argument("--timeout", type=float, default=None, metavar="MINUTES",
                    help="wall time per cell. local: each cell then runs in a worker process of its own, and one "
                         "that runs out is stopped and recorded as failed (timed out); slurm: per array task, a "
                         "cell that runs out is checkpointed and requeued (default 240)")
    ex.add_argument("--array-parallelism", type=int, help="at most this many array tasks at once")
    ex.add_argument("--cpus-per-cell", type=int, help="CPUs per array task")
    ex.add_argument("--mem-gb", type=int, help="memory per array task (GB)")
    ex.add_argument("--no-wait", action="store_true", help="submit the job array and return without waiting")

    chk = sub.add_parser("check", help="run the conformance suite on methods (a plugin's, with --plugin)")
    _add_common(chk)
    chk.add_argument("--methods", help="comma-separated methods (default: those the --plugin files register, "
                                       "or every registered method)")
    chk.add_argument("--families", help="comma-separated tiny families (default: all of "
                                        "llama, qwen2, gemma3, mistral, opt, gpt2)")

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
    ev.add_argument("--ppl", default="lee", help="comma-separated perplexity datasets or text paths (default: lee)")
    ev.add_argument("--encoding", default="utf-8", help="encoding of text files named by path")
    ev.add_argument("--seqlen", type=int, help="evaluation window length (default: the record's beside the "
                                                 "masks file, else 2048)")
    ev.add_argument("--max-windows", type=int, help="evaluate at most this many windows per dataset (default: the "
                                                    "record's beside the masks file, else all)")
    ev.add_argument("--batch-size", type=int, default=1)
    ev.add_argument("--data-dir", help="local copies of the standard data files")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", help="default: the dtype recorded in the masks file")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")

    co = sub.add_parser("cost", help="storage and FLOPs per token of pruned models: every record of a results "
                                     "directory, saved masks, or an exported checkpoint")
    which = co.add_mutually_exclusive_group(required=True)
    which.add_argument("--results", help="a results directory: cost.csv, cost.md and quality-vs-cost plots in its report/")
    which.add_argument("--masks", help="a *.masks.safetensors file (run --save-masks)")
    which.add_argument("--checkpoint", help="an exported checkpoint directory (prunebench export): its zeros")
    co.add_argument("--out", help="where --results writes (default: <results>/report)")
    co.add_argument("--value-dtype", default="bfloat16", help="bytes per stored value: bfloat16, float16, float32")
    co.add_argument("--context", type=int, default=512, help="context length for attention FLOPs (default 512)")
    co.add_argument("--speed", action="store_true",
                    help="with --results: also measure each record's decode speed on this machine (minutes on a "
                         "CPU; writes report/speed.csv, which later cost tables use)")
    co.add_argument("--threads", type=int, help="torch threads for --speed (default: torch's default)")
    _add_common(co)
    cmp = sub.add_parser("compare", help="method A minus method B on every metric, with intervals over seeds and "
                                         "windows / items, and the verdict")
    _add_common(cmp)
    cmp.add_argument("--results", default=DEFAULT_RESULTS)
    cmp.add_argument("a", metavar="A", help="a method name (or alias), as in the records")
    cmp.add_argument("b", metavar="B", help="the method it is compared with")
    cmp.add_argument("--model", help="only this model id (default: every model both were run on)")
    cmp.add_argument("--sparsity", help="only this sparsity label: 0.5, 2:4, hybrid:0.35/64 (default: every shared one)")
    cmp.add_argument("--format", choices=["md", "csv"], default="md")

    rp = sub.add_parser("reproduce", help="compare a fresh run with a reference run (exit 1 on a real difference)")
    rp.add_argument("--fresh", required=True, help="the fresh run's results directory")
    rp.add_argument("--reference", default=DEFAULT_RESULTS, help="the reference results directory (default: results)")
    rp.add_argument("--sd-multiple", type=float, metavar="K",
                    help="a figure reproduces within K x the reference's seed SD of its mean (default 3)")
    rp.add_argument("--tolerance-ppl", type=float, metavar="X",
                    help="relative perplexity floor, for cells without a seed spread (default 1e-3)")
    rp.add_argument("--tolerance-acc", type=float, metavar="X",
                    help="absolute accuracy floor, for cells without a seed spread (default: exact)")
    rp.add_argument("--require-identical-masks", action="store_true", help="a cell whose masks differ fails too")
    rp.add_argument("--write-reference-report", action="store_true",
                    help="also write reproduction.{json,md} into the reference's report dir")
    return parser


def main(argv=None) -> int:
    # Only prunebench's own messages at INFO; libraries (gensim, lm-eval, ...) at WARNING and above.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    # torchao (imported by transformers whenever it is installed) warns about CUDA libraries and
    # triton on every CPU start, and torch's pytree about torchao's enums: none of it concerns a run.
    for noisy in ("transformers", "lm-eval", "lm_eval", "datasets", "urllib3", "filelock", "httpx", "torchao",
                  "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "quiet", False):
            os.environ["PRUNEBENCH_NO_PROGRESS"] = "1"
        from prunebench import plugins, registry

        registry.allow_replacing(getattr(args, "replace", []) or [])
        for plugin in getattr(args, "plugin", []) or []:
            added = plugins.load_plugin(plugin)
            args.plugin_methods = getattr(args, "plugin_methods", []) + added
            if not getattr(args, "quiet", False):
                log.info("plugin %s registered: %s", plugin, ", ".join(added) or "(nothing new)")
        plugins.check_replacements(getattr(args, "replace", []) or [])
        return {"run": cmd_run, "check": cmd_check, "list": cmd_list, "report": cmd_report, "export": cmd_export,
                "eval": cmd_eval, "reproduce": cmd_reproduce, "cost": cmd_cost,
                "compare": cmd_compare}[args.command](args)
    except UserError as exc:
        print(f"prunebench: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunebench: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user mistake: still one line, the traceback on request
        if os.environ.get("PRUNEBENCH_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"prunebench: internal error: {type(exc).__name__}: {first} "
              f"(hint: rerun with PRUNEBENCH_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 3


_EXAMPLES = {"--models": "--models smollm2-135m", "--methods": "--methods wanda,sparsegpt",
             "--sparsities": "--sparsities 0.5,2:4"}


def _seeds_arg(args):
    from prunebench.run.grid import check_seeds

    if args.seeds is not None and args.seed is not None:
        raise UserError("give --seeds or --seed, not both", hint="--seeds 0,1,2")
    value = args.seeds if args.seeds is not None else args.seed
    if value is None:
        return None
    flag = "--seeds" if args.seeds is not None else "--seed"
    return check_seeds(value.split(","), flag)


def grid_from_args(args):
    from prunebench.run.grid import grid_from_dict, load_grid, preset

    if args.grid and args.preset:
        raise UserError("give either --grid or --preset, not both")
    if args.grid:
        grid = load_grid(args.grid)
    else:
        grid = preset(args.preset or "embedded")
    import dataclasses

    data = dataclasses.asdict(grid)
    for flag, value in (("--models", args.models), ("--methods", args.methods), ("--sparsities", args.sparsities)):
        if value is not None and not _csv(value):
            raise UserError(f"{flag} {value!r} names nothing", hint=f"give a comma-separated list, e.g. {_EXAMPLES[flag]}")
    overrides = {"models": _csv(args.models), "methods": _csv(args.methods), "sparsities": _csv(args.sparsities),
                 "data_dir": args.data_dir, "device": args.device, "dtype": args.dtype, "seeds": _seeds_arg(args)}
    if overrides["methods"] is not None:
        # A method named on the command line keeps the config the grid gives it (e.g. the
        # embedded preset's CPU-sized LEAP), so `--methods leap,admm` stays on that grid's budget.
        from prunebench import registry

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
    cal = {"dataset": args.calibration, "n_samples": args.n_samples, "seqlen": args.seqlen, "encoding": args.encoding}
    data["calibration"].update({k: v for k, v in cal.items() if v is not None})
    ev = {"seqlen": args.seqlen, "perplexity": _csv(args.ppl), "limit": args.limit, "batch_size": args.batch_size,
          "encoding": args.encoding, "max_ppl_windows": args.max_ppl_windows}
    if args.tasks is not None:
        ev["tasks"] = [] if args.tasks.strip().lower() in ("", "none") else _csv(args.tasks)
    data["eval"].update({k: v for k, v in ev.items() if v is not None})
    return grid_from_dict(data, where="command line")


def executor_from_args(args):
    from prunebench.run.executors import make_executor

    if args.lock_timeout is not None and args.lock_timeout <= 0:
        raise UserError(f"--lock-timeout must be positive, got {args.lock_timeout}")
    if args.timeout is not None and not 0 < args.timeout < float("inf"):
        raise UserError(f"--timeout must be a positive number of minutes, got {args.timeout:g}", hint="e.g. --timeout 90")
    slurm_only = {"--slurm-partition": args.slurm_partition, "--gpus-per-cell": args.gpus_per_cell,
                  "--array-parallelism": args.array_parallelism,
                  "--cpus-per-cell": args.cpus_per_cell, "--mem-gb": args.mem_gb}
    nproc = 1 if args.nproc_per_node is None else args.nproc_per_node
    if nproc < 1:
        raise UserError(f"--nproc-per-node must be 1 or more, got {nproc}")
    if args.executor == "local":
        given = [flag for flag, v in slurm_only.items() if v is not None] + (["--no-wait"] if args.no_wait else [])
        if given:
            raise UserError(f"{', '.join(given)} only apply to --executor slurm")
        return make_executor("local", nproc_per_node=nproc, timeout_s=None if args.timeout is None else args.timeout * 60)
    return make_executor("slurm", partition=args.slurm_partition,
                         gpus_per_cell=args.gpus_per_cell or 0,
                         timeout_min=240 if args.timeout is None else math.ceil(args.timeout),  # SLURM: whole minutes
                         array_parallelism=args.array_parallelism, cpus_per_cell=args.cpus_per_cell,
                         mem_gb=args.mem_gb, wait=not args.no_wait, nproc_per_node=nproc)


def _plan_options(args, grid):
    """The dry run's plan options (None: no plan), checked, and the GPU count the executor gives
    learned cells checked before anything runs."""
    from prunebench.run import plan as plans

    nproc = args.nproc_per_node or 1
    available = None
    if not args.dry_run and args.executor == "local" and str(grid.device).startswith("cuda"):
        import torch

        available = torch.cuda.device_count() if torch.cuda.is_available() else None
    plans.check_gpu_count(grid.device, args.executor, nproc, args.gpus_per_cell, available=available)
    asked = args.plan_gpu is not None or args.plan_utilisation is not None
    if asked and not args.dry_run:
        raise UserError("--plan-gpu and --plan-utilisation only apply to --dry-run")
    card = plans.gpu(args.plan_gpu or plans.DEFAULT_GPU)  # an unknown name: one line, before anything
    utilisation = plans.check_utilisation(plans.DEFAULT_UTILISATION if args.plan_utilisation is None
                                          else args.plan_utilisation)
    if not asked and not str(grid.device).startswith("cuda"):
        return None  # a CPU grid lists its cells as it always did
    return {"gpu_name": card.name, "utilisation": utilisation, "nproc": nproc}


def cmd_run(args) -> int:
    from prunebench.run.runner import run_grid

    from prunebench.run.validate import check_grid

    grid = grid_from_args(args)
    executor = executor_from_args(args)
    plan = _plan_options(args, grid)
    if not args.dry_run:  # a dry run checks the grid its own way: offline, on any machine
        from prunebench.run.plan import check_model_access
        from prunebench.data.stream import check_grid_supply

        cells = check_grid(grid)  # everything checkable before a model loads
        check_model_access(grid)
        check_grid_supply(cells, grid.data_dir)
    if args.require_clean:
        from prunebench.run.runner import uncommitted_code

        changed = uncommitted_code()
        if changed:
            raise UserError(f"the code has uncommitted changes ({', '.join(changed[:3])}"
                            f"{', ...' if len(changed) > 3 else ''}): these records would name a commit that is not "
                            "the code that made them", hint="commit first (or drop --require-clean for a scratch run)")
    if args.dry_run:
        from prunebench.run.dryrun import dry_run

        for line in dry_run(grid, args.results, plan=plan).all_lines():
            print(line)
        return 0  # pending cells are news for the plan, not a failure
    summary = run_grid(grid, args.results, force=args.force, progress=not args.quiet, executor=executor,
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


def cmd_check(args) -> int:
    from prunebench import registry
    from prunebench.run.conformance import check_method
    from prunebench.modeling.models import TINY_FAMILIES

    families = _csv(args.families) or list(TINY_FAMILIES)
    unknown = [f for f in families if f not in TINY_FAMILIES]
    if unknown:
        raise UserError(f"unknown tiny family {unknown[0]!r}", hint=f"use {', '.join(TINY_FAMILIES)}")
    methods = [registry.resolve(m) for m in _csv(args.methods)] if args.methods else \
        (getattr(args, "plugin_methods", None) or [m for m in registry.available() if m != "dense"])
    outcomes = []
    for method in methods:
        for outcome in check_method(method, families=families):
            print(outcome.line(), flush=True)
            outcomes.append(outcome)
    passed = sum(o.ok for o in outcomes)
    print(f"{passed} of {len(outcomes)} checks passed ({', '.join(methods)} on tiny {', '.join(families)})")
    return 0 if outcomes and passed == len(outcomes) else 1


def cmd_list(args) -> int:
    from prunebench import registry

    from prunebench.engines import allocation

    methods = registry.describe()
    allocations = allocation.describe()
    if args.json:
        print(json.dumps(methods + [{**a, "kind": "allocation"} for a in allocations], indent=2, default=str))
        return 0
    for m in methods:
        caps = m["capabilities"]
        alias = f" (alias: {', '.join(m['aliases'])})" if m["aliases"] else ""
        print(f"{m['name']}{alias} [{m['kind']}]: {m['summary']}")
        print(f"    patterns: {', '.join(caps['patterns'])}; calibration: {'yes' if caps['needs_calibration'] else 'no'}; "
              f"gradients: {'yes' if caps['needs_gradients'] else 'no'}; statistics: {caps['statistics']}; "
              f"one cell per seed: {'yes' if caps['seed_dependent'] else 'no'}")
        presets = m.get("presets") or {}
        if presets:
            # its settings default to None, filled from the chosen preset: show what each gives
            chosen = m["defaults"].get("preset")
            print(f"    defaults: preset={chosen!r}; every setting left unset takes the preset's value "
                  f"(choose with config: {{preset: NAME}}):")
            for name, values in presets.items():
                print(f"    preset {name}: " + ", ".join(f"{k}={v!r}" for k, v in values.items()))
        elif m["defaults"]:
            print("    defaults: " + ", ".join(f"{k}={v!r}" for k, v in m["defaults"].items()))
    print("\nsparsity allocations (compose with a layer-wise method: wanda+owl, sparsegpt+alphapruning):")
    for a in allocations:
        print(f"{a['name']}: {a['summary']}")
        print(f"    patterns: {', '.join(a['patterns'])}; calibration: {'yes' if a['statistics'] != 'none' else 'no'}; "
              "defaults: " + ", ".join(f"{k}={v!r}" for k, v in a["defaults"].items()))
    return 0


def cmd_report(args) -> int:
    from prunebench.report.build import build_report
    from prunebench.run.validate import check_results_dir

    if not args.paper:
        check_results_dir(args.results, create=False)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out!r} is a file, not a directory", hint="give a directory for the report")
    text = build_report(args.results, out_dir=args.out, fmt=args.format, paper=args.paper)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def cmd_cost(args) -> int:
    from prunebench.measure import cost as costs

    if args.value_dtype not in costs.VALUE_BYTES:
        raise UserError(f"unknown --value-dtype {args.value_dtype!r}", hint=f"use one of {', '.join(costs.VALUE_BYTES)}")
    if args.context < 1:
        raise UserError(f"--context must be 1 or more, got {args.context}")
    if (args.speed or args.threads is not None) and not args.results:
        raise UserError("--speed and --threads measure the records of a results directory", hint="add --results DIR")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be 1 or more, got {args.threads}")
    value_bytes = costs.VALUE_BYTES[args.value_dtype]
    if args.results:
        from prunebench.store.records import load_records, warn_skipped
        from prunebench.report.cost import write_cost_report
        from prunebench.run.validate import check_results_dir

        check_results_dir(args.results, create=False)
        records, skipped = load_records(args.results)
        warn_skipped(skipped, "not costed")
        out = Path(args.out) if args.out else Path(args.results) / "report"
        if args.speed:
            from prunebench.report.cost import write_speed_report

            if args.threads is not None:
                import torch

                torch.set_num_threads(args.threads)
            text, written = write_speed_report(records, out, context=args.context, value_dtype=args.value_dtype,
                                               progress=not getattr(args, "quiet", False))
        else:
            text, written = write_cost_report(records, out, context=args.context, value_dtype=args.value_dtype)
        sys.stdout.write(text)
        print(f"wrote {', '.join(str(p) for p in written)}")
        return 0
    if args.masks:
        from prunebench.store.artifacts import load_masked_model

        loaded, meta = load_masked_model(args.masks)
        label = str(meta.get("sparsity_label") or meta.get("sparsity") or "")
        source = f"masks {args.masks}"
    else:
        from prunebench.modeling.models import check_model_spec, load_model

        if not Path(args.checkpoint).is_dir():
            raise UserError(f"checkpoint {args.checkpoint!r} is not a directory", hint="pass what prunebench export wrote")
        check_model_spec(args.checkpoint)
        loaded, label, source = load_model(args.checkpoint), "", f"checkpoint {args.checkpoint}"
    from prunebench.modeling.models import all_prunable, weight_matrix

    masks = {name: weight_matrix(m).detach() != 0 for name, m in all_prunable(loaded.model).items()}
    spec = costs.spec_of_label(label)
    linears = costs.linears_for_spec(masks, spec, value_bytes=value_bytes)
    total = costs.model_cost(linears, costs.model_shape(loaded.model), context=args.context, value_dtype=args.value_dtype)
    print(f"{source}: {len(linears)} linears, kept {total['kept_fraction']:.4f} of their weights")
    print(f"  linears {total['linear_bytes'] / 1e6:.1f} MB ({total['linear_ratio']:.3f}x dense), whole model "
          f"{total['model_bytes'] / 1e6:.1f} MB ({total['model_ratio']:.3f}x), values in {args.value_dtype}")
    print("  formats: " + ", ".join(f"{k} x{v}" for k, v in sorted(total["formats"].items())))
    print(f"  {total['flops_per_token'] / 1e9:.3f} GFLOP per token at context {args.context} "
          f"({total['flops_ratio']:.3f}x dense)")
    return 0


def cmd_export(args) -> int:
    from prunebench.store.artifacts import export_checkpoint
    from prunebench.run.validate import check_results_dir

    check_results_dir(args.results, create=False)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out!r} is a file, not a directory", hint="give a new or empty directory")
    try:
        out = export_checkpoint(args.results, args.out, key=args.key, model=args.model, method=args.method,
                                sparsity=args.sparsity)
    except OSError as exc:  # an unwritable place or a full disk (export_checkpoint leaves nothing half-written)
        raise UserError(f"cannot export to {args.out!r}: {exc.strerror or exc}"
                        + (f" ({exc.filename})" if exc.filename else ""),
                        hint="pick a writable --out on a disk with free space") from None
    print(f"wrote {out} (HF checkpoint, safetensors) and {out / 'sparsity_report.json'}")
    return 0


def cmd_eval(args) -> int:
    from prunebench.store.artifacts import load_masked_model, record_beside
    from prunebench.data.windows import eval_tokens
    from prunebench.evaluate.perplexity import perplexity

    from prunebench.data.windows import _check_data_dir, check_dataset_name
    from prunebench.run.validate import check_device

    if not Path(args.masks).is_file():
        raise UserError(f"masks file {args.masks!r} does not exist", hint="run with --save-masks first")
    # The windows the cell was scored on, unless the user names others: the same masks then give
    # the recorded figure.
    recorded = ((record_beside(args.masks) or {}).get("spec") or {}).get("eval") or {}
    windows_from = None
    if args.seqlen is None:
        args.seqlen = recorded.get("seqlen") or DEFAULT_EVAL_SEQLEN
        if args.max_windows is None:
            args.max_windows = recorded.get("max_ppl_windows")
        windows_from = "the record beside the masks file" if recorded.get("seqlen") else "the default"
    if args.seqlen < 2:
        raise UserError(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be 1 or more, got {args.batch_size}")
    if args.max_windows is not None and args.max_windows < 1:
        raise UserError(f"--max-windows must be 1 or more, got {args.max_windows}", hint="leave it out to score every window")
    datasets = _csv(args.ppl) or []
    if not datasets:
        raise UserError("--ppl names no dataset", hint="e.g. --ppl lee or --ppl path/to/text.txt")
    if args.data_dir:
        _check_data_dir(args.data_dir)
    for dataset in datasets:
        check_dataset_name(dataset, "a perplexity dataset")
    check_device(args.device)
    if args.model is not None:
        from prunebench.modeling.models import check_model_spec

        check_model_spec(args.model)
    loaded, meta = load_masked_model(args.masks, args.model, dtype=args.dtype)
    from prunebench.modeling.models import max_positions

    limit = max_positions(args.model or meta["model"])
    if windows_from == "the default" and limit is not None and args.seqlen > limit:
        args.seqlen, windows_from = limit, "the model's position limit"
    if windows_from and not args.json:
        log.info("windows of %d tokens%s (from %s; --seqlen / --max-windows choose others)", args.seqlen,
                 f", at most {args.max_windows}" if args.max_windows else "", windows_from)
    if limit is not None and args.seqlen > limit:
        raise UserError(f"--seqlen {args.seqlen} exceeds the model's position limit of {limit}", hint=f"use --seqlen {limit} or less")
    from prunebench.modeling.sequence_start import check_prefix_fits, sequence_start_ids

    start = sequence_start_ids(loaded.tokenizer)  # every window starts as the tokenizer starts a sequence
    check_prefix_fits(start, args.seqlen, "evaluation")
    loaded.model.to(args.device)
    streams = {dataset: eval_tokens(loaded.tokenizer, dataset, args.data_dir, encoding=args.encoding)
               for dataset in datasets}
    for dataset, ids in streams.items():  # an empty or short text is the user's to fix, before any scoring
        if ids.numel() < args.seqlen - len(start):
            raise UserError(f"--ppl {dataset}: the text has {ids.numel()} tokens, fewer than one window of "
                            f"{args.seqlen - len(start)}", hint="give a longer text or a smaller --seqlen")
    results = {}
    for dataset, ids in streams.items():
        results[dataset] = perplexity(loaded.model, ids, args.seqlen, batch_size=args.batch_size, device=args.device,
                                      progress=not args.quiet, max_windows=args.max_windows, prefix=start)
    if args.json:
        print(json.dumps({"masks": args.masks, "model": args.model or meta["model"], "perplexity": results}, indent=2))
    else:
        for dataset, r in results.items():
            value = "diverged" if r.get("value") is None else f"{r['value']:.4f}"
            print(f"{dataset}: perplexity {value} ({r['n_windows']} windows of {r['seqlen']})")
    return 0


def cmd_compare(args) -> int:
    from prunebench.store.records import load_records, records_frame, warn_skipped
    from prunebench.report.compare import compare_methods, render

    records, skipped = load_records(args.results)
    warn_skipped(skipped, "not compared")
    if not records:
        raise UserError(f"no records under {Path(args.results) / 'records'}", hint="pass --results DIR")
    rows = compare_methods(records_frame(records), args.a, args.b, model=args.model, sparsity=args.sparsity)
    sys.stdout.write(rows.to_csv(index=False, lineterminator="\n") if args.format == "csv" else render(rows))
    return 0


def cmd_reproduce(args) -> int:
    from prunebench.report.reproduce import ACC_ABS_TOL, PPL_REL_TOL, SD_MULTIPLE, Tolerance, reproduce

    tol = Tolerance(ppl_rel=PPL_REL_TOL if args.tolerance_ppl is None else args.tolerance_ppl,
                    acc_abs=ACC_ABS_TOL if args.tolerance_acc is None else args.tolerance_acc,
                    sd_multiple=SD_MULTIPLE if args.sd_multiple is None else args.sd_multiple)
    if tol.ppl_rel < 0 or tol.acc_abs < 0 or tol.sd_multiple < 0:
        raise UserError("tolerances must not be negative")
    return reproduce(args.fresh, args.reference, tolerance=tol, write_reference_report=args.write_reference_report,
                     require_identical_masks=args.require_identical_masks)


if __name__ == "__main__":
    sys.exit(main())
