"""Bipartite matching and the set-prediction losses of Deformable DETR (paper §3.1).

"The predictions from the queries are matched to target objects or marked as background using a bipartite
matching process" (§3.1). The matcher finds, per image, the one-to-one assignment of queries to GT boxes
with the lowest cost  2 * focal class cost + 5 * L1 + 2 * (-GIoU)  (scipy's linear_sum_assignment);
the criterion then applies sigmoid focal loss (weight 2), L1 (5) and GIoU (2) to every decoder layer's
predictions and a class-agnostic version to the two-stage encoder proposals.

Building blocks reused by DynQL's Eq. 10 (`dynql.py`): `focal_loss`, `box_losses`, `global_num_boxes`.

Shape legend: B batch, Q queries, K classes, N GT boxes in the batch (n_b in image b).
Boxes are normalized cxcywh unless a name says xyxy.

Deviations from the paper / official code:
  - The official criterion also logs a class error and cardinality error; they are not losses and are left
    out here.
  - Under autocast the matching cost is computed in at least float32, in one dtype for predictions and
    targets (the official code has no mixed precision): in fp16 the focal cost's log(1 - p + 1e-8) is -inf.
"""
import functools

import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from errors import is_distributed


def cxcywh_to_xyxy(boxes):
    return box_convert(boxes, "cxcywh", "xyxy")


def global_num_boxes(targets, device):
    """GT boxes in the batch averaged over ranks, at least 1: the loss normalizer of every rank."""
    num = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if is_distributed():
        dist.all_reduce(num)
        num = num / dist.get_world_size()
    return num.clamp(min=1).item()


def focal_loss(logits, onehot, num_boxes, alpha=0.25, gamma=2.0):
    """Sigmoid focal loss summed over queries and classes, divided by the number of boxes."""
    return sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="sum") / num_boxes


def box_losses(src_boxes, tgt_boxes, num_boxes):
    """L1 and GIoU losses of matched pairs (M, 4) each, summed and divided by the number of boxes."""
    loss_bbox = (src_boxes - tgt_boxes).abs().sum() / num_boxes
    giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(src_boxes), cxcywh_to_xyxy(tgt_boxes)))
    return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to GT boxes minimizing the weighted matching cost."""

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def cost_matrix(self, logits, boxes, tgt_labels, tgt_boxes):
        """Cost of assigning each of Q predictions to each of n GT boxes: (Q, n).

        cost_class * focal class cost + cost_bbox * L1 + cost_giou * (-GIoU), boxes cxcywh. The focal class cost of
        calling a prediction GT j's class k is the focal loss of "k" minus that of "not k", with p = sigmoid(logit_k):
        alpha (1 - p)^gamma (-log(p + 1e-8)) - (1 - alpha) p^gamma (-log(1 - p + 1e-8)). Computed in at least
        float32, in one dtype for predictions and targets (see the deviations above).
        """
        # At least float32: under fp16 autocast 1 - p + 1e-8 rounds to 0 and the log gives -inf costs. One dtype
        # for predictions and targets: torch.cdist refuses to mix them (e.g. float64 targets).
        dtype = functools.reduce(torch.promote_types, (logits.dtype, boxes.dtype, tgt_boxes.dtype), torch.float32)
        logits, boxes, tgt_boxes = logits.to(dtype), boxes.to(dtype), tgt_boxes.to(dtype)
        prob = logits.sigmoid()
        # Focal cost: the focal loss of predicting the GT class minus that of predicting "not this class".
        neg = (1 - self.alpha) * prob ** self.gamma * -(1 - prob + 1e-8).log()
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        cost_class = pos[:, tgt_labels] - neg[:, tgt_labels]
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(tgt_boxes))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs, targets):
        """Per image b, (query indices, GT indices) as int64 tensors of length min(Q, n_b)."""
        B, Q, _ = outputs["pred_logits"].shape
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in targets]
        # One cost matrix for the whole batch is cheaper than B small ones; only diagonal blocks are used.
        # (B*Q, K) and (B*Q, 4) predictions against all N GT boxes of the batch.
        C = self.cost_matrix(outputs["pred_logits"].flatten(0, 1), outputs["pred_boxes"].flatten(0, 1),
                             torch.cat([t["labels"] for t in targets]), torch.cat([t["boxes"] for t in targets]))
        C = C.view(B, Q, -1).cpu()  # (B, Q, N)
        indices = []
        for b, c in enumerate(C.split(sizes, -1)):
            rows, cols = linear_sum_assignment(c[b].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


class SetCriterion(nn.Module):
    """Focal + L1 + GIoU on every decoder layer (suffix _i) and on the two-stage proposals (suffix _enc)."""

    def __init__(self, num_classes, matcher=None, focal_alpha=0.25):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher or HungarianMatcher()
        self.focal_alpha = focal_alpha

    def single_layer_losses(self, outputs, targets, indices, num_boxes):
        logits = outputs["pred_logits"]
        onehot = torch.zeros_like(logits)
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        tgt_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        onehot[batch_idx, src_idx, tgt_labels] = 1.0
        losses = {"loss_ce": focal_loss(logits, onehot, num_boxes, self.focal_alpha)}
        src_boxes = outputs["pred_boxes"][batch_idx, src_idx]  # (M, 4)
        tgt_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)])
        losses.update(box_losses(src_boxes, tgt_boxes, num_boxes))
        return losses

    def forward(self, outputs, targets, num_boxes=None):
        """Unweighted loss terms; `weight_dict(...)` says how to sum them.

        `num_boxes`: the normalizer from `global_num_boxes`, when the caller already has it (one all-reduce a step).
        """
        if num_boxes is None:
            num_boxes = global_num_boxes(targets, outputs["pred_logits"].device)
        layers = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        losses = {}
        for suffix, out in layers:
            indices = self.matcher(out, targets)
            layer_losses = self.single_layer_losses(out, targets, indices, num_boxes)
            losses.update({k + suffix: v for k, v in layer_losses.items()})
        if "enc_outputs" in outputs:
            # Proposals are class-agnostic: every object counts as class 0.
            binary = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
            enc = outputs["enc_outputs"]
            indices = self.matcher(enc, binary)
            losses.update({k + "_enc": v for k, v in self.single_layer_losses(enc, binary, indices, num_boxes).items()})
        return losses


def weight_dict(loss_names, *, ce=2.0, bbox=5.0, giou=2.0, align=1.0):
    """Weight of every loss term by its base name: loss_ce*, loss_bbox*, loss_giou* (DynQL's too), loss_align."""
    weights = {}
    for name in loss_names:
        if name.startswith("loss_align"):
            weights[name] = align
        elif "_ce" in name:
            weights[name] = ce
        elif "_bbox" in name:
            weights[name] = bbox
        elif "_giou" in name:
            weights[name] = giou
        else:
            raise ValueError(f"no weight for loss term {name!r}")
    return weights
