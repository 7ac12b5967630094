"""Routing-op benchmark: our ops against the byte floor, eager PyTorch and torch.compile of the eager code.

    python benchmarks/bench.py                        # every BENCH shape on the GPU, table + JSON
    python benchmarks/bench.py --shapes dsv3 --ops permute,unpermute

Everything is measured in one process run: the copy bandwidth that sets the floor, our op, the eager sequence a user
runs today (Megatron's masked_select permute and scatter_add unpermute, two scatters for the multihot map, a sort and
a per-row quantisation for init routing) and `torch.compile` of that eager sequence. Each result is checked against
the eager one before it is timed. Compare ratios within a run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moe_inductor import ops  # noqa: E402
from moe_inductor.testing.eager import megatron_permute_masked_select, megatron_unpermute  # noqa: E402

# name: (T, E, K, H)
SHAPES = {
    "dsv3": (16384, 256, 8, 7168),
    "dsv3-small": (4096, 256, 8, 7168),
    "qwen3-30b": (16384, 128, 8, 2048),
    "mixtral": (16384, 8, 2, 4096),
    "decode": (64, 256, 8, 7168),
    "tiny": (37, 6, 2, 64),  # smoke runs on CPU
}
OPS = ("multihot", "permute", "unpermute", "init_routing_quant")


@dataclass
class Result:
    """One op and pass at one shape. `*_ms` are stream times of a call as a Python caller pays them (host launch work
    included where the GPU waits for it); `*_gpu_ms` are the GPU's busy time per call (the sum of its kernels). The
    ratio to the byte floor uses our GPU time, as the floor is GPU memory time."""

    op: str
    pass_: str
    shape: str
    dtype: str
    ours_ms: float
    floor_ms: float
    ratio: float
    eager_ms: float
    compiled_eager_ms: Optional[float]
    ours_gpu_ms: float = 0.0
    eager_gpu_ms: float = 0.0
    compiled_eager_gpu_ms: Optional[float] = None
    note: str = ""


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], object], device: str) -> float:
    """Median milliseconds of `fn` (device events on CUDA, host clock on CPU), after warm-up."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def time_graph_ms(fn: Callable[[], object], device: str) -> float:
    """Like `time_ms`, replayed from a CUDA graph: the GPU time of launch-bound ops, without Python launch overhead
    (what a compiled model with CUDA graphs pays)."""
    if device != "cuda":
        return time_ms(fn, device)
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def gpu_ms(fn: Callable[[], object], device: str, calls: int = 10) -> float:
    """GPU busy time of one call: the summed durations of the kernels (and copies) it runs, from the profiler. Host
    launch gaps are left out, as a CUDA graph or an Inductor wrapper would hide most of them."""
    if device != "cuda":
        return time_ms(fn, device)
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    total_us = sum(e.device_time for e in prof.events() if e.device_type == cuda)
    return total_us / 1e3 / calls


def copy_bandwidth(device: str) -> float:
    """Bytes per ms of a large device-to-device copy (read + write)."""
    n = (1 << 30) if device == "cuda" else (1 << 26)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * n / ms


# ---------------------------------------------------------------------------------------------------------------------
# Eager baselines that Megatron does not provide
# ---------------------------------------------------------------------------------------------------------------------


def eager_multihot(indices, probs, num_experts):
    """The non-fused multihot of NeMo / Megatron: two scatters into dense maps."""
    routing_map = torch.zeros(indices.shape[0], num_experts, dtype=torch.bool, device=indices.device)
    routing_map.scatter_(1, indices, True)
    probs_map = torch.zeros(indices.shape[0], num_experts, dtype=probs.dtype, device=probs.device)
    probs_map.scatter_(1, indices, probs)
    return routing_map, probs_map


