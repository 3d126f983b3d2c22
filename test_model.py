"""Tests for model.py, the Deformable DETR of paper §3.1: multi-scale deformable attention
against a naive bilinear loop, its gradients, the official sampling-location formulas, the decoder's
attention mask, official parameter names, two-stage proposals, post-processing, batch independence,
eval-mode equality with the CLIP-DETR training modules, and backbone errors. CPU only, no network.

Shape legend: B batch, Q queries, L feature levels, C model width, M heads, P sampling points, K classes,
S_all = sum_l H_l * W_l flattened memory length, Lq attention queries.
"""
import itertools
import math
import time

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

import model
from alignnet import AlignNet
from data import collate_fn
from dynql import DynQL
from conftest import official_checkpoint, official_state_shapes
from model import (MLP, Backbone, DeformableDecoder, DeformableDETR, DeformableTransformer, Joiner,
                   MSDeformAttn, PositionEmbeddingSine, PostProcess, ms_deform_attn_pytorch)

D_MODEL = 32  # the tiny detector's width (conftest.make_tiny_detr)


def level_start(spatial_shapes):
    sizes = [h * w for h, w in spatial_shapes.tolist()]
    return torch.tensor([0] + list(itertools.accumulate(sizes))[:-1])


# Backbone ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_backbone_folded_frozen_bn_equals_torchvision_modules(name):
    """Backbone.forward folds each FrozenBatchNorm2d into its conv: the same maps and weight gradients as
    running torchvision's modules one after the other (float64, non-trivial BN statistics)."""
    torch.manual_seed(0)
    backbone = model.Backbone(name).double()
    for m in backbone.modules():
        if isinstance(m, model.FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    images = torch.randn(2, 3, 40, 72, dtype=torch.float64)
    weights = [backbone.body.conv1.weight, backbone.body.layer2[0].downsample[0].weight,
               backbone.body.layer4[-1].conv2.weight]
    reference = list(backbone.body(images).values())
    folded = [x for x, _ in backbone(images, torch.zeros(2, 40, 72, dtype=torch.bool))]
    for ref, out in zip(reference, folded):
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    probe = [torch.randn_like(x) for x in reference]
    loss = lambda maps: sum((x * p).sum() for x, p in zip(maps, probe))  # noqa: E731
    for g_ref, g_out in zip(torch.autograd.grad(loss(reference), weights), torch.autograd.grad(loss(folded), weights)):
        torch.testing.assert_close(g_out, g_ref, rtol=1e-10, atol=1e-10)


# ms_deform_attn_pytorch ---------------------------------------------------------------------------------

def naive_ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """One bilinear sample at a time: pixel coordinate x*W - 0.5, four corners, zero outside the map."""
    B, _, M, Dh = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    starts = level_start(spatial_shapes).tolist()
    out = torch.zeros(B, Lq, M, Dh, dtype=value.dtype)
    for b, q, m, lvl, p in itertools.product(range(B), range(Lq), range(M), range(L), range(P)):
        H, W = spatial_shapes[lvl].tolist()
        x = sampling_locations[b, q, m, lvl, p, 0].item() * W - 0.5
        y = sampling_locations[b, q, m, lvl, p, 1].item() * H - 0.5
        x0, y0 = math.floor(x), math.floor(y)
        fx, fy = x - x0, y - y0
        sample = torch.zeros(Dh, dtype=value.dtype)
        for xi, yi, corner_weight in ((x0, y0, (1 - fx) * (1 - fy)), (x0 + 1, y0, fx * (1 - fy)),
                                      (x0, y0 + 1, (1 - fx) * fy), (x0 + 1, y0 + 1, fx * fy)):
            if 0 <= xi < W and 0 <= yi < H:
                sample += corner_weight * value[b, starts[lvl] + yi * W + xi, m]
        out[b, q, m] += attention_weights[b, q, m, lvl, p] * sample
    return out.flatten(2)  # (B, Lq, M*Dh)


def test_ms_deform_attn_equals_naive_bilinear_loop():
    torch.manual_seed(0)
    spatial_shapes = torch.tensor([[4, 5], [2, 3], [1, 1]])
    B, Lq, M, Dh, P = 2, 3, 2, 3, 2
    L = len(spatial_shapes)
    value = torch.randn(B, int(spatial_shapes.prod(1).sum()), M, Dh, dtype=torch.float64)
    # Many points outside [0, 1] (partly or wholly off the map), then some exactly on borders.
    locations = torch.rand(B, Lq, M, L, P, 2, dtype=torch.float64) * 1.6 - 0.3
    locations[0, 0, 0, :, 0] = 0.0
    locations[0, 0, 1, :, 1] = 1.0
    for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
        locations[1, 1, 0, lvl, 0] = torch.tensor([0.5 / W, 0.5 / H])  # first pixel centre
        locations[1, 1, 1, lvl, 1] = torch.tensor([1 + 0.5 / W, -0.5 / H])  # a full pixel outside
        locations[1, 2, 0, lvl, 1] = torch.tensor([1 - 0.5 / W, 1.0])
    weights = torch.rand(B, Lq, M, L, P, dtype=torch.float64)
    expected = naive_ms_deform_attn(value, spatial_shapes, locations, weights)
    torch.testing.assert_close(ms_deform_attn_pytorch(value, spatial_shapes, locations, weights), expected,
                               rtol=0, atol=1e-12)
    assert expected.abs().max() > 0.1


def test_ms_deform_attn_gradcheck():
    torch.manual_seed(0)
    spatial_shapes = torch.tensor([[3, 4], [2, 2]])
    B, Lq, M, Dh, P = 1, 2, 2, 2, 2
    L = len(spatial_shapes)
    value = torch.randn(B, int(spatial_shapes.prod(1).sum()), M, Dh, dtype=torch.float64, requires_grad=True)
    # Pixel coordinates k + u with u in [0.2, 0.8]: away from the kinks of bilinear sampling at integers;
    # k from -1 puts some points half outside the map.
    size_wh = spatial_shapes.flip(1).to(torch.float64)  # (L, 2) as (W, H)
    k = torch.floor(torch.rand(B, Lq, M, L, P, 2, dtype=torch.float64) * (size_wh[:, None] + 1)) - 1
    u = 0.2 + 0.6 * torch.rand(B, Lq, M, L, P, 2, dtype=torch.float64)
    locations = ((k + u + 0.5) / size_wh[:, None]).requires_grad_()
    weights = torch.rand(B, Lq, M, L, P, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_pytorch(v, spatial_shapes, loc, w), (value, locations, weights))


# ms_deform_attn_gather, the CPU fast path --------------------------------------------------------------

def attention_inputs(spatial_shapes, B, Lq, M, Dh, P, *, spread=1.6, seed=0, dtype=torch.float64):
    """Random inputs with points inside, on the border, partly and wholly outside, and far outside the maps."""
    g = torch.Generator().manual_seed(seed)
    L = len(spatial_shapes)
    value = torch.randn(B, int(spatial_shapes.prod(1).sum()), M, Dh, generator=g, dtype=dtype)
    locations = torch.rand(B, Lq, M, L, P, 2, generator=g, dtype=dtype) * spread + (1 - spread) / 2
    locations[0, 0, 0, :, 0] = 0.0
    locations[0, 0, -1, :, -1] = 1.0
    locations[-1, -1, 0, :, 0] = torch.tensor([-40.0, 0.5], dtype=dtype)  # far left of every map
    locations[-1, -1, -1, :, -1] = torch.tensor([0.5, 75.0], dtype=dtype)  # far below
    weights = torch.rand(B, Lq, M, L, P, generator=g, dtype=dtype)
    return value, locations, weights


def forward_backward(fn, spatial_shapes, value, locations, weights, grad_out=None):
    value, locations, weights = (t.detach().clone().requires_grad_() for t in (value, locations, weights))
    out = fn(value, spatial_shapes, locations, weights)
    grad_out = torch.randn_like(out, generator=torch.Generator().manual_seed(1)) if grad_out is None else grad_out
    return (out, *torch.autograd.grad(out, (value, locations, weights), grad_out)), grad_out


@pytest.mark.parametrize("spatial_shapes, B, Lq, M, Dh, P", [
    ([[4, 5], [2, 3], [1, 1]], 2, 3, 2, 3, 2),
    ([[7, 3], [4, 2], [2, 1], [1, 1]], 3, 5, 4, 2, 3),  # taller than wide, 4 levels
    ([[1, 6]], 1, 4, 1, 5, 1),  # one row, one head, one point
    ([[3, 4], [2, 2]], 2, 30, 2, 3, 2),  # more points than table rows: the encoder's backward
])
def test_gather_attention_equals_reference_with_gradients(spatial_shapes, B, Lq, M, Dh, P):
    """ms_deform_attn_gather gives the reference's output and all three gradients to float64 rounding, through
    both backward paths (fewer points than table rows, as decoder queries; more, as the encoder)."""
    spatial_shapes = torch.tensor(spatial_shapes)
    inputs = attention_inputs(spatial_shapes, B, Lq, M, Dh, P)
    want, grad_out = forward_backward(ms_deform_attn_pytorch, spatial_shapes, *inputs)
    got, _ = forward_backward(model.ms_deform_attn_gather, spatial_shapes, *inputs, grad_out=grad_out)
    for name, w, g in zip(("output", "grad value", "grad locations", "grad weights"), want, got):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12, msg=name)
        assert w.abs().max() > 0.05, name  # nothing compared is trivially zero
    # The far-outside points read nothing and get no gradient, as with zero padding.
    assert got[2][-1, -1, 0, :, 0].abs().max() == 0 and got[3][-1, -1, -1, :, -1].abs().max() == 0


