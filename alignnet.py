"""AlignNet: instance-level alignment of the encoder memory with CLIP's label dictionary (paper Sec. 3.2, Eq. 1-5).

Training only. For every ground-truth box AlignNet pools the encoder memory inside the box (Eq. 1), builds a
category- and scale-aware attribute feature from the CLIP text embedding of the box's class and its size
(Eq. 2-3), and aligns the two with a symmetric contrastive loss over all N instances of the local batch
(Eq. 4-5). DynQL (dynql.py) reuses the attribute feature z_attr of Eq. 3 as its well-informed query content.
The label dictionary f_cls it reads is made in label_dictionary.py.

  Eq. 1   AlignNet.object_encoded_feature   z_enc: ROI-pooled memory, averaged over the L levels
  Eq. 2   AlignNet.object_attribute_input   f_cat = concat(f_cls[label], [w, h])
  Eq. 3   AlignNet.object_attribute_feature z_attr = Linear(f_cat)
  Eq. 4   AlignNet.similarity               A = beta * normalize(z_enc) normalize(z_attr)^T
  Eq. 5   AlignNet.alignment_loss           cross entropy of A against the identity, both axes

Shapes:
    B  images in the batch
    L  encoder feature levels
    C  model width (d_model)
    N  ground-truth instances in the batch (all images together)
    K  classes
    D  CLIP text embedding width (1024 for RN50x64)
    H_l, W_l  height and width of the padded level-l memory map

Deviations from the paper:
    - "ROIPool" of Eq. 1 is torchvision's roi_align (aligned=True) with one output bin and adaptive
      sampling (about one sample per memory pixel), i.e. the average of the memory inside the box; the
      paper does not name the pooling size (docs/design.md, "AlignNet").
    - Eq. 2's [w, h] are the box size normalized by the image size; the Table 5 variants are
      selectable: 'label' (f_cls only), 'label+bbox' ([cx, cy, w, h]) and 'label+scale' (default).
    - beta of Eq. 4 is exp(logit_beta), initialised at 1/0.07 and capped at 100 as CLIP's logit
      scale; the paper only calls it a learnable logit.
    - With no instance in the batch the loss is 0 * (sum of the parameters) instead of undefined, so
      that distributed data parallel training sees a gradient for every parameter on every rank.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, roi_align

ALIGN_FEATURES = ('label', 'label+bbox', 'label+scale')
# Columns that Eq. 2 appends to f_cls, per Table 5 variant.
_BOX_COLUMNS = {'label': [], 'label+bbox': [0, 1, 2, 3], 'label+scale': [2, 3]}


class AlignNet(nn.Module):
    """Instance-wise contrastive alignment of encoder memory with CLIP label and box-size features.

    Holds the label dictionary `f_cls` (K, D) as a non-persistent buffer (checkpoints stay loadable into a
    plain Deformable DETR), the Eq. 3 projection `attr_proj` and the learnable logit `logit_beta`.
    """

    def __init__(self, *, label_embeddings, d_model=256, align_feature='label+scale', beta_init=1 / 0.07,
                 beta_max=100.0):
        super().__init__()
        if align_feature not in ALIGN_FEATURES:
            raise ValueError(f"align_feature '{align_feature}' is unknown, expected one of {list(ALIGN_FEATURES)}")
        if label_embeddings.ndim != 2:
            raise ValueError(f"label_embeddings has shape {tuple(label_embeddings.shape)}, expected (K, D)")
        if not 0 < beta_init <= beta_max:
            raise ValueError(f"beta_init={beta_init} and beta_max={beta_max}, expected 0 < beta_init <= beta_max")
        self.align_feature = align_feature
        self.beta_max = beta_max
        self.register_buffer('f_cls', label_embeddings.detach().float().clone(), persistent=False)
        self.attr_proj = nn.Linear(label_embeddings.shape[1] + len(_BOX_COLUMNS[align_feature]), d_model)
        self.logit_beta = nn.Parameter(torch.tensor(math.log(beta_init)))

    @property
    def beta(self):
        """Similarity scale of Eq. 4, exp(logit_beta) capped at beta_max as CLIP caps its logit scale."""
        return self.logit_beta.exp().clamp(max=self.beta_max)

    def object_encoded_feature(self, memory_levels, valid_ratios, boxes, batch_index):
        """Eq. (1): z_enc, the encoder memory averaged inside each GT box, then over the L levels, (N, C).

        memory_levels: L maps (B, C, H_l, W_l), padded; valid_ratios (B, L, 2): (w, h) fraction of each
        padded map that the image covers; boxes (N, 4) cxcywh normalized to the unpadded image;
        batch_index (N,) the image of each box.
        """
        if len(memory_levels) != valid_ratios.shape[1]:
            raise ValueError(f"{len(memory_levels)} memory levels but valid_ratios has {valid_ratios.shape[1]}, "
                             f"expected the same number")
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes has shape {tuple(boxes.shape)}, expected (N, 4) cxcywh")
        xyxy = box_convert(boxes, 'cxcywh', 'xyxy')
        z_enc_levels = []
        for level, memory in enumerate(memory_levels):
            height, width = memory.shape[-2:]
            # The image covers only the top-left valid part of a padded map: scale to that part's pixels.
            image_size = valid_ratios[batch_index, level] * valid_ratios.new_tensor([width, height])  # (N, 2)
            image_size = image_size.repeat(1, 2)  # (N, 4) as (w, h, w, h)
            rois = torch.cat([batch_index[:, None].to(xyxy), xyxy * image_size], dim=1)  # (N, 5)
            # One bin with adaptive sampling puts about one sample per pixel: the mean inside the box.
            pooled = roi_align(memory, rois.to(memory.dtype), output_size=1, spatial_scale=1.0, sampling_ratio=-1,
                               aligned=True)  # (N, C, 1, 1)
            z_enc_levels.append(pooled.flatten(1))  # (N, C)
        return torch.stack(z_enc_levels).mean(dim=0)  # (L, N, C) -> (N, C)

    def object_attribute_input(self, labels, boxes):
        """Eq. (2): f_cat = concat(f_cls[label], [w, h]), (N, D + 2).

        The Table 5 variants append [cx, cy, w, h] ('label+bbox', D + 4) or nothing ('label', D).
        """
        num_classes = self.f_cls.shape[0]
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels range over [{labels.min().item()}, {labels.max().item()}], "
                             f"expected class indices in [0, {num_classes - 1}]")
        columns = _BOX_COLUMNS[self.align_feature]
        return torch.cat([self.f_cls[labels], boxes[:, columns].to(self.f_cls)], dim=1)

    def object_attribute_feature(self, labels, boxes):
        """Eq. (3): z_attr = Linear(f_cat), the attribute feature in the memory's space, (N, C)."""
        return self.attr_proj(self.object_attribute_input(labels, boxes))

    def similarity(self, z_enc, z_attr):
        """Eq. (4): A = beta * normalize(z_enc) @ normalize(z_attr)^T, (N, N); row i is encoded instance i."""
        if z_enc.shape != z_attr.shape:
            raise ValueError(f"z_enc has shape {tuple(z_enc.shape)} and z_attr {tuple(z_attr.shape)}, expected "
                             f"equal (N, C): is d_model the memory width?")
        return self.beta * F.normalize(z_enc, dim=-1) @ F.normalize(z_attr, dim=-1).t()  # (N, C) @ (C, N)

    def alignment_loss(self, A):
        """Eq. (5): cross entropy of A against the identity along both axes, averaged."""
        target = torch.arange(A.shape[0], device=A.device)
        # Rows: each encoded instance picks its attribute; A^T (N, N): each attribute picks its instance.
        return (F.cross_entropy(A, target) + F.cross_entropy(A.t(), target)) / 2

    def forward(self, memory_levels, valid_ratios, targets):
        """AlignNet loss of a batch: targets are B dicts with 'boxes' (n_b, 4) cxcywh normalized, 'labels' (n_b,)."""
        boxes = torch.cat([t['boxes'] for t in targets])
        labels = torch.cat([t['labels'] for t in targets])
        if boxes.shape[0] == 0:
            # Keep every parameter in the graph: DDP waits for gradients of all of them on every rank.
            return sum(p.sum() for p in self.parameters()) * 0.0
        counts = torch.tensor([len(t['boxes']) for t in targets], device=boxes.device)
        batch_index = torch.repeat_interleave(torch.arange(len(targets), device=boxes.device), counts)
        z_enc = self.object_encoded_feature(memory_levels, valid_ratios, boxes, batch_index)
        z_attr = self.object_attribute_feature(labels, boxes)
        return self.alignment_loss(self.similarity(z_enc, z_attr))
