"""Triton kernels of `moe_inductor.kernels.init_routing` against the plain-torch reference.

How the kernels run on CPU. `triton.jit` decides at decoration time between an interpreted and a compiled function
(`TRITON_INTERPRET=1`), and so does Triton's own library (`tl.sum`, `tl.max`, `tl.cumsum` are `@jit` functions
decorated when `triton.language` is first imported). An interpreted kernel that calls a compiled library function
fails ("Cannot call @triton.jit'd outside of the scope of a kernel"; checked with Triton 3.9), so loading a fresh copy
of the kernel module with the variable set is not enough once anything imported Triton. Hence:

tests/conftest.py sets `TRITON_INTERPRET=1` on machines without CUDA before any test module is imported, and the
CPU tests run here on the canonical kernel module; where it is not set (a GPU machine) they skip.

During a CPU test the kernel module's `torch.empty`/`empty_like` return outputs filled with a garbage byte and
followed by a guard region: an element no kernel wrote, or a write past the end, fails the test. Every case runs
with the default tile sizes, a subset also with tiny ones (every loop over H, experts, chunks and sub-blocks
taken).

Integer outputs, int8 and scales must be bitwise equal. Float sums agree up to summation order (torch does not always
add the K terms in k order); bf16 results get one bf16 step because the interpreter truncates float32 -> bf16 (GPUs
round to nearest).

GPU tests (`@pytest.mark.gpu`) run the ops on CUDA, where they launch the compiled kernels, against the CPU reference
at the benchmark shapes (dsv3-small) and at odd shapes, eager and under torch.compile.
"""

from __future__ import annotations


import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from moe_inductor import ops
from moe_inductor.ops.init_routing import InitRoutingArgs
from moe_inductor.reference import init_routing as ref
from poison import interpreted_module

F32, BF16 = torch.float32, torch.bfloat16

SMALL_TILES = dict(
    _CHUNK=32,
    _RANK_BLOCK=8,
    _MAX_BLOCK_E=2,
    _MIN_BINS=1,
    _MAX_BINS=2,
    _SCAN_CHUNKS=2,
    _MAX_BLOCK_H=16,
    _ROW_TILE=16,
    _ZERO_ROWS=4,
)


@pytest.fixture
def k(request, monkeypatch):
    """The interpreted kernel module (poisoned outputs, guards checked afterwards); tiny tiles when parametrized
    with "small" (indirect), and with "small_inline" also ranks computed by the data kernels whatever K is."""
    module, poisoned = interpreted_module("moe_inductor.kernels.init_routing", monkeypatch)
    param = getattr(request, "param", "default")
    if param.startswith("small"):
        for name, value in SMALL_TILES.items():
            monkeypatch.setattr(module, name, value)
    if param.endswith("inline"):  # the data kernel ranks its own copies at any K (else from K = 4 on)
        monkeypatch.setattr(module, "_ranks_inline", lambda topk: True)
    yield module
    poisoned.check_guards()


def test_kernels_are_interpreted(k):
    assert isinstance(k._dynamic_quant_kernel, InterpretedFunction)
    assert isinstance(k._finalize_kernel, InterpretedFunction)


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _nonzero(*shape, seed, dtype=F32, low=0.25):
    """Random floats with magnitude in [low, low + 2), random sign: never zero."""
    g = _gen(seed)
    sign = torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)
    return ((torch.rand(*shape, generator=g) * 2 + low) * sign).to(dtype)


def _expert_ids(N, K, E, *, seed, dtype=torch.int32):
    """Ids in [0, E) with some -1, some just past E and some at the dtype's maximum (another rank's / garbage)."""
    g = _gen(seed)
    ids = torch.randint(0, E, (N, K), generator=g)
    roll = torch.rand(N, K, generator=g)
    ids[roll < 0.1] = -1
    ids[(roll >= 0.1) & (roll < 0.15)] = E + 1
    ids[(roll >= 0.15) & (roll < 0.17)] = torch.iinfo(dtype).max
    return ids.to(dtype)