def test_gather_attention_equals_naive_loop_on_exact_pixel_centres():
    """Known answers: at pixel centres, borders and one pixel outside, against the one-sample-at-a-time loop."""
    spatial_shapes = torch.tensor([[4, 5], [2, 3], [1, 1]])
    value, locations, weights = attention_inputs(spatial_shapes, 2, 3, 2, 3, 2, spread=1.0)
    for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
        locations[1, 1, 0, lvl, 0] = torch.tensor([0.5 / W, 0.5 / H])
        locations[1, 1, 1, lvl, 1] = torch.tensor([1 + 0.5 / W, -0.5 / H])
        locations[1, 2, 0, lvl, 1] = torch.tensor([1 - 0.5 / W, 1.0])
    torch.testing.assert_close(model.ms_deform_attn_gather(value, spatial_shapes, locations, weights),
                               naive_ms_deform_attn(value, spatial_shapes, locations, weights), rtol=0, atol=1e-12)


def test_gather_attention_float32_and_bf16_autocast_compute_in_float32():
    """float32 inputs match the reference to float32 rounding; under CPU bf16 autocast a bf16 value is sampled in
    float32 and the output comes back in value's dtype, as the Triton path does."""
    spatial_shapes = torch.tensor([[6, 8], [3, 4], [2, 2], [1, 1]])
    value, locations, weights = attention_inputs(spatial_shapes, 2, 7, 4, 8, 4, dtype=torch.float32)
    want = ms_deform_attn_pytorch(value, spatial_shapes, locations, weights)
    torch.testing.assert_close(model.ms_deform_attn_gather(value, spatial_shapes, locations, weights), want,
                               rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.ms_deform_attn_gather(value.bfloat16(), spatial_shapes, locations, weights)
    assert got.dtype == torch.bfloat16
    want_bf16 = ms_deform_attn_pytorch(value.bfloat16().float(), spatial_shapes, locations, weights)
    torch.testing.assert_close(got.float(), want_bf16, rtol=1e-2, atol=1e-2)


def test_gather_attention_without_value_gradient_and_without_queries():
    """Gradients to locations and weights alone (a frozen value), and a call with no queries at all."""
    spatial_shapes = torch.tensor([[3, 4], [2, 2]])
    value, locations, weights = attention_inputs(spatial_shapes, 1, 4, 2, 3, 2)
    locations.requires_grad_()
    want = torch.autograd.grad(ms_deform_attn_pytorch(value, spatial_shapes, locations, weights).sum(), locations)
    got = torch.autograd.grad(model.ms_deform_attn_gather(value, spatial_shapes, locations, weights).sum(), locations)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    empty = model.ms_deform_attn_gather(value, spatial_shapes, locations[:, :0], weights[:, :0])
    assert empty.shape == (1, 0, 2 * 3)


def test_model_trains_alike_with_gather_and_reference_attention(tiny_detr):
    """One tiny two-stage model, the same step with either attention: same losses and parameter gradients."""
    images = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 60:] = True
    grads = {}
    for impl in ("pytorch", "gather"):
        detr = tiny_detr()
        for m in detr.modules():
            if isinstance(m, MSDeformAttn):
                m.attn_impl = impl
        out = detr(images, mask)
        loss = out['pred_logits'].sigmoid().sum() + out['pred_boxes'].sum() + out['enc_outputs']['pred_boxes'].sum()
        loss.backward()
        grads[impl] = (loss.detach(), {n: p.grad.clone() for n, p in detr.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads['gather'][0], grads['pytorch'][0], rtol=1e-5, atol=1e-5)
    assert grads['gather'][1].keys() == grads['pytorch'][1].keys()
    for name, g in grads['pytorch'][1].items():
        torch.testing.assert_close(grads['gather'][1][name], g, rtol=1e-3, atol=1e-5, msg=name)


# MSDeformAttn ------------------------------------------------------------------------------------------

@pytest.fixture
def captured_attention(monkeypatch):
    """Replace the attention kernel by one that records its sampling locations and weights."""
    calls = []

    def capture(value, spatial_shapes, sampling_locations, attention_weights):
        calls.append((sampling_locations, attention_weights))
        return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)

    monkeypatch.setattr(model, 'ms_deform_attn_pytorch', capture)
    return calls


