"""Command line: `python -m smartkv generate ...` for one-off use, `python -m smartkv bench` for decode speed.

Bad input (unknown method, bad budget or bit width, missing file or model folder) prints one
line on stderr and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from smartkv.methods.registry import ConfigError

EXIT_USAGE = 2


class UsageError(Exception):
    pass


def _method_params(args) -> dict:
    """Turn --budget/--bits/--param into the method's config params (validated by the registry)."""
    params: dict = {}
    if args.budget is not None:
        params["budget"] = args.budget
    if args.bits is not None:
        key = "nbits" if args.method.startswith("hf_") else "bits"
        params[key] = args.bits
    for item in args.param or []:
        if "=" not in item:
            raise UsageError(f"--param {item!r} must look like key=value")
        key, value = item.split("=", 1)
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
        if isinstance(params[key], list):
            params[key] = tuple(params[key])
    return params


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="default (embedded SmolLM2-135M-Instruct), gemma3-270m (embedded Gemma-3-270M), "
                        "a local model folder or a Hugging Face id")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _load_model(name: str, dtype: str):
    """`load_model`, with a model that cannot be found or read turned into one line (exit 2)."""
    from smartkv.models import load_model

    try:
        return load_model(name, dtype=dtype)
    except FileNotFoundError:
        raise
    except OSError as err:  # transformers: not a model folder, or a hub id it cannot reach offline
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--model {name!r} cannot be loaded: {first}") from None


def _evicted_tokens(report: dict) -> float:
    """Tokens held at 0 bits, averaged over layers: values at 0 bits over the values one token holds
    in all layers (every token holds the same number of values per layer, evicted or not)."""
    hist = report.get("bits_histogram", {})
    values, seq_len = sum(hist.values()), report.get("seq_len", 0)
    return round(hist.get(0, 0) * seq_len / values, 2) if values and seq_len else 0.0


def cmd_generate(args) -> int:
    from smartkv.methods import make_config

    params = _method_params(args)
    config = make_config(args.method, **params)  # validate before loading anything
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UsageError(f"--prompt-file {str(path)!r} does not exist or is not a file")
        prompt = path.read_text()
    else:
        prompt = args.prompt
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} must be >= 1")

    import torch

    from smartkv.methods.budget_check import check_budget_reachable
    from smartkv.methods.registry import build_cache, config_dict
    from smartkv.last_query import attend_last_query
    from smartkv.runner import RunSpec, decode, encode, fork, memory_of, prefill

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = _load_model(args.model, args.dtype)
    build_cache(args.method, model.config, **params)  # a method this model cannot run fails before prefill
    ids, mask = encode(tok, [prompt], device=model.device)
    # The cache ends holding prompt + new tokens - 1 (the last token is never fed back).
    check_budget_reachable(args.method, params, model.config, ids.shape[1] + args.max_new_tokens - 1, model.dtype)
    # the fork ranks from every prompt query, as `model.generate` with this cache would
    pre = attend_last_query(model, prefill(model, ids, mask))
    cache, _ = fork(pre, RunSpec(args.method, args.method, params), model)
    new, seconds = decode(model, pre, cache, args.max_new_tokens, do_sample=args.sample, seed=args.seed)
    text = tok.decode(new[0], skip_special_tokens=True)
    mem = memory_of(cache)
    report = cache.memory_report() if hasattr(cache, "memory_report") else {}
    out = {
        "text": text,
        "method": args.method,
        "config": config_dict(config),
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": int(new.shape[1]),
        "kv_bytes": int(mem["kv_bytes"]),
        "fp16_kv_bytes": int(mem["fp16_kv_bytes"]),
        "kv_ratio": float(mem["ratio"]),
        "mean_bits": float(mem["mean_bits"]),
        # False while the context is too short for the budget (the cache holds its floor), or when
        # generation stopped before the first decode step; budget_holds_from: tokens from which it holds
        "budget_met": bool(report.get("budget_met", True)),
        "budget_holds_from": report.get("budget_holds_from", 0),
        "budget_note": report.get("budget_note", ""),
        # what the policy did: re-allocations run, values held at each width (0 = evicted), and the
        # evicted tokens, averaged over layers (a layer evicts its own tokens)
        "reallocations": int(report.get("reallocations", 0)),
        "bits_histogram": {int(b): int(n) for b, n in report.get("bits_histogram", {}).items()},
        "evicted_tokens": _evicted_tokens(report),
        "prefill_s": pre.seconds,
        "decode_s": seconds,
    }
    if args.json:
        print(json.dumps(out, default=list))
    else:
        print(text)
        print(
            f"[{args.method}] KV cache: {out['kv_bytes'] / 2**20:.2f} MiB held vs {out['fp16_kv_bytes'] / 2**20:.2f} MiB "
            f"in FP16 (ratio {out['kv_ratio']:.4f}, {out['mean_bits']:.2f} bits/value) for "
            f"{out['prompt_tokens'] + out['new_tokens'] - 1} tokens",
            file=sys.stderr,
        )
        if not out["budget_met"]:
            print(f"[{args.method}] budget {config_dict(config).get('budget')} NOT met: {out['budget_note']}",
                  file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from smartkv.bench import DEFAULT_RUNS, parse_runs, run_bench

    try:
        runs = parse_runs(args.run) if args.run else DEFAULT_RUNS
    except ValueError as err:
        raise UsageError(str(err)) from None
    for r in runs:
        r.config()  # validate first
    for c in args.context:
        if c < 16:
            raise UsageError(f"--context {c} must be >= 16 tokens")
    if args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats} must be >= 1 (3 or more for a spread)")
    if args.new_tokens < 2:
        raise UsageError(f"--new-tokens {args.new_tokens} must be >= 2 (a first step and at least one steady step)")
    from smartkv.models import resolve_model_path

    resolve_model_path(args.model)  # a missing model folder is one line, before any work
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise UsageError(f"--device {args.device!r} must be cpu, cuda or cuda:N")
    if args.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: torch sees no CUDA device (torch {torch.__version__})")
    result = run_bench(args.model, args.dtype, runs, args.context, args.new_tokens, args.repeats, args.threads,
                       profile=not args.no_phases, device=args.device)
    text = json.dumps(result, indent=2, default=list)
    if args.out:
        from smartkv.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    print(text if args.json else result["table"])
    return 0


