"""DynQL, the Dynamic Query Learning mechanism of CLIP-DETR (paper §3.3, Eq. 6-10). Training only.

For every GT instance i and every noise level beta_s (s = 1..S) DynQL builds a "DynQuery": its content is the
object attribute feature z_attr^i (Eq. 3, shared with AlignNet) blended with Gaussian noise (Eq. 6), its
position a jittered copy of the GT box (Eq. 7) encoded like a conventional query's (Eq. 8). The S sets are
decoded together with the conventional queries under an attention mask that keeps the sets from leaking
into the conventional queries and into each other (Eq. 9). DynQuery i of every set is assigned to GT i
directly, without Hungarian matching, and gets the conventional losses normalized by S * N (Eq. 10).

  Eq. 6   DynQL.content             sqrt(beta_s) * eps + sqrt(1 - beta_s) * z_attr^i
  Eq. 7   DynQL.position            GT centre moved by lambda * theta / 2, size by lambda * theta
  Eq. 8   DynQL.positional_query    Linear(PE(p))
  Eq. 9   attention_mask            who may attend to whom in [q ; set 1 ; ... ; set S]
  Eq. 10  dynql_loss                direct assignment, all decoder layers, normalized by S * N

Shape legend: B batch, Q conventional queries, S DynQuery sets, G = max_b n_b GT boxes per image (each set is
padded to G), N GT instances in the batch, C model width, K classes, T = Q + S * G decoder queries.
Boxes are normalized cxcywh.

Deviations from the paper:
  - Eq. 7's lambda is drawn as |lambda| ~ U(0, rho) with a random sign per coordinate (DINO's box noise,
    which the paper says it follows); the jittered box is clipped to the image and keeps w, h >= 1e-3.
  - Images with fewer GT boxes than the batch maximum pad their sets; padded DynQueries are hidden as keys
    from every query and ignored by the loss.
  - N in Eq. 10 is the number of GT boxes averaged over ranks (as the conventional loss normalizer), so that
    every rank's gradient has the same scale under DDP.
  - The classification term of Eq. 10 is the focal loss over the real DynQueries only; there are no
    background DynQueries.
"""
from typing import NamedTuple

import torch
from torch import nn
from torchvision.ops import box_convert

from matcher import box_losses, focal_loss
from model import box_sine_embed


class DynQueries(NamedTuple):
    """The DynQuery sets of a batch, laid out for the decoder after the Q conventional queries."""
    content: torch.Tensor     # (B, S*G, C)   Eq. 6
    query_pos: torch.Tensor   # (B, S*G, C)   Eq. 8
    reference: torch.Tensor   # (B, S*G, 4)   Eq. 7, the reference boxes of the decoder
    attn_mask: torch.Tensor   # (B, T, T)     Eq. 9, True = may not attend
    valid: torch.Tensor       # (B, G)        False on padding
    num_sets: int             # S
    group_size: int           # G
    anchor: torch.Tensor      # 0 * sum of DynQL's parameters: keeps DDP's graph whole when N = 0


def attention_mask(num_queries, num_sets, group_size, valid):
    """Eq. (9): the self-attention mask of the decoder input [q ; q_DynQ set 1 ; ... ; set S].

    Conventional queries see only conventional queries; set s sees the conventional queries and itself,
    never another set; padded DynQueries (valid False, (B, G)) are hidden from every query.
    Returns (B, T, T) bool, True where the row query may NOT attend to the column key.
    """
    Q, S, G = num_queries, num_sets, group_size
    T = Q + S * G
    set_id = torch.cat([torch.full((Q,), -1), torch.arange(S).repeat_interleave(G)]).to(valid.device)  # (T,)
    row, col = set_id[:, None], set_id[None, :]
    # Allowed: a key of the conventional set, or of the row's own set.
    blocked = ~((col == -1) | (row == col))  # (T, T)
    padded_keys = torch.cat([valid.new_zeros(valid.shape[0], Q), ~valid.repeat(1, S)], 1)  # (B, T)
    return blocked[None] | padded_keys[:, None, :]  # (B, T, T)


