"""Tests for dynql.py, DynQL (paper §3.3, Eq. 6-10): the noise statistics of Eq. 6, the box
jitter bounds of Eq. 7, the unit-scale z_attr that keeps Eq. 6's beta spectrum, the positional query of
Eq. 8 against the transformer's own two-stage query, the attention mask of Eq. 9 alone and inside a real
decoder, the direct-assignment loss of Eq. 10 (per layer, per set, per slot, inside the full model) and its
S * N normalization, the per-beta log values, bad arguments, and a batch without GT boxes. CPU only, no network.

Shape legend: B batch, Q conventional queries, S DynQuery sets, G padded set size (max GT per image),
N GT instances in the batch, C model width, K classes.
"""
import itertools
import math

import pytest
import torch
from torchvision.ops import box_convert

from alignnet import AlignNet
from dynql import DynQL, attention_mask, dynql_loss, dynql_set_losses
from matcher import global_num_boxes
from model import MLP, DeformableTransformer, box_sine_embed

D_MODEL = 32


def tiny_transformer(d_model=D_MODEL, num_proposals=4, n_levels=2):
    """A 1-encoder, 2-decoder-layer two-stage transformer with its heads attached, in eval mode."""
    torch.manual_seed(0)
    transformer = DeformableTransformer(d_model=d_model, n_heads=4, num_encoder_layers=1, num_decoder_layers=2,
                                        d_ffn=64, dropout=0.0, n_levels=n_levels, enc_n_points=2, dec_n_points=2,
                                        two_stage=True, two_stage_num_proposals=num_proposals).eval()
    transformer.decoder.bbox_embed = torch.nn.ModuleList(MLP(d_model, d_model, 4, 3) for _ in range(3))
    transformer.decoder.class_embed = torch.nn.ModuleList(torch.nn.Linear(d_model, 3) for _ in range(3))
    return transformer


def encoded(transformer, batch=2, shapes=((4, 6), (2, 3))):
    """Encoder output of random feature maps, one per level."""
    d_model = transformer.d_model
    srcs = [torch.randn(batch, d_model, h, w) for h, w in shapes]
    masks = [torch.zeros(batch, h, w, dtype=torch.bool) for h, w in shapes]
    pos = [torch.randn(batch, d_model, h, w) for h, w in shapes]
    with torch.no_grad():
        return transformer.encode(srcs, masks, pos)


