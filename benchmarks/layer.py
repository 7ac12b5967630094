"""A Megatron-style MoE layer, forward + backward: eager, stock torch.compile, and torch.compile with the
`moe_inductor` backend (which rewrites the eager routing code into our ops).

    python benchmarks/layer.py                          # GPU: the qwen3-30b and mixtral shapes of BENCH.md
    python benchmarks/layer.py --shapes qwen3-30b,dsv3-small
    python benchmarks/layer.py --smoke                  # tiny shape on CPU, well under a minute

The layer is the routing code of tests/test_patterns_layer.py in plain eager torch: router logits `x @ w_router`,
fp32 softmax, top-k, Megatron's routing and probs maps by `scatter`, megatron-core's masked_select `permute`, two
expert matmuls with SiLU between, Megatron's probs-weighted `scatter_add` `unpermute`. Nothing calls moe_inductor.

Expert matmuls: `torch._grouped_mm` over the permuted rows, per-expert weights `[E, H, I]` and `[E, I, H]`, group
offsets `routing_map.sum(0).cumsum(0)` computed on the device (torchtitan's form). Real code often loops over the
experts with `tokens_per_expert.tolist()`: a host sync per step, and with default settings a graph break, in every
variant alike. The grouped form syncs nowhere and stock torch.compile traces it in one graph, so the comparison
measures the routing code. `_grouped_mm` takes bf16 (on CPU too), so the layer runs in bf16.

Variants, each compiled with a cold cache (fresh Inductor cache dir, `torch._dynamo.reset()`):
- `stock`: `torch.compile(layer)` with default settings (masked_select breaks the graph: NOTES-torch.md);
- `stock+capture`: the same with `capture_dynamic_output_shape_ops` / `capture_scalar_outputs`, the two settings
  the moe_inductor backend turns on (one graph, masked_select stays, a host sync);
- `moe_inductor`: `torch.compile(layer, backend="moe_inductor")`.
Outputs and gradients of each are checked against eager before timing. Compile time = first fwd+bwd call (cold)
minus one steady-state step. Step time: median over iterations after warm-up, CUDA events on the GPU. The table is
printed last; the numbers go to `benchmarks/results/layer-<gpu>.json` with GPU name, torch and triton versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moe_inductor.backends.inductor import static_launch_settings  # noqa: E402
from moe_inductor.testing.eager import megatron_permute_masked_select, megatron_unpermute  # noqa: E402

# name: (T, E, K, H, expert I), BENCH.md
SHAPES = {
    "dsv3": (16384, 256, 8, 7168, 2048),
    "dsv3-small": (4096, 256, 8, 7168, 2048),
    "qwen3-30b": (16384, 128, 8, 2048, 768),
    "mixtral": (16384, 8, 2, 4096, 14336),
    "small": (1024, 16, 4, 256, 128),  # CPU default
    "tiny": (64, 8, 2, 64, 64),  # --smoke
}
CAPTURE = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True}
NO_CAPTURE = {name: False for name in CAPTURE}
VARIANTS = ("stock", "stock+capture", "moe_inductor")


def moe_layer(x, w_router, w1, w2, topk: int):
    """Router top-k, Megatron multihot maps, masked_select permute, grouped expert MLP, scatter_add unpermute."""
    logits = x @ w_router
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
    probs, top_indices = torch.topk(scores, topk, dim=-1)
    routing_map = torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool()
    routing_probs = torch.zeros_like(logits).scatter(1, top_indices, probs)
    permuted, _, sorted_indices = megatron_permute_masked_select(x, routing_map, routing_probs)
    offsets = routing_map.sum(0).cumsum(0).to(torch.int32)
    hidden = torch._grouped_mm(F.silu(torch._grouped_mm(permuted, w1, offs=offsets)), w2, offs=offsets)
    return megatron_unpermute(hidden, sorted_indices, x.shape, routing_probs, routing_map)


def make_inputs(T, E, K, H, ffn, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    leaves = (rand(T, H), rand(H, E, scale=H**-0.5), rand(E, H, ffn, scale=H**-0.5), rand(E, ffn, H, scale=ffn**-0.5))
    grad_out = torch.randn(T, H, generator=g).to(device=device, dtype=dtype)
    return leaves, grad_out


def step(fn, leaves, grad_out, topk):
    """One forward + backward; returns the output and the gradients of all leaves."""
    for t in leaves:
        t.grad = None
    out = fn(*leaves, topk)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup, iters) -> float:
    """Median ms of `fn()` after `warmup` calls: CUDA events per call on the GPU, the host clock on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check(name, got, want, tol):
    """Output and every gradient within `tol` relative error (bf16; ours rounds once, eager at every add)."""
    (out, grads), (out_e, grads_e) = got, want
    errors = {"out": rel_err(out, out_e)}
    errors.update({f"grad{i}": rel_err(g, ge) for i, (g, ge) in enumerate(zip(grads, grads_e, strict=True))})
    bad = {k: v for k, v in errors.items() if not v <= tol}
    if bad:
        raise AssertionError(f"{name}: results differ from eager (relative errors {bad}, tolerance {tol})")
    return max(errors.values())


def compile_variant(variant):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    if variant == "moe_inductor":
        # The object behind `backend="moe_inductor"` (the name needs the package installed, for its entry point).
        from moe_inductor.backends.inductor import backend

        return torch.compile(moe_layer, backend=backend), CAPTURE
    return torch.compile(moe_layer), CAPTURE if variant == "stock+capture" else NO_CAPTURE


