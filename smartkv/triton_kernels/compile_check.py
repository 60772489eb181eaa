"""Compile the Triton kernels to GPU code without a GPU: `python -m smartkv.triton_kernels.compile_check`.

Triton's interpreter (what the CPU tests run) executes the kernel source with numpy and accepts
code that the compiler refuses; this runs the real compiler (front end, MLIR passes, PTX, and the
wheel's own ptxas) for an NVIDIA target, so such errors show on a machine without a GPU too. It
needs TRITON_INTERPRET unset (the test runs it in a subprocess). Prints one line per kernel.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_POINTERS = {
    "_unit_map_kernel": {"table_ptr": "*i64", "map_ptr": "*i32"},
    "_attend_split_kernel": {
        "q_ptr": "*fp32", "sink_k": "*fp16", "sink_v": "*fp16", "win_k": "*bf16", "win_v": "*bf16",
        "shift_ptr": "*fp32", "kscale_ptr": "*fp32", "allowed_ptr": "*u8", "map_ptr": "*i32", "table_ptr": "*i64",
        "scores_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "scaling": "fp32",
    },
    "_combine_kernel": {"scores_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32",
                        "out_ptr": "*fp32"},
}
# Llama-3-8B's decode shape (4 query heads per KV head, head_dim 128), every switch on
_CONSTANTS = {
    "_unit_map_kernel": {"COLS": 18, "BLOCK": 256},
    "_attend_split_kernel": {"HEAD_MAJOR": False, "HAS_SMOOTH": True, "HAS_ALLOWED": True, "DP": 128, "GQ": 4,
                             "BLOCK_T": 16, "COLS": 18},
    "_combine_kernel": {"SP": 64, "DP": 128, "BLOCK_R": 1024},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smartkv.triton_kernels.compile_check",
                                description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability as a number (90: Hopper, 80: Ampere)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        print("error: TRITON_INTERPRET is set; the compiler check needs it unset", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import smartkv.triton_kernels.packed_attention as kernels

    target = GPUTarget("cuda", args.arch, 32)
    for name, constants in _CONSTANTS.items():
        fn = getattr(kernels, name)
        signature = {a: "constexpr" if a in constants else _POINTERS[name].get(a, "i32") for a in fn.arg_names}
        start = time.perf_counter()
        compiled = triton.compile(ASTSource(fn, signature, constants), target=target)
        print(f"{name}: sm_{args.arch} cubin {len(compiled.asm['cubin'])} bytes in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
