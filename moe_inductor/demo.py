"""`python -m moe_inductor.demo`: one MoE layer through the ops, checked against a per-token loop.

router top-k -> indices_to_multihot -> permute -> gmm (gate/up) -> SiLU-and-mul -> gmm (down) -> unpermute,
in eager mode and under `torch.compile(fullgraph=True)`, forward and backward. Runs on CPU in a few seconds.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from . import ops


def moe_layer(x, router, w_gate_up, w_down, topk: int):
    """The data flow of one layer through our ops (see DESIGN: every step is one op, nothing syncs with the host)."""
    num_tokens, num_experts = x.shape[0], router.shape[1]
    probs, indices = torch.topk((x @ router).softmax(dim=-1), topk, dim=-1)
    routing_map, probs_map = ops.indices_to_multihot(indices, probs, num_experts)
    permuted, _, sorted_indices = ops.permute(x, routing_map, num_out_tokens=num_tokens * topk)
    tokens_per_expert = routing_map.sum(dim=0)
    gate, up = ops.gmm_v2(permuted, w_gate_up, group_list=tokens_per_expert).chunk(2, dim=-1)
    expert_out = ops.gmm_v2(F.silu(gate) * up, w_down, group_list=tokens_per_expert)
    return ops.unpermute(expert_out, sorted_indices, x.shape, probs=probs_map, routing_map=routing_map)


def loop_reference(x, router, w_gate_up, w_down, topk: int):
    """The same layer written the slow, obvious way: each token, each of its experts, in float64."""
    x64, r64, wgu64, wd64 = (t.double() for t in (x, router, w_gate_up, w_down))
    probs, indices = torch.topk((x64 @ r64).softmax(dim=-1), topk, dim=-1)
    out = torch.zeros_like(x64)
    for t in range(x.shape[0]):
        for k in range(topk):
            e = int(indices[t, k])
            gate, up = (x64[t] @ wgu64[e]).chunk(2)
            out[t] += probs[t, k] * ((F.silu(gate) * up) @ wd64[e])
    return out


def _inputs(num_tokens, hidden, num_experts, intermediate, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    return (
        rand(num_tokens, hidden, scale=1.0),
        rand(hidden, num_experts, scale=hidden**-0.5),
        rand(num_experts, hidden, 2 * intermediate, scale=hidden**-0.5),
        rand(num_experts, intermediate, hidden, scale=intermediate**-0.5),
    )


def _forward_backward(fn, inputs, topk, grad_out):
    out = fn(*inputs, topk)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--hidden", type=int, default=40)
    parser.add_argument("--experts", type=int, default=6)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=24)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    args = parser.parse_args(argv)
    T, H, E, K, inter = args.tokens, args.hidden, args.experts, args.topk, args.intermediate

    inputs = _inputs(T, H, E, inter)
    grad_out = torch.randn(T, H, generator=torch.Generator().manual_seed(1))
    print(f"MoE layer: {T} tokens, hidden {H}, {E} experts, top-{K}, expert width {inter} (float32, CPU)")
    print("  router top-k -> indices_to_multihot -> permute -> gmm_v2 -> SiLU*up -> gmm_v2 -> unpermute")

    ref_out, ref_grads = _forward_backward(loop_reference, inputs, K, grad_out.double())
    runs = [("eager", moe_layer)]
    if not args.no_compile:
        runs.append(("torch.compile(fullgraph=True)", torch.compile(moe_layer, fullgraph=True)))

    ok = True
    print(f"  {'mode':<32}{'max |out - loop|':>18}{'max |grad - loop|':>19}{'seconds':>9}")
    for name, fn in runs:
        start = time.perf_counter()
        out, grads = _forward_backward(fn, inputs, K, grad_out)
        seconds = time.perf_counter() - start
        out_err = (out.double() - ref_out).abs().max().item()
        grad_err = max((g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads, strict=True))
        good = out_err < 1e-4 and grad_err < 1e-4
        ok &= good
        print(f"  {name:<32}{out_err:>18.2e}{grad_err:>19.2e}{seconds:>9.2f}  {'ok' if good else 'MISMATCH'}")

    chosen = torch.topk(inputs[0] @ inputs[1], K).indices  # softmax keeps the order of the logits
    print(f"  tokens per expert: {torch.bincount(chosen.flatten(), minlength=E).tolist()}")
    print("demo passed: ops agree with the per-token loop" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