def known_offset_attention():
    """MSDeformAttn whose sampling offsets do not depend on the query: the bias, (M, L, P, 2)."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=3)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.copy_(torch.randn(attn.sampling_offsets.bias.shape) * 3)
        attn.attention_weights.weight.normal_()
    return attn, attn.sampling_offsets.bias.detach().view(2, 2, 3, 2)  # (M, L, P, 2)


@pytest.mark.parametrize('ref_dim', [2, 4])
def test_msdeformattn_sampling_locations_follow_official_formula(captured_attention, ref_dim):
    attn, offsets = known_offset_attention()
    spatial_shapes = torch.tensor([[4, 6], [3, 5]])  # H != W on both levels: (W, H) order matters
    B, Lq, M, L, P = 2, 3, 2, 2, 3
    query = torch.randn(B, Lq, 8)
    value_in = torch.randn(B, int(spatial_shapes.prod(1).sum()), 8)
    reference = torch.rand(B, Lq, L, ref_dim)
    attn(query, reference, value_in, spatial_shapes, level_start(spatial_shapes))
    (locations, weights), = captured_attention
    expected = torch.empty(B, Lq, M, L, P, 2)
    for b, q, m, lvl, p in itertools.product(range(B), range(Lq), range(M), range(L), range(P)):
        H, W = spatial_shapes[lvl].tolist()
        ref = reference[b, q, lvl]
        if ref_dim == 2:
            expected[b, q, m, lvl, p] = ref + offsets[m, lvl, p] / torch.tensor([W, H])
        else:
            expected[b, q, m, lvl, p] = ref[:2] + offsets[m, lvl, p] / P * ref[2:] * 0.5
    torch.testing.assert_close(locations, expected)
    # One softmax over all levels and points of a head.
    torch.testing.assert_close(weights.sum((-2, -1)), torch.ones(B, Lq, M))
    assert not torch.allclose(weights[..., 0, :].sum(-1), torch.ones(B, Lq, M))
    # `sampling`, which the walkthrough draws, gives exactly what the kernel samples.
    shown_locations, shown_weights = attn.sampling(query, reference, spatial_shapes)
    torch.testing.assert_close(shown_locations, locations, rtol=0, atol=0)
    torch.testing.assert_close(shown_weights, weights, rtol=0, atol=0)


def test_msdeformattn_rejects_bad_reference_dim():
    attn, _ = known_offset_attention()
    spatial_shapes = torch.tensor([[2, 2], [1, 1]])
    with pytest.raises(ValueError, match='reference_points'):
        attn(torch.randn(1, 2, 8), torch.rand(1, 2, 2, 3), torch.randn(1, 5, 8), spatial_shapes,
             level_start(spatial_shapes))


# Decoder attention mask --------------------------------------------------------------------------------

def decoder_inputs(Lq, seed=0):
    """Random memory of two levels and random (tgt, query_pos, reference boxes) for Lq queries."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor([[4, 6], [2, 3]])
    B = 2
    memory = torch.randn(B, int(spatial_shapes.prod(1).sum()), D_MODEL, generator=g)
    queries = dict(tgt=torch.randn(B, Lq, D_MODEL, generator=g), query_pos=torch.randn(B, Lq, D_MODEL, generator=g),
                   reference=0.2 + 0.6 * torch.rand(B, Lq, 4, generator=g))
    layout = dict(memory=memory, spatial_shapes=spatial_shapes, level_start_index=level_start(spatial_shapes),
                  valid_ratios=torch.ones(B, 2, 2),
                  memory_padding_mask=torch.zeros(B, memory.shape[1], dtype=torch.bool))
    return queries, layout