def eager_init_routing_quant(x, expert_idx, num_experts):
    """Sort-based dispatch with per-row dynamic int8 quantisation, as plain torch code writes it."""
    topk = expert_idx.shape[1]
    order = expert_idx.reshape(-1).argsort(stable=True)
    rows = x.index_select(0, order // topk).float()
    scale = rows.abs().amax(-1) / 127.0
    quantised = torch.round(rows / scale.unsqueeze(-1)).to(torch.int8)
    row_idx = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
    counts = torch.bincount(expert_idx.reshape(-1), minlength=num_experts)
    return quantised, row_idx.int(), counts, scale


# ---------------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------------


def make_routing(T, E, K, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(T, E, generator=gen)
    probs, indices = logits.softmax(-1).topk(K, dim=-1)
    return indices.to(device), probs.to(device)


def _check(ours, eager, what):
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    eager = eager if isinstance(eager, (tuple, list)) else (eager,)
    for a, b in zip(ours, eager, strict=True):
        if a is None or b is None:
            continue
        if a.is_floating_point():
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=lambda m: f"{what}: {m}")
        else:
            assert torch.equal(a, b.to(a.dtype)), f"{what}: integer outputs differ"


def run_shape(name, T, E, K, H, device, dtype, ops_wanted, compile_eager, bandwidth):
    s = torch.tensor([], dtype=dtype).element_size()
    indices, probs = make_routing(T, E, K, device)
    x = torch.randn(T, H, device=device, dtype=dtype)
    routing_map, probs_map = ops.indices_to_multihot(indices, probs, E)
    rows = T * K
    results = []

    def bench(op, pass_, ours, eager, compiled, floor_bytes, check=None, note="", timer=time_ms):
        """Check `ours` against `check` (eager code on float32 copies: ours rounds once, bf16 eager code at every
        add), then time ours, eager and compiled eager (None: not measured)."""
        if check is not None:
            _check(ours(), check(), f"{op} {pass_} {name}")
        compiled_ms = compiled_gpu = None
        if compiled is not None:
            compiled()
            compiled_ms, compiled_gpu = timer(compiled, device), gpu_ms(compiled, device)
        ours_ms, eager_ms = timer(ours, device), timer(eager, device)
        ours_gpu = gpu_ms(ours, device)
        floor_ms = floor_bytes / bandwidth
        results.append(
            Result(
                op,
                pass_,
                name,
                str(dtype).replace("torch.", ""),
                ours_ms,
                floor_ms,
                ours_gpu / floor_ms,
                eager_ms,
                compiled_ms,
                ours_gpu,
                gpu_ms(eager, device),
                compiled_gpu,
                note,
            )
        )

    def compiled(fn):
        return torch.compile(fn) if compile_eager else None

    def backward_of(fwd, inputs, grad):
        """A callable that runs only the backward of `fwd(*inputs)`; the forward graph is built once and kept."""
        if fwd is None:
            return None
        out = fwd(*inputs)
        return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)

    def leaf(t, dtype=None):
        return t.detach().to(dtype or t.dtype).requires_grad_()

    if "multihot" in ops_wanted:
        bytes_ = T * K * (indices.element_size() + probs.element_size()) + T * E * (1 + probs.element_size())
        eager = lambda: eager_multihot(indices, probs, E)  # noqa: E731
        bench(
            "indices_to_multihot",
            "fwd",
            lambda: ops.indices_to_multihot(indices, probs, E),
            eager,
            compiled(eager),
            bytes_,
            check=eager,
            note="launch-bound: CUDA-graph replay (GPU time); compare us, not ratio",
            timer=time_graph_ms,
        )

    if "permute" in ops_wanted:
        eager = lambda: megatron_permute_masked_select(x, routing_map, probs_map)  # noqa: E731
        bench(
            "permute",
            "fwd",
            lambda: ops.permute(x, routing_map, probs_map, num_out_tokens=rows),
            eager,
            compiled(eager),
            (K + 1) * T * H * s,
            check=eager,
        )

        def ours_bwd(t):
            return ops.permute(t, routing_map, num_out_tokens=rows)[0]

        def eager_bwd(t):
            return megatron_permute_masked_select(t, routing_map)[0]

        grad = torch.randn(rows, H, device=device, dtype=dtype)
        bench(
            "permute",
            "bwd",
            backward_of(ours_bwd, (leaf(x),), grad),
            backward_of(eager_bwd, (leaf(x),), grad),
            backward_of(compiled(eager_bwd), (leaf(x),), grad),
            (K + 1) * T * H * s,
            check=backward_of(eager_bwd, (leaf(x, torch.float32),), grad.float()),
        )

    if "unpermute" in ops_wanted:
        _, _, sorted_indices = ops.permute(x, routing_map, num_out_tokens=rows)
        permuted = torch.randn(rows, H, device=device, dtype=dtype)

        def ours_fn(y, p):
            return ops.unpermute(y, sorted_indices, (T, H), probs=p, routing_map=routing_map)

        def eager_fn(y, p):
            return megatron_unpermute(y, sorted_indices, (T, H), p, routing_map)

        compiled_fn = compiled(eager_fn)
        bench(
            "unpermute",
            "fwd",
            lambda: ours_fn(permuted, probs_map),
            lambda: eager_fn(permuted, probs_map),
            compiled_fn and (lambda: compiled_fn(permuted, probs_map)),
            (K + 1) * T * H * s,
            check=lambda: eager_fn(permuted.float(), probs_map),
        )
        grad = torch.randn(T, H, device=device, dtype=dtype)
        bench(
            "unpermute",
            "bwd",
            backward_of(ours_fn, (leaf(permuted), leaf(probs_map)), grad),
            backward_of(eager_fn, (leaf(permuted), leaf(probs_map)), grad),
            backward_of(compiled(eager_fn), (leaf(permuted), leaf(probs_map)), grad),
            (2 * K + 1) * T * H * s,
            check=backward_of(eager_fn, (leaf(permuted, torch.float32), leaf(probs_map)), grad.float()),
        )

    if "init_routing_quant" in ops_wanted:
        idx32 = indices.int()

        def ours():
            return ops.moe_init_routing_v2(
                x, idx32, expert_num=E, quant_mode=1, expert_tokens_num_flag=True, expert_tokens_num_type=1
            )

        eager = lambda: eager_init_routing_quant(x, idx32, E)  # noqa: E731
        # Quantised values may differ by one step where the two divide differently; check the rest exactly.
        q_ours, row_ours, cnt_ours, s_ours = ours()
        q_eager, row_eager, cnt_eager, s_eager = eager()
        assert torch.equal(row_ours, row_eager) and torch.equal(cnt_ours, cnt_eager)
        assert (q_ours.int() - q_eager.int()).abs().max() <= 1
        torch.testing.assert_close(s_ours, s_eager)
        bench("init_routing_v2 int8", "fwd", ours, eager, compiled(eager), T * H * s + T * K * H + 12 * T * K)
    return results


