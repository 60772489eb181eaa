"""The packed decode kernel's outputs over many synthetic histories, or a comparison of two such
files: evidence that a change to smartkv/csrc leaves every output bit as it was.

    python docs/probes/neutrality/kernel_outputs.py write OUT.pt       # with the kernel at hand
    python docs/probes/neutrality/kernel_outputs.py compare A.pt B.pt  # exit 1 on any difference

`write` runs `packed_decode_attention` on 2,017 histories laid out by tests/test_packed_attention.py's
`make_history`: the five head geometries of that file, layer- and head-major units, K and V apart or
together, bit sets (2, 3, 4, 8), (4,), (1, 5), (6, 7) and (2,), symmetric and asymmetric rows, key
smoothing on and off, groups of 8, 16 and 32 (and one of 64 = head_dim), batches of one and of two
with a left-padding mask, and every third unit of one level evicted in a third of them. Queries come
from seeded generators, so two runs of the same kernel write identical files. Build the old kernel
by checking out the old smartkv/csrc (builds are cached by source content, smartkv/kernels.py).
`check_rows.py` beside it does the same for a slice of the study's stages.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))


def write(out: str) -> None:
    from test_packed_attention import GEOMETRIES, make_history

    from smartkv.packed_attention import packed_decode_attention

    torch.set_num_threads(2)
    results, seed = [], 0
    grid = itertools.product(GEOMETRIES, [False, True], [False, True], [(2, 3, 4, 8), (4,), (1, 5), (6, 7), (2,)],
                             [False, True], [False, True], [8, 16, 32])
    for (hq, hkv, d), head_major, kv_split, bits, symmetric, smoothing, group in grid:
        if d % group or (symmetric and 1 in bits):
            continue
        seed += 1
        for b in (1, 2):
            h = make_history(b, hkv, d, 3, 300 + seed % 7, 5, head_major=head_major, kv_split=kv_split, bit_set=bits,
                             group=group, symmetric=symmetric, smoothing=smoothing, seed=seed)
            q = torch.randn(b, hq, 1, d, generator=torch.Generator().manual_seed(seed)) * 2
            allowed = None
            if b == 2:
                allowed = torch.ones(2, h.length, dtype=torch.bool)
                allowed[1, : seed % 40 + 1] = False
            if len(h.levels) > 1 and seed % 3 == 0:
                rows, index = h.levels[0]
                keep = torch.arange(rows.n_rows) % 3 != 0
                h.levels[0] = (rows.select(keep), index[keep].contiguous())
                h.evicts = True
            results.append(packed_decode_attention(q, h, 0.125, allowed))
    h = make_history(1, 3, 64, 4, 700, 9, group=64, seed=99)
    q = torch.randn(1, 9, 1, 64, generator=torch.Generator().manual_seed(5))
    results.append(packed_decode_attention(q, h, 0.125))
    torch.save([tuple(t.clone() for t in r) for r in results], out)
    print(f"wrote {len(results)} outputs to {out}")


def compare(a: str, b: str) -> int:
    x, y = torch.load(a), torch.load(b)
    differ = [i for i, (u, v) in enumerate(zip(x, y)) if not all(torch.equal(s, t) for s, t in zip(u, v))]
    same = not differ and len(x) == len(y)
    print(f"{len(x)} vs {len(y)} outputs; " + ("bit-identical" if same else f"differing: {differ[:20]}"))
    return 0 if same else 1


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2])
    else:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
