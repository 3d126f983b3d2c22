"""Tests of the Triton multi-scale deformable attention against the PyTorch reference.

CPU tests run the kernels in Triton's interpreter. Triton decides between interpreter and compiler when it is
itself imported (torchvision imports it too) and when each kernel is defined, so conftest.py sets
TRITON_INTERPRET=1 before any test file imports anything; on the CPU nothing else runs the Triton path, so the
setting changes no other test. CUDA tests (skipped
without a GPU) run in a subprocess with TRITON_INTERPRET=0, so that the kernels are compiled, at Deformable
DETR sizes. The GPU compile test needs no GPU: in a subprocess with TRITON_INTERPRET=0 it compiles both
kernels ahead of time for sm_80 and sm_90 and reads registers and spills from the cubin.

Sampling locations are multiples of 2**-10: then x * W - 0.5 is exact in float32 and in the float64
reference alike, so both take the same corner pixels even where a location sits exactly on a pixel centre
(an integer pixel coordinate, where the bilinear derivative jumps) and the gradients compare there too.
"""
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import pytest
import torch

import model
from model import ms_deform_attn_pytorch

interpreted = pytest.mark.skipif(not model.triton_interpreted(), reason="needs triton, imported with "
                                 "TRITON_INTERPRET=1 (conftest.py sets it first)")
_HERE = pathlib.Path(__file__).resolve().parent
_GRID = 2 ** 10  # denominator of every sampling coordinate, see the module docstring
_TINY_SHAPES = [(5, 7), (3, 4), (2, 2)]
# Per level of _TINY_SHAPES: normalized (x, y) on borders and pixel centres. 0 and 1 are the map's outer
# edges (pixel coordinate -0.5 and W - 0.5); (k + 0.5) / W are pixel centres; -0.5 / W and (W + 0.5) / W
# put the coordinate at -1 and W, where the last tap inside the map leaves.
_BORDER_POINTS = [
    [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5), (0.0, 1.0), (1.0, 0.5), (0.5, 0.0)],
    [(0.375, 0.5), (-0.125, 0.5), (1.125, 0.5), (0.875, 0.0), (0.125, 1.0)],
    [(0.25, 0.75), (0.75, 0.25), (-0.25, -0.25), (1.25, 1.25), (0.25, 1.0)],
]