def run_meta(device: str) -> dict:
    """What a results JSON records about the run: GPU, torch and triton versions, date."""
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
    }


def print_table(results, bandwidth, meta):
    print(f"\n{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  copy bandwidth {bandwidth / 1e9:.2f} TB/s")
    print("ms: stream time per call (host launch work included); gpu: GPU busy time per call; ratio = ours gpu / floor")
    header = (
        f"{'op':<21}{'pass':<5}{'shape':<11}{'ours ms':>9}{'ours gpu':>9}{'floor':>8}{'ratio':>7}"
        f"{'eager ms':>9}{'comp ms':>9}{'vs eager':>9}{'vs comp':>8}{'gpu vs eager':>13}{'gpu vs comp':>12}"
    )
    print(header)
    print("-" * len(header))

    def times(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    for r in results:
        comp = f"{r.compiled_eager_ms:9.3f}" if r.compiled_eager_ms is not None else f"{'-':>9}"
        print(
            f"{r.op[:20]:<21}{r.pass_:<5}{r.shape:<11}{r.ours_ms:9.3f}{r.ours_gpu_ms:9.3f}{r.floor_ms:8.3f}{r.ratio:7.2f}"
            f"{r.eager_ms:9.3f}{comp}{times(r.eager_ms, r.ours_ms):>9}{times(r.compiled_eager_ms, r.ours_ms):>8}"
            f"{times(r.eager_gpu_ms, r.ours_gpu_ms):>13}{times(r.compiled_eager_gpu_ms, r.ours_gpu_ms):>12}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="dsv3,dsv3-small,qwen3-30b,mixtral,decode")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled-eager baseline")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--tag", default="", help="suffix for the JSON file name")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    ops_wanted = set(args.ops.split(","))
    unknown = ops_wanted - set(OPS)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
    meta = run_meta(args.device)
    bandwidth = copy_bandwidth(args.device)
    os.makedirs(args.out, exist_ok=True)
    slug = meta["gpu"].lower().replace(" ", "-") + (f"-{args.tag}" if args.tag else "")
    path = os.path.join(args.out, f"routing-{slug}.json")
    results = []
    for name in args.shapes.split(","):
        T, E, K, H = SHAPES[name]
        results += run_shape(name, T, E, K, H, args.device, dtype, ops_wanted, not args.no_compile, bandwidth)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        with open(path, "w") as f:  # after every shape, so a run cut short still leaves its numbers
            json.dump(
                {**meta, "copy_bandwidth_bytes_per_ms": bandwidth, "results": [asdict(r) for r in results]}, f, indent=1
            )
    print(f"wrote {path}")
    print_table(results, bandwidth, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
