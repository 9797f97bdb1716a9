#!/usr/bin/env python
"""Run one weight-kernel op a few times on CUDA, for a profiler to look at (ncu, nsys).

    ncu --kernel-name regex:ternary --launch-skip 3 --launch-count 2 --set detailed \\
        python benchmarks/profile_linear.py --op w2a8 --n 3840 --k 2560 --m 1

``scripts/gpu_check_all.sh profile`` runs it for the 2B4T q/k/v and gate_up shapes at M = 1 under
ncu (the dp4a, ternary and quantize kernels after a warm-up, with the SpeedOfLight, LaunchStats,
Occupancy and WarpStateStats sections): the data for finding the latency floor of the decode
kernels (docs/kernels.md).
"""

from __future__ import annotations

import argparse

import torch

from bitserve.cli_args import positive_int


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", default="w2a8", choices=("w2a8", "w2a16"))
    ap.add_argument("--n", type=positive_int, default=3840)
    ap.add_argument("--k", type=positive_int, default=2560)
    ap.add_argument("--m", type=positive_int, default=1)
    ap.add_argument("--calls", type=positive_int, default=5)
    args = ap.parse_args(argv)
    if args.k % 4:
        ap.error(f"--k {args.k}: the packed ternary layout needs a multiple of 4")
    if not torch.cuda.is_available():
        print("profile_linear needs a CUDA device")
        return 2
    from bitserve.kernels import ops
    from bitserve.kernels.packing import pack_ternary

    gen = torch.Generator(device="cuda").manual_seed(0)
    packed = pack_ternary(torch.randint(-1, 2, (args.n, args.k), device="cuda", dtype=torch.int8, generator=gen))
    scale = torch.rand(args.n, device="cuda", generator=gen) + 0.5
    x = torch.randn(args.m, args.k, device="cuda", generator=gen).bfloat16()
    op = ops.ternary_w2a8 if args.op == "w2a8" else ops.ternary_w2a16
    for _ in range(args.calls):
        op(x, packed, scale, None)
    torch.cuda.synchronize()
    print(f"{args.op} N={args.n} K={args.k} M={args.m}: {args.calls} calls done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