def targets_of_sizes(sizes, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for n in sizes:
        centre = 0.3 + 0.4 * torch.rand(n, 2, generator=g)
        size = 0.1 + 0.2 * torch.rand(n, 2, generator=g)
        targets.append({'labels': torch.randint(0, K, (n,), generator=g), 'boxes': torch.cat([centre, size], 1)})
    return targets


# Eq. 6 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('beta', [0.0, 0.3, 0.9, 1.0])
def test_content_mean_and_variance(beta):
    torch.manual_seed(0)
    z = torch.tensor([1.0, -2.0, 0.5, 3.0])
    draws = DynQL(d_model=4).content(z.repeat(20000, 1), beta)  # (20000, C)
    torch.testing.assert_close(draws.mean(0), math.sqrt(1 - beta) * z, rtol=0, atol=0.03)
    torch.testing.assert_close(draws.var(0), torch.full((4,), beta), rtol=0, atol=0.05)


def test_forward_lays_out_sets_per_image_in_gt_order():
    torch.manual_seed(0)
    targets = targets_of_sizes([2, 3, 0])
    z_attr = torch.randn(5, 8)
    z_hat = z_attr / z_attr.norm(dim=1, keepdim=True) * math.sqrt(8)  # unit per-element scale
    dynql = DynQL(d_model=8, betas=(0.0, 0.5, 0.0), rho=0.0)
    dyn = dynql(z_attr, targets, num_queries=4, proposal_queries=tiny_transformer(d_model=8).proposal_queries)
    S, G = 3, 3
    assert (dyn.num_sets, dyn.group_size) == (S, G)
    assert dyn.valid.tolist() == [[True, True, False], [True, True, True], [False, False, False]]
    content = dyn.content.view(3, S, G, 8)  # (B, S, G, C)
    reference = dyn.reference.view(3, S, G, 4)  # (B, S, G, 4)
    for s in (0, 2):  # beta = 0: the content is z_attr itself, at unit scale
        torch.testing.assert_close(content[0, s, :2], z_hat[:2])
        torch.testing.assert_close(content[1, s], z_hat[2:])
    assert (content[0, 1, :2] - z_hat[:2]).abs().max() > 0.1
    for s in range(S):  # rho = 0: the reference is the GT box
        torch.testing.assert_close(reference[0, s, :2], targets[0]['boxes'], rtol=0, atol=1e-6)
        torch.testing.assert_close(reference[1, s], targets[1]['boxes'], rtol=0, atol=1e-6)
    assert dyn.z_attr_norm.item() == pytest.approx(z_attr.norm(dim=1).mean().item(), rel=1e-6)


def test_beta_spectrum_from_informed_to_uninformed():
    """A freshly initialised z_attr (element std ~0.03): the cosine between DynQuery content and z_attr is
    ~sqrt(1 - beta) and falls with beta, i.e. the sets span informed to uninformed (Eq. 6; docs/design.md)."""
    torch.manual_seed(0)
    N, C = 400, 64
    betas = (0.1, 0.3, 0.5, 0.7, 0.9)
    z_attr = 0.03 * torch.randn(N, C) + 0.01
    targets = targets_of_sizes([N])
    dyn = DynQL(d_model=C, betas=betas)(z_attr, targets, num_queries=0,
                                        proposal_queries=tiny_transformer(d_model=C).proposal_queries)
    content = dyn.content.view(len(betas), N, C)  # (S, N, C), one image
    cosine = torch.nn.functional.cosine_similarity(content, z_attr[None], dim=-1).mean(1)  # (S,)
    expected = torch.tensor([math.sqrt(1 - b) for b in betas])
    torch.testing.assert_close(cosine, expected, rtol=0, atol=0.02)
    assert (cosine[1:] < cosine[:-1]).all(), cosine
    # The blend keeps unit per-element scale at every beta, as the diffusion forward step does.
    torch.testing.assert_close(content.pow(2).mean((1, 2)), torch.ones(len(betas)), rtol=0, atol=0.05)


# Eq. 7 ---------------------------------------------------------------------------------------------

def test_position_jitter_bounded_by_rho_theta():
    torch.manual_seed(0)
    rho = 0.8
    g = torch.Generator().manual_seed(1)
    boxes = torch.cat([0.4 + 0.2 * torch.rand(4000, 2, generator=g), 0.05 + 0.1 * torch.rand(4000, 2, generator=g)], 1)
    p = DynQL(d_model=8, rho=rho).position(boxes)
    theta = boxes[:, 2:]  # (N, 2)
    centre_step = (p[:, :2] - boxes[:, :2]) / (rho * theta / 2)  # (N, 2): lambda / rho of the centre, in [-1, 1]
    size_step = (p[:, 2:] - boxes[:, 2:]) / (rho * theta)
    for step in (centre_step, size_step):
        assert step.abs().max() <= 1 + 1e-4
        assert step.abs().max() > 0.99  # the bound is reached: lambda goes up to rho
        assert abs(step.abs().mean().item() - 0.5) < 0.03  # |lambda| ~ U(0, rho)
        assert (step > 0.1).float().mean() > 0.4 and (step < -0.1).float().mean() > 0.4  # both signs
    # One lambda per coordinate, drawn independently.
    magnitudes = torch.cat([centre_step, size_step], 1).abs().T  # (4, N)
    assert torch.corrcoef(magnitudes).fill_diagonal_(0).abs().max() < 0.1


def test_position_without_jitter_is_the_gt_box():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.2, 0.2], [0.5, 0.5, 1.0, 1.0]])
    torch.testing.assert_close(DynQL(d_model=8, rho=0.0).position(boxes), boxes, rtol=0, atol=1e-6)


BORDER_BOXES = torch.tensor([[0.02, 0.98, 0.04, 0.04], [0.98, 0.02, 0.04, 0.04], [0.5, 0.5, 1.0, 1.0],
                             [0.995, 0.5, 0.01, 0.2], [0.5, 0.5, 0.002, 0.002]])