def _init_args(
    N=37, K=3, E=5, H=33, *, x="randn", x_dtype=F32, id_dtype=torch.int32, scale=None, seed=0, strided=False, **kw
):
    kw.setdefault("expert_num", E)
    kw.setdefault("expert_tokens_num_flag", True)
    start, end = ref.expert_range(kw["expert_num"], kw.get("active_expert_range", ()))
    if x_dtype == torch.int8:
        xt = torch.randint(-128, 128, (N, H), generator=_gen(seed), dtype=torch.int8)
    elif x == "halves":  # static quant ties: x*1 + 0 lands on k + 0.5
        xt = (torch.randint(-400, 400, (N, H), generator=_gen(seed)) * 0.5).to(x_dtype)
    else:
        xt = (torch.randn(N, H, generator=_gen(seed)) * 3).to(x_dtype)
        if x == "zero_row" and N > 2:
            xt[2] = 0  # dynamic scale 0: the row quantises to zeros
    offset = None
    if scale == "token":
        scale = _nonzero(N, seed=seed + 1)
    elif scale == "token64":
        scale = _nonzero(N, seed=seed + 1, dtype=torch.float64)
    elif scale == "shared":
        scale = _nonzero(1, H, seed=seed + 1)
    elif scale == "expert":
        scale = _nonzero(end - start, H, seed=seed + 1)
    elif scale == "static1":
        scale, offset = _nonzero(1, seed=seed + 1) * 20, _nonzero(1, seed=seed + 2)
    elif scale == "staticH":
        scale, offset = torch.ones(1, H, dtype=torch.float64), torch.zeros(1, H, dtype=torch.float64)
    ids = _expert_ids(N, K, E, seed=seed + 3, dtype=id_dtype)
    if strided:  # transposed storage: not contiguous
        xt, ids = xt.t().contiguous().t(), ids.t().contiguous().t()
    return InitRoutingArgs(xt, ids, scale, offset, **kw)


INIT_CASES = {
    "dropless": {},
    "scatter_idx": dict(row_idx_type=1),
    "sub_range": dict(active_expert_range=(1, 4)),
    "sub_range_scatter": dict(active_expert_range=(2, 5), row_idx_type=1),
    "active_num_small": dict(active_num=10),
    "active_num_small_scatter": dict(active_num=10, row_idx_type=1),
    "active_num_over_in_range": dict(active_num=105, active_expert_range=(1, 4)),
    "active_num_over_copies_scatter": dict(active_num=500, row_idx_type=1, active_expert_range=(0, 3)),
    "counts": dict(expert_tokens_num_type=1),
    "key_value": dict(expert_tokens_num_type=2, active_expert_range=(1, 4)),
    "key_value_empty_experts": dict(N=3, K=2, E=9, expert_tokens_num_type=2),
    "no_counts": dict(expert_tokens_num_flag=False),
    "token_scale": dict(scale="token"),
    "token_scale_f64_scatter": dict(scale="token64", row_idx_type=1, active_num=20),
    "static_scalar": dict(quant_mode=0, scale="static1", active_num=100, active_expert_range=(1, 5)),
    "static_per_column_ties": dict(quant_mode=0, scale="staticH", x="halves"),
    "dynamic": dict(quant_mode=1),
    "dynamic_shared_smooth": dict(quant_mode=1, scale="shared", active_num=90),
    "dynamic_expert_smooth": dict(quant_mode=1, scale="expert", active_expert_range=(1, 4), active_num=70),
    "dynamic_zero_row": dict(quant_mode=1, x="zero_row"),
    "bf16_scatter": dict(x_dtype=BF16, row_idx_type=1),
    "bf16_dynamic_expert_smooth": dict(x_dtype=BF16, quant_mode=1, scale="expert"),
    "fp16_static": dict(x_dtype=torch.float16, quant_mode=0, scale="static1"),
    "f64_dynamic_shared": dict(x_dtype=torch.float64, quant_mode=1, scale="shared"),
    "int8_x": dict(x_dtype=torch.int8, scale="token"),
    "int64_ids_dynamic": dict(id_dtype=torch.int64, quant_mode=1, scale="shared"),
    "int64_ids_scatter": dict(id_dtype=torch.int64, row_idx_type=1, active_expert_range=(1, 3)),
    "one_expert": dict(E=1, expert_tokens_num_type=2),
    "strided_inputs_dynamic_expert": dict(strided=True, quant_mode=1, scale="expert", row_idx_type=1),
    "strided_inputs_copy": dict(strided=True, x_dtype=BF16),
    "k1": dict(K=1, quant_mode=1),
    "one_token": dict(N=1, K=7, quant_mode=1, scale="expert"),
    "many_experts_multi_subblock": dict(N=40, K=4, E=64, H=4, quant_mode=1),
    "drop_pad_overfull": dict(drop_pad_mode=1, expert_capacity=3),
    "drop_pad_underfull": dict(drop_pad_mode=1, expert_capacity=40, expert_tokens_num_type=2),
    "drop_pad_dynamic_expert": dict(drop_pad_mode=1, expert_capacity=7, quant_mode=1, scale="expert"),
    "drop_pad_dynamic": dict(drop_pad_mode=1, expert_capacity=16, quant_mode=1, x_dtype=BF16),
    "drop_pad_static": dict(drop_pad_mode=1, expert_capacity=7, quant_mode=0, scale="static1"),
    "drop_pad_token_scale": dict(drop_pad_mode=1, expert_capacity=5, scale="token", expert_tokens_num_type=0),
    "no_tokens": dict(N=0),
    "no_hidden": dict(H=0, quant_mode=1),
}


