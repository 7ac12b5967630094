"""Grouped-matmul benchmark: our gmm against torch._grouped_mm, a per-group torch.mm loop and a dense mm.

    python benchmarks/gmm.py                                 # every case on the GPU, table + JSON
    python benchmarks/gmm.py --cases qwen3-30b --dtypes bfloat16

Each case is an expert projection of a BENCH.md model (gate+up: `[rows, H] @ [G, H, 2I]`) with group sizes from the
top-k of a softmax over random logits, plus one skewed routing. In one process run it measures, forward and backward
(dx and dW): our op as users call it (`ops.gmm_v2`; on bf16 + sm90 that dispatches to torch._grouped_mm, see
kernels/grouped_matmul.py), our Triton kernel alone, `torch._grouped_mm`, the per-group `torch.mm` loop real code
writes (it reads the group sizes on the host: one sync) and a dense mm of the same size (the compute ceiling).
Floor = max(FLOP / dense 8192^3 rate, bytes / copy bandwidth), both measured in the same run. Every result is
checked against the loop before it is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench import copy_bandwidth, run_meta, time_ms  # noqa: E402

from moe_inductor import ops  # noqa: E402

# name: (T, E, K, H, I, local experts, skew). Rows = the tokens routed to the local experts (T*K when all are local).
CASES = {
    "dsv3-ep8": (16384, 256, 8, 7168, 2048, 32, False),  # 32 local experts (expert parallel over 8 ranks)
    "dsv3": (16384, 256, 8, 7168, 2048, 256, False),
    "dsv3-small": (4096, 256, 8, 7168, 2048, 256, False),  # ~128 rows per expert: memory-bound
    "qwen3-30b": (16384, 128, 8, 2048, 768, 128, False),
    "mixtral": (16384, 8, 2, 4096, 14336, 8, False),
    "qwen3-30b-skewed": (16384, 128, 8, 2048, 768, 128, True),
    "decode": (64, 256, 8, 7168, 2048, 256, False),  # 2 rows per expert: reading the weights is all there is
    "tiny": (61, 6, 2, 40, 24, 6, False),  # CPU smoke run
}


@dataclass
class Result:
    case: str
    dtype: str
    pass_: str
    rows: int
    groups: int
    K: int
    N: int
    ours_ms: float
    floor_ms: float
    ratio: float
    ours_tflops: float
    triton_tflops: Optional[float]
    grouped_mm_tflops: Optional[float]
    loop_tflops: float
    dense_tflops: float
    note: str = ""


def group_sizes(T, E, K, local, skew, device, seed=0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if skew:
        logits[:, :4] += 3.0  # four hot experts take most of the traffic
    idx = logits.softmax(-1).topk(K, dim=-1).indices
    return torch.bincount(idx.flatten(), minlength=E)[:local].to(device)


@contextmanager
def forced_triton():
    old = os.environ.get("MOE_INDUCTOR_GMM")
    os.environ["MOE_INDUCTOR_GMM"] = "triton"
    try:
        yield
    finally:
        if old is None:
            del os.environ["MOE_INDUCTOR_GMM"]
        else:
            os.environ["MOE_INDUCTOR_GMM"] = old


def loop_gmm(x, w, counts):
    """The per-group loop: group bounds read on the host (a sync), one mm per non-empty group."""
    out = x.new_zeros((x.shape[0], w.shape[2]))
    start = 0
    for g, n in enumerate(counts.tolist()):
        if n:
            out[start : start + n] = x[start : start + n] @ w[g]
        start += n
    return out


def grouped_mm(x, w, counts):
    return torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))


def dense_rate(device) -> float:
    """TFLOP/s of a bf16 8192^3 torch.mm: the compute ceiling of the floor."""
    if device != "cuda":
        return 1.0
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192**3 / time_ms(lambda: a @ b, device) / 1e9


def _close(a, b, what):
    # In slices of the first dim: a float32 copy of a 256-expert weight gradient would not fit next to the rest.
    err = scale = 0.0
    for i in range(0, a.shape[0], 8):
        d = a[i : i + 8].float() - b[i : i + 8].float()
        err = max(err, d.abs().max().item() if d.numel() else 0.0)
        scale = max(scale, b[i : i + 8].float().abs().max().item() if d.numel() else 0.0)
    if err > 2e-2 * (scale or 1.0):
        raise AssertionError(f"{what}: max error {err:.3g} vs max |ref| {scale:.3g}")


def _timed(fn, x, w, dy, pass_, device) -> float:
    """ms of the forward, or of the backward alone (dx and dW) with the forward's graph built once beforehand."""
    if pass_ == "fwd":
        return time_ms(lambda: fn(x, w), device)
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(xg, wg)
    return time_ms(lambda: torch.autograd.grad(y, (xg, wg), dy, retain_graph=True), device)


def _fwd_and_grads(fn, x, w, dy):
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(xg, wg)
    return (y.detach(), *torch.autograd.grad(y, (xg, wg), dy))