def run_decoder(decoder, queries, layout, mask):
    with torch.no_grad():
        hs, refs = decoder(queries['tgt'], queries['query_pos'], queries['reference'], layout['memory'],
                           layout['spatial_shapes'], layout['level_start_index'], layout['valid_ratios'],
                           layout['memory_padding_mask'], mask)
    return hs, torch.stack(refs)  # (n_layers, B, Lq, C), (n_layers, B, Lq, 4)


def perturbed(queries, rows):
    g = torch.Generator().manual_seed(1)
    out = {k: v.clone() for k, v in queries.items()}
    out['tgt'][:, rows] += torch.randn(out['tgt'][:, rows].shape, generator=g)
    out['query_pos'][:, rows] += torch.randn(out['query_pos'][:, rows].shape, generator=g)
    out['reference'][:, rows] = 0.2 + 0.6 * torch.rand(out['reference'][:, rows].shape, generator=g)
    return out


@pytest.mark.parametrize('refine', [False, True])
def test_decoder_mask_hides_group_b_from_group_a(refine):
    torch.manual_seed(0)
    kwargs = dict(d_model=D_MODEL, d_ffn=64, dropout=0.0, n_levels=2, n_heads=4, n_points=2)
    decoder = DeformableDecoder(kwargs, num_layers=3).eval()
    if refine:
        decoder.bbox_embed = torch.nn.ModuleList(MLP(D_MODEL, D_MODEL, 4, 3) for _ in range(3))
    A, B_ = slice(0, 3), slice(3, 6)
    queries, layout = decoder_inputs(6)
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[:, A, B_] = True  # A rows may not attend B keys; B sees everything
    hs, refs = run_decoder(decoder, queries, layout, mask)
    hs_b, refs_b = run_decoder(decoder, perturbed(queries, B_), layout, mask)
    torch.testing.assert_close(hs_b[:, :, A], hs[:, :, A], rtol=0, atol=1e-6)
    torch.testing.assert_close(refs_b[:, :, A], refs[:, :, A], rtol=0, atol=1e-6)
    assert (hs_b[:, :, B_] - hs[:, :, B_]).abs().amax((1, 2, 3)).min() > 1e-2
    # Sanity: B may see A, so changing A changes B in every layer.
    hs_a, _ = run_decoder(decoder, perturbed(queries, A), layout, mask)
    assert (hs_a[:, :, B_] - hs[:, :, B_]).abs().amax((1, 2, 3)).min() > 1e-2
    if refine:
        assert (refs_b[1:, :, B_] - refs[1:, :, B_]).abs().max() > 1e-3


def test_refined_boxes_are_detached_between_decoder_layers(eval_detr):
    """Official gradient flow: layer 2's box loss trains layer 2's box head, never layer 1's through the
    reference boxes layer 1 refined; layer 1's own box loss does reach it. (The backbone is left out: it
    only feeds the memory, and its backward would dominate the test's time.)"""
    detr, transformer = eval_detr, eval_detr.transformer
    detr.zero_grad(set_to_none=True)
    enc = transformer.encode(*random_levels([(6, 5), (3, 4), (2, 2), (1, 3)]))
    tgt, query_pos, reference, _ = transformer.select_queries(enc)
    _, boxes = detr.heads(*transformer.decode(enc, tgt, query_pos, reference))
    boxes[1].sum().backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in detr.bbox_embed[0].parameters())
    assert detr.bbox_embed[1].layers[-1].bias.grad.abs().sum() > 0
    boxes[0].sum().backward()
    assert detr.bbox_embed[0].layers[-1].bias.grad.abs().sum() > 0
    detr.zero_grad(set_to_none=True)


# Official parameter names ------------------------------------------------------------------------------

def check_official_load(detr, shapes, *, shared_heads=False):
    """detr lives on the meta device (built in no time); assign=True gives it the checkpoint's tensors."""
    assert set(detr.state_dict()) == set(shapes)
    state = official_checkpoint(shapes, shared_heads=shared_heads)
    detr.load_state_dict(state, strict=True, assign=True)
    for k, v in detr.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_official_r50_two_stage_refine_checkpoint_loads_strict():
    with torch.device('meta'):
        backbone = Joiner(Backbone('resnet50'), PositionEmbeddingSine(128))
        detr = DeformableDETR(backbone, DeformableTransformer(two_stage=True), num_classes=91, two_stage=True,
                              with_box_refine=True)
        resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    shapes = official_state_shapes(backbone_state=resnet.state_dict(), backbone_channels=(512, 1024, 2048),
                                   num_classes=91, d_model=256, n_heads=8, d_ffn=1024, enc_layers=6, dec_layers=6,
                                   n_levels=4, n_points=4, num_queries=300, two_stage=True, with_box_refine=True)
    assert 'query_embed.weight' not in shapes and 'transformer.decoder.class_embed.6.weight' in shapes
    check_official_load(detr, shapes)