def _tiled(cases, small):
    """(k, case) parameters: every case with default tiles, the cases named in `small` with tiny tiles too."""
    assert set(small) <= set(cases)
    params = [pytest.param("default", c, id=f"default-{c}") for c in cases]
    return params + [pytest.param(tiles, c, id=f"{tiles}-{c}") for tiles in ("small", "small_inline") for c in small]


def _assert_equal(actual, expected, what):
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert torch.equal(actual, expected), (what, actual, expected)


def _assert_close(actual, expected, what, dot=False):
    """Equal up to float32 summation order (a dot product over H: a few ulps of its terms), plus one bf16 step."""
    if expected is None:
        assert actual is None, what
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if expected.dtype in (torch.bfloat16, torch.float16):
        torch.testing.assert_close(actual, expected, rtol=8e-3, atol=1e-5, msg=what)
    else:
        tol = 1e-5 if dot else 1e-6
        torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=what)


# ---------------------------------------------------------------------------------------------------------------------
# CPU, interpreter: moe_init_routing_v2
# ---------------------------------------------------------------------------------------------------------------------


INIT_SMALL_TILES = (
    "dropless",
    "scatter_idx",
    "active_num_small_scatter",
    "active_num_over_in_range",
    "key_value",
    "token_scale",
    "static_per_column_ties",
    "dynamic",
    "dynamic_shared_smooth",
    "dynamic_expert_smooth",
    "drop_pad_overfull",
    "drop_pad_dynamic_expert",
    "many_experts_multi_subblock",
)


@pytest.mark.parametrize("k,case", _tiled(INIT_CASES, INIT_SMALL_TILES), indirect=["k"])
def test_init_routing_matches_reference(k, case):
    args = _init_args(**INIT_CASES[case])
    actual = k.moe_init_routing_v2(*args)
    expected = ref.moe_init_routing_v2(*args)
    for a, e, what in zip(
        actual, expected, ("expanded_x", "expanded_row_idx", "counts", "expanded_scale"), strict=True
    ):
        _assert_equal(a, e, f"{case}: {what}")


def test_round_half_even_matches_torch_round(k):
    """Static quant with scale 1 and offset 0 rounds x itself: ties, near-ties, large and tiny values."""
    base = torch.tensor([0.5, 1.5, 2.5, 3.5, 126.5, 127.5, 0.49999997, 1e-30, 4194304.5, 1e10])
    vals = torch.cat([base, torch.nextafter(base, torch.tensor(0.0)), torch.nextafter(base, torch.tensor(1e38))])
    vals = torch.cat([vals, -vals, torch.arange(-140, 140, 0.25)])
    args = InitRoutingArgs(
        vals.view(1, -1), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1), torch.zeros(1), expert_num=1
    )._replace(quant_mode=0)
    assert torch.equal(k.moe_init_routing_v2(*args)[0], ref.moe_init_routing_v2(*args)[0])


# ---------------------------------------------------------------------------------------------------------------------
# CPU, interpreter: moe_init_routing_v2 backward
# ---------------------------------------------------------------------------------------------------------------------

INIT_BACKWARD_CASES = {
    "gather": dict(row_idx_type=0, active_num=60),
    "scatter": dict(row_idx_type=1, active_num=60, active_expert_range=(1, 4)),
    "scatter_all_rows": dict(row_idx_type=1),
    "drop_pad": dict(drop_pad_mode=1, expert_capacity=4),
    "bf16_gather": dict(row_idx_type=0, x_dtype=BF16),
    "bf16_scatter_no_scale": dict(row_idx_type=1, x_dtype=BF16, with_scale=False),
}


