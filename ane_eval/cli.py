"""The `ane-eval` command line.

    ane-eval run --model DIR --tasks a,b [...]   evaluate (upstream runner's options), resumable with --use-cache
    ane-eval inspect DIR [--json]                what is inside a model directory, with consistency verdicts
    ane-eval compare A B [--json]                two results; exit status 1 on a regression (for CI)
    ane-eval fidelity --model DIR --reference REF --text FILE [--json]
                                                 per-token divergence from the source checkpoint (exit 1 past a
                                                 --max-kld / --min-top1 threshold)

`demo` stands for the embedded demo model wherever a model directory is expected.
Bad input gives one line and exit status 2 (`--debug` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_inspect(args) -> int:
    from .card import format_card, model_card
    from .model import resolve_model

    card = model_card(resolve_model(args.model_dir))
    print(json.dumps(card, indent=2, default=str) if args.json else format_card(card))
    return 0 if card["consistency"]["ok"] else 1


def cmd_run(args) -> int:
    from . import gate, runner
    from .bundle import model_info
    from .distributed import Group
    from .harness import ANELM
    from .model import load_model, resolve_model
    from .report import ReportData, write_report

    group = Group(timeout=args.dist_timeout)  # under torchrun: join the run's process group (quiets ranks > 0)
    tm = runner.task_manager(args.include_path)
    tasks = runner.resolve_tasks(tm, args.tasks)
    model = load_model(resolve_model(args.model), backend=args.backend, precision=args.precision,
                       compute_units=args.compute_units)
    if group.rank == 0:
        print(f"ane-eval: {model!r}" + (f" ({group.world_size} processes)" if group.world_size > 1 else ""),
              file=sys.stderr)
    info = model_info(model.bundle)
    lm = ANELM(model=model, seed=args.seed, batch_size=args.batch_size, group=group)
    out = Path(args.output_dir)
    if args.use_cache:
        Path(args.use_cache).parent.mkdir(parents=True, exist_ok=True)
    limit = int(args.limit) if args.limit is not None and float(args.limit).is_integer() else args.limit
    results = runner.evaluate(lm, tasks, tm, num_fewshot=args.num_shots, limit=limit,
                              apply_chat_template=args.apply_chat_template, max_gen_toks=args.max_tokens,
                              seed=args.seed, use_cache=args.use_cache, output_dir=out,
                              write_samples=args.log_samples, model_name=info["name"])
    if results is None:  # a rank other than 0: lm-eval gathered its share on rank 0, which writes everything
        return 0
    samples = results.get("samples") or {}
    records = {t: gate.task_record(results, t, limit=limit, model=info, samples=samples.get(t))
               for t in results.get("configs", {})}
    rows = [row for t, rec in records.items() for row in gate.evaluate_gate(t, rec)]
    _, images = write_report(out, ReportData(rows, records, info, model.backend))
    gate.write_summary(out / "summary.md", rows, info, model.backend, images)
    gate.write_baseline(out / "baseline.json", records, info)
    from lm_eval.utils import make_table
    print(make_table(results))
    print(f"ane-eval: results in {out} (lm-eval results JSON{', samples JSONL' if args.log_samples else ''}, "
          "summary.md, report.html, baseline.json)", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    from . import gate

    before, _ = gate.load_records(args.a)
    now, _ = gate.load_records(args.b)
    rows = gate.compare(before, now, tolerance=args.tolerance, z=args.z, relative_tolerance=args.relative_tolerance)
    regressed = any(r.failed for r in rows)
    if args.json:
        print(json.dumps({"regression": regressed, "rows": [r.__dict__ for r in rows]}, indent=2))
    else:
        print(gate.format_table(rows))
        print(f"\n{'REGRESSION' if regressed else 'no regression'}: B ({args.b}) against A ({args.a})")
    return 1 if regressed else 0


def cmd_fidelity(args) -> int:
    from . import fidelity
    from .model import load_model, resolve_model

    reference = fidelity.load_reference(args.reference, device=args.device)
    if args.save_reference and reference.stored:
        raise fidelity.FidelityError(f"--save-reference needs a checkpoint reference; {args.reference} is already "
                                     "a stored reference")
    texts = [fidelity.read_text(f) for f in args.text]
    thresholds = {}
    if args.max_kld is not None:
        thresholds["mean_kld"] = {"max": args.max_kld}
    if args.min_top1 is not None:
        thresholds["top1_agreement"] = {"min": args.min_top1}
    model = load_model(resolve_model(args.model), backend=args.backend, precision=args.precision,
                       compute_units=args.compute_units)
    plan = fidelity.plan(model, reference, texts, args.max_tokens)
    print(f"ane-eval: {plan.describe()}", file=sys.stderr)
    report = fidelity.run(plan, save=args.save_reference, top_k=args.top_k)
    rows = fidelity.check(report, thresholds)
    failed = [r.metric for r in rows if r.failed]
    doc = {**fidelity.json_report(report), "thresholds": thresholds, "failed": failed}
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fidelity.json").write_text(json.dumps(doc, indent=2) + "\n")
        import numpy as np
        np.savez_compressed(out / "fidelity_positions.npz", **report["positions"])
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(fidelity.format_report(report))
        if rows:
            from .gate import format_table
            print("\n" + format_table(rows))
    if args.save_reference:
        print(f"ane-eval: reference written to {args.save_reference}", file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ane-eval", description="Evaluate and regression-gate LLMs converted for "
                                     "the Apple Neural Engine (ANEMLL layout), with CoreML or the portable runtime.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("inspect", help="show a model directory's parts, interfaces, metadata and consistency")
    p.add_argument("model_dir", help="ANEMLL model directory, or 'demo' for the embedded demo model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("run", help="evaluate a model on lm-eval tasks (the upstream runner's options)")
    p.add_argument("--model", required=True, help="ANEMLL model directory, or 'demo'")
    p.add_argument("--tasks", required=True, nargs="+", help="task names, comma- or space-separated")
    p.add_argument("--num-shots", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--batch-size", default="1", help="accepted for compatibility; requests run serially")
    p.add_argument("--output-dir", default="results", help="where results, samples, summary, baseline go")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    p.add_argument("--max-tokens", type=int, default=None, help="max tokens to generate (generation tasks)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--apply-chat-template", action="store_true", help="use the model's chat template")
    p.add_argument("--backend", default="auto", choices=["auto", "coreml", "mil"])
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32"], help="portable runtime numerics")
    p.add_argument("--compute-units", default="CPU_AND_NE", help="CoreML compute units")
    p.add_argument("--use-cache", default=None, metavar="PATH",
                   help="sqlite cache of finished requests: a killed run started again resumes")
    p.add_argument("--log-samples", action="store_true", help="write per-document samples JSONL")
    p.add_argument("--include-path", action="append", default=[], help="directory of task YAMLs (repeatable)")
    p.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="under torchrun: timeout of every collective (default 3600 or $ANE_EVAL_DIST_TIMEOUT)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="compare two results (files or output directories); exit 1 on regression")
    p.add_argument("a", help="the reference run (baseline.json, lm-eval results_*.json, or an output directory)")
    p.add_argument("b", help="the run to check")
    p.add_argument("--tolerance", type=float, default=0.01, help="smallest fall that counts (absolute)")
    p.add_argument("--z", type=float, default=1.96, help="multiplier of the combined standard error")
    p.add_argument("--relative-tolerance", type=float, default=0.01,
                   help="smallest rise of a perplexity-type metric that counts (relative; default 0.01 = 1%%)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("fidelity", help="per-token divergence (KLD, top-1, PPL ratio, Δp) from the source "
                                        "checkpoint; cost: one infer per scored token")
    p.add_argument("--model", required=True, help="ANEMLL model directory, or 'demo'")
    p.add_argument("--reference", required=True, metavar="REF",
                   help="the source Hugging Face checkpoint directory, or a file written with --save-reference")
    p.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="UTF-8 text to score, one document per file (repeatable; a stored reference holds its own)")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most N tokens (N infer calls)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--output-dir", default=None, help="write fidelity.json and per-position fidelity_positions.npz")
    p.add_argument("--save-reference", default=None, metavar="FILE",
                   help="also write the checkpoint's top-k log-probabilities per position (for runs without it)")
    p.add_argument("--top-k", type=int, default=64, help="tokens per position kept by --save-reference (default 64)")
    p.add_argument("--max-kld", type=float, default=None, help="exit 1 if the mean KLD exceeds this")
    p.add_argument("--min-top1", type=float, default=None, help="exit 1 if the top-1 agreement is below this")
    p.add_argument("--device", default=None, help="torch device of the checkpoint (default: mps on a Mac, else cpu)")
    p.add_argument("--backend", default="auto", choices=["auto", "coreml", "mil"])
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32"], help="portable runtime numerics")
    p.add_argument("--compute-units", default="CPU_AND_NE", help="CoreML compute units")
    p.set_defaults(func=cmd_fidelity)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("ane-eval: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, NotImplementedError) as e:
        if args.debug:
            raise
        message = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        print(f"ane-eval: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