def test_two_stage_without_box_refine_is_rejected(tiny_detr):
    # The encoder proposals use the extra refinement head; the official code crashes without it.
    with pytest.raises(ValueError, match='--two-stage needs --with-box-refine'):
        tiny_detr(two_stage=True, with_box_refine=False)


@pytest.mark.parametrize('two_stage,refine', [(False, False), (False, True)])
def test_official_variants_load_strict(two_stage, refine, tiny_detr):
    with torch.device('meta'):
        detr = tiny_detr(two_stage=two_stage, with_box_refine=refine)
        resnet = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    shapes = official_state_shapes(backbone_state=resnet.state_dict(), backbone_channels=(128, 256, 512),
                                   num_classes=5, d_model=D_MODEL, n_heads=4, d_ffn=64, enc_layers=2, dec_layers=2,
                                   n_levels=4, n_points=2, num_queries=10, two_stage=two_stage,
                                   with_box_refine=refine)
    if not two_stage:
        assert {'query_embed.weight', 'transformer.reference_points.weight'} <= set(shapes)
    check_official_load(detr, shapes, shared_heads=not refine)


# Initial values the official code fixes ---------------------------------------------------------------

PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # focal-loss prior 0.01: sigmoid(bias) = 0.01


def assert_xavier_uniform(name, weight, gain=1.0):
    """Drawn from U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out)): none beyond b, and (with >= 60 draws) some
    beyond 0.8 b, which PyTorch's default Linear/Conv init (b = 1 / sqrt(fan_in), at most 0.58 of it) never is."""
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(weight)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    largest = weight.detach().abs().max().item()
    assert 0.8 * bound < largest <= bound, (name, largest, bound)


@pytest.mark.parametrize('two_stage, refine', [(True, True), (False, True), (False, False)])
def test_class_and_box_heads_start_as_the_official_ones(two_stage, refine, tiny_detr):
    """Every class head's bias is the focal-loss prior -log(99) (sigmoid 0.01), not +log(99); the box heads' last
    layer is zero, with -2 on (w, h) of the shared head, of box-refinement head 0 only, and of none with two-stage
    (its boxes start as the proposals)."""
    detr = tiny_detr(two_stage=two_stage, with_box_refine=refine)
    num_pred = 2 + (1 if two_stage else 0)
    assert len(detr.class_embed) == len(detr.bbox_embed) == num_pred
    for i, (cls, box) in enumerate(zip(detr.class_embed, detr.bbox_embed)):
        torch.testing.assert_close(cls.bias.detach(), torch.full_like(cls.bias, PRIOR_BIAS), rtol=0, atol=0)
        torch.testing.assert_close(cls.bias.sigmoid().detach(), torch.full_like(cls.bias, 0.01))
        assert not box.layers[-1].weight.any(), i
        size_bias = -2.0 if not two_stage and (not refine or i == 0) else 0.0
        assert box.layers[-1].bias.tolist() == [0.0, 0.0, size_bias, size_bias], i
        assert all(layer.weight.any() for layer in box.layers[:-1]), i
    if not refine:  # one head for every layer, as in the official code
        assert len({id(m) for m in detr.class_embed}) == len({id(m) for m in detr.bbox_embed}) == 1


def test_open_vocabulary_heads_start_at_the_focal_prior_and_clips_scale():
    """The open-vocabulary head (every decoder layer) and the two-stage objectness head start at the focal prior
    too, and the head's logit scale at CLIP's 1/0.07, capped at 100."""
    table = torch.randn(4, 8)
    head = model.LabelEmbeddingClassifier(label_embeddings=table, d_model=D_MODEL, train_classes=[0, 2])
    class_embeds, _ = model.prediction_heads(D_MODEL, 4, 3, with_box_refine=True, two_stage=True, class_head=head)
    for cls in class_embeds[:-1]:
        assert isinstance(cls, model.LabelEmbeddingClassifier)
        assert cls.bias.item() == pytest.approx(PRIOR_BIAS, abs=1e-6)
        assert cls.logit_scale.item() == pytest.approx(math.log(1 / 0.07)) and cls.logit_scale_max == 100.0
        assert cls.scale.item() == pytest.approx(1 / 0.07)
    objectness = class_embeds[-1]
    assert objectness.out_features == 1 and objectness.bias.item() == pytest.approx(PRIOR_BIAS, abs=1e-6)
    with torch.no_grad():
        class_embeds[0].logit_scale.fill_(math.log(1000.0))
    assert class_embeds[0].scale.item() == pytest.approx(100.0)


def test_deformable_attention_starts_at_the_official_sampling_grid():
    """Offsets start as a fixed grid (weight 0): head h points along angle 2 pi h / M, scaled so the larger
    coordinate is 1, point p at distance p + 1, on every level; attention weights start uniform (weight and bias
    0); the value and output projections are xavier-uniform with zero bias."""
    attn = MSDeformAttn(d_model=D_MODEL, n_levels=3, n_heads=8, n_points=3)
    assert not attn.sampling_offsets.weight.any()
    directions = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]],
                              dtype=torch.float32)  # (M, 2) for M = 8
    expected = directions[:, None, None, :] * torch.arange(1.0, 4.0)[None, None, :, None]  # (M, 1, P, 2)
    grid = attn.sampling_offsets.bias.detach().view(8, 3, 3, 2)  # (M, L, P, 2)
    torch.testing.assert_close(grid, expected.expand(8, 3, 3, 2), rtol=0, atol=1e-5)
    assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()
    for name in ('value_proj', 'output_proj'):
        layer = getattr(attn, name)
        assert_xavier_uniform(name, layer.weight)
        assert not layer.bias.any(), name


