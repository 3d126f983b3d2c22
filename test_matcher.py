"""Tests for matcher.py (paper §3.1): the Hungarian matcher is optimal and per-image, the focal
class cost and the criterion's focal / L1 / GIoU losses equal hand computations, and the loss bookkeeping
(aux and encoder suffixes, weights, the num_boxes normalizer). CPU only.

Shape legend: B batch, Q queries, K classes, n GT boxes of one image.
"""
import itertools
import math

import pytest
import torch

from matcher import HungarianMatcher, SetCriterion, box_losses, cxcywh_to_xyxy, global_num_boxes, weight_dict


def random_boxes(n, generator):
    """Valid normalized cxcywh boxes, (n, 4)."""
    centre = 0.2 + 0.6 * torch.rand(n, 2, generator=generator)
    size = 0.05 + 0.3 * torch.rand(n, 2, generator=generator)
    return torch.cat([centre, size], 1)


def random_batch(sizes, Q=5, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(sizes)
    outputs = {'pred_logits': torch.randn(B, Q, K, generator=g),
               'pred_boxes': random_boxes(B * Q, g).view(B, Q, 4)}  # (B, Q, 4)
    targets = [{'labels': torch.randint(0, K, (n,), generator=g), 'boxes': random_boxes(n, g)} for n in sizes]
    return outputs, targets


def focal(logit, target, alpha=0.25, gamma=2.0):
    """Sigmoid focal loss of one logit, from its definition (Lin et al.)."""
    p = 1 / (1 + math.exp(-logit))
    p_t = p if target else 1 - p
    alpha_t = alpha if target else 1 - alpha
    return -alpha_t * (1 - p_t) ** gamma * math.log(p_t)


# Matcher ----------------------------------------------------------------------------------------------

def test_batched_matching_equals_per_image_matching():
    outputs, targets = random_batch([2, 0, 3, 1])
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    for b, target in enumerate(targets):
        alone = matcher({k: v[b:b + 1] for k, v in outputs.items()}, [target])[0]
        assert batched[b][0].tolist() == alone[0].tolist()
        assert batched[b][1].tolist() == alone[1].tolist()
        assert len(batched[b][0]) == len(target['boxes'])
        assert batched[b][0].dtype == batched[b][1].dtype == torch.int64


def test_empty_targets_give_empty_indices_and_finite_losses():
    outputs, targets = random_batch([0, 0])
    outputs['aux_outputs'] = [{k: v.clone() for k, v in outputs.items()}]
    outputs['enc_outputs'] = {k: v.clone() for k, v in outputs.items() if k != 'aux_outputs'}
    for src, tgt in HungarianMatcher()(outputs, targets):
        assert src.numel() == 0 and tgt.numel() == 0
    losses = SetCriterion(num_classes=4)(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses['loss_bbox'] == 0 and losses['loss_giou_0'] == 0
    # Every query is a negative of every class; num_boxes is clamped to 1.
    expected_ce = sum(focal(x, 0) for x in outputs['pred_logits'].flatten().tolist())  # (B*Q*K,) logits
    assert losses['loss_ce'].item() == pytest.approx(expected_ce, rel=1e-5)


def test_matching_is_the_optimum_over_all_permutations():
    outputs, targets = random_batch([3], Q=4, seed=3)
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(outputs['pred_logits'][0], outputs['pred_boxes'][0], targets[0]['labels'],
                               targets[0]['boxes'])  # (Q, n)
    assert cost.shape == (4, 3)
    totals = {queries: sum(cost[q, j].item() for j, q in enumerate(queries))
              for queries in itertools.permutations(range(4), 3)}
    best = min(totals, key=totals.get)
    src, tgt = matcher(outputs, targets)[0]
    chosen = {j: q for q, j in zip(src.tolist(), tgt.tolist())}
    assert tuple(chosen[j] for j in range(3)) == best
    # A case that needs the assignment solver: the optimum is unique and GT-by-GT greedy misses it.
    assert totals[best] < sorted(totals.values())[1]
    greedy = []
    for j in range(3):
        greedy.append(min((q for q in range(4) if q not in greedy), key=lambda q: cost[q, j].item()))
    assert tuple(greedy) != best


def test_focal_class_cost_and_box_costs_known_answer():
    logits = torch.tensor([[5.0, -3.0, math.log(3.0)]])  # sigmoid of the label-2 logit is 0.75
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    gt = torch.tensor([[0.6, 0.5, 0.2, 0.4]])
    label = torch.tensor([2])
    # alpha (1-p)^2 (-log p) - (1-alpha) p^2 (-log(1-p)), p = 0.75
    class_cost = 0.25 * 0.25 ** 2 * -math.log(0.75) - 0.75 * 0.75 ** 2 * -math.log(0.25)
    only_class = HungarianMatcher(cost_class=1.0, cost_bbox=0.0, cost_giou=0.0)
    assert only_class.cost_matrix(logits, pred, label, gt).item() == pytest.approx(class_cost, rel=1e-5)
    assert class_cost == pytest.approx(-0.580348, abs=1e-6)
    # L1: |0.5-0.6| + |0.2-0.4| = 0.3. xyxy (.4,.4,.6,.6) vs (.5,.3,.7,.7): IoU .02/.10, enclosing .12,
    # GIoU = 0.2 - (0.12 - 0.10) / 0.12 = 1/30.
    expected = 2 * class_cost + 5 * 0.3 - 2 * (1 / 30)
    assert HungarianMatcher().cost_matrix(logits, pred, label, gt).item() == pytest.approx(expected, rel=1e-5)


def test_cxcywh_to_xyxy_known_answer_and_a_giou_that_tells_centres_from_corners():
    assert cxcywh_to_xyxy(torch.tensor([[0.5, 0.375, 0.25, 0.5]])).tolist() == [[0.375, 0.125, 0.625, 0.625]]
    # xyxy (.2,.4,.4,.6) inside (.2,.4,.8,.6): GIoU = IoU = .04 / .12. Read as corner + size, the same numbers
    # are (.3,.5,.5,.7) and (.5,.5,1.1,.7), which only touch: GIoU 0.
    pred, gt = torch.tensor([[0.3, 0.5, 0.2, 0.2]]), torch.tensor([[0.5, 0.5, 0.6, 0.2]])
    losses = box_losses(pred, gt, num_boxes=1)
    assert losses['loss_giou'].item() == pytest.approx(1 - 1 / 3, rel=1e-5)
    assert losses['loss_bbox'].item() == pytest.approx(0.2 + 0.4, rel=1e-5)
    only_giou = HungarianMatcher(cost_class=0.0, cost_bbox=0.0, cost_giou=1.0)
    cost = only_giou.cost_matrix(torch.zeros(1, 2), pred, torch.tensor([0]), gt)
    assert cost.item() == pytest.approx(-1 / 3, rel=1e-5)


# Criterion --------------------------------------------------------------------------------------------

def one_image_case():
    """One GT of class 1; query 0 is close to it, query 1 far: query 0 is matched."""
    outputs = {'pred_logits': torch.tensor([[[-1.0, 2.0], [0.5, -2.0]]]),
               'pred_boxes': torch.tensor([[[0.55, 0.5, 0.2, 0.3], [0.2, 0.2, 0.1, 0.1]]])}
    targets = [{'labels': torch.tensor([1]), 'boxes': torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    return outputs, targets


def test_criterion_losses_equal_hand_computation():
    outputs, targets = one_image_case()
    losses = SetCriterion(num_classes=2)(outputs, targets)
    assert set(losses) == {'loss_ce', 'loss_bbox', 'loss_giou'}
    # Focal over all Q*K entries, the one positive is (query 0, class 1); num_boxes = 1.
    expected_ce = focal(-1.0, 0) + focal(2.0, 1) + focal(0.5, 0) + focal(-2.0, 0)
    assert losses['loss_ce'].item() == pytest.approx(expected_ce, rel=1e-5)
    assert losses['loss_bbox'].item() == pytest.approx(0.05 + 0.1, rel=1e-5)
    # xyxy (.45,.35,.65,.65) vs (.4,.4,.6,.6): intersection .15*.2 = .03, union .06+.04-.03 = .07,
    # enclosing .25*.3 = .075; GIoU = 3/7 - .005/.075.
    giou = 3 / 7 - 0.005 / 0.075
    assert losses['loss_giou'].item() == pytest.approx(1 - giou, rel=1e-5)


def test_aux_and_encoder_loss_keys_and_encoder_is_class_agnostic():
    outputs, targets = random_batch([2, 3], K=3, seed=1)
    base = {k: v.clone() for k, v in outputs.items()}
    g = torch.Generator().manual_seed(7)
    enc = {'pred_logits': torch.randn(2, 5, 3, generator=g),
           'pred_boxes': random_boxes(10, g).view(2, 5, 4)}  # (B, Q, 4)
    outputs['aux_outputs'] = [dict(base), {k: v + 0.01 for k, v in base.items()}]
    outputs['enc_outputs'] = enc
    criterion = SetCriterion(num_classes=3)
    losses = criterion(outputs, targets)
    terms = ('loss_ce', 'loss_bbox', 'loss_giou')
    assert set(losses) == {t + s for t, s in itertools.product(terms, ('', '_0', '_1', '_enc'))}
    for t in terms:
        torch.testing.assert_close(losses[t + '_0'], losses[t])
    assert losses['loss_bbox_1'] != losses['loss_bbox']
    as_class_zero = [dict(t, labels=torch.zeros_like(t['labels'])) for t in targets]
    assert any(t['labels'].any() for t in targets)
    expected = criterion(enc, as_class_zero)
    with_labels = criterion(enc, targets)
    for t in terms:
        torch.testing.assert_close(losses[t + '_enc'], expected[t])
    assert losses['loss_ce_enc'] != with_labels['loss_ce']


def test_weight_dict_maps_every_term_and_rejects_unknown():
    names = ['loss_ce', 'loss_bbox_0', 'loss_giou_enc', 'loss_dynql_ce_3', 'loss_dynql_bbox', 'loss_align']
    assert weight_dict(names, align=0.5) == {'loss_ce': 2.0, 'loss_bbox_0': 5.0, 'loss_giou_enc': 2.0,
                                             'loss_dynql_ce_3': 2.0, 'loss_dynql_bbox': 5.0, 'loss_align': 0.5}
    with pytest.raises(ValueError, match='loss_cardinality'):
        weight_dict(['loss_ce', 'loss_cardinality'])


def test_global_num_boxes_counts_and_clamps_at_one():
    _, targets = random_batch([2, 0, 3])
    assert global_num_boxes(targets, torch.device('cpu')) == 5.0
    assert global_num_boxes(random_batch([0, 0])[1], torch.device('cpu')) == 1.0


def test_cost_matrix_is_finite_for_half_precision_logits():
    """Under fp16 autocast 1 - p + 1e-8 rounds to 0: the cost must be computed in float32."""
    matcher = HungarianMatcher()
    logits = torch.tensor([[20.0, -20.0], [0.0, 3.0]], dtype=torch.float16)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]], dtype=torch.float16)
    cost = matcher.cost_matrix(logits, boxes, torch.tensor([1, 0]), torch.tensor([[0.5, 0.5, 0.2, 0.2],
                                                                                  [0.3, 0.3, 0.1, 0.1]]))
    assert cost.dtype == torch.float32 and torch.isfinite(cost).all()


@pytest.mark.parametrize('pred_dtype', [torch.float32, torch.float64])
def test_float64_targets_match_and_lose_like_float32_ones(pred_dtype):
    """float64 GT boxes (a float64 run, or a user's pipeline) with float32 or float64 predictions: same matching
    and losses as float32 targets, the costs computed in the wider dtype."""
    outputs, targets = random_batch([3, 2], Q=6, seed=5)
    outputs = {k: v.to(pred_dtype) for k, v in outputs.items()}
    wide = [dict(t, boxes=t['boxes'].double()) for t in targets]
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(outputs['pred_logits'][0], outputs['pred_boxes'][0], wide[0]['labels'],
                               wide[0]['boxes'])
    assert cost.dtype == torch.float64
    for (src, tgt), (src32, tgt32) in zip(matcher(outputs, wide), matcher(outputs, targets)):
        assert src.tolist() == src32.tolist() and tgt.tolist() == tgt32.tolist()
    losses, losses32 = SetCriterion(num_classes=4)(outputs, wide), SetCriterion(num_classes=4)(outputs, targets)
    for k in losses32:
        torch.testing.assert_close(losses[k].float(), losses32[k].float())
