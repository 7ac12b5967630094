"""Host time of eager op calls: the public function (eager fast path) against the same op through the dispatcher.

    python benchmarks/host.py                 # decode shape on the GPU, table + JSON
    python benchmarks/host.py --shape tiny    # any shape of bench.py; on CPU too

At small batches an eager call costs more host time than its kernels take on the GPU, so this is what a Python
caller waits for. The calls are issued back to back without a sync, so each time is the host's (the GPU keeps up);
the median of 7 rounds. Compare within a run: host times move by 2x between runs on shared machines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench import SHAPES, run_meta  # noqa: E402

from moe_inductor import ops  # noqa: E402
from moe_inductor.ops._registry import OPS  # noqa: E402


def host_us(fn, device, calls=200, rounds=7) -> float:
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(20):
        fn()
    times = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    sync()
    return statistics.median(times)


def cases(T, E, K, H, device):
    """name: (public call, the same op through the dispatcher)."""
    gen = torch.Generator(device=device).manual_seed(0)
    probs, idx = torch.randn(T, E, device=device, generator=gen).softmax(-1).topk(K, dim=-1)
    x = torch.randn(T, H, device=device, generator=gen).bfloat16()
    routing_map, probs_map = ops.indices_to_multihot(idx, probs, E)
    permuted, _, token_of_row = ops.permute(x, routing_map, probs_map, num_out_tokens=T * K)
    x_grad, permuted_grad = x.clone().requires_grad_(), permuted.clone().requires_grad_()
    idx32 = idx.int()

    def permute_pair(x):
        return (
            lambda: ops.permute(x, routing_map, probs_map, num_out_tokens=T * K),
            lambda: OPS["permute"](x, routing_map, probs_map, T * K, False),
        )

    def unpermute_pair(y):
        return (
            lambda: ops.unpermute(y, token_of_row, x.shape, probs=probs_map, routing_map=routing_map),
            lambda: OPS["unpermute"](y, token_of_row, list(x.shape), probs_map, routing_map, False),
        )

    return {
        "indices_to_multihot": (
            lambda: ops.indices_to_multihot(idx, probs, E),
            lambda: OPS["indices_to_multihot"](idx, probs, E),
        ),
        "permute": permute_pair(x),
        "permute (grad)": permute_pair(x_grad),
        "unpermute": unpermute_pair(permuted),
        "unpermute (grad)": unpermute_pair(permuted_grad),
        "init_routing int8": (
            lambda: ops.moe_init_routing_v2(x, idx32, active_num=T * K, expert_num=E, quant_mode=1),
            lambda: OPS["moe_init_routing_v2"](x, idx32, None, None, T * K, -1, E, 0, 0, False, 1, [], 0),
        ),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="decode", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    T, E, K, H = SHAPES[args.shape]
    meta = {**run_meta(args.device), "shape": args.shape, "T": T, "E": E, "K": K, "H": H}
    rows = []
    for name, (public, dispatcher) in cases(T, E, K, H, args.device).items():
        through_op, fast = host_us(dispatcher, args.device), host_us(public, args.device)
        rows.append({"op": name, "dispatcher_us": through_op, "fast_us": fast})
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"host-{meta['gpu'].lower().replace(' ', '-')}.json")
    with open(path, "w") as f:
        json.dump({**meta, "results": rows}, f, indent=1)
    print(f"wrote {path}")
    print(f"{'op':22s}{'dispatcher us':>15s}{'fast us':>10s}{'saved us':>10s}")
    for r in rows:
        print(f"{r['op']:22s}{r['dispatcher_us']:15.1f}{r['fast_us']:10.1f}{r['dispatcher_us'] - r['fast_us']:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