def run_case(name, dtype, device, peak, bandwidth, with_triton) -> list[Result]:
    T, E, K, H, inter, local, skew = CASES[name]
    counts = group_sizes(T, E, K, local, skew, device)
    M, G, Kd, N = int(counts.sum()), local, H, 2 * inter
    used = int((counts > 0).sum())  # the weights of empty groups are never read
    gen = torch.Generator(device=device).manual_seed(1)
    x = (torch.randn(M, Kd, device=device, generator=gen) * 0.5).to(dtype)
    w = (torch.randn(G, Kd, N, device=device, generator=gen) / Kd**0.5).to(dtype)
    dy = (torch.randn(M, N, device=device, generator=gen) * 0.5).to(dtype)
    s = x.element_size()

    ours = lambda a, b: ops.gmm_v2(a, b, group_list=counts)  # noqa: E731
    loop = lambda a, b: loop_gmm(a, b, counts)  # noqa: E731
    torch_gmm = lambda a, b: grouped_mm(a, b, counts)  # noqa: E731
    has_torch_gmm = device == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")

    # Correctness first: forward and both gradients against the loop.
    expected = _fwd_and_grads(loop, x, w, dy)
    for forced in (False, True) if with_triton else (False,):
        with forced_triton() if forced else nullcontext():
            actual = _fwd_and_grads(ours, x, w, dy)
        for what, a, e in zip(("fwd", "dx", "dW"), actual, expected, strict=True):
            _close(a, e, f"{name} {'triton ' if forced else ''}{what}")
        del actual
    del expected

    a = torch.randn(M, Kd, device=device, dtype=dtype)
    b = torch.randn(Kd, N, device=device, dtype=dtype)

    results = []
    for pass_, flops, nbytes in (
        ("fwd", 2 * M * Kd * N, (M * Kd + used * Kd * N + M * N) * s),
        # dy and x read twice (dx, dW), the weights read; dx written, dW written for every group
        ("bwd", 4 * M * Kd * N, (2 * M * N + 2 * M * Kd + used * Kd * N + M * Kd + G * Kd * N) * s),
    ):
        ours_ms = _timed(ours, x, w, dy, pass_, device)
        triton_ms = None
        if with_triton:
            with forced_triton():
                triton_ms = _timed(ours, x, w, dy, pass_, device)
        gmm_ms = _timed(torch_gmm, x, w, dy, pass_, device) if has_torch_gmm else None
        loop_ms = _timed(loop, x, w, dy, pass_, device)
        dense_ms = _timed(lambda p, q: p @ q, a, b, dy, pass_, device)
        floor_ms = max(flops / (peak * 1e9), nbytes / bandwidth)
        rate = lambda ms, flops=flops: flops / ms / 1e9 if ms else None  # noqa: E731
        results.append(
            Result(
                name,
                str(dtype).removeprefix("torch."),
                pass_,
                M,
                G,
                Kd,
                N,
                ours_ms,
                floor_ms,
                ours_ms / floor_ms,
                rate(ours_ms),
                rate(triton_ms),
                rate(gmm_ms),
                rate(loop_ms),
                rate(dense_ms),
                note=f"{M / G:.0f} rows/group",
            )
        )
    return results


def print_table(results, meta, peak, bandwidth):
    print(
        f"\n{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  copy bandwidth {bandwidth / 1e9:.2f} TB/s"
        f"  dense bf16 8192^3 {peak:.0f} TFLOP/s"
    )
    header = (
        f"{'case':<18}{'dtype':<9}{'pass':<5}{'rows/g':>7}{'ours ms':>9}{'floor':>8}{'ratio':>7}  TFLOP/s:"
        f"{'ours':>6}{'triton':>7}{'_gmm':>6}{'loop':>6}{'dense':>6}{'vs _gmm':>8}{'vs loop':>8}"
    )
    print(header)
    print("-" * len(header))
    fmt = lambda v: f"{v:6.0f}" if v is not None else f"{'-':>6}"  # noqa: E731
    for r in results:
        vs_gmm = f"{r.ours_tflops / r.grouped_mm_tflops:7.2f}x" if r.grouped_mm_tflops else f"{'-':>8}"
        print(
            f"{r.case:<18}{r.dtype:<9}{r.pass_:<5}{r.rows / r.groups:7.0f}{r.ours_ms:9.3f}{r.floor_ms:8.3f}"
            f"{r.ratio:7.2f}{'':10}{fmt(r.ours_tflops)}{fmt(r.triton_tflops):>7}{fmt(r.grouped_mm_tflops)}"
            f"{fmt(r.loop_tflops)}{fmt(r.dense_tflops)}{vs_gmm}{r.ours_tflops / r.loop_tflops:7.2f}x"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="dsv3-ep8,dsv3,dsv3-small,qwen3-30b,mixtral,qwen3-30b-skewed,decode")
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument(
        "--other-dtype-cases",
        default="dsv3-ep8,qwen3-30b,decode",
        help="cases also run in the non-bf16 dtypes of --dtypes (the rest run in bf16 only)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--tag", default="", help="suffix for the JSON file name")
    args = parser.parse_args(argv)
    meta = run_meta(args.device)
    bandwidth = copy_bandwidth(args.device)
    peak = dense_rate(args.device)
    os.makedirs(args.out, exist_ok=True)
    slug = meta["gpu"].lower().replace(" ", "-") + (f"-{args.tag}" if args.tag else "")
    path = os.path.join(args.out, f"gmm-{slug}.json")
    others = set(args.other_dtype_cases.split(","))
    results = []
    for name in args.cases.split(","):
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            if dtype != torch.bfloat16 and name not in others and name != "tiny":
                continue
            # Our Triton kernel alone is shown where the op dispatches elsewhere (bf16 on sm90).
            with_triton = args.device == "cuda" and dtype == torch.bfloat16
            results += run_case(name, dtype, args.device, peak, bandwidth, with_triton)
            if args.device == "cuda":
                torch.cuda.empty_cache()
            with open(path, "w") as f:  # after every case, so a run cut short still leaves its numbers
                json.dump(
                    {**meta, "copy_bandwidth_bytes_per_ms": bandwidth, "dense_bf16_tflops": peak}
                    | {"results": [asdict(r) for r in results]},
                    f,
                    indent=1,
                )
    print(f"wrote {path}")
    print_table(results, meta, peak, bandwidth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