@pytest.mark.parametrize('two_stage', [True, False])
def test_transformer_and_input_projections_start_as_the_official_ones(two_stage, tiny_detr):
    """Every matrix of the transformer is xavier-uniform (but the attention's zero offsets and weights), the
    single-stage reference points xavier (gain 1) with zero bias, the level embedding N(0, 1); input_proj's convs
    xavier-uniform with zero bias, its GroupNorms at weight 1, bias 0."""
    detr = tiny_detr(two_stage=two_stage, with_box_refine=True, seed=3)
    transformer = detr.transformer
    for name, p in transformer.named_parameters():
        if p.dim() < 2 or name.endswith(('sampling_offsets.weight', 'attention_weights.weight', 'level_embed')) \
                or name.startswith(('decoder.bbox_embed', 'decoder.class_embed')):
            continue
        assert_xavier_uniform(name, p)
    if not two_stage:
        assert not transformer.reference_points.bias.any()
    level_embed = transformer.level_embed.detach()  # (L, C): 128 draws of N(0, 1)
    assert abs(level_embed.mean().item()) < 0.35 and 0.75 < level_embed.std().item() < 1.25
    for i, (conv, norm) in enumerate(detr.input_proj):
        assert_xavier_uniform(f'input_proj.{i}', conv.weight)
        assert not conv.bias.any() and bool((norm.weight == 1).all()) and not norm.bias.any(), i


# Two-stage proposals -----------------------------------------------------------------------------------

def test_encoder_proposals_mask_padding_and_out_of_range_boxes():
    torch.manual_seed(0)
    transformer = DeformableTransformer(d_model=D_MODEL, n_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                                        d_ffn=64, n_levels=2, two_stage=True)
    # Level 0 is 60 wide: its first and last columns have cx = 0.5/60 < 0.01 and 59.5/60 > 0.99.
    # Level 5 boxes are 0.05 * 2^5 = 1.6 wide. Image 1 is padded on every level but the last ones.
    spatial_shapes = torch.tensor([[3, 60], [2, 4], [2, 2], [1, 1], [1, 1], [1, 1]])
    valid_hw = [[(3, 60), (2, 4), (2, 2), (1, 1), (1, 1), (1, 1)],
                [(2, 45), (1, 3), (1, 1), (1, 1), (1, 1), (1, 1)]]
    masks = []
    for H, W in spatial_shapes.tolist():
        masks.append(torch.ones(2, H, W, dtype=torch.bool))
    for b, per_level in enumerate(valid_hw):
        for m, (h, w) in zip(masks, per_level):
            m[b, :h, :w] = False
    mask = torch.cat([m.flatten(1) for m in masks], 1)  # (B, S_all)
    memory = torch.randn(2, mask.shape[1], D_MODEL)
    out_memory, proposals = transformer.encoder_proposals(memory, mask, spatial_shapes)

    expected = torch.empty(2, mask.shape[1], 4)
    for b in range(2):
        s = 0
        for lvl, (H, W) in enumerate(spatial_shapes.tolist()):
            vh, vw = valid_hw[b][lvl]
            for i, j in itertools.product(range(H), range(W)):
                box = torch.tensor([(j + 0.5) / vw, (i + 0.5) / vh, 0.05 * 2 ** lvl, 0.05 * 2 ** lvl])
                inside = bool(((box > 0.01) & (box < 0.99)).all())
                expected[b, s] = torch.log(box / (1 - box)) if inside and i < vh and j < vw else float('inf')
                s += 1
    torch.testing.assert_close(proposals, expected)
    invalid = torch.isinf(proposals).any(-1)  # (B, S_all)
    assert invalid[0, 0] and not invalid[0, 1] and invalid[0, 59] and invalid[:, -1].all()
    assert not invalid[1, 0] and invalid[1, 45]
    with torch.no_grad():
        expected_memory = transformer.enc_output_norm(transformer.enc_output(memory.masked_fill(invalid[..., None], 0)))
    torch.testing.assert_close(out_memory, expected_memory)