def cmd_demo(args) -> int:
    from smartkv.methods import make_config

    if args.length < 64:
        raise UsageError(f"--length {args.length} must be >= 64 tokens")
    if not 0.0 <= args.depth <= 1.0:
        raise UsageError(f"--depth {args.depth} must lie in [0, 1]")
    make_config("smartkv", budget=args.budget)  # a bad budget fails here, before the model loads

    import torch

    from smartkv.demo import render, run_demo
    from smartkv.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype)
    result = run_demo(model, tok, length=args.length, depth=args.depth, seed=args.seed, budget=args.budget)
    if args.json:
        print(json.dumps({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in result.items()}))
    else:
        print(render(result, args.budget))
    return 0


class OneLineParser(argparse.ArgumentParser):
    """Bad input is one line on stderr and exit 2 (argparse would print its usage block first)."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m smartkv", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate with one KV method and report its measured memory")
    g.add_argument("--method", required=True, help="registered method: fp16, uniform, kivi, smartkv, hf_quanto, hf_hqq")
    g.add_argument("--budget", type=float, default=None, help="smartkv: fraction of FP16 KV bytes, in (0, 1]")
    g.add_argument("--bits", type=int, default=None, help="uniform/kivi/hf_*: bit width")
    g.add_argument("--param", action="append", help="any other config field, key=value (JSON value), repeatable")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    _add_model_args(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="decode tokens/s of each method against context length, relative to fp16, one process")
    b.add_argument("--context", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                   help="prompt lengths in tokens (default: 1024 2048 4096 8192)")
    b.add_argument("--new-tokens", type=int, default=33,
                   help="timed tokens per run (>= 2): the first step, with the cache's one-off compression, then steady steps")
    b.add_argument("--repeats", type=int, default=3, help="timed round-robin repeats per method (median and spread reported)")
    b.add_argument("--run", action="append", help="LABEL=METHOD[:key=value,...], repeatable (default: the standard set)")
    b.add_argument("--no-phases", action="store_true",
                   help="skip the extra timed-phase decode of each smartkv run (tracking / re-allocation shares)")
    b.add_argument("--device", default="cpu",
                   help="cpu (C++ kernels) or cuda / cuda:N (Triton kernel for SmartKV's decode attention)")
    b.add_argument("--out", default=None, help="also write the JSON result here")
    b.add_argument("--json", action="store_true")
    _add_model_args(b)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="one passkey prompt: FP16 vs SmartKV answers, bytes and the bits map")
    d.add_argument("--length", type=int, default=1024, help="prompt tokens (repeated-filler passkey)")
    d.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1]")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--budget", type=float, default=0.25, help="SmartKV budget, fraction of FP16 KV bytes")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    _add_model_args(d)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as err:  # e.g. a budget below what the context allows
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
