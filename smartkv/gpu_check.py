"""The GPU check: SmartKV's Triton decode-attention kernel tested and timed on a CUDA machine.

    python -m smartkv.gpu_check --out DIR [--model default] [--contexts 8192 16384 32768]

Three parts, each recorded in DIR/gpu_check.json and DIR/gpu_check.md (written after every part,
so a run cut short keeps what it measured):
1. `tests`: tests/test_triton_attention.py compiled on CUDA tensors (SMARTKV_TEST_DEVICE=cuda, no
   interpreter): the kernel against `reference_decode_attention`.
2. `kernel`: one layer's decode attention alone at each context, for SmolLM2-135M's and
   Llama-3-8B's head geometry over a mixed 2/3/4/8-bit history: the Triton kernel, the PyTorch
   reference (de-quantize + SDPA + softmax) and FP16 SDPA over a full-precision cache of the same
   length (CUDA events, median of 50 after a warm-up), and the kernel's largest error against the
   reference at that size.
3. `model`: `python -m smartkv bench --device cuda` for fp16, INT4, KIVI-2 and SmartKV at 0.25 at
   each context, in one process, plus how many decode-attention calls the Triton kernel served.
   `--model` is an embedded name, a model folder or a hub id; a folder with a config and a
   tokenizer but no weights gets random weights (seed 0): decode speed does not depend on them.

Exits 2 with one line when torch sees no CUDA device or triton does not import, and 1 when a
part failed (its error is in the files). See scripts/gpu_check.sh for the device machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
GEOMETRIES = {"smollm2-135m": (9, 3, 64), "llama-3-8b": (32, 8, 128)}  # query heads, KV heads, head_dim
BENCH_RUNS = ["fp16=fp16", "int4=uniform:bits=4", "kivi-2=kivi:bits=2", "smartkv-b0.25=smartkv:budget=0.25"]


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run_tests() -> dict:
    path = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = dict(os.environ, SMARTKV_TEST_DEVICE="cuda", PYTHONPATH=path)
    env.pop("TRITON_INTERPRET", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "test_triton_attention.py")],
                          cwd=REPO, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "seconds": time.perf_counter() - start,
            "summary": tail[-1] if tail else "", "tail": tail}


def synthetic_history(hkv: int, d: int, t: int, device, sinks: int = 4, window: int = 32, seed: int = 0):
    """A layer's history of `t` tokens: sinks and window in fp16, the rest in layer-granularity units at
    2/3/4/8 bits (drawn per unit), key smoothing on, group 32: how a SmartKV layer looks mid-decode."""
    from smartkv.packed_attention import PackedHistory
    from smartkv.quantize import quantize_rows

    gen = torch.Generator(device=device).manual_seed(seed)
    n = t - sinks - window
    k = torch.randn(1, hkv, t, d, generator=gen, device=device)
    v = torch.randn(1, hkv, t, d, generator=gen, device=device)
    kq, vq = k[:, :, sinks:sinks + n], v[:, :, sinks:sinks + n]
    hi, lo = kq.amax(dim=-2, keepdim=True), kq.amin(dim=-2, keepdim=True)
    shift, scale = ((hi + lo) / 2).half(), ((hi - lo) / 2).clamp_min(1e-4).half()
    units = torch.stack([(kq - shift.float()) / scale.float(), vq]).permute(3, 1, 0, 2, 4).reshape(n, 2 * hkv * d)
    which = torch.randint(0, 4, (n,), generator=gen, device=device)
    levels = []
    for lvl, bits in enumerate((2, 3, 4, 8)):
        ids = torch.nonzero(which == lvl).flatten()
        levels.append((quantize_rows(units[ids], bits, 32), ids.to(torch.int32)))
    half = torch.float16
    return PackedHistory(k[:, :, :sinks].to(half), v[:, :, :sinks].to(half), levels, n, 2 * hkv * d, False,
                         k[:, :, sinks + n:].to(half), v[:, :, sinks + n:].to(half), shift, scale), k.half(), v.half()


def _cuda_ms(fn, repeats: int = 50) -> dict:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def kernel_bench(contexts: list[int]) -> list[dict]:
    from smartkv.packed_attention import reference_decode_attention
    from smartkv.triton_kernels.packed_attention import triton_decode_attention

    device = torch.device("cuda")
    rows = []
    for name, (hq, hkv, d) in GEOMETRIES.items():
        for t in contexts:
            history, k, v = synthetic_history(hkv, d, t, device)
            query = torch.randn(1, hq, 1, d, device=device)
            scaling = d**-0.5
            out, probs = triton_decode_attention(query, history, scaling)
            ref_out, ref_probs = reference_decode_attention(query, history, scaling)
            q16, g = query.half(), hq // hkv
            k16, v16 = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            rows.append({
                "geometry": name, "heads": [hq, hkv, d], "context": t,
                "max_abs_err_out": float((out - ref_out).abs().max()),
                "max_abs_err_probs": float((probs - ref_probs).abs().max()),
                "triton": _cuda_ms(lambda: triton_decode_attention(query, history, scaling)),
                "reference": _cuda_ms(lambda: reference_decode_attention(query, history, scaling)),
                "fp16_sdpa": _cuda_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q16, k16, v16,
                                                                                               scale=scaling)),
            })
            print(f"[gpu_check] kernel {name} {t}: triton {rows[-1]['triton']['median_ms']:.3f} ms, reference "
                  f"{rows[-1]['reference']['median_ms']:.3f} ms, fp16 sdpa {rows[-1]['fp16_sdpa']['median_ms']:.3f} ms",
                  file=sys.stderr, flush=True)
    return rows


def bench_model_path(model: str, dtype: str) -> tuple[str, str]:
    """(what to load, which weights): a folder without weights gets random ones, saved to a temp folder."""
    from smartkv.models import resolve_model_path

    path = Path(resolve_model_path(model))
    if not path.is_dir() or any(path.glob("*.safetensors")) or any(path.glob("*.bin")):
        return str(path), "trained"
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(path))
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    target = Path(tempfile.mkdtemp(prefix="smartkv-random-model-"))
    net.save_pretrained(str(target))
    AutoTokenizer.from_pretrained(str(path)).save_pretrained(str(target))
    return str(target), "random (seed 0)"


def model_bench(model: str, dtype: str, contexts: list[int], new_tokens: int, repeats: int) -> dict:
    import smartkv.triton_kernels.packed_attention as gpu
    from smartkv.bench import parse_runs, run_bench

    path, weights = bench_model_path(model, dtype)
    calls = {"n": 0}
    real = gpu.triton_decode_attention

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    gpu.triton_decode_attention = counted
    try:
        result = run_bench(path, dtype, parse_runs(BENCH_RUNS), contexts, new_tokens, repeats, profile=False,
                           device="cuda")
    finally:
        gpu.triton_decode_attention = real
    result.update({"model": model, "weights": weights, "triton_calls": calls["n"]})
    return result


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report.get('gpu')}", "", f"torch {report.get('torch')}, triton {report.get('triton')}, "
             f"created {report.get('created')}", ""]
    tests = report.get("tests")
    if tests:
        lines += [f"## Kernel tests on CUDA: {'passed' if tests['ok'] else 'FAILED'}", "", f"`{tests['summary']}`", ""]
    if report.get("kernel"):
        lines += ["## One layer's decode attention (ms, median of 50)", "",
                  "| geometry | context | Triton | reference | FP16 SDPA | Triton / FP16 | max err out "
                  "| max err probs |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in report["kernel"]:
            tri, ref, fp = r["triton"]["median_ms"], r["reference"]["median_ms"], r["fp16_sdpa"]["median_ms"]
            lines.append(f"| {r['geometry']} | {r['context']} | {tri:.3f} | {ref:.3f} | {fp:.3f} | {tri / fp:.2f} | "
                         f"{r['max_abs_err_out']:.2e} | {r['max_abs_err_probs']:.2e} |")
        lines.append("")
    model = report.get("model")
    if model and "table" in model:
        lines += [f"## Decode tokens/s ({model['model']}, weights {model['weights']}, attention path "
                  f"{model['kernels']}, Triton calls {model['triton_calls']})", "", "```", model["table"], "```", ""]
    for part, err in report.get("errors", {}).items():
        lines += [f"## {part}: FAILED", "", "```", err.strip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smartkv.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--model", default="default", help="embedded name, model folder (no weights: random ones) or hub id")
    p.add_argument("--dtype", default="float16", help="model dtype for the decode bench (float16 | bfloat16 | float32)")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--new-tokens", type=int, default=33, help="timed tokens per run: a first step, then steady steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", nargs="+", default=["tests", "kernel", "model"], choices=["tests", "kernel", "model"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        return _fail(f"torch {torch.__version__} sees no CUDA device: the GPU check needs one (nothing was run)")
    try:
        import triton
    except Exception as exc:
        return _fail(f"triton does not import ({type(exc).__name__}: {exc}); pip install 'smartkv[gpu]'")
    if os.environ.get("SMARTKV_NO_KERNEL", "") not in ("", "0"):
        return _fail("SMARTKV_NO_KERNEL is set: the GPU check times the Triton kernel; unset it")
    from smartkv.io import atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
              "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "args": vars(args), "errors": {}}

    def save() -> None:
        atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=2, default=str) + "\n")
        atomic_write_text(out / "gpu_check.md", markdown(report) + "\n")

    parts = {
        "tests": run_tests,
        "kernel": lambda: kernel_bench(args.contexts),
        "model": lambda: model_bench(args.model, args.dtype, args.contexts, args.new_tokens, args.repeats),
    }
    for name in args.parts:
        start = time.perf_counter()
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        try:
            report[name] = parts[name]()
            if name == "tests" and not report[name]["ok"]:
                report["errors"][name] = "\n".join(report[name]["tail"])
        except Exception:
            report["errors"][name] = traceback.format_exc()
        print(f"[gpu_check] {name}: {time.perf_counter() - start:.0f} s"
              f"{' FAILED' if name in report['errors'] else ''}", file=sys.stderr, flush=True)
        save()
    print(markdown(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