def random_levels(shapes, seed=0):
    """Random unpadded inputs of the transformer: L maps (1, C, H_l, W_l), their masks and positions."""
    g = torch.Generator().manual_seed(seed)
    srcs = [torch.randn(1, D_MODEL, h, w, generator=g) for h, w in shapes]
    masks = [torch.zeros(1, h, w, dtype=torch.bool) for h, w in shapes]
    pos = [PositionEmbeddingSine(D_MODEL // 2)(m) for m in masks]
    return srcs, masks, pos


def test_level_start_index_is_cumulative_level_sizes_and_splits_memory_exactly(eval_detr):
    shapes = [(6, 5), (3, 4), (2, 2), (1, 3)]  # H != W and unequal sizes: an offset or (W, H) slip shows
    with torch.no_grad():
        enc = eval_detr.transformer.encode(*random_levels(shapes))
    assert enc['level_start_index'].tolist() == [0, 30, 42, 46]
    levels = DeformableDETR.memory_levels(enc)
    assert [tuple(level.shape) for level in levels] == [(1, D_MODEL, h, w) for h, w in shapes]
    flat = torch.cat([level.flatten(2).transpose(1, 2) for level in levels], 1)  # (1, S_all, C)
    assert torch.equal(flat, enc['memory'])


def test_two_stage_reference_boxes_are_top_q_of_the_objectness_column(eval_detr):
    """The encoder head learns every object as class 0 (class-agnostic): queries are ranked by that column."""
    transformer = eval_detr.transformer
    with torch.no_grad():
        enc = transformer.encode(*random_levels([(6, 5), (3, 4), (2, 2), (1, 3)]))
        _, _, reference, enc_out = transformer.select_queries(enc)
    Q = transformer.two_stage_num_proposals
    top = enc_out['pred_logits'][..., 0].topk(Q, dim=1).indices  # (B, Q)
    expected = torch.gather(enc_out['pred_boxes'], 1, top[..., None].expand(-1, -1, 4))  # (B, Q, 4)
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-6)
    # Sanity: another column ranks other locations first, so the test tells the columns apart.
    assert set(enc_out['pred_logits'][0, :, 1].topk(Q).indices.tolist()) != set(top[0].tolist())


# Post-processing ---------------------------------------------------------------------------------------

def test_postprocess_topk_labels_and_absolute_boxes():
    logits = torch.full((2, 3, 4), -10.0)
    logits[0, 2, 1], logits[0, 0, 3], logits[0, 1, 0] = 3.0, 2.0, 1.0
    logits[1, 1, 2], logits[1, 2, 2], logits[1, 0, 1] = 4.0, 0.5, 0.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 1.0], [0.1, 0.2, 0.2, 0.2]],
                          [[0.5, 0.5, 1.0, 1.0], [0.75, 0.25, 0.5, 0.5], [0.5, 0.5, 0.2, 0.2]]])
    target_sizes = torch.tensor([[100, 200], [50, 40]])  # (h, w)
    results = PostProcess(num_select=3)({'pred_logits': logits, 'pred_boxes': boxes}, target_sizes)
    sig = torch.sigmoid
    torch.testing.assert_close(results[0]['scores'], sig(torch.tensor([3.0, 2.0, 1.0])))
    assert results[0]['labels'].tolist() == [1, 3, 0]
    torch.testing.assert_close(results[0]['boxes'], torch.tensor([[0.0, 10.0, 40.0, 30.0],
                                                                  [80.0, 30.0, 120.0, 70.0],
                                                                  [0.0, 0.0, 100.0, 100.0]]))
    torch.testing.assert_close(results[1]['scores'], sig(torch.tensor([4.0, 0.5, 0.0])))
    assert results[1]['labels'].tolist() == [2, 2, 1]
    torch.testing.assert_close(results[1]['boxes'], torch.tensor([[20.0, 0.0, 40.0, 25.0],
                                                                  [16.0, 20.0, 24.0, 30.0],
                                                                  [0.0, 0.0, 40.0, 50.0]]))


def test_postprocess_ranks_all_query_class_pairs_so_a_query_can_score_two_classes():
    logits = torch.full((1, 3, 3), -10.0)
    logits[0, 1, 0], logits[0, 1, 2], logits[0, 0, 1] = 3.0, 2.0, 1.0  # query 1 is best for classes 0 and 2
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5], [0.8, 0.8, 0.2, 0.2]]])
    result, = PostProcess(num_select=3)({'pred_logits': logits, 'pred_boxes': boxes}, torch.tensor([[10, 10]]))
    torch.testing.assert_close(result['scores'], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0])))
    assert result['labels'].tolist() == [0, 2, 1]
    torch.testing.assert_close(result['boxes'], torch.tensor([[0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 5.0, 5.0],
                                                          [4.0, 4.0, 6.0, 6.0]]))


# Batch independence ------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def eval_detr(tiny_detr):
    return tiny_detr().eval()


def run(detr, images, mask=None, targets=None):
    if mask is None:
        mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
    with torch.no_grad():
        return detr(images, mask, targets)


def test_unpadded_image_in_batch_equals_image_alone(eval_detr):
    torch.manual_seed(0)
    large, small = torch.randn(3, 128, 128), torch.randn(3, 64, 128)
    images, mask, _ = collate_fn([(large, {}), (small, {})])
    batched = run(eval_detr, images, mask)
    alone = run(eval_detr, large[None])
    for key in ('pred_logits', 'pred_boxes'):
        torch.testing.assert_close(batched[key][0], alone[key][0], rtol=0, atol=1e-4)
        torch.testing.assert_close(batched['aux_outputs'][0][key][0], alone['aux_outputs'][0][key][0],
                                   rtol=0, atol=1e-4)
    torch.testing.assert_close(batched['enc_outputs']['pred_logits'][0], alone['enc_outputs']['pred_logits'][0],
                               rtol=0, atol=1e-4)


def test_padded_image_masks_and_position_encoding_equal_image_alone(eval_detr):
    """Sizes are multiples of the largest stride (64), so every level's valid part is exact."""
    torch.manual_seed(0)
    large, small = torch.randn(3, 128, 192), torch.randn(3, 64, 128)
    images, mask, _ = collate_fn([(large, {}), (small, {})])
    with torch.no_grad():
        _, masks, pos = eval_detr.features(images, mask)
        _, masks_alone, pos_alone = eval_detr.features(small[None], torch.zeros(1, 64, 128, dtype=torch.bool))
    assert len(masks) == 4
    for m, p, m_alone, p_alone in zip(masks, pos, masks_alone, pos_alone):
        h, w = m_alone.shape[-2:]
        assert not m[1, :h, :w].any() and m[1, h:].all() and m[1, :, w:].all()
        torch.testing.assert_close(p[1, :, :h, :w], p_alone[0], rtol=0, atol=1e-5)