def _make_inputs(shapes, batch=2, n_queries=5, n_heads=2, head_dim=4, n_points=3, seed=0, border=False):
    """Random inputs and upstream gradient; locations on the 2**-10 grid in [-0.2, 1.2]."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    n_levels = len(shapes)
    value = torch.randn(batch, int(sizes.sum()), n_heads, head_dim, generator=gen)
    loc = torch.randint(-_GRID // 5, _GRID * 6 // 5 + 1, (batch, n_queries, n_heads, n_levels, n_points, 2),
                        generator=gen) / _GRID
    if border:
        for lvl, points in enumerate(_BORDER_POINTS):
            for k, point in enumerate(points):
                loc[:, k % n_queries, :, lvl, k // n_queries] = torch.tensor(point)
    attn = torch.rand(batch, n_queries, n_heads, n_levels, n_points, generator=gen)
    grad_out = torch.randn(batch, n_queries, n_heads * head_dim, generator=gen)
    return value, spatial_shapes, level_start_index, loc, attn, grad_out


def _forward_backward(fn, value, spatial_shapes, level_start_index, loc, attn, grad_out):
    """(output, grad value, grad sampling locations, grad attention weights) of fn."""
    leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
    out = fn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out))


def _reference(value, spatial_shapes, level_start_index, loc, attn, grad_out):
    """The same four results from ms_deform_attn_pytorch in float64."""
    def fn(v, s, _start, p, a):
        return ms_deform_attn_pytorch(v, s, p, a)
    return _forward_backward(fn, value.double(), spatial_shapes, level_start_index, loc.double(), attn.double(),
                             grad_out.double())


@interpreted
@pytest.mark.parametrize("head_dim, block_q", [(4, 64), (6, 2)])
def test_matches_reference_on_cpu_interpreter(head_dim, block_q):
    # head_dim 6 exercises the channel mask (block of 8), block_q 2 several query blocks with a partial last one.
    inputs = _make_inputs(_TINY_SHAPES, head_dim=head_dim, border=True)
    got = _forward_backward(
        lambda *a: model.ms_deform_attn_triton(*a, block_q=block_q), *inputs)
    want = _reference(*inputs)
    for name, g, w in zip(("output", "grad value", "grad locations", "grad weights"), got, want):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-5, msg=name)
    # The locations reach outside the maps, so the comparison also covers zero padding.
    assert (inputs[3] < 0).any() and (inputs[3] > 1).any()


@interpreted
def test_pixel_centre_reads_one_pixel_and_outside_reads_zero():
    value, spatial_shapes, level_start_index, _, _, _ = _make_inputs([(3, 4)], batch=1, n_heads=1, n_points=1)
    # Query 0 at the centre of pixel (y=1, x=1), flat index 5; query 1 beyond the left edge (x = -1.7).
    loc = torch.tensor([[0.375, 0.5], [-0.3, 0.5]]).view(1, 2, 1, 1, 1, 2)  # (B, Lq, M, L, P, 2)
    attn = torch.tensor([0.7, 0.9]).view(1, 2, 1, 1, 1)  # (B, Lq, M, L, P)
    grad_out = torch.ones(1, 2, value.shape[-1])
    out, grad_value, grad_loc, grad_attn = _forward_backward(
        model.ms_deform_attn_triton, value, spatial_shapes, level_start_index, loc, attn, grad_out)
    torch.testing.assert_close(out[0, 0], 0.7 * value[0, 5, 0])
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    expected_grad_value = torch.zeros_like(value)
    expected_grad_value[0, 5] = 0.7
    torch.testing.assert_close(grad_value, expected_grad_value)
    torch.testing.assert_close(grad_attn.flatten(), torch.stack([value[0, 5, 0].sum(), torch.tensor(0.0)]))
    assert torch.equal(grad_loc[0, 1], torch.zeros_like(grad_loc[0, 1]))


@interpreted
def test_far_outside_points_read_zero_and_get_zero_gradients():
    # Beyond the clamp of the pixel coordinate to [-2, W + 1] (int32 safety) both taps of an axis stay outside.
    value, spatial_shapes, level_start_index, _, _, grad_out = _make_inputs([(3, 4)], batch=1, n_queries=4,
                                                                            n_heads=1, n_points=1)
    loc = torch.tensor([[-1e6, 0.5], [1e6, 0.5], [0.5, -3.0], [0.5, 1e30]])
    loc = loc.view(1, 4, 1, 1, 1, 2)  # (B, Lq, M, L, P, 2)
    attn = torch.ones(1, 4, 1, 1, 1)  # (B, Lq, M, L, P)
    got = _forward_backward(model.ms_deform_attn_triton, value, spatial_shapes, level_start_index, loc, attn,
                            grad_out)
    for name, g in zip(("output", "grad value", "grad locations", "grad weights"), got):
        assert torch.equal(g, torch.zeros_like(g)), name


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    value, spatial_shapes, level_start_index, loc, attn, grad_out = _make_inputs(_TINY_SHAPES, head_dim=6)
    value, loc, attn = value.to(dtype), loc.to(dtype), attn.to(dtype)
    got = _forward_backward(model.ms_deform_attn_triton, value, spatial_shapes, level_start_index, loc, attn,
                            grad_out.to(dtype))
    # float32 on the very same (rounded) inputs: the only differences left are the final casts to dtype.
    want = _forward_backward(model.ms_deform_attn_triton, value.float(), spatial_shapes, level_start_index,
                             loc.float(), attn.float(), grad_out.to(dtype).float())
    for name, g, w in zip(("output", "grad value", "grad locations", "grad weights"), got, want):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.float(), w, rtol=1e-2, atol=1e-2, msg=name)


@interpreted
def test_bad_shapes_raise_value_error():
    value, spatial_shapes, level_start_index, loc, attn, _ = _make_inputs(_TINY_SHAPES)
    with pytest.raises(ValueError, match="attention_weights"):
        model.ms_deform_attn_triton(value, spatial_shapes, level_start_index, loc, attn[..., :2])
    with pytest.raises(ValueError, match="spatial_shapes"):
        model.ms_deform_attn_triton(value, spatial_shapes[:2], level_start_index[:2], loc, attn)
    with pytest.raises(ValueError, match="sampling_locations"):
        model.ms_deform_attn_triton(value, spatial_shapes, level_start_index, loc[:, :, :1], attn)
    with pytest.raises(ValueError, match="block_q"):
        model.ms_deform_attn_triton(value, spatial_shapes, level_start_index, loc, attn, block_q=3)
    # 2^31 elements in one batch element pass the kernels' int32 offsets; an expanded view allocates nothing.
    big = torch.zeros(1, 1, 1, 1).expand(1, 2**23, 8, 32)  # (B, S_all, M, Dh)
    with pytest.raises(ValueError, match=r"2\^31"):
        model.ms_deform_attn_triton(big, torch.tensor([[2**13, 2**10]]), torch.zeros(1, dtype=torch.int64),
                                    torch.zeros(1, 1, 8, 1, 1, 2), torch.zeros(1, 1, 8, 1, 1))


def _check_cuda(n_queries):
    """Compiled kernels on the GPU against the float64 reference, Deformable DETR sizes (800x1333 input)."""
    if model.triton_interpreted():
        raise RuntimeError("_check_cuda needs TRITON_INTERPRET unset or 0, to test the compiled kernels")
    shapes = [(100, 167), (50, 84), (25, 42), (13, 21)]  # strides 8, 16, 32, 64
    n_queries = n_queries or sum(h * w for h, w in shapes)  # 0: one query per memory position (encoder)
    inputs = [t.cuda() for t in _make_inputs(shapes, batch=2, n_queries=n_queries, n_heads=8, head_dim=32,
                                             n_points=4)]
    got = _forward_backward(model.ms_deform_attn_triton, *inputs)
    want = _reference(*inputs)
    for name, g, w in zip(("output", "grad value", "grad locations", "grad weights"), got, want):
        # Float32 atomics sum grad value in any order: tolerances relative to each tensor's scale.
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-4 * float(w.abs().max()), msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n_queries", [300, 0], ids=["decoder-300", "encoder-S_all"])
def test_cuda_matches_reference(n_queries):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    code = f"import test_triton; test_triton._check_cuda({n_queries})"
    result = subprocess.run([sys.executable, "-c", code], cwd=_HERE, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_bench_gpu_on_a_machine_without_gpu_prints_one_line():
    # CUDA hidden, so the test means the same on a GPU machine; there `python bench.py gpu` runs the CUDA tests.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(_HERE / "bench.py"), "gpu"], cwd=_HERE, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["bench.py gpu: no CUDA device (torch.cuda.is_available() is False); "
                                          "nothing run"], result.stdout


# What a launch at the COCO configuration passes (d_model 256, 8 heads, 4 levels, 4 points; an 800x1333 image,
# decoder Lq 300): the kernel arguments that are not constexpr, by name.
_LAUNCH_SIZES = dict(S_all=22223, M=8, Lq=300, L=4, P=4, Dh=32)
_MAX_REGISTERS = 128


def _launch_signature(kernel):
    """Signature and attributes as the launcher specializes a launch at _LAUNCH_SIZES.

    Tensors are pointers to their dtype: float32 for every floating tensor (ms_deform_attn_triton casts fp16,
    bf16 and float64 to float32, so no other float dtype reaches the kernels), int64 for the level shapes and
    starts. torch allocations are 16-byte aligned and ints that are multiples of 16 (Dh) are marked so too:
    the launcher's tt.divisibility specialization, which decides how wide the value loads are.
    """
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name.startswith("BLOCK_"):
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name in ("shapes_ptr", "starts_ptr") else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if _LAUNCH_SIZES[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _compile_for_gpus():
    """Print, as one JSON line, each kernel's resources compiled for sm_80 and sm_90 at the launch's blocks."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if model.triton_interpreted():
        raise RuntimeError("_compile_for_gpus needs TRITON_INTERPRET unset or 0, to compile the kernels")
    cuobjdump = triton.knobs.nvidia.cuobjdump.path
    blocks = dict(BLOCK_Q=model.TRITON_BLOCK_Q, BLOCK_D=triton.next_power_of_2(_LAUNCH_SIZES["Dh"]))
    rows = []
    for arch in (80, 90):
        for kernel in (model._msda_fwd_kernel, model._msda_bwd_kernel):
            signature, attrs = _launch_signature(kernel)
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=blocks, attrs=attrs),
                                      target=GPUTarget("cuda", arch, 32))
            row = dict(kernel=kernel.__name__, arch=f"sm_{arch}", **blocks, shared_dynamic=compiled.metadata.shared,
                       cubin_bytes=len(compiled.asm["cubin"]))
            if cuobjdump and os.path.exists(cuobjdump):
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(compiled.asm["cubin"])
                    f.flush()
                    usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                           text=True, check=True).stdout
                found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
                row.update(zip(("registers", "stack", "shared_static", "local"), map(int, found.groups())))
            rows.append(row)
    print(json.dumps(rows))


@pytest.mark.slow
@pytest.mark.skipif(not model.triton_available(), reason="needs triton")
def test_kernels_compile_for_gpus_without_spills(tmp_path):
    # A fresh cache: the test must compile, not find last run's cubins.
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", "import test_triton; test_triton._compile_for_gpus()"],
                            cwd=_HERE, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(result.stdout.splitlines()[-1])
    assert [(r["kernel"], r["arch"]) for r in rows] == [(k, a) for a in ("sm_80", "sm_90")
                                                       for k in ("_msda_fwd_kernel", "_msda_bwd_kernel")]
    assert all(r["cubin_bytes"] > 0 for r in rows)
    if any("registers" not in r for r in rows):
        pytest.skip("compiled; triton ships no cuobjdump here to read registers and spills")
    # Spills go to local memory (stack) and cap occupancy: none allowed, and at most 128 registers per thread.
    bad = [r for r in rows if r["stack"] or r["local"] or r["registers"] > _MAX_REGISTERS]
    assert not bad, f"kernels over {_MAX_REGISTERS} registers or spilling: {bad}"