class DynQL(nn.Module):
    """Builds the noised DynQuery sets from z_attr and the GT boxes."""

    def __init__(self, *, d_model=256, betas=(0.1, 0.3, 0.5, 0.7, 0.9), rho=1.0):
        super().__init__()
        betas = [float(b) for b in betas]
        if not betas or any(not 0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"--dynql-betas {betas}: expected one or more noise levels in [0, 1]")
        if rho < 0:
            raise ValueError(f"--dynql-rho {rho}: expected a value >= 0")
        self.d_model, self.betas, self.rho = d_model, betas, float(rho)
        self.query_pos_proj = nn.Linear(2 * d_model, d_model)

    def content(self, z_attr, beta):
        """Eq. (6): q_content = sqrt(beta) * eps + sqrt(1 - beta) * z_attr, eps ~ N(0, I). (N, C) -> (N, C)."""
        eps = torch.randn_like(z_attr)
        return beta ** 0.5 * eps + (1.0 - beta) ** 0.5 * z_attr

    def position(self, boxes):
        """Eq. (7): p = [p_cent + lambda * theta / 2, p_wh + lambda * theta], |lambda| ~ U(0, rho).

        boxes (N, 4) GT cxcywh; theta is the GT (w, h). Returns jittered boxes (N, 4), inside the image.
        """
        theta = boxes[:, 2:].repeat(1, 2)  # (N, 4): (w, h, w, h)
        lam = torch.rand_like(boxes) * self.rho
        sign = torch.randint_like(boxes, 0, 2) * 2 - 1
        step = torch.cat([theta[:, :2] / 2, theta[:, 2:]], 1)  # centre moves by theta/2, size by theta
        p = boxes + sign * lam * step
        p = torch.cat([p[:, :2], p[:, 2:].clamp(min=1e-3)], 1)
        p = box_convert(box_convert(p, "cxcywh", "xyxy").clamp(0.0, 1.0), "xyxy", "cxcywh")
        wh = p[:, 2:].clamp(min=1e-3)
        # A box squashed against the border keeps a minimum size, so its centre moves inside by half of it.
        centre = torch.minimum(torch.maximum(p[:, :2], wh / 2), 1 - wh / 2)
        return torch.cat([centre, wh], 1)

    def positional_query(self, p):
        """Eq. (8): q_pos = Linear(PE(p)), PE the sine embedding of the 4-D box. (..., 4) -> (..., C)."""
        return self.query_pos_proj(box_sine_embed(p, self.d_model))

    def forward(self, z_attr, targets, num_queries):
        """z_attr (N, C) in the order of torch.cat over targets; returns the padded DynQueries of the batch."""
        B, C, S = len(targets), z_attr.shape[1], len(self.betas)
        sizes = [len(t["boxes"]) for t in targets]
        G = max(sizes, default=0)
        device = z_attr.device
        valid = torch.arange(G, device=device)[None] < torch.as_tensor(sizes, device=device)[:, None]  # (B, G)
        gt_boxes = torch.cat([t["boxes"] for t in targets])  # (N, 4)
        # Padding gets a harmless box in the image centre; it is masked out everywhere. The boxes keep the GT's
        # dtype: under autocast z_attr is bf16/fp16, while the decoder's reference boxes stay float32.
        content = z_attr.new_zeros(B, S, G, C)
        reference = gt_boxes.new_tensor([0.5, 0.5, 0.1, 0.1]).repeat(B, S, G, 1)  # (B, S, G, 4)
        for s, beta in enumerate(self.betas):
            content[:, s][valid] = self.content(z_attr, beta)
            reference[:, s][valid] = self.position(gt_boxes)
        content = content.flatten(1, 2)  # (B, S*G, C)
        reference = reference.flatten(1, 2)  # (B, S*G, 4)
        anchor = sum(0.0 * p.sum() for p in self.parameters())
        return DynQueries(content, self.positional_query(reference), reference,
                          attention_mask(num_queries, S, G, valid), valid, S, G, anchor)


def dynql_loss(dynql_outputs, layout, targets, num_instances, focal_alpha=0.25):
    """Eq. (10): L_DynQL = sum_s sum_i L_conventional(y_DynQ^{s,i}, y^i) / (S * N), on every decoder layer.

    dynql_outputs: per decoder layer {pred_logits (B, S*G, K), pred_boxes (B, S*G, 4)}; DynQuery i of every set
    is assigned to GT i of its image. Keys follow the criterion: loss_dynql_{ce,bbox,giou} for the last layer,
    with suffix _i for earlier layers.
    """
    S, G = layout.num_sets, layout.group_size
    norm = S * num_instances
    b_idx, g_idx = layout.valid.nonzero(as_tuple=True)  # (N,), (N,) in torch.cat(targets) order
    q_idx = (torch.arange(S, device=g_idx.device)[:, None] * G + g_idx[None]).flatten()  # (S*N,)
    b_idx = b_idx.repeat(S)  # (S*N,)
    labels = torch.cat([t["labels"] for t in targets]).repeat(S)
    gt_boxes = torch.cat([t["boxes"] for t in targets]).repeat(S, 1)  # (S*N, 4)
    n = len(dynql_outputs)
    losses = {}
    for layer, out in enumerate(dynql_outputs):
        suffix = "" if layer == n - 1 else f"_{layer}"
        logits = out["pred_logits"][b_idx, q_idx]  # (S*N, K)
        onehot = torch.zeros_like(logits)
        onehot[torch.arange(len(labels)), labels] = 1.0
        terms = {"loss_ce": focal_loss(logits, onehot, norm, focal_alpha)}
        terms.update(box_losses(out["pred_boxes"][b_idx, q_idx], gt_boxes, norm))
        for k, v in terms.items():
            losses[k.replace("loss_", "loss_dynql_") + suffix] = v
    losses["loss_dynql_ce"] = losses["loss_dynql_ce"] + layout.anchor
    return losses