def test_padded_image_transformer_equals_image_alone(eval_detr):
    """Given the same features on the valid part (garbage on padding), encoder memory and encoder proposals
    there, and the decoder run from the same queries, equal the image alone. The full detector differs on a
    padded image: the backbone's convolutions and input_proj's GroupNorm see the padding (as in the official
    code), which this test sidesteps by feeding the transformer directly."""
    torch.manual_seed(0)
    transformer = eval_detr.transformer
    alone_shapes = [(8, 16), (4, 8), (2, 4), (1, 2)]
    padded_shapes = [(16, 24), (8, 12), (4, 6), (2, 3)]
    srcs_alone = [torch.randn(1, D_MODEL, h, w) for h, w in alone_shapes]
    pos_alone = [eval_detr.backbone[1](torch.zeros(1, h, w, dtype=torch.bool)) for h, w in alone_shapes]
    srcs, masks, pos = [], [], []
    for s, (h, w), (H, W) in zip(srcs_alone, alone_shapes, padded_shapes):
        src = torch.randn(2, D_MODEL, H, W) * 5  # image 0 fills its map, image 1 is padded with garbage
        src[1, :, :h, :w] = s[0]
        m = torch.ones(2, H, W, dtype=torch.bool)
        m[0] = False
        m[1, :h, :w] = False
        srcs.append(src)
        masks.append(m)
        pos.append(eval_detr.backbone[1](m))
    with torch.no_grad():
        enc = transformer.encode(srcs, masks, pos)
        enc_alone = transformer.encode(srcs_alone, [torch.zeros(1, h, w, dtype=torch.bool) for h, w in alone_shapes],
                                       pos_alone)
        valid = ~enc['mask'][1]
        torch.testing.assert_close(enc['memory'][1, valid], enc_alone['memory'][0], rtol=0, atol=1e-4)
        tgt, query_pos, reference, enc_out = transformer.select_queries(enc_alone)
        torch.testing.assert_close(transformer.select_queries(enc)[3]['pred_logits'][1, valid],
                                   enc_out['pred_logits'][0], rtol=0, atol=1e-4)
        hs, refs = transformer.decode(enc, torch.cat([tgt, tgt]), torch.cat([query_pos, query_pos]),
                                      torch.cat([reference, reference]))
        hs_alone, refs_alone = transformer.decode(enc_alone, tgt, query_pos, reference)
    torch.testing.assert_close(hs[:, 1], hs_alone[:, 0], rtol=0, atol=1e-4)
    torch.testing.assert_close(refs[-1][1], refs_alone[-1][0], rtol=0, atol=1e-4)


# Eval mode with the CLIP-DETR training modules ---------------------------------------------------------

def test_eval_with_training_modules_equals_baseline(tiny_detr):
    torch.manual_seed(1)
    alignnet, dynql = AlignNet(label_embeddings=torch.randn(5, 16), d_model=D_MODEL), DynQL(d_model=D_MODEL)
    full = tiny_detr(alignnet=alignnet, dynql=dynql, seed=0).eval()
    baseline = tiny_detr(seed=1).eval()
    result = baseline.load_state_dict(full.state_dict(), strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys and all(k.startswith(('alignnet.', 'dynql.')) for k in result.unexpected_keys)
    images = torch.randn(2, 3, 64, 64)
    targets = [{'labels': torch.tensor([1, 3]), 'boxes': torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.6, 0.2, 0.3]])},
               {'labels': torch.tensor([0]), 'boxes': torch.tensor([[0.4, 0.4, 0.5, 0.2]])}]
    out_full, out_base = run(full, images, targets=targets), run(baseline, images)
    assert set(out_full) == set(out_base) == {'pred_logits', 'pred_boxes', 'aux_outputs', 'enc_outputs'}
    torch.testing.assert_close(out_full['pred_logits'], out_base['pred_logits'], rtol=0, atol=0)
    torch.testing.assert_close(out_full['pred_boxes'], out_base['pred_boxes'], rtol=0, atol=0)
    torch.testing.assert_close(out_full['aux_outputs'], out_base['aux_outputs'], rtol=0, atol=0)
    torch.testing.assert_close(out_full['enc_outputs'], out_base['enc_outputs'], rtol=0, atol=0)


# Backbone errors ---------------------------------------------------------------------------------------

def test_pretrained_backbone_offline_fails_fast_naming_backbone(tmp_path, monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    start = time.monotonic()
    with pytest.raises(ValueError, match='resnet18'):
        Backbone('resnet18', pretrained=True)
    assert time.monotonic() - start < 5


def test_unknown_backbone_is_rejected():
    with pytest.raises(ValueError, match='resnet51'):
        Backbone('resnet51')


# Attention implementation choice -----------------------------------------------------------------------

def test_attn_impl_auto_on_cpu_is_gather_for_large_calls_and_unknown_is_rejected():
    assert model.resolve_attn_impl('auto', 'cpu', points=model.GATHER_MIN_POINTS) == 'gather'
    assert model.resolve_attn_impl('auto', 'cpu', points=model.GATHER_MIN_POINTS - 1) == 'pytorch'
    assert model.resolve_attn_impl('auto', 'cpu') == 'pytorch'
    assert model.resolve_attn_impl('gather', 'cpu', points=1) == 'gather'
    assert model.resolve_attn_impl('pytorch', 'cpu', points=2**30) == 'pytorch'
    with pytest.raises(ValueError, match='cuda-kernel'):
        model.resolve_attn_impl('cuda-kernel', 'cpu')


def test_attn_impl_triton_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match='triton'):
        model.resolve_attn_impl('triton', 'cpu')