def warm_up_compiler(device):
    """Compile something small once, so that the first measured compile does not also pay the process's one-time
    costs (imports, compiler toolchain checks)."""
    from torch._inductor.utils import fresh_cache

    torch._dynamo.reset()
    a = torch.randn(16, 16, device=device, requires_grad=True)
    with fresh_cache():
        torch.compile(lambda t: (t.sin() @ t).sum())(a).backward()
    sync(device)


def run_variant(variant, leaves, grad_out, topk, reference, device, warmup, iters) -> dict:
    """Compile (cold), check against eager, time; the variant's entries of a result row."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    row = {}
    compiled, settings = compile_variant(variant)
    with torch._dynamo.config.patch(settings):  # also for recompiles while timing
        sync(device)
        with fresh_cache():
            t0 = time.perf_counter()
            result = step(compiled, leaves, grad_out, topk)
            sync(device)
            first_s = time.perf_counter() - t0
        row[f"{variant}_graphs"] = counters["stats"]["unique_graphs"]
        if variant == "moe_inductor":
            row["rewrites"] = dict(counters["moe_inductor"])
        row[f"{variant}_max_rel_err"] = check(variant, result, reference, tol=3e-2)
        ms = time_ms(lambda: step(compiled, leaves, grad_out, topk), device, warmup, iters)
    row[f"{variant}_ms"] = ms
    row[f"{variant}_compile_s"] = max(first_s - ms / 1e3, 0.0)
    return row


def run_shape(name, device, dtype, variants, warmup, iters):
    T, E, K, H, ffn = SHAPES[name]
    leaves, grad_out = make_inputs(T, E, K, H, ffn, device, dtype)
    reference = step(moe_layer, leaves, grad_out, K)
    row = {"shape": name, "T": T, "E": E, "K": K, "H": H, "I": ffn, "dtype": str(dtype).replace("torch.", "")}
    row["eager_ms"] = time_ms(lambda: step(moe_layer, leaves, grad_out, K), device, warmup, iters)
    for variant in variants:
        try:
            row.update(run_variant(variant, leaves, grad_out, K, reference, device, warmup, iters))
        except Exception as e:  # one failing variant (e.g. a compile error) must not end the run
            row[f"{variant}_error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"{name} {variant} failed: {row[f'{variant}_error']}", file=sys.stderr)
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def print_table(rows, meta):
    print(f"\n{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  (fwd+bwd of one MoE layer)")
    header = f"{'shape':<12}{'variant':<15}{'graphs':>7}{'compile s':>11}{'step ms':>10}{'vs eager':>10}"
    header += f"{'vs stock':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['shape']:<12}{'eager':<15}{'-':>7}{'-':>11}{r['eager_ms']:10.3f}{'1.00x':>10}{'-':>10}")
        for v in VARIANTS:
            if f"{v}_error" in r:
                print(f"{'':<12}{v:<15}failed: {r[f'{v}_error'][:80]}")
            if f"{v}_ms" not in r:
                continue
            vs_stock = f"{r['stock_ms'] / r[f'{v}_ms']:9.2f}x" if "stock_ms" in r else f"{'-':>10}"
            print(
                f"{'':<12}{v:<15}{r[f'{v}_graphs']:>7}{r[f'{v}_compile_s']:11.1f}{r[f'{v}_ms']:10.3f}"
                f"{r['eager_ms'] / r[f'{v}_ms']:9.2f}x{vs_stock}"
            )
        for stock in ("stock", "stock+capture"):
            if f"{stock}_compile_s" in r and "moe_inductor_compile_s" in r:
                ratio = r["moe_inductor_compile_s"] / max(r[f"{stock}_compile_s"], 1e-9)
                print(f"{'':<12}compile time moe_inductor / {stock}: {ratio:.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=None, help=f"comma-separated, from {sorted(SHAPES)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on CPU, 1 warm-up, 3 timed steps")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.shapes = "cpu", args.shapes or "tiny"
    shapes = (args.shapes or ("qwen3-30b,mixtral" if args.device == "cuda" else "small")).split(",")
    variants = args.variants.split(",")
    unknown = (set(shapes) - set(SHAPES)) | (set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown shapes / variants {sorted(unknown)}")
    on_gpu = args.device == "cuda"
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    iters = args.iters if args.iters is not None else (30 if on_gpu else 3)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        "gpu": torch.cuda.get_device_name() if on_gpu else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "warmup": warmup,
        "iters": iters,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"layer-{meta['gpu'].lower().replace(' ', '-')}.json")
    rows = []
    # The backend has Inductor's compile workers launch our kernels statically; workers read that from the environment
    # when they start, which the warm-up below does. Setting it first measures what a process gets whose first compile
    # is ours (the stock variants' kernels are Inductor's own, launched statically either way).
    meta["static_launch_user_defined_triton_kernels"] = bool(static_launch_settings())
    warm_up_compiler(args.device)
    for name in shapes:
        rows.append(run_shape(name, args.device, torch.bfloat16, variants, warmup, iters))
        with open(path, "w") as f:  # after every shape, so a run cut short still leaves its numbers
            json.dump({**meta, "results": rows}, f, indent=1)
    print(f"wrote {path}")
    print_table(rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