@pytest.mark.parametrize('rho', [0.5, 1.0, 1.5])
def test_position_boxes_at_the_border_keep_positive_size(rho):
    torch.manual_seed(0)
    p = DynQL(d_model=8, rho=rho).position(BORDER_BOXES.repeat(400, 1))
    assert torch.isfinite(p).all()
    assert (p[:, 2:] > 0).all()
    assert (p[:, :2] >= 0).all() and (p[:, :2] <= 1).all()


@pytest.mark.parametrize('rho', [1.0, 1.5])
def test_position_boxes_at_the_border_stay_inside_the_image(rho):
    torch.manual_seed(0)
    p = DynQL(d_model=8, rho=rho).position(BORDER_BOXES.repeat(400, 1))
    xyxy = box_convert(p, 'cxcywh', 'xyxy')
    assert xyxy.min() >= -1e-6 and xyxy.max() <= 1 + 1e-6


# Eq. 8 ---------------------------------------------------------------------------------------------

def naive_box_sine_embed(boxes, d_model, temperature=10000):
    """Per coordinate (cx, cy, w, h) in turn, d_model/2 features: sin for even k, cos for odd k, of
    coordinate * 2 pi / temperature^(2 floor(k/2) / (d_model/2))."""
    num_feats = d_model // 2
    out = torch.empty(boxes.shape[0], 4 * num_feats)
    for n, c, k in itertools.product(range(boxes.shape[0]), range(4), range(num_feats)):
        v = boxes[n, c].item() * 2 * math.pi / temperature ** (2 * (k // 2) / num_feats)
        out[n, c * num_feats + k] = math.sin(v) if k % 2 == 0 else math.cos(v)
    return out


def test_box_sine_embedding_known_answer():
    p = torch.rand(5, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(box_sine_embed(p, 16), naive_box_sine_embed(p, 16))


def test_dynquery_positional_query_is_the_conventional_query_at_the_same_box():
    """Eq. 8: a DynQuery at box p gets exactly the positional query the transformer's two-stage path gives a
    conventional query whose proposal is p; DynQL owns no projection of its own."""
    transformer = tiny_transformer(num_proposals=8)
    enc = encoded(transformer)
    with torch.no_grad():
        _, query_pos, reference, _ = transformer.select_queries(enc)  # (B, Q, C), (B, Q, 4)
    # GT boxes = conventional references that lie inside the image (Eq. 7 clips boxes to it), 3 per image.
    xyxy = box_convert(reference, 'cxcywh', 'xyxy')
    inside = ((xyxy >= 0) & (xyxy <= 1)).all(-1)  # (B, Q)
    picks = [row.nonzero()[:3, 0] for row in inside]
    assert all(len(p) == 3 for p in picks)
    targets = [{'boxes': reference[b, p], 'labels': torch.zeros(3, dtype=torch.long)} for b, p in enumerate(picks)]
    dynql = DynQL(d_model=D_MODEL, betas=(0.2, 0.6), rho=0.0)
    assert list(dynql.parameters()) == []
    with torch.no_grad():
        dyn = dynql(torch.randn(6, D_MODEL), targets, num_queries=8, proposal_queries=transformer.proposal_queries)
    dyn_pos = dyn.query_pos.view(2, 2, 3, D_MODEL)  # (B, S, G, C)
    for b, s in itertools.product(range(2), range(2)):
        torch.testing.assert_close(dyn_pos[b, s], query_pos[b, picks[b]], rtol=0, atol=1e-5)
    # ... and that query is LayerNorm(pos_trans(PE(p))), first half, as the official two-stage code builds it.
    boxes = targets[0]['boxes']
    with torch.no_grad():
        official = transformer.pos_trans_norm(transformer.pos_trans(naive_box_sine_embed(boxes, D_MODEL)))
    torch.testing.assert_close(dyn_pos[0, 1], official[:, :D_MODEL], rtol=0, atol=1e-5)


# Eq. 9 ---------------------------------------------------------------------------------------------

def test_attention_mask_known_answer():
    Q, S, G = 2, 2, 2
    valid = torch.tensor([[True, True], [True, False]])
    mask = attention_mask(Q, S, G, valid)
    assert mask.shape == (2, 6, 6) and mask.dtype == torch.bool

    def group(i):
        return -1 if i < Q else (i - Q) // G

    for b, row, col in itertools.product(range(2), range(6), range(6)):
        padded_key = col >= Q and not valid[b, (col - Q) % G]
        may_attend = (group(col) == -1 or group(col) == group(row)) and not padded_key
        assert mask[b, row, col].item() == (not may_attend), (b, row, col)
    # Spelled out for image 1, whose second DynQuery of each set is padding (True = hidden).
    assert mask[1].int().tolist() == [[0, 0, 1, 1, 1, 1],
                                      [0, 0, 1, 1, 1, 1],
                                      [0, 0, 0, 1, 1, 1],
                                      [0, 0, 0, 1, 1, 1],
                                      [0, 0, 1, 1, 0, 1],
                                      [0, 0, 1, 1, 0, 1]]


@pytest.fixture(scope='module')
def decoder_case():
    """A 2-layer decoder with box refinement, Q two-stage queries and S=2 DynQuery sets for GT sizes [2, 1]."""
    transformer = tiny_transformer()
    enc = encoded(transformer)
    dynql = DynQL(d_model=D_MODEL, betas=(0.3, 0.7))
    with torch.no_grad():
        tgt, query_pos, reference, _ = transformer.select_queries(enc)
        dyn = dynql(torch.randn(3, D_MODEL), targets_of_sizes([2, 1]), num_queries=4,
                    proposal_queries=transformer.proposal_queries)
    queries = {'tgt': torch.cat([tgt, dyn.content], 1), 'query_pos': torch.cat([query_pos, dyn.query_pos], 1),
               'reference': torch.cat([reference, dyn.reference], 1)}  # (B, Q + S*G, .)
    return transformer, enc, queries, dyn.attn_mask


def decode(case, queries):
    transformer, enc, _, mask = case
    with torch.no_grad():
        hs, refs = transformer.decode(enc, queries['tgt'], queries['query_pos'], queries['reference'], mask)
    return hs, torch.stack(refs)  # (layers, B, T, C), (layers, B, T, 4)


def perturb(queries, images, rows):
    g = torch.Generator().manual_seed(5)
    out = {k: v.clone() for k, v in queries.items()}
    for b, r in itertools.product(images, rows):
        out['tgt'][b, r] += torch.randn(D_MODEL, generator=g)
        out['query_pos'][b, r] += torch.randn(D_MODEL, generator=g)
        out['reference'][b, r] = 0.2 + 0.6 * torch.rand(4, generator=g)
    return out


def changed_rows(case, images, rows):
    """Per (image, query): the largest change of hidden state or reference over all layers."""
    hs, refs = decode(case, case[2])
    hs_p, refs_p = decode(case, perturb(case[2], images, rows))
    return torch.maximum((hs_p - hs).abs().amax((0, 3)), (refs_p[1:] - refs[1:]).abs().amax((0, 3)))  # (B, T)


Q_CONV, G = 4, 2
CONVENTIONAL = list(range(Q_CONV))
SET_1, SET_2 = [Q_CONV, Q_CONV + 1], [Q_CONV + G, Q_CONV + G + 1]


def test_decoder_dynqueries_never_reach_conventional_queries(decoder_case):
    change = changed_rows(decoder_case, [0, 1], SET_1 + SET_2)
    assert change[:, CONVENTIONAL].max() < 1e-6


def test_decoder_set_2_never_reaches_set_1(decoder_case):
    change = changed_rows(decoder_case, [0, 1], SET_2)
    assert change[:, CONVENTIONAL + SET_1].max() < 1e-6
    assert change[0, SET_2].min() > 1e-3


def test_decoder_padded_dynqueries_never_reach_anything(decoder_case):
    padded = [SET_1[1], SET_2[1]]  # image 1 has one GT: the second DynQuery of each set is padding
    change = changed_rows(decoder_case, [1], padded)
    others = [i for i in range(Q_CONV + 2 * G) if i not in padded]
    assert change[:, others].max() < 1e-6 and change[0].max() < 1e-6


def test_decoder_set_1_sees_itself_and_conventional_queries_reach_sets(decoder_case):
    """Sanity: the mask lets information through where Eq. 9 allows it."""
    change = changed_rows(decoder_case, [0], SET_1[:1])
    assert change[0, SET_1[1]] > 1e-3
    assert change[0, SET_2].max() < 1e-6
    change = changed_rows(decoder_case, [0], CONVENTIONAL[:1])
    assert change[0, SET_1 + SET_2].min() > 1e-3


@pytest.fixture
def tiny_clip_detr(tiny_detr):
    """The tiny detector (1 encoder layer, 3 classes, 6 queries) with AlignNet and DynQL (two sets) attached."""
    torch.manual_seed(0)
    alignnet = AlignNet(label_embeddings=torch.randn(3, 16), d_model=D_MODEL)
    dynql = DynQL(d_model=D_MODEL, betas=(0.2, 0.6))
    return tiny_detr(num_classes=3, num_queries=6, enc_layers=1, alignnet=alignnet, dynql=dynql)


def test_model_conventional_outputs_unchanged_by_dynql_in_training(tiny_clip_detr):
    detr = tiny_clip_detr.train()
    images = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    targets = targets_of_sizes([2, 1])
    with torch.no_grad():
        with_dynql = detr(images, mask, targets)
        dynql, detr.dynql = detr.dynql, None
        without = detr(images, mask, targets)
        detr.dynql = dynql
    assert len(with_dynql['dynql_outputs']) == 2
    assert with_dynql['dynql_outputs'][-1]['pred_logits'].shape == (2, 2 * 2, 3)
    for key in ('pred_logits', 'pred_boxes', 'aux_outputs', 'enc_outputs'):
        torch.testing.assert_close(with_dynql[key], without[key], rtol=0, atol=1e-5)


# Eq. 10 --------------------------------------------------------------------------------------------

def test_model_dynquery_slot_s_i_is_supervised_by_gt_i(tiny_clip_detr):
    """Full model, rho = 0, box heads that output their reference box: DynQuery (s, i) predicts GT i's box exactly,
    so the DynQL box losses are 0 on every layer; pairing the slots with other GT boxes makes them non-zero."""
    detr = tiny_clip_detr.train()
    detr.dynql.rho = 0.0
    with torch.no_grad():
        for head in detr.bbox_embed:
            head.layers[-1].weight.zero_()
            head.layers[-1].bias.zero_()
    targets = targets_of_sizes([2, 3])
    with torch.no_grad():
        out = detr(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool), targets)
    layout = out['dynql_layout']
    losses = dynql_loss(out['dynql_outputs'], layout, targets, num_instances=5)
    box_keys = [k for k in losses if 'bbox' in k or 'giou' in k]
    assert len(box_keys) == 4  # 2 decoder layers
    for key in box_keys:
        assert losses[key].item() < 1e-5, (key, losses[key].item())
    # Swap the outputs of DynQueries 0 and 1 in every set: each is now scored against the other's GT.
    S, G = layout.num_sets, layout.group_size
    swap = torch.arange(S * G).view(S, G)  # (S, G)
    swap[:, [0, 1]] = swap[:, [1, 0]]
    swapped = [{k: v[:, swap.flatten()] for k, v in o.items()} for o in out['dynql_outputs']]
    permuted = dynql_loss(swapped, layout, targets, num_instances=5)
    for key in box_keys:
        assert permuted[key].item() > 0.01, key


LOGIT = 2.0
P_GT = 1 / (1 + math.exp(-LOGIT))  # sigmoid(+LOGIT): the GT class of an assigned DynQuery
FOCAL_POS = 0.25 * (1 - P_GT) ** 2 * -math.log(P_GT)  # focal loss of the GT class at +LOGIT
FOCAL_NEG = 0.75 * (1 - P_GT) ** 2 * -math.log(P_GT)  # ... of another class at -LOGIT: sigmoid(-x) = 1 - sigmoid(x)


def loss_case(betas, set_offsets, layer_offsets=(0.0, 0.0, 0.0), garbage=0.0, K=3):
    """dynql_outputs of 3 decoder layers for GT sizes [2, 1] with distinct labels [0, 1], [2]: at the assigned
    slot of set s in layer l the box is the GT plus set_offsets[s] + layer_offsets[l] on cx and the logits are
    +LOGIT on the GT class, -LOGIT on the others; padded slots hold `garbage`."""
    targets = targets_of_sizes([2, 1], K=K)
    targets[0]['labels'], targets[1]['labels'] = torch.tensor([0, 1]), torch.tensor([2])
    layout = DynQL(d_model=8, betas=betas)(torch.randn(3, 8), targets, num_queries=4,
                                           proposal_queries=tiny_transformer(d_model=8).proposal_queries)
    S, G = layout.num_sets, layout.group_size
    outputs = []
    for layer_offset in layer_offsets:
        logits = torch.full((2, S, G, K), garbage)
        boxes = torch.full((2, S, G, 4), garbage)
        for b, s in itertools.product(range(2), range(S)):
            n = len(targets[b]['boxes'])
            logits[b, s, :n] = -LOGIT
            logits[b, s, torch.arange(n), targets[b]['labels']] = LOGIT
            boxes[b, s, :n] = targets[b]['boxes'] + torch.tensor([set_offsets[s] + layer_offset, 0.0, 0.0, 0.0])
        outputs.append({'pred_logits': logits.flatten(1, 2), 'pred_boxes': boxes.flatten(1, 2)})  # (B, S*G, .)
    return outputs, layout, targets


def test_loss_keys_and_each_layer_scored_on_its_own_output():
    layer_offsets = (0.01, 0.02, 0.04)
    outputs, layout, targets = loss_case((0.3, 0.7), (0.0, 0.0), layer_offsets)
    losses = dynql_loss(outputs, layout, targets, num_instances=3)
    terms = ('loss_dynql_ce', 'loss_dynql_bbox', 'loss_dynql_giou')
    assert set(losses) == {t + s for t, s in itertools.product(terms, ('', '_0', '_1'))}
    # Every DynQuery is off by the layer's offset on cx: the L1 term per query is exactly that offset.
    for suffix, offset in zip(('_0', '_1', ''), layer_offsets):
        assert losses['loss_dynql_bbox' + suffix].item() == pytest.approx(offset, rel=1e-4), suffix
    outputs, layout, targets = loss_case((0.3, 0.7), (0.0, 0.0))
    for key, value in dynql_loss(outputs, layout, targets, num_instances=3).items():
        if 'ce' not in key:
            assert value.abs().item() < 1e-6, key


def test_loss_normalized_by_sets_times_instances():
    K = 3
    # Set 1 exact, set 2 off by 0.1 in cx for all N = 3 instances: L1 sum 0.3 over S * N = 6.
    outputs, layout, targets = loss_case((0.3, 0.7), (0.0, 0.1), K=K)
    losses = dynql_loss(outputs, layout, targets, num_instances=3)
    assert losses['loss_dynql_bbox'].item() == pytest.approx(0.3 / 6, rel=1e-5)
    # Each DynQuery is confident in its own GT's class: any other pairing of slots and labels costs far more.
    assert losses['loss_dynql_ce'].item() == pytest.approx(FOCAL_POS + (K - 1) * FOCAL_NEG, rel=1e-5)
    # Twice the sets (betas repeated, Table 7's x2): twice the per-query sum and twice the normalizer.
    outputs, layout, targets = loss_case((0.3, 0.7, 0.3, 0.7), (0.0, 0.1, 0.0, 0.1), K=K)
    doubled = dynql_loss(outputs, layout, targets, num_instances=3)
    for key in losses:
        torch.testing.assert_close(doubled[key], losses[key])


def test_set_losses_per_beta_for_the_log():
    K = 3
    outputs, layout, targets = loss_case((0.3, 0.7, 0.3), (0.0, 0.1, 0.02), K=K)
    values = dynql_set_losses(outputs, layout, targets)
    assert set(values) == {f'dynql_b{b}_{t}' for b in ('0.3', '0.7') for t in ('ce', 'bbox', 'giou')}
    # beta 0.3 covers sets 0 and 2 (offsets 0 and 0.02): their mean L1 per query; beta 0.7 is set 1 alone.
    assert values['dynql_b0.3_bbox'] == pytest.approx(0.01, rel=1e-4)
    assert values['dynql_b0.7_bbox'] == pytest.approx(0.1, rel=1e-4)
    assert values['dynql_b0.3_ce'] == pytest.approx(FOCAL_POS + (K - 1) * FOCAL_NEG, rel=1e-5)
    # Weighted by the sets each covers, the per-beta values give back the optimised last-layer terms.
    losses = dynql_loss(outputs, layout, targets, num_instances=3)
    for term in ('ce', 'bbox', 'giou'):
        mixed = (2 * values[f'dynql_b0.3_{term}'] + values[f'dynql_b0.7_{term}']) / 3
        assert mixed == pytest.approx(losses[f'loss_dynql_{term}'].item(), rel=1e-5, abs=1e-7), term


def test_loss_ignores_padded_slots():
    outputs, layout, targets = loss_case((0.3, 0.7), (0.05, 0.1), garbage=0.5)
    reference = dynql_loss(outputs, layout, targets, num_instances=3)
    outputs, layout, targets = loss_case((0.3, 0.7), (0.05, 0.1), garbage=1e3)
    garbage = dynql_loss(outputs, layout, targets, num_instances=3)
    torch.testing.assert_close(garbage, reference)


# Arguments and empty batches ------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs', [dict(betas=(0.5, 1.2)), dict(betas=(-0.1,)), dict(betas=()), dict(rho=-0.1)])
def test_bad_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError, match='beta|rho'):
        DynQL(d_model=8, **kwargs)


def test_extreme_betas_and_zero_rho_are_accepted():
    assert DynQL(d_model=8, betas=(0.0, 1.0), rho=0.0).betas == [0.0, 1.0]


def test_batch_without_gt_gives_zero_losses():
    transformer = tiny_transformer(d_model=8)
    targets = targets_of_sizes([0, 0])
    dyn = DynQL(d_model=8, betas=(0.3, 0.7))(torch.zeros(0, 8), targets, num_queries=4,
                                             proposal_queries=transformer.proposal_queries)
    assert dyn.content.shape == (2, 0, 8) and dyn.attn_mask.shape == (2, 4, 4) and not dyn.attn_mask.any()
    assert dyn.query_pos.shape == (2, 0, 8) and dyn.z_attr_norm.item() == 0
    outputs = [{'pred_logits': torch.zeros(2, 0, 3), 'pred_boxes': torch.zeros(2, 0, 4)}] * 2
    losses = dynql_loss(outputs, dyn, targets, global_num_boxes(targets, torch.device('cpu')))
    assert all(torch.isfinite(v) and v.item() == 0 for v in losses.values())


@pytest.mark.parametrize('align_loss', [True, False])
def test_model_batch_without_gt_trains(align_loss, tiny_clip_detr):
    """DDP needs a gradient for every trainable parameter on every rank, also when a rank has no GT box."""
    detr = tiny_clip_detr.train()
    detr.align_loss = align_loss  # False: --method dynql, where z_attr feeds only DynQL
    if not align_loss:
        detr.alignnet.logit_beta.requires_grad_(False)
    targets = targets_of_sizes([0, 0])
    out = detr(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool), targets)
    losses = dynql_loss(out['dynql_outputs'], out['dynql_layout'], targets, global_num_boxes(targets, 'cpu'))
    total = sum(losses.values()) + out.get('loss_align', 0.0)
    assert torch.isfinite(total) and total.item() == 0
    total.backward()
    for name in ('transformer.pos_trans.weight', 'alignnet.attr_proj.weight', 'alignnet.attr_proj.bias'):
        assert detr.get_parameter(name).grad is not None, name


def test_forward_under_bf16_autocast_keeps_float32_reference_boxes():
    """--amp: z_attr arrives in bf16 (AlignNet's Linear under autocast) while the GT boxes are float32; the
    DynQuery reference boxes stay float32 and exact (rho = 0: the GT boxes themselves)."""
    torch.manual_seed(0)
    targets = targets_of_sizes([2, 1])
    dynql = DynQL(d_model=8, betas=(0.5, 0.9), rho=0.0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        dyn = dynql(torch.randn(3, 8, dtype=torch.bfloat16), targets, num_queries=4,
                    proposal_queries=lambda p: (p.new_zeros(*p.shape[:-1], 8),) * 2)
    assert dyn.reference.dtype == torch.float32
    reference = dyn.reference.view(2, 2, 2, 4)  # (B, S, G, 4)
    for s in range(2):  # bf16 would be off by ~1e-3
        torch.testing.assert_close(reference[0, s], targets[0]['boxes'], rtol=0, atol=1e-6)
        torch.testing.assert_close(reference[1, s, :1], targets[1]['boxes'], rtol=0, atol=1e-6)