@pytest.mark.parametrize("k,case", _tiled(INIT_BACKWARD_CASES, ("gather", "scatter", "drop_pad")), indirect=["k"])
def test_init_routing_backward_matches_reference(k, case):
    kw = dict(INIT_BACKWARD_CASES[case])
    with_scale = kw.pop("with_scale", True)
    args = _init_args(**kw, scale="token" if with_scale and not kw.get("drop_pad_mode") else None)
    expanded_x, row_idx, _, _ = ref.moe_init_routing_v2(*args)
    grad_rows = _nonzero(*expanded_x.shape, seed=11, dtype=expanded_x.dtype)
    grad_scale = _nonzero(expanded_x.numel() // expanded_x.shape[-1], seed=12) if with_scale else None
    topk = args.expert_idx.shape[1]
    actual = k.moe_init_routing_v2_backward(grad_rows, grad_scale, row_idx, args.row_idx_type, topk)
    expected = ref.moe_init_routing_v2_backward(grad_rows, grad_scale, row_idx, args.row_idx_type, topk)
    for a, e, what in zip(actual, expected, ("grad_x", "grad_scale"), strict=True):
        _assert_close(a, e, f"{case}: {what}")


def test_init_routing_backward_ignores_garbage_indices(k):
    """Row indices past the rows, -1, and (scatter form) copies past N*K contribute nothing and are never read."""
    N, K, H, R = 9, 3, 20, 15
    grad_rows = _nonzero(R, H, seed=1)
    for row_idx_type in (0, 1):
        row_idx = torch.randint(-1, R + 4, (N * K,), generator=_gen(row_idx_type), dtype=torch.int32)
        if row_idx_type == 1:
            row_idx = torch.randperm(N * K + 4, generator=_gen(3))[: N * K].to(torch.int32) - 1
        actual = k.moe_init_routing_v2_backward(grad_rows, None, row_idx, row_idx_type, K)
        expected = ref.moe_init_routing_v2_backward(grad_rows, None, row_idx, row_idx_type, K)
        _assert_close(actual[0], expected[0], f"row_idx_type={row_idx_type}")


# ---------------------------------------------------------------------------------------------------------------------
# CPU, interpreter: moe_finalize_routing forward and backward
# ---------------------------------------------------------------------------------------------------------------------


def _finalize_args(mode, *, N=37, K=3, E=5, H=33, dtype=F32, bias=True, scales=True, skips=2, seed=0, skip_dtype=None):
    """Rows from a random permutation (each row used at most once), ~10% of copies -1, a few past the last row."""
    g = _gen(seed)
    if mode in ref.DROP_PAD_MODES:
        capacity = (N * K) // E + 2
        rows = _nonzero(E, capacity, H, seed=seed + 1, dtype=dtype)
        num_rows = E * capacity
    else:
        num_rows = N * K + 4
        rows = _nonzero(num_rows, H, seed=seed + 1, dtype=dtype)
    idx = torch.randperm(num_rows, generator=g)[: N * K]
    roll = torch.rand(N * K, generator=g)
    idx[roll < 0.1] = -1
    idx[(roll >= 0.1) & (roll < 0.13)] = num_rows + 2
    experts = torch.randint(0, E, (N, K), generator=g)
    experts[torch.rand(N, K, generator=g) < 0.05] = E + 3  # unchecked garbage: no bias row
    skip_dtype = skip_dtype or dtype
    skip1 = _nonzero(N, H, seed=seed + 2, dtype=skip_dtype) if skips >= 1 else None
    skip2 = _nonzero(N, H, seed=seed + 3, dtype=skip_dtype) if skips >= 2 else None
    bias_t = _nonzero(E, H, seed=seed + 4, dtype=dtype) if bias else None
    scales_t = _nonzero(N, K, seed=seed + 5, dtype=dtype) if scales else None
    return rows, skip1, skip2, bias_t, scales_t, idx.to(torch.int32), experts.to(torch.int32), mode, K


FINALIZE_CASES = {
    **{f"mode{m}_all": dict(mode=m) for m in range(4)},
    "mode2_bare": dict(mode=2, bias=False, scales=False, skips=0),
    "mode0_scales_only_bf16": dict(mode=0, bias=False, skips=0, dtype=BF16),
    "mode3_bf16_f32_skip": dict(mode=3, dtype=BF16, skips=1, skip_dtype=F32),
    "mode2_bf16_skip1": dict(mode=2, dtype=BF16, bias=False, skips=1),
    "mode1_fp16": dict(mode=1, dtype=torch.float16, skips=0),
    "mode2_k1": dict(mode=2, K=1, E=1),
    "mode2_no_tokens": dict(mode=2, N=0),
}


@pytest.mark.parametrize("k,case", _tiled(FINALIZE_CASES, [f"mode{m}_all" for m in range(4)]), indirect=["k"])
def test_finalize_matches_reference(k, case):
    args = _finalize_args(**FINALIZE_CASES[case])
    _assert_close(k.moe_finalize_routing(*args), ref.moe_finalize_routing(*args), case)


FINALIZE_BACKWARD_CASES = {
    **{f"mode{m}": dict(mode=m) for m in range(4)},
    "mode2_bf16": dict(mode=2, dtype=BF16),
    "mode0_no_scales": dict(mode=0, scales=False),
    "mode3_no_bias_bf16": dict(mode=3, bias=False, dtype=BF16),
    "mode2_rows_only": dict(mode=2, need="rows"),
    "mode1_scales_only": dict(mode=1, need="scales"),
}


@pytest.mark.parametrize(
    "k,case", _tiled(FINALIZE_BACKWARD_CASES, [f"mode{m}" for m in range(4)] + ["mode2_rows_only"]), indirect=["k"]
)
def test_finalize_backward_matches_reference(k, case):
    kw = dict(FINALIZE_BACKWARD_CASES[case])
    need = kw.pop("need", "all")
    rows, _, _, bias, scales, idx, experts, mode, topk = _finalize_args(**kw, skips=0)
    grad_out = _nonzero(idx.shape[0] // topk, rows.shape[-1], seed=9, dtype=rows.dtype)
    flags = (need in ("all", "rows"), need == "all" and bias is not None, need != "rows" and scales is not None)
    args = (grad_out, rows, bias, scales, idx, experts, mode, topk, *flags)
    actual = k.moe_finalize_routing_backward(*args)
    expected = ref.moe_finalize_routing_backward(*args)
    for a, e, what in zip(actual, expected, ("grad_rows", "grad_bias", "grad_scales"), strict=True):
        _assert_close(a, e, f"{case}: {what}", dot=what == "grad_scales")
    if flags[0] and rows.dtype == F32:
        assert torch.equal(actual[0], expected[0]), "grad rows are one product each: exact"


def test_init_then_finalize_round_trip(k):
    """Mode 2 with init's expanded_row_idx recovers sum_k scale * x (the layer's dispatch + combine)."""
    args = _init_args(N=21, K=4, E=6, H=40, expert_tokens_num_flag=False)
    expanded_x, row_idx, _, _ = k.moe_init_routing_v2(*args)
    scales = _nonzero(21, 4, seed=5)
    out = k.moe_finalize_routing(expanded_x, None, None, None, scales, row_idx, None, 2, 4)
    in_range = ((args.expert_idx >= 0) & (args.expert_idx < 6)).float()
    torch.testing.assert_close(out, args.x * (scales * in_range).sum(1, keepdim=True), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# GPU: the ops on CUDA (compiled kernels) against the CPU reference
# ---------------------------------------------------------------------------------------------------------------------

GPU_SHAPES = {"dsv3_small": (4096, 8, 256, 7168), "odd": (37, 3, 5, 33), "decode": (64, 8, 256, 7168)}


def _routing(N, K, E, seed):
    g = _gen(seed)
    logits = torch.randn(N, E, generator=g)
    return logits.softmax(-1).topk(K, dim=-1)


def _cuda(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


def _cpu(outputs):
    return tuple(o.cpu() if isinstance(o, torch.Tensor) else o for o in outputs)


GPU_INIT = {
    "dropless_bf16": dict(),
    "dynamic": dict(quant_mode=1),
    "dynamic_shared_smooth": dict(quant_mode=1, scale="shared"),
    "dynamic_expert_smooth": dict(quant_mode=1, scale="expert"),
    "static": dict(quant_mode=0, scale="static1"),
    "token_scale_scatter_sub_range": dict(scale="token", row_idx_type=1, active_expert_range=(1, 4), active_num=-1),
    "drop_pad_dynamic": dict(drop_pad_mode=1, quant_mode=1, expert_tokens_num_type=2, capacity_factor=1.0),
    # Copies outside the expert range leave rows past the in-range total, which the quantising kernel zeroes.
    "dynamic_sub_range": dict(quant_mode=1, active_expert_range=(1, 4)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("case", list(GPU_INIT))
def test_gpu_init_routing_matches_reference(shape, case):
    N, K, E, H = GPU_SHAPES[shape]
    kw = dict(GPU_INIT[case])
    capacity_factor = kw.pop("capacity_factor", None)
    if capacity_factor is not None:
        kw["expert_capacity"] = max(1, int(N * K / E * capacity_factor))
    if "active_expert_range" in kw:
        kw["active_expert_range"] = (1, max(2, E - 1))
    args = _init_args(N, K, E, H, x_dtype=BF16, **kw)
    _, idx = _routing(N, K, E, seed=1)
    args = args._replace(expert_idx=idx.to(torch.int32))
    expected = ref.moe_init_routing_v2(*args)
    actual = _cpu(torch.ops.moe_inductor.moe_init_routing_v2(*_cuda(args)))
    for a, e, what in zip(
        actual, expected, ("expanded_x", "expanded_row_idx", "counts", "expanded_scale"), strict=True
    ):
        _assert_equal(a, e, f"{shape}/{case}: {what}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("mode", [2, 0])
def test_gpu_finalize_forward_and_backward_match_reference(shape, mode):
    N, K, E, H = GPU_SHAPES[shape]
    probs, idx = _routing(N, K, E, seed=2)
    x = (torch.randn(N, H, generator=_gen(3)) * 2).to(BF16)
    expanded_x, row_idx, _, _ = ref.moe_init_routing_v2(*InitRoutingArgs(x, idx.to(torch.int32), expert_num=E))
    if mode == 0:  # column-major index: copy (i, k) at k * N + i
        row_idx = row_idx.view(N, K).t().reshape(-1)
    bias = _nonzero(E, H, seed=4, dtype=BF16)
    skip = _nonzero(N, H, seed=5, dtype=BF16)
    args = (expanded_x, skip, None, bias, probs.to(BF16), row_idx, idx.to(torch.int32), mode, K)
    expected = ref.moe_finalize_routing(*args)
    leaves = [a.cuda().requires_grad_(i in (0, 3, 4)) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    out = torch.ops.moe_inductor.moe_finalize_routing(*leaves)
    _assert_close(out.cpu(), expected, "out")
    grad_out = _nonzero(N, H, seed=6, dtype=BF16)
    grads = torch.autograd.grad(out, [leaves[0], leaves[3], leaves[4]], grad_out.cuda())
    rows, _, _, bias, scales, row_idx, experts, mode, topk = args
    expected_grads = ref.moe_finalize_routing_backward(
        grad_out, rows, bias, scales, row_idx, experts, mode, topk, True, True, True
    )
    for a, e, what in zip(grads, expected_grads, ("grad_rows", "grad_bias", "grad_scales"), strict=True):
        if what == "grad_bias":  # per-expert sums over thousands of rows: bf16 output of a long fp32 sum
            torch.testing.assert_close(a.cpu(), e, rtol=2e-2, atol=1e-2)
        elif what == "grad_scales":
            torch.testing.assert_close(a.float().cpu(), e.float(), rtol=2e-2, atol=2e-2)
        else:
            _assert_close(a.cpu(), e, what)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("row_idx_type", [0, 1])
def test_gpu_init_routing_backward_matches_reference(shape, row_idx_type):
    N, K, E, H = GPU_SHAPES[shape]
    _, idx = _routing(N, K, E, seed=7)
    x = (torch.randn(N, H, generator=_gen(8)) * 2).to(BF16)
    scale = _nonzero(N, seed=9)
    args = InitRoutingArgs(x, idx.to(torch.int32), scale, expert_num=E, row_idx_type=row_idx_type)
    args = args._replace(active_num=N * K - 5, active_expert_range=(0, E - 1))
    expanded_x, row_idx, _, _ = ref.moe_init_routing_v2(*args)
    grad_rows = _nonzero(*expanded_x.shape, seed=10, dtype=BF16)
    grad_scale = _nonzero(expanded_x.shape[0], seed=11)
    expected = ref.moe_init_routing_v2_backward(grad_rows, grad_scale, row_idx, row_idx_type, K)
    x_cuda, scale_cuda = x.cuda().requires_grad_(), scale.cuda().requires_grad_()
    outputs = torch.ops.moe_inductor.moe_init_routing_v2(*_cuda(args._replace(x=x_cuda, scale=scale_cuda)))
    grads = torch.autograd.grad([outputs[0], outputs[3]], [x_cuda, scale_cuda], [grad_rows.cuda(), grad_scale.cuda()])
    _assert_close(grads[0].cpu(), expected[0], "grad_x")
    _assert_close(grads[1].cpu(), expected[1], "grad_scale")


@pytest.mark.gpu
def test_gpu_compiled_init_and_finalize_match_eager():
    """Under torch.compile the kernels are traced through wrap_triton; results equal the eager launches."""
    N, K, E, H = 256, 8, 64, 512
    probs, idx = _routing(N, K, E, seed=12)
    x = (torch.randn(N, H, generator=_gen(13))).to(BF16).cuda()
    idx, probs = idx.to(torch.int32).cuda(), probs.to(BF16).cuda()
    smooth = _nonzero(E, H, seed=14).cuda()

    def layer(x, idx, probs, smooth):
        q, row_idx, counts, ds = ops.moe_init_routing_v2(
            x, idx, scale=smooth, expert_num=E, quant_mode=1, expert_tokens_num_flag=True
        )
        rows = (q.float() * ds.unsqueeze(-1)).to(x.dtype)
        return ops.moe_finalize_routing(rows, x, None, None, probs, row_idx, idx, drop_pad_mode=2), counts

    eager = layer(x, idx, probs, smooth)
    compiled = torch.compile(layer, fullgraph=True)(x, idx, probs, smooth)
    for a, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_fast_quotient_rounds_like_torch_division():
    """The compiled quantiser divides by one reciprocal and an FMA correction instead of `div_rn`: its int8 must be
    torch's `round(x / scale)` for every finite bf16 x (what the op quantises without a smooth scale) and for random
    fp32 x (smoothed rows), over scales across the exponent range, including the ones that fall back to `div_rn`."""
    import triton
    import triton.language as tl

    from moe_inductor.kernels.init_routing import _quantise

    @triton.jit
    def probe(x_ptr, ds_ptr, out_ptr, n, stride_xs, BLOCK: tl.constexpr):
        s = tl.program_id(1)
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ds = tl.load(ds_ptr + s)
        x = tl.load(x_ptr + s * stride_xs + i, mask=i < n, other=0.0)
        tl.store(out_ptr + s * n + i, _quantise(x, ds, tl.where(ds > 0, ds, 1.0), True), mask=i < n)

    g = _gen(21)
    exponents = torch.randint(-118, 118, (1024,), generator=g).float()
    amax = (1 + torch.rand(1024, generator=g)) * torch.exp2(exponents)
    amax[:16] = torch.tensor([0.0, 1.0, 127.0, 2.0**-126, 2.0**-110, 2.0**-93, 2.0**100, 3e38] * 2)
    ds = amax / 127.0  # the kernel's dynamic scale (IEEE division, as torch)
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(BF16).float()
    finite_bf16 = bits[torch.isfinite(bits)]
    cases = {
        "all bf16": finite_bf16.expand(ds.numel(), -1),
        "random fp32": (torch.rand(ds.numel(), 1 << 16, generator=g) * 2 - 1) * amax[:, None],
    }
    for name, x in cases.items():
        x = x.contiguous()
        safe = torch.where(ds > 0, ds, torch.ones_like(ds))
        q = torch.round(x / safe[:, None])
        valid = q.abs() <= 127  # what a row's own amax guarantees; larger quotients saturate differently
        expected = torch.where(ds[:, None] > 0, q, 0.0).to(torch.int8)
        out = torch.empty(x.shape, dtype=torch.int8, device="cuda")
        n = x.shape[1]
        probe[(triton.cdiv(n, 1024), ds.numel())](x.cuda(), ds.cuda(), out, n, n, BLOCK=1024)
        got = out.cpu()
        bad = valid & (got != expected)
        assert valid.sum() > 1_000_000, name
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} mismatches, first at x={x[bad][0]}, scale={safe.expand_as(x)[bad][0]}"
        )
