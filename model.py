"""Deformable DETR, the detector that CLIP-DETR trains (paper §3.1; Zhu et al. 2020).

This file is the whole inference-time network. CLIP-DETR adds nothing here at test time: AlignNet
(`alignnet.py`, Eq. 1-5) and DynQL (`dynql.py`, Eq. 6-10) are attached as `model.alignnet` and
`model.dynql` and run only when the model is in training mode and targets are given.

Pieces, in the order data flows through them (and in the order of this file):
  Backbone            torchvision ResNet, frozen BatchNorm (folded into its convs), C3-C5 (strides 8/16/32)
  PositionEmbeddingSine   normalized 2*pi sine encoding of each padded feature map
  ms_deform_attn_pytorch  the readable reference of multi-scale deformable attention, built on grid_sample
  MSDeformAttn        multi-scale deformable attention with the official initialisation; `sampling` gives where
                      each query samples and with what weight (docs/walkthrough.ipynb draws them)
  DeformableTransformer   6 encoder layers, two-stage proposals, 6 decoder layers with box refinement;
                      the decoder's self-attention takes an attention mask (DynQL's Eq. 9 needs it)
  DeformableDETR      input_proj (1x1 conv + GroupNorm per level, a 3x3 stride-2 conv for the stride-64 level),
                      heads (focal-loss classifier, 3-layer box MLP), output contract below;
                      LabelEmbeddingClassifier, the open-vocabulary class head (Sec. 4.2), scores the decoder's
                      outputs against the CLIP label dictionary (label_dictionary.py) instead
  PostProcess         top-100 of the Q*K sigmoid scores, absolute xyxy boxes
The paper's model ends there. The last part of the file, under its own title, holds the fast paths of the
deformable attention, each equal to the reference (values and gradients, proven in the tests): the CPU gather
path `ms_deform_attn_gather`, the optional Triton GPU kernel `ms_deform_attn_triton`, and `resolve_attn_impl`,
which picks one. A reader of the paper can stop before it.

Output contract of `DeformableDETR.forward(images, mask, targets=None)`:
  pred_logits  (B, Q, K)   class logits of the last decoder layer (sigmoid, no background class)
  pred_boxes   (B, Q, 4)   normalized cxcywh boxes, relative to each image's unpadded size
  aux_outputs  list of {pred_logits, pred_boxes} for decoder layers 1 .. n-1
  enc_outputs  {pred_logits (B, S_all, K), pred_boxes} two-stage encoder proposals (two-stage only); with a
               custom (open-vocabulary) class head the encoder's is class-agnostic: pred_logits (B, S_all, 1)
  training only, when targets are given and the modules exist:
  loss_align   scalar AlignNet loss (Eq. 5)
  dynql_outputs  list over decoder layers of {pred_logits (B, S*G, K), pred_boxes (B, S*G, 4)}
  dynql_layout   the DynQueries object (group size G, number of sets S, validity) that built them

Shape legend: B batch, Q queries, L feature levels, C model width, M attention heads, P sampling points,
K classes, S_all = sum_l H_l*W_l flattened memory length, Lq number of attention queries, S DynQuery sets,
G DynQueries per set (the most GT boxes of an image in the batch).

Parameter names follow the official Deformable-DETR module tree (backbone.0.body..., input_proj.N,
transformer..., class_embed.N, bbox_embed.N.layers.M, query_embed) so an official checkpoint loads with
strict=True, including the official aliases transformer.decoder.{class,bbox}_embed of the heads.

Deviations from the paper / official code, first those of the model itself:
  - The backbone trains every layer when it starts from random weights (the official code freezes the stem
    and layer1, which only makes sense for ImageNet weights); with `pretrained=True`, or once a checkpoint's
    weights are loaded (`freeze_stem_and_layer1`), it freezes them as the official code does.
  - Each frozen BatchNorm is folded into the conv before it (`conv_frozen_bn`, one convolution where the official
    code runs the conv, then FrozenBatchNorm2d): the same function up to float rounding.
  - The decoder self-attention accepts an attention mask (the official decoder has none): DynQL needs it.
  - Under autocast (--amp) the deformable attention samples in float32 on every device (softmax weights,
    locations, bilinear sum); the linear projections around it follow autocast on CUDA. Under CPU autocast only
    the convolutions (backbone, input_proj) take bf16 and the transformer runs in float32: its small operations
    lose more to casts than they gain (measured: 0.88x of a demo training step). The official code has no mixed
    precision.
  - The backbone keeps its weights and activations channels-last (the same function, oneDNN and cuDNN
    convolutions run without reordering; measured: 0.86x of a demo training step).
then those of the fast paths (the official code ships a compiled CUDA C++ extension instead):
  - The GPU kernel is Triton (`ms_deform_attn_triton`), compiled on first use on CUDA tensors, with no build
    step. With TRITON_INTERPRET=1 set before triton is first imported, the same kernels run on CPU tensors (tests).
  - The Triton kernel computes in float32. fp16/bf16 inputs are cast up to float32 and the output is cast back
    to the dtype of `value` (the official extension has no half-precision path either); float64 inputs are
    computed in float32 too, where the official extension has a float64 kernel.
  - On the CPU `--attn-impl auto` runs `ms_deform_attn_gather` for calls that sample at least GATHER_MIN_POINTS
    points (the COCO-sized encoder), not the grid_sample reference: the same function
    and gradients (equal to float64 rounding, and it rounds pixel coordinates as grid_sample does, so at the
    kinks of bilinear sampling it takes the same one-sided gradient); in float32 its sums run in another order,
    so results differ from the reference's in the last bits. `--attn-impl pytorch` runs the reference.
  - The Triton backward sums gradients of `value` with float32 atomics, so their last bits depend on the order
    in which programs run: that backward pass is not bit-for-bit deterministic.
  - The kernels do not check that S_all equals sum_l H_l * W_l (that would cost a device-to-host copy per
    call); the caller's shapes are trusted.
"""
import contextlib
import copy
import math
import os
import urllib.error
import warnings

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.autograd.function import once_differentiable
from torchvision.ops import FrozenBatchNorm2d

from errors import InputError, is_main


def inverse_sigmoid(x, eps=1e-5):
    """log(x / (1 - x)), clamped so that boxes at 0 or 1 stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


# ----------------------------------------------------------------------------------------------------------
# Backbone and position encoding
# ----------------------------------------------------------------------------------------------------------
_RESNETS = {
    "resnet18": ("resnet18", "ResNet18_Weights", (128, 256, 512)),
    "resnet34": ("resnet34", "ResNet34_Weights", (128, 256, 512)),
    "resnet50": ("resnet50", "ResNet50_Weights", (512, 1024, 2048)),
    "resnet101": ("resnet101", "ResNet101_Weights", (512, 1024, 2048)),
}


def load_imagenet_resnet(name):
    """A torchvision ResNet with its ImageNet-1k V1 weights (the ones the official code used), frozen BN.

    Offline, the download fails: that becomes one clear ValueError instead of a long traceback.
    """
    fn_name, weights_name, _ = _RESNETS[name]
    weights = getattr(torchvision.models, weights_name).IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", weights.url.rsplit("/", 1)[-1])
    if not os.path.exists(cached) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise InputError(f"cannot load ImageNet weights for {name}: offline (HF_HUB_OFFLINE=1) and not cached "
                         f"at {cached}; drop --pretrained-backbone or copy the file there")
    try:
        return getattr(torchvision.models, fn_name)(weights=weights, norm_layer=FrozenBatchNorm2d)
    except (urllib.error.URLError, OSError) as err:
        raise InputError(f"cannot download ImageNet weights for {name} ({err}); drop --pretrained-backbone "
                         f"or place {weights.url.rsplit('/', 1)[-1]} in {torch.hub.get_dir()}/checkpoints") from None


def conv_frozen_bn(x, conv, bn):
    """conv then FrozenBatchNorm2d as one convolution: the frozen statistics scale the kernel and give it a bias.

    The same function as `bn(conv(x))` up to float rounding, with one pass over the activations instead of three
    (the separate affine op reads and writes the whole map twice forward and once more backward).
    """
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # (C_out,)
    return F.conv2d(x, conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale,
                    conv.stride, conv.padding, conv.dilation, conv.groups)


def residual_block(x, block):
    """A torchvision BasicBlock or Bottleneck with every conv-BN pair through `conv_frozen_bn`."""
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if hasattr(block, "conv3"):
        pairs.append((block.conv3, block.bn3))
    out = x
    for i, (conv, bn) in enumerate(pairs):
        out = conv_frozen_bn(out, conv, bn)
        if i < len(pairs) - 1:
            out = F.relu(out, inplace=True)
    identity = x if block.downsample is None else conv_frozen_bn(x, block.downsample[0], block.downsample[1])
    return F.relu(out + identity, inplace=True)


class Backbone(nn.Module):
    """ResNet C3-C5 with frozen BatchNorm folded into each conv (`conv_frozen_bn`); `body` holds the weights
    under the official parameter names, and `forward` walks its layers itself."""

    def __init__(self, name="resnet50", pretrained=False):
        super().__init__()
        if name not in _RESNETS:
            raise InputError(f"unknown backbone {name!r}; expected one of {sorted(_RESNETS)}")
        fn_name, _, self.num_channels = _RESNETS[name]
        if pretrained:
            resnet = load_imagenet_resnet(name)
        else:
            resnet = getattr(torchvision.models, fn_name)(weights=None, norm_layer=FrozenBatchNorm2d)
        self.body = torchvision.models._utils.IntermediateLayerGetter(
            resnet, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"})
        self.strides = (8, 16, 32)
        # Channels-last: oneDNN's convolutions (and cuDNN's under AMP) run without reordering every activation;
        # measured 0.86x of a CPU demo step (README, "The demo's time").
        self.body.to(memory_format=torch.channels_last)
        if pretrained:
            self.freeze_stem_and_layer1()

    def freeze_stem_and_layer1(self):
        """Trained weights (ImageNet, or a detector checkpoint's) keep stem and layer1 frozen, as the official
        code does for a pretrained ResNet; random ones must learn."""
        for name, p in self.body.named_parameters():
            if not name.startswith(("layer2", "layer3", "layer4")):
                p.requires_grad_(False)

    def forward(self, images, mask):
        """Feature maps (B, C_l, H_l, W_l) and their padding masks (B, H_l, W_l), True on padding."""
        body = self.body
        images = images.contiguous(memory_format=torch.channels_last)  # (B, 3, H, W), stored as (B, H, W, 3)
        x = body.maxpool(F.relu(conv_frozen_bn(images, body.conv1, body.bn1)))
        feats = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            for block in getattr(body, name):
                x = residual_block(x, block)
            if name != "layer1":
                feats.append(x)
        out = []
        for x in feats:
            m = F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]  # (B, H_l, W_l)
            out.append((x, m))
        return out


class PositionEmbeddingSine(nn.Module):
    """Normalized sine encoding of (y, x), 2*pi scale, offset by -0.5 as in Deformable DETR."""

    def __init__(self, num_pos_feats=128, temperature=10000):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature

    def forward(self, mask):
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # (B, H, W)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps, scale = 1e-6, 2 * math.pi
        y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * scale
        x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t  # (B, H, W, C/2)
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)  # (B, H, W, C/2)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)  # (B, H, W, C/2)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, C, H, W)


class Joiner(nn.Sequential):
    """backbone.0 = Backbone, backbone.1 = position encoding: the official module tree."""

    def forward(self, images, mask):
        out = self[0](images, mask)
        return out, [self[1](m).to(x.dtype) for x, m in out]


def box_sine_embed(boxes, d_model=256, temperature=10000):
    """Sine embedding of normalized 4-D boxes: (..., 4) -> (..., 2*d_model).

    Used for two-stage proposals (official `get_proposal_pos_embed`, which takes them in logit space and
    applies the sigmoid first) and by DynQL's Eq. 8; here the input is already in [0, 1].
    """
    num_feats = d_model // 2
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos = boxes[..., None] * (2 * math.pi) / dim_t  # (..., 4, C/2)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1)  # (..., 4, C/4, 2)
    return pos.flatten(-3)  # (..., 2C)


# ----------------------------------------------------------------------------------------------------------
# Multi-scale deformable attention: the readable reference and the module
# ----------------------------------------------------------------------------------------------------------
def ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights):
    """Readable reference of multi-scale deformable attention (Zhu et al., Eq. 3), built on grid_sample.

    value (B, S_all, M, C/M); spatial_shapes (L, 2) as (H_l, W_l), a tensor or L pairs of Python ints (see
    `encode`); sampling_locations (B, Lq, M, L, P, 2) as normalized (x, y) in [0, 1] of each level's (padded)
    map, pixel centres at (i + 0.5) / W; attention_weights (B, Lq, M, L, P). Bilinear sampling, zero outside the
    map. Returns (B, Lq, M*C/M).
    """
    B, _, M, Dh = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = spatial_shapes.tolist() if torch.is_tensor(spatial_shapes) else spatial_shapes
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for lvl, (H, W) in enumerate(shapes):
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(B * M, Dh, H, W)  # (B*M, Dh, H_l, W_l)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*M, Lq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    w = attention_weights.transpose(1, 2).reshape(B * M, 1, Lq, L * P)  # (B*M, 1, Lq, L*P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * w).sum(-1)  # (B*M, Dh, Lq)
    return out.view(B, M * Dh, Lq).transpose(1, 2).contiguous()  # (B, Lq, C)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module with the official initialisation."""

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, attn_impl="pytorch"):
        super().__init__()
        if d_model % n_heads:
            raise InputError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.attn_impl = attn_impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # Head h starts sampling along direction 2*pi*h/M, point p at distance p+1: a spread-out grid.
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # (M, 2)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)  # (M, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)  # (M, L, P, 2)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)  # (M, L, P, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())  # (M*L*P*2,)
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.constant_(lin.bias, 0.0)

    def sampling(self, query, reference_points, spatial_shapes):
        """Where each query samples and how much each sample counts: locations (B, Lq, M, L, P, 2) as normalized
        (x, y) of each level's padded map, and attention weights (B, Lq, M, L, P), one softmax over the L*P samples
        of a head. query (B, Lq, C); reference_points (B, Lq, L, 2) points or (B, Lq, L, 4) boxes, normalized."""
        B, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(query).view(B, Lq, M, L, P, 2)  # (B, Lq, M, L, P, 2)
        logits = self.attention_weights(query).view(B, Lq, M, L * P)  # (B, Lq, M, L*P)
        # At least float32, so that the sampling runs in float32 under autocast on every device: CUDA
        # autocast computes softmax in float32, CPU autocast would keep it in bf16.
        weights = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        weights = weights.view(B, Lq, M, L, P)  # (B, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalize by (W_l, H_l), in that order.
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
            loc = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # Offsets are fractions of the reference box: half its size reached by the outermost point.
            loc = (reference_points[:, :, None, :, None, :2]
                   + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points last dim must be 2 or 4, got {reference_points.shape[-1]}")
        return loc, weights

    def forward(self, query, reference_points, value_in, spatial_shapes, level_start_index, padding_mask=None,
                level_shapes=None):
        """query (B, Lq, C); reference_points (B, Lq, L, 2 or 4) normalized; value_in (B, S_all, C)."""
        B = query.shape[0]
        M = self.n_heads
        value = self.value_proj(value_in)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(B, value.shape[1], M, self.d_model // M)  # (B, S_all, M, C/M)
        loc, weights = self.sampling(query, reference_points, spatial_shapes)
        impl = resolve_attn_impl(self.attn_impl, value.device, points=weights.numel())
        if impl == "triton":
            out = ms_deform_attn_triton(value, spatial_shapes, level_start_index, loc, weights)
        elif impl == "gather":
            out = ms_deform_attn_gather(value, spatial_shapes, loc, weights)
        else:
            shapes = spatial_shapes if level_shapes is None else level_shapes
            out = ms_deform_attn_pytorch(value, shapes, loc, weights)
        return self.output_proj(out)


# ----------------------------------------------------------------------------------------------------------
# Encoder and decoder
# ----------------------------------------------------------------------------------------------------------
class DeformableEncoderLayer(nn.Module):
    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4, attn_impl="pytorch"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, attn_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask, level_shapes=None):
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, reference_points, src, spatial_shapes,
                                                            level_start_index, padding_mask, level_shapes)))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    def __init__(self, layer_kwargs, num_layers=6):
        super().__init__()
        self.layers = nn.ModuleList([DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers)])

    @staticmethod
    def reference_points(spatial_shapes, valid_ratios, device, level_shapes=None):
        """Every pixel centre of every level, in the coordinates of each level: (B, S_all, L, 2)."""
        refs = []
        for lvl, (H, W) in enumerate(spatial_shapes.tolist() if level_shapes is None else level_shapes):
            # arange + 0.5, not linspace: the same floats, and torch.export keeps H, W symbolic through arange.
            ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32, device=device) + 0.5,
                                    torch.arange(W, dtype=torch.float32, device=device) + 0.5, indexing="ij")
            ys = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H)  # (B, H*W)
            xs = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W)  # (B, H*W)
            refs.append(torch.stack((xs, ys), -1))  # (B, H*W, 2)
        ref = torch.cat(refs, 1)  # (B, S_all, 2)
        return ref[:, :, None] * valid_ratios[:, None]  # (B, S_all, L, 2)

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos, padding_mask, level_shapes=None):
        ref = self.reference_points(spatial_shapes, valid_ratios, src.device, level_shapes)
        for layer in self.layers:
            src = layer(src, pos, ref, spatial_shapes, level_start_index, padding_mask, level_shapes)
        return src


class DeformableDecoderLayer(nn.Module):
    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4, attn_impl="pytorch"):
        super().__init__()
        self.n_heads = n_heads
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, attn_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                memory_padding_mask, self_attn_mask=None, level_shapes=None):
        """self_attn_mask (B, Lq, Lq) bool, True = this query may NOT attend to that key."""
        q = k = tgt + query_pos
        mask = None
        if self_attn_mask is not None:
            mask = self_attn_mask.repeat_interleave(self.n_heads, dim=0)  # (B*M, Lq, Lq)
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, attn_mask=mask, need_weights=False)[0]))
        tgt = self.norm1(tgt + self.dropout1(self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, memory_padding_mask,
            level_shapes)))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableDecoder(nn.Module):
    """Decoder layers with iterative box refinement; `bbox_embed`/`class_embed` alias the detector's heads."""

    def __init__(self, layer_kwargs, num_layers=6):
        super().__init__()
        self.layers = nn.ModuleList([DeformableDecoderLayer(**layer_kwargs) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.bbox_embed = None
        self.class_embed = None

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                valid_ratios, memory_padding_mask, self_attn_mask=None, level_shapes=None):
        """Returns the hidden states of every layer (n, B, Lq, C) and the reference each layer started from."""
        hs, refs = [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ref_in = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                ref_in = reference_points[:, :, None] * valid_ratios[:, None]  # (B, Lq, L, 2)
            refs.append(reference_points)
            tgt = layer(tgt, query_pos, ref_in, memory, spatial_shapes, level_start_index,
                        memory_padding_mask, self_attn_mask, level_shapes)
            hs.append(tgt)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](tgt)
                if reference_points.shape[-1] == 4:
                    new_ref = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_ref = torch.cat([(delta[..., :2] + inverse_sigmoid(reference_points)).sigmoid(),
                                         delta[..., 2:].sigmoid()], -1)
                # Refined boxes are detached between layers: each layer learns its own correction.
                reference_points = new_ref.detach()
        return torch.stack(hs), refs


class DeformableTransformer(nn.Module):
    """Encoder, query selection (two-stage proposals or learned queries) and decoder."""

    def __init__(self, d_model=256, n_heads=8, num_encoder_layers=6, num_decoder_layers=6, d_ffn=1024,
                 dropout=0.1, n_levels=4, enc_n_points=4, dec_n_points=4, two_stage=True,
                 two_stage_num_proposals=300, attn_impl="pytorch"):
        super().__init__()
        self.d_model, self.n_heads = d_model, n_heads
        self.two_stage, self.two_stage_num_proposals = two_stage, two_stage_num_proposals
        common = dict(d_model=d_model, d_ffn=d_ffn, dropout=dropout, n_levels=n_levels, n_heads=n_heads,
                      attn_impl=attn_impl)
        self.encoder = DeformableEncoder(dict(common, n_points=enc_n_points), num_encoder_layers)
        self.decoder = DeformableDecoder(dict(common, n_points=dec_n_points), num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def valid_ratio(mask):
        """(w, h) fraction of a padded map that holds image: (B, 2)."""
        _, H, W = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).float() / H
        valid_w = (~mask[:, 0, :]).sum(1).float() / W
        return torch.stack([valid_w, valid_h], -1)

    def encode(self, srcs, masks, pos_embeds):
        """Flatten the L levels, run the encoder. Returns a dict with memory (B, S_all, C) and its layout."""
        src_flat, mask_flat, pos_flat, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append(src.shape[-2:])
            src_flat.append(src.flatten(2).transpose(1, 2))  # (B, H_l*W_l, C)
            mask_flat.append(mask.flatten(1))  # (B, H_l*W_l)
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))  # (B, H_l*W_l, C)
        src_flat, mask_flat, pos_flat = torch.cat(src_flat, 1), torch.cat(mask_flat, 1), torch.cat(pos_flat, 1)
        # The sizes travel twice: as a tensor for the kernels, and as Python ints (SymInts under torch.export, where
        # a tensor's values are unknown; torch.tensor keeps them symbolic, torch.as_tensor would fix them).
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=src_flat.device)  # (L, 2)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.valid_ratio(m) for m in masks], 1)  # (B, L, 2)
        memory = self.encoder(src_flat, spatial_shapes, level_start_index, valid_ratios, pos_flat, mask_flat, shapes)
        return dict(memory=memory, mask=mask_flat, spatial_shapes=spatial_shapes, level_shapes=shapes,
                    level_start_index=level_start_index, valid_ratios=valid_ratios)

    def encoder_proposals(self, memory, memory_padding_mask, spatial_shapes, level_shapes=None):
        """Two-stage: one proposal per memory location, a box of size 0.05*2^l centred on it (logit space)."""
        B = memory.shape[0]
        proposals, start = [], 0
        for lvl, (H, W) in enumerate(spatial_shapes.tolist() if level_shapes is None else level_shapes):
            m = memory_padding_mask[:, start:start + H * W].view(B, H, W)  # (B, H_l, W_l)
            valid_h, valid_w = (~m[:, :, 0]).sum(1), (~m[:, 0, :]).sum(1)
            # arange, not linspace: the same floats, and torch.export keeps H, W symbolic through arange.
            ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32, device=memory.device),
                                    torch.arange(W, dtype=torch.float32, device=memory.device), indexing="ij")
            grid = torch.stack([xs, ys], -1)  # (H, W, 2)
            scale = torch.stack([valid_w, valid_h], -1).view(B, 1, 1, 2)  # (B, 1, 1, 2)
            grid = (grid[None] + 0.5) / scale  # (B, H, W, 2)
            wh = torch.full_like(grid, 0.05 * (2.0 ** lvl))
            proposals.append(torch.cat((grid, wh), -1).view(B, -1, 4))  # (B, H*W, 4)
            start += H * W
        proposals = torch.cat(proposals, 1)  # (B, S_all, 4)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        invalid = memory_padding_mask[..., None] | ~valid
        proposals = proposals.masked_fill(invalid, float("inf"))
        out_memory = memory.masked_fill(invalid, 0.0)
        return self.enc_output_norm(self.enc_output(out_memory)), proposals

    def proposal_queries(self, boxes):
        """Two-stage query of each box (official `pos_trans_norm(pos_trans(get_proposal_pos_embed(...)))`):
        (query_pos, tgt), each (..., C), from boxes (..., 4) normalized cxcywh.

        DynQL's Eq. 8 takes the positional half, so a DynQuery's position is encoded as a conventional query's.
        """
        pos_tgt = self.pos_trans_norm(self.pos_trans(box_sine_embed(boxes, self.d_model)))  # (..., 2C)
        return torch.split(pos_tgt, self.d_model, dim=-1)  # (..., C) each

    def select_queries(self, enc, query_embed=None):
        """Conventional queries: (tgt, query_pos, reference boxes) and, two-stage, the encoder predictions."""
        memory = enc["memory"]
        B, C = memory.shape[0], self.d_model
        if self.two_stage:
            out_memory, proposals = self.encoder_proposals(memory, enc["mask"], enc["spatial_shapes"],
                                                           enc["level_shapes"])
            head = self.decoder.num_layers
            enc_logits = self.decoder.class_embed[head](out_memory)  # (B, S_all, K)
            enc_coord_logit = self.decoder.bbox_embed[head](out_memory) + proposals  # (B, S_all, 4)
            k = min(self.two_stage_num_proposals, enc_logits.shape[1])
            # Class-agnostic: the encoder head is trained with every object as class 0.
            topk = torch.topk(enc_logits[..., 0], k, dim=1)[1]  # (B, Q)
            coords = torch.gather(enc_coord_logit, 1, topk[..., None].repeat(1, 1, 4)).detach()  # (B, Q, 4)
            reference = coords.sigmoid()
            query_pos, tgt = self.proposal_queries(reference)
            enc_out = {"pred_logits": enc_logits, "pred_boxes": enc_coord_logit.sigmoid()}
            return tgt, query_pos, reference, enc_out
        query_pos, tgt = torch.split(query_embed, C, dim=1)
        query_pos = query_pos[None].expand(B, -1, -1)  # (B, Q, C)
        tgt = tgt[None].expand(B, -1, -1)
        return tgt, query_pos, self.reference_points(query_pos).sigmoid(), None

    def decode(self, enc, tgt, query_pos, reference, self_attn_mask=None):
        return self.decoder(tgt, query_pos, reference, enc["memory"], enc["spatial_shapes"],
                            enc["level_start_index"], enc["valid_ratios"], enc["mask"], self_attn_mask,
                            enc["level_shapes"])


# ----------------------------------------------------------------------------------------------------------
# The detector
# ----------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Feed-forward network with ReLU between its layers (the 3-layer box head)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def check_variant(*, two_stage, with_box_refine, dynql=False, alignnet=True):
    """The Deformable DETR variants that can be built, checked before anything is: two-stage needs the extra
    refinement head, DynQL needs two-stage (4-D reference boxes) and AlignNet's Eq. 3 projection."""
    if two_stage and not with_box_refine:
        raise InputError("--two-stage needs --with-box-refine (the encoder proposals use the extra refinement "
                         "head, as in the official code); add --no-two-stage for single-stage Deformable DETR")
    if dynql and not two_stage:
        raise InputError("DynQL (--method dynql or clip-detr) needs --two-stage: DynQueries carry 4-D reference "
                         "boxes")
    if dynql and not alignnet:
        raise InputError("DynQL needs the AlignNet projection for z_attr (Eq. 3); pass alignnet too")


def input_projections(in_channels, d_model, num_feature_levels):
    """`input_proj`: a 1x1 conv + GroupNorm to d_model per backbone level, then, for each extra level, a 3x3
    stride-2 conv (on C5, then on the previous extra level) + GroupNorm, xavier-initialised as in the official code."""
    proj = [nn.Sequential(nn.Conv2d(c, d_model, kernel_size=1), nn.GroupNorm(32, d_model)) for c in in_channels]
    for i in range(num_feature_levels - len(in_channels)):
        c_in = in_channels[-1] if i == 0 else d_model
        proj.append(nn.Sequential(nn.Conv2d(c_in, d_model, kernel_size=3, stride=2, padding=1),
                                  nn.GroupNorm(32, d_model)))
    for p in proj:
        nn.init.xavier_uniform_(p[0].weight, gain=1)
        nn.init.constant_(p[0].bias, 0)
    return nn.ModuleList(proj)


class LabelEmbeddingClassifier(nn.Module):
    """Open-vocabulary class head (paper §4.2, OV-COCO): scores a decoder output against the label dictionary.

    logits (..., K) = exp(logit_scale) * normalize(proj(h)) @ normalize(f_cls)^T + bias, so a class is named by
    the similarity of the query with its CLIP text embedding, and a class never seen in training (OV-COCO's
    novel categories) is scored at test time by its row of the dictionary alone. As in CLIP, the scale starts
    at 1/0.07 and is capped at 100; the shared bias starts at the focal-loss prior 0.01 of Deformable DETR.

    `train_classes` (bool mask over K, or class indices) are the classes with training annotations. In
    training mode the logits of every other class are set to -1e4: their sigmoid is 0, so the focal loss of
    those classes and its gradient vanish, and a novel class is never pushed down as a negative on images
    where it may well appear unannotated (OV-DETR's practice). -1e4 rather than -inf keeps the loss finite
    (-inf gives 0 * inf = NaN) and is representable in float16. In eval mode all K classes are scored.

    The dictionary is a persistent buffer: a checkpoint carries the exact rows its projection was trained on.
    `set_label_embeddings` swaps it for the rows of any other names (any vocabulary at inference).
    """

    MASKED_LOGIT = -1e4

    def __init__(self, *, label_embeddings, d_model=256, train_classes=None, logit_scale_init=1 / 0.07,
                 logit_scale_max=100.0, prior_prob=0.01):
        super().__init__()
        if label_embeddings.ndim != 2:
            raise ValueError(f"label_embeddings has shape {tuple(label_embeddings.shape)}, expected (K, D)")
        if not 0 < logit_scale_init <= logit_scale_max:
            raise ValueError(f"logit_scale_init={logit_scale_init} and logit_scale_max={logit_scale_max}, "
                             f"expected 0 < logit_scale_init <= logit_scale_max")
        if not 0 < prior_prob < 1:
            raise ValueError(f"prior_prob={prior_prob}, expected a probability in (0, 1)")
        num_classes, dim = label_embeddings.shape
        self.logit_scale_max = logit_scale_max
        self.register_buffer('label_embeddings', F.normalize(label_embeddings.detach().float(), dim=-1))
        self.proj = nn.Linear(d_model, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))
        self.bias = nn.Parameter(torch.tensor(-math.log((1 - prior_prob) / prior_prob)))
        self.register_buffer('train_mask', self._train_mask(train_classes, num_classes), persistent=False)

    @staticmethod
    def _train_mask(train_classes, num_classes):
        """(K,) bool, True for the classes trained with annotations; None when all of them are."""
        if train_classes is None:
            return None
        classes = torch.as_tensor(train_classes)
        if classes.dtype == torch.bool:
            if classes.shape != (num_classes,):
                raise ValueError(f"train_classes is a mask of shape {tuple(classes.shape)}, expected ({num_classes},)")
            mask = classes.clone()
        else:
            if classes.ndim != 1 or (classes.numel() and (classes.min() < 0 or classes.max() >= num_classes)):
                raise ValueError(f"train_classes {classes.tolist()} must be class indices in [0, {num_classes - 1}]")
            mask = torch.zeros(num_classes, dtype=torch.bool)
            mask[classes.long()] = True
        if not mask.any():
            raise ValueError("train_classes selects no class, expected at least one class with annotations")
        return mask

    def set_label_embeddings(self, label_embeddings):
        """Score against `label_embeddings` (K', D) from now on, normalized as at construction; D must be the
        width the projection was trained into. The training mask named rows of the old dictionary: it goes."""
        width = self.label_embeddings.shape[1]
        if label_embeddings.ndim != 2 or label_embeddings.shape[1] != width:
            raise ValueError(f"label_embeddings has shape {tuple(label_embeddings.shape)}, expected (K, {width}): "
                             f"the class head projects into a {width}-wide text embedding space")
        self.label_embeddings = F.normalize(label_embeddings.detach().float(), dim=-1).to(self.proj.weight.device)
        self.train_mask = None

    @property
    def scale(self):
        """exp(logit_scale), capped at logit_scale_max as CLIP caps its logit scale."""
        return self.logit_scale.exp().clamp(max=self.logit_scale_max)

    def forward(self, h):
        """h (..., C) decoder outputs -> logits (..., K)."""
        logits = self.scale * F.normalize(self.proj(h), dim=-1) @ self.label_embeddings.t() + self.bias
        if self.training and self.train_mask is not None:
            logits = logits.masked_fill(~self.train_mask, self.MASKED_LOGIT)
        return logits


def prediction_heads(d_model, num_classes, num_pred, *, with_box_refine, two_stage, class_head=None):
    """(class_embed, bbox_embed): one class head and one 3-layer box MLP per prediction (decoder layers, + 1 for
    the two-stage encoder proposals) with box refinement, else one pair shared by every layer, as in the official
    code. `class_head` replaces the linear classifier (open vocabulary: scores against the CLIP dictionary)."""
    bbox_embed = MLP(d_model, d_model, 4, 3)
    if class_head is None:
        class_embed = nn.Linear(d_model, num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))  # focal prior 0.01
    else:
        class_embed = class_head
    nn.init.constant_(bbox_embed.layers[-1].weight, 0)
    nn.init.constant_(bbox_embed.layers[-1].bias, 0)
    if with_box_refine:
        class_embeds = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
        bbox_embeds = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
        nn.init.constant_(bbox_embeds[0].layers[-1].bias[2:], -2.0)
    else:
        nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
        class_embeds = nn.ModuleList(class_embed for _ in range(num_pred))
        bbox_embeds = nn.ModuleList(bbox_embed for _ in range(num_pred))
    if two_stage and class_head is not None:
        # Proposals are ranked by column 0 of the encoder head, trained with every object as class 0. A class
        # head that scores CLIP rows would make its column 0 (a real class) the objectness and push every
        # other class down on every object: open-vocabulary DETRs keep a class-agnostic head here instead.
        objectness = nn.Linear(d_model, 1)
        nn.init.constant_(objectness.bias, -math.log((1 - 0.01) / 0.01))  # focal prior 0.01
        class_embeds[-1] = objectness
    if two_stage:
        for box_embed in bbox_embeds:
            nn.init.constant_(box_embed.layers[-1].bias[2:], 0.0)
    return class_embeds, bbox_embeds


class DeformableDETR(nn.Module):
    """Deformable DETR with optional training-only CLIP-DETR modules (`alignnet`, `dynql`)."""

    def __init__(self, backbone, transformer, *, num_classes, num_queries=300, num_feature_levels=4,
                 with_box_refine=True, two_stage=True, alignnet=None, dynql=None, align_loss=True,
                 class_head=None):
        super().__init__()
        check_variant(two_stage=two_stage, with_box_refine=with_box_refine, dynql=dynql is not None,
                      alignnet=alignnet is not None)
        C = transformer.d_model
        self.num_queries, self.num_classes = num_queries, num_classes
        self.with_box_refine, self.two_stage = with_box_refine, two_stage
        self.backbone = backbone
        self.transformer = transformer
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, C * 2)
        self.input_proj = input_projections(list(backbone[0].num_channels), C, num_feature_levels)
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        self.class_embed, self.bbox_embed = prediction_heads(C, num_classes, num_pred, with_box_refine=with_box_refine,
                                                             two_stage=two_stage, class_head=class_head)
        # The official aliases: the decoder refines boxes with the detector's heads, and two-stage proposals are
        # scored by its extra class head (state-dict keys transformer.decoder.{bbox,class}_embed.N).
        if with_box_refine:
            transformer.decoder.bbox_embed = self.bbox_embed
        if two_stage:
            transformer.decoder.class_embed = self.class_embed
        self.alignnet = alignnet
        self.dynql = dynql
        # DynQL alone still needs AlignNet's Eq. 3 projection, but not its loss.
        self.align_loss = align_loss and alignnet is not None

    def features(self, images, mask):
        """Backbone + input projections: L maps (B, C, H_l, W_l), their masks and position encodings."""
        feats, pos = self.backbone(images, mask)
        srcs = [proj(x) for proj, (x, _) in zip(self.input_proj, feats)]
        masks = [m for _, m in feats]
        for lvl in range(len(feats), len(self.input_proj)):
            srcs.append(self.input_proj[lvl](feats[-1][0] if lvl == len(feats) else srcs[-1]))
            masks.append(F.interpolate(mask[None].float(), size=srcs[-1].shape[-2:]).to(torch.bool)[0])
            pos.append(self.backbone[1](masks[-1]).to(srcs[-1].dtype))
        return srcs, masks, pos

    def heads(self, hs, refs):
        """Class logits and boxes of every decoder layer: lists of (B, Lq, K) and (B, Lq, 4)."""
        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            ref = inverse_sigmoid(refs[lvl])
            delta = self.bbox_embed[lvl](hs[lvl])
            if ref.shape[-1] == 4:
                delta = delta + ref
            else:
                delta = torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1)
            logits.append(self.class_embed[lvl](hs[lvl]))
            boxes.append(delta.sigmoid())
        return logits, boxes

    @staticmethod
    def memory_levels(enc):
        """The flat encoder memory back as L maps (B, C, H_l, W_l) (AlignNet's F^l, the score maps)."""
        memory = enc["memory"]
        levels = []
        for (H, W), start in zip(enc["spatial_shapes"].tolist(), enc["level_start_index"].tolist()):
            levels.append(memory[:, start:start + H * W].transpose(1, 2).unflatten(2, (H, W)))  # (B, C, H, W)
        return levels

    def forward(self, images, mask, targets=None):
        """images (B, 3, H, W), mask (B, H, W) True on padding; targets only drive the training modules."""
        srcs, masks, pos = self.features(images, mask)
        if images.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # CPU autocast stops after the convolutions: bf16 pays there (AMX, AVX512-BF16), while the transformer's
            # many small operations lose more to casts than their matrix products gain (README, "The demo's time").
            with torch.autocast("cpu", enabled=False):
                return self.detect([s.float() for s in srcs], masks, [p.float() for p in pos], targets)
        return self.detect(srcs, masks, pos, targets)

    def detect(self, srcs, masks, pos, targets=None):
        """The transformer and the heads on the L projected feature maps: forward's output contract."""
        enc = self.transformer.encode(srcs, masks, pos)
        query_embed = None if self.two_stage else self.query_embed.weight
        tgt, query_pos, reference, enc_out = self.transformer.select_queries(enc, query_embed)
        Q = tgt.shape[1]
        out = {}
        train_modules = self.training and targets is not None
        dyn = None
        if train_modules and self.dynql is not None:
            z_attr = self.alignnet.object_attribute_feature(
                torch.cat([t["labels"] for t in targets]), torch.cat([t["boxes"] for t in targets]))
            dyn = self.dynql(z_attr, targets, num_queries=Q, proposal_queries=self.transformer.proposal_queries)
            tgt = torch.cat([tgt, dyn.content], 1)  # (B, Q + S*G, C)
            query_pos = torch.cat([query_pos, dyn.query_pos], 1)
            reference = torch.cat([reference, dyn.reference], 1)
        hs, refs = self.transformer.decode(enc, tgt, query_pos, reference, None if dyn is None else dyn.attn_mask)
        logits, boxes = self.heads(hs, refs)
        layers = [{"pred_logits": lg[:, :Q], "pred_boxes": bx[:, :Q]} for lg, bx in zip(logits, boxes)]
        out.update(layers[-1])
        out["aux_outputs"] = layers[:-1]
        if enc_out is not None:
            out["enc_outputs"] = enc_out
        if dyn is not None:
            out["dynql_outputs"] = [{"pred_logits": lg[:, Q:], "pred_boxes": bx[:, Q:]}
                                    for lg, bx in zip(logits, boxes)]
            out["dynql_layout"] = dyn
        if train_modules and self.align_loss:
            out["loss_align"] = self.alignnet(self.memory_levels(enc), enc["valid_ratios"], targets)
        return out


class PostProcess(nn.Module):
    """Top-k of the Q*K sigmoid scores, boxes in absolute xyxy of each original image."""

    def __init__(self, num_select=100):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs, target_sizes):
        """target_sizes (B, 2) as (h, w) of the original images. Returns a list of dicts per image."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        B, Q, K = logits.shape
        k = min(self.num_select, Q * K)
        scores, idx = torch.topk(logits.sigmoid().view(B, -1), k, dim=1)  # (B, k)
        labels = idx % K
        boxes = torchvision.ops.box_convert(boxes, "cxcywh", "xyxy")
        boxes = torch.gather(boxes, 1, (idx // K)[..., None].repeat(1, 1, 4))  # (B, k, 4)
        h, w = target_sizes.unbind(1)
        boxes = boxes * torch.stack([w, h, w, h], 1)[:, None].to(boxes.dtype)
        return [{"scores": s, "labels": lb, "boxes": b} for s, lb, b in zip(scores, labels, boxes)]



# ==========================================================================================================
# FAST PATHS OF THE DEFORMABLE ATTENTION. The paper's model ends above: a reader can stop here.
# Everything below computes exactly what `ms_deform_attn_pytorch` computes (test_model.py and test_triton.py
# prove it, values and gradients), only faster: which one runs (`resolve_attn_impl`), the CPU gather path,
# and the optional Triton GPU kernel.
# ==========================================================================================================

# ----------------------------------------------------------------------------------------------------------
# Which implementation runs
# ----------------------------------------------------------------------------------------------------------
_ATTN_IMPLS = ("auto", "pytorch", "gather", "triton")
_announced = set()
# On the CPU, 'auto' takes the gather path for calls that sample at least this many points (B*Lq*M*L*P). Below it
# the gather path's few dozen small tensor operations cost more than grid_sample's samples: measured on 2 cores,
# the demo's encoder (210 K points, C/M = 16) trains 7-10 % faster per step with the reference, while the 640x640
# COCO encoder (2.2 M points, C/M = 32) is where the gather path halves a training step.
GATHER_MIN_POINTS = 2**20


def resolve_attn_impl(impl, device, points=None):
    """'auto' -> Triton for CUDA tensors when importable; on the CPU the gather path for calls sampling at least
    GATHER_MIN_POINTS points (`points`), else the PyTorch reference; 'triton' where it cannot run -> error."""
    if impl not in _ATTN_IMPLS:
        raise InputError(f"--attn-impl {impl!r}: expected one of {_ATTN_IMPLS}")
    cuda = torch.device(device).type == "cuda"
    if impl == "auto":
        if cuda:
            impl = "triton" if triton_available() else "pytorch"
        else:
            impl = "gather" if points is not None and points >= GATHER_MIN_POINTS else "pytorch"
    elif impl == "triton" and not (cuda and triton_available()):
        raise InputError("--attn-impl triton needs a CUDA device and an importable triton "
                         f"(device={device}, triton importable={triton_available()}); use --attn-impl pytorch")
    if impl not in _announced:
        _announced.add(impl)
        if is_main():
            why = "" if cuda or points is None else f" (first call: {points} sampled points)"
            print(f"multi-scale deformable attention: {impl}{why}")
    return impl


# ----------------------------------------------------------------------------------------------------------
# Multi-scale deformable attention: the CPU fast path, bilinear taps gathered as rows
# ----------------------------------------------------------------------------------------------------------
# The same sum as the reference, written so that nothing of size (points x channels) is ever materialised. The
# reference builds grid_sample's (B*M, C/M, Lq, L*P) samples, stacks, weights and sums them, and its backward
# does the same again: at the COCO configuration that is 70 M floats per encoder layer, the bulk of a CPU
# training step. Here every level's map gets a one-pixel ring of zeros, so the four bilinear taps of a point
# are the rows key, key + M, key + W'M, key + (W'+1)M of one table (W' = W_l + 2, M heads interleaved) and a tap
# outside the map reads the ring's zero. The output is then one `embedding_bag`: per (query, head), the sum of
# L*P*4 table rows weighted by attention weight x bilinear weight. `_TapSum` supplies the backward:
#   - d weight of a tap = <grad_out of its (query, head), table row of the tap>: `sampled_addmm`, a dot product
#     per tap without gathering the rows;
#   - d table = the transposed sum, an `embedding_bag` of grad_out rows into table rows over taps sorted by row.
#     Where points outnumber table rows (the encoder), the points are sorted by key once: because the four taps
#     of a point are key plus a per-level constant that keeps them inside their level's block, that one order
#     also sorts every tap column, and each column is one `embedding_bag` (four passes over the rows instead of
#     a sort of four times as many taps). Otherwise (decoder queries) the taps are sorted, one pass.
# Gradients to locations and attention weights follow by autograd from the tap weights, as grid_sample's do
# (the floor is piecewise constant). A point whose top-left tap lies beyond the ring has all four taps outside
# the map: its attention weight is zeroed, as zero padding reads zeros there.
def _bag_offsets(tap_rows, table):
    """Where each table row's taps start in the row-sorted order: the bag offsets of the transposed sum."""
    counts = torch.bincount(tap_rows, minlength=table.shape[0])
    return (counts.cumsum(0) - counts).to(tap_rows.dtype)


class _TapSum(torch.autograd.Function):
    """out[n] = sum_t w[n, t] * table[key[n, t // 4] + delta[level of t, t % 4]], with the backward above.

    table (R, Dh); key (N, L*P) the table row of each point's top-left tap, in any order; delta (L, 4) the
    row offsets of the four taps on each level; w (N, L*P*4) tap weights. Returns (N, Dh).
    """

    @staticmethod
    def forward(ctx, table, key, delta, w):
        N, LP = key.shape
        L = delta.shape[0]
        rows = (key.view(N, L, LP // L, 1) + delta.view(1, L, 1, 4)).view(N, LP * 4)  # (N, L*P*4)
        ctx.save_for_backward(table, key, delta, rows, w)
        return F.embedding_bag(rows, table, per_sample_weights=w, mode="sum")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        table, key, delta, rows, w = ctx.saved_tensors
        N, T = rows.shape
        L, LP = delta.shape[0], key.shape[1]
        grad_out = grad_out.contiguous()
        grad_table = grad_w = None
        if ctx.needs_input_grad[3]:
            crow = torch.arange(0, N * T + 1, T, dtype=rows.dtype, device=rows.device)
            with warnings.catch_warnings():  # sparse CSR is "beta"; these tensors are built valid by construction
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
                taps = torch.sparse_csr_tensor(crow, rows.view(-1), w.new_zeros(N * T), (N, table.shape[0]),
                                               check_invariants=False)
                grad_w = torch.sparse.sampled_addmm(taps, grad_out, table.t(), beta=0.0).values().view(N, T)
        if ctx.needs_input_grad[0]:
            if key.numel() < table.shape[0]:
                # Fewer points than table rows (decoder queries): sort the taps themselves, one pass over the rows.
                order = rows.view(-1).argsort()  # (N*T,)
                return (F.embedding_bag((order // T).to(rows.dtype), grad_out, _bag_offsets(rows.view(-1), table),
                                        per_sample_weights=w.view(-1).index_select(0, order), mode="sum"),
                        None, None, grad_w)
            keys = key.view(-1)  # (N*L*P,) one per point
            order = keys.argsort()  # points by the row of their top-left tap
            bag = (order // LP).to(rows.dtype)  # the (query, head) of each sorted point
            level = (order // (LP // L)) % L
            # Sorted too, every tap column: see the comment above _TapSum.
            tap_rows = keys.index_select(0, order)[None, :] + delta.t().index_select(1, level)  # (4, N*L*P)
            tap_w = w.view(N * LP, 4).index_select(0, order).t().contiguous()  # (4, N*L*P)
            grad_table = torch.zeros_like(table)
            for rows_of_tap, w_of_tap in zip(tap_rows, tap_w):
                grad_table += F.embedding_bag(bag, grad_out, _bag_offsets(rows_of_tap, table),
                                              per_sample_weights=w_of_tap, mode="sum")
        return grad_table, None, None, grad_w


def ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights):
    """Multi-scale deformable attention (Zhu et al., Eq. 3), the CPU fast path described above.

    Same arguments and result as `ms_deform_attn_pytorch` (equal to float64 rounding, test_model.py). Computes in
    float32 (float64 for float64 inputs) with autocast off; the output has `value`'s dtype.
    """
    B, _, M, Dh = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    dtype = torch.promote_types(value.dtype, torch.float32)
    shapes = spatial_shapes.tolist()
    with torch.autocast(value.device.type, enabled=False):
        # The table: each level's (H_l, W_l) map inside a ring of zeros, (B, sum_l (H_l+2)(W_l+2), M, Dh).
        ringed = [(h + 2) * (w + 2) for h, w in shapes]
        table = value.new_zeros((B, sum(ringed), M, Dh), dtype=dtype)
        starts = [0]
        for (h, w), size, level_value in zip(shapes, ringed, value.split([h * w for h, w in shapes], dim=1)):
            level_table = table[:, starts[-1]:starts[-1] + size].view(B, h + 2, w + 2, M, Dh)
            level_table[:, 1:-1, 1:-1] = level_value.view(B, h, w, M, Dh)  # (B, H_l, W_l, M, Dh)
            starts.append(starts[-1] + size)
        index = torch.int32 if table.numel() // Dh < 2**31 else torch.int64
        wh = spatial_shapes.flip(-1).to(dtype)  # (L, 2) as (W_l, H_l)
        # Pixel coordinates x * W_l - 0.5, rounded as grid_sample's CPU kernel rounds them: it gets 2x - 1 and
        # computes (g + 1) * W_l/2 - 0.5 with one fused multiply-add (emulated here in float64). At init most encoder
        # points sit on pixel centres, where bilinear sampling has a kink, and a last-bit difference would pick the
        # other one-sided gradient.
        grid = 2 * sampling_locations.to(dtype) - 1
        pix = ((grid + 1).double() * (wh[:, None, :] / 2).double() - 0.5).to(dtype)  # (B, Lq, M, L, P, 2)
        corner = pix.detach().floor()
        frac = pix - corner  # (B, Lq, M, L, P, 2), what the bilinear weights are made of
        # A top-left tap in [-1, W_l - 1] x [-1, H_l - 1] keeps all four taps inside the ring; else (also NaN)
        # the point is outside the map and reads zero.
        inside = (corner >= -1) & (corner <= wh[:, None, :] - 1)  # (B, Lq, M, L, P, 2)
        corner = torch.where(inside, corner, -1.0).to(index) + 1  # ringed coordinates
        a = attention_weights.to(dtype) * inside.all(-1)  # (B, Lq, M, L, P)
        ringed_w = (spatial_shapes[:, 1] + 2).to(index)  # (L,)
        level_start = torch.tensor(starts[:-1], dtype=index, device=value.device)
        row0 = level_start.view(L, 1) + corner[..., 1] * ringed_w.view(L, 1) + corner[..., 0]  # (B, Lq, M, L, P)
        batch = torch.arange(B, dtype=index, device=value.device).view(B, 1, 1, 1, 1) * starts[-1]
        head = torch.arange(M, dtype=index, device=value.device).view(1, 1, M, 1, 1)
        key = ((batch + row0) * M + head).view(B * Lq * M, L * P)  # (B*Lq*M, L*P) table row of the top-left tap
        delta = torch.stack([torch.zeros_like(ringed_w), torch.ones_like(ringed_w), ringed_w, ringed_w + 1], -1) * M
        fx, fy = frac.unbind(-1)  # (B, Lq, M, L, P) each
        a_x1 = a * fx
        a_x0 = a - a_x1
        w_x0y1, w_x1y1 = a_x0 * fy, a_x1 * fy
        w = torch.stack([a_x0 - w_x0y1, a_x1 - w_x1y1, w_x0y1, w_x1y1], -1)  # (B, Lq, M, L, P, 4) in delta's order
        out = _TapSum.apply(table.view(-1, Dh), key, delta, w.view(B * Lq * M, L * P * 4))  # (B*Lq*M, Dh)
    return out.view(B, Lq, M * Dh).to(value.dtype)  # (B, Lq, C)


# ----------------------------------------------------------------------------------------------------------
# Multi-scale deformable attention: the optional Triton GPU kernel, forward and backward
# ----------------------------------------------------------------------------------------------------------
# For one head m of one query q, with attention weights A and normalized sampling locations p,
#
#     out[q, m] = sum_l sum_p A[q, m, l, p] * bilinear(V_l[:, m], p[q, m, l, p] scaled to level l)
#
# where a normalized (x, y) maps to the pixel coordinate (x * W_l - 0.5, y * H_l - 0.5) (pixel centres at
# (i + 0.5) / W_l, `grid_sample` with align_corners=False), and a bilinear tap outside the map reads 0.
#
# Kernel layout: one program per (block of queries, batch element and head). It loops over levels and points,
# holds a (BLOCK_Q, BLOCK_D) tile of the head's channels, and gathers the four corner rows of `value` per
# sampling point, one tap at a time. The backward kernel recomputes the corners; with t_ij = <grad_out, V[tap ij]>
# over the head's channels it produces
#   - grad value: w_ij * A * grad_out scattered with atomic adds into an fp32 buffer (many queries read a pixel);
#   - grad attention weight: <grad_out, bilinear sample> = sum_ij w_ij t_ij;
#   - grad location: A * sum_ij (d w_ij / d coordinate) t_ij, times W_l (for x) or H_l (for y), the chain rule
#     of x * W_l - 0.5.
# Registers: with TRITON_BLOCK_Q = 16 and BLOCK_D = 32 (Dh of the 256-wide, 8-head model), 4 warps hold 4
# channels per thread, and both kernels fit in at most 128 registers without spilling on sm_80 and sm_90;
# test_triton compiles them for those GPUs and reads the cubin. Larger blocks spill (64: up to 255 registers).
# Offsets are int32 within one batch element's head (_check_inputs bounds S_all * M * Dh) and int64 only in
# the per-program scalar bases.
try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only PyTorch wheels do not ship triton; the PyTorch reference is used instead.
    triton = None


def triton_available():
    """True when triton can be imported, i.e. the Triton kernels can be compiled or interpreted."""
    return triton is not None


# Triton chooses interpreter or compiler from TRITON_INTERPRET twice: when triton itself is imported (its own
# library kernels, e.g. tl.zeros) and when each kernel here is defined. Both must see the same setting.
# Older triton releases have no `knobs`; they read the environment variable directly.
_INTERPRETED = triton is not None and (
    bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else os.environ.get("TRITON_INTERPRET") == "1")


def triton_interpreted():
    """True when TRITON_INTERPRET=1 was set as this module was imported: the kernels then run on CPU tensors.

    The interpreter works only if TRITON_INTERPRET=1 was also set before triton was first imported in the
    process (torchvision imports it); this function cannot see that.
    """
    return _INTERPRETED


if triton is not None:

    @triton.jit
    def _program_block(M, Lq, Dh, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's batch element b and head m, its block of BLOCK_Q queries and its channel block.

        row0 (int64) indexes (B, Lq, M) at the block's first query; the queries' rows are row0 + q_rows, with
        int32 q_rows < BLOCK_Q * M, so only the scalar base needs 64 bits (B*Lq*M*L*P*2 can pass 2^31).
        """
        q0 = tl.program_id(0) * BLOCK_Q
        bm = tl.program_id(1).to(tl.int64)
        b = bm // M
        m = bm % M
        q = tl.arange(0, BLOCK_Q)
        d = tl.arange(0, BLOCK_D)
        return b, m, (b * Lq + q0) * M + m, q * M, q0 + q < Lq, d, d < Dh

    @triton.jit
    def _point(loc_blk, attn_blk, lp, q_ok, H, W):
        """One sampling point of a block of queries: attention weight, top-left tap (y0, x0), fractions (ly, lx)."""
        a = tl.load(attn_blk + lp, mask=q_ok, other=0.0)
        x = tl.load(loc_blk + 2 * lp, mask=q_ok, other=0.0) * W.to(tl.float32) - 0.5
        y = tl.load(loc_blk + 2 * lp + 1, mask=q_ok, other=0.0) * H.to(tl.float32) - 0.5
        # Past -2 or W + 1 both taps are outside anyway; the clamp keeps far-away points from overflowing int32.
        x = tl.minimum(tl.maximum(x, -2.0), W.to(tl.float32) + 1.0)
        y = tl.minimum(tl.maximum(y, -2.0), H.to(tl.float32) + 1.0)
        x0 = tl.floor(x)
        y0 = tl.floor(y)
        return a, y0.to(tl.int32), x0.to(tl.int32), y - y0, x - x0

    @triton.jit
    def _tap(v_head, H, W, start, yi, xi, q_ok, row_stride, d, d_ok):
        """One bilinear tap of a block of queries: offsets (BLOCK_Q, BLOCK_D) into the head's value rows, mask
        (zero padding outside the map) and values. int32 offsets: _check_inputs bounds S_all * M * Dh."""
        inside = q_ok & (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
        off = ((start + yi * W + xi) * row_stride)[:, None] + d[None, :]
        mask = inside[:, None] & d_ok[None, :]
        return off, mask, tl.load(v_head + off, mask=mask, other=0.0)

    @triton.jit
    def _tap_backward(v_head, gv_head, H, W, start, yi, xi, q_ok, row_stride, d, d_ok, g_out, weight):
        """Scatter weight * grad_out into grad value at one tap; return <grad_out, value row> per query."""
        off, mask, v = _tap(v_head, H, W, start, yi, xi, q_ok, row_stride, d, d_ok)
        tl.atomic_add(gv_head + off, weight[:, None] * g_out, mask=mask, sem="relaxed")
        return tl.sum(g_out * v, axis=1)

    @triton.jit
    def _msda_fwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
                         S_all, M, Lq, L, P, Dh,
                         BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
        b, m, row0, q_rows, q_ok, d, d_ok = _program_block(M, Lq, Dh, BLOCK_Q, BLOCK_D)
        v_head = value_ptr + b * S_all * M * Dh + m * Dh
        loc_blk = loc_ptr + row0 * L * P * 2
        attn_blk = attn_ptr + row0 * L * P
        acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
        # One tap at a time, each folded into acc at once: few value tiles are live, so no registers spill.
        for lvl in range(L):
            H = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
            W = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
            start = tl.load(starts_ptr + lvl).to(tl.int32)
            for pt in range(P):
                lp = q_rows * L * P + lvl * P + pt
                a, y0, x0, ly, lx = _point(loc_blk, attn_blk, lp, q_ok, H, W)
                hy = 1.0 - ly
                hx = 1.0 - lx
                _, _, v = _tap(v_head, H, W, start, y0, x0, q_ok, M * Dh, d, d_ok)
                acc += (a * hy * hx)[:, None] * v
                _, _, v = _tap(v_head, H, W, start, y0, x0 + 1, q_ok, M * Dh, d, d_ok)
                acc += (a * hy * lx)[:, None] * v
                _, _, v = _tap(v_head, H, W, start, y0 + 1, x0, q_ok, M * Dh, d, d_ok)
                acc += (a * ly * hx)[:, None] * v
                _, _, v = _tap(v_head, H, W, start, y0 + 1, x0 + 1, q_ok, M * Dh, d, d_ok)
                acc += (a * ly * lx)[:, None] * v
        out_blk = out_ptr + row0 * Dh
        tl.store(out_blk + (q_rows * Dh)[:, None] + d[None, :], acc, mask=q_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _msda_bwd_kernel(value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
                         grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
                         S_all, M, Lq, L, P, Dh,
                         BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
        b, m, row0, q_rows, q_ok, d, d_ok = _program_block(M, Lq, Dh, BLOCK_Q, BLOCK_D)
        head_offset = b * S_all * M * Dh + m * Dh
        v_head = value_ptr + head_offset
        gv_head = grad_value_ptr + head_offset
        loc_blk = loc_ptr + row0 * L * P * 2
        attn_blk = attn_ptr + row0 * L * P
        g_loc_blk = grad_loc_ptr + row0 * L * P * 2
        g_attn_blk = grad_attn_ptr + row0 * L * P
        g_out = tl.load(grad_out_ptr + row0 * Dh + (q_rows * Dh)[:, None] + d[None, :],
                        mask=q_ok[:, None] & d_ok[None, :], other=0.0)
        for lvl in range(L):
            H = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
            W = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
            start = tl.load(starts_ptr + lvl).to(tl.int32)
            for pt in range(P):
                lp = q_rows * L * P + lvl * P + pt
                a, y0, x0, ly, lx = _point(loc_blk, attn_blk, lp, q_ok, H, W)
                hy = 1.0 - ly
                hx = 1.0 - lx
                # Per tap t_ij = <grad_out, V[tap ij]>: the sample is sum w_ij V[tap ij], so its gradients are
                # sums of the four t_ij, and each value tile dies after its own tap (no spills).
                t00 = _tap_backward(v_head, gv_head, H, W, start, y0, x0, q_ok, M * Dh, d, d_ok, g_out,
                                    a * hy * hx)
                t01 = _tap_backward(v_head, gv_head, H, W, start, y0, x0 + 1, q_ok, M * Dh, d, d_ok, g_out,
                                    a * hy * lx)
                t10 = _tap_backward(v_head, gv_head, H, W, start, y0 + 1, x0, q_ok, M * Dh, d, d_ok, g_out,
                                    a * ly * hx)
                t11 = _tap_backward(v_head, gv_head, H, W, start, y0 + 1, x0 + 1, q_ok, M * Dh, d, d_ok, g_out,
                                    a * ly * lx)
                tl.store(g_attn_blk + lp, hy * hx * t00 + hy * lx * t01 + ly * hx * t10 + ly * lx * t11, mask=q_ok)
                # d sample / d x and d y of the bilinear weights, times W_l and H_l (chain rule of x * W_l - 0.5).
                tl.store(g_loc_blk + 2 * lp, a * W.to(tl.float32) * (hy * (t01 - t00) + ly * (t11 - t10)),
                         mask=q_ok)
                tl.store(g_loc_blk + 2 * lp + 1, a * H.to(tl.float32) * (hx * (t10 - t00) + lx * (t11 - t01)),
                         mask=q_ok)


# Queries per program of every launch (a power of two); see the register note above.
TRITON_BLOCK_Q = 16


def _device_guard(tensor):
    """Launch on the tensor's own GPU, which need not be the current one."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _launch_grid(B, Lq, M, block_q):
    """Programs: query blocks on axis 0 (up to 2^31 - 1 of them), batch elements times heads on axis 1."""
    return (triton.cdiv(Lq, block_q), B * M)


class MSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; all floating inputs must be float32 and on one device."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, block_q):
        value = value.contiguous()
        spatial_shapes = spatial_shapes.contiguous()
        level_start_index = level_start_index.contiguous()
        sampling_locations = sampling_locations.contiguous()
        attention_weights = attention_weights.contiguous()
        B, S_all, M, Dh = value.shape
        _, Lq, _, L, P, _ = sampling_locations.shape
        out = value.new_empty((B, Lq, M, Dh))  # every element is written by the kernel
        if B * Lq * M > 0:
            with _device_guard(value):
                _msda_fwd_kernel[_launch_grid(B, Lq, M, block_q)](
                    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
                    S_all, M, Lq, L, P, Dh, BLOCK_Q=block_q, BLOCK_D=triton.next_power_of_2(Dh))
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        ctx.block_q = block_q
        return out.view(B, Lq, M * Dh)  # (B, Lq, M*Dh)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        B, S_all, M, Dh = value.shape
        _, Lq, _, L, P, _ = sampling_locations.shape
        grad_output = grad_output.contiguous()
        grad_value = torch.zeros_like(value)  # float32: the atomic adds accumulate in it
        grad_loc = torch.zeros_like(sampling_locations)
        grad_attn = torch.zeros_like(attention_weights)
        if B * Lq * M > 0:
            with _device_guard(value):
                _msda_bwd_kernel[_launch_grid(B, Lq, M, ctx.block_q)](
                    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output,
                    grad_value, grad_loc, grad_attn,
                    S_all, M, Lq, L, P, Dh, BLOCK_Q=ctx.block_q, BLOCK_D=triton.next_power_of_2(Dh))
        return grad_value, None, None, grad_loc, grad_attn, None


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, block_q):
    if value.dim() != 4:
        raise ValueError(f"value has shape {tuple(value.shape)}, expected (B, S_all, M, Dh)")
    B, _, M, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations has shape {tuple(sampling_locations.shape)}, "
                         "expected (B, Lq, M, L, P, 2)")
    _, Lq, _, L, P, _ = sampling_locations.shape
    if sampling_locations.shape[0] != B or sampling_locations.shape[2] != M:
        raise ValueError(f"sampling_locations has shape {tuple(sampling_locations.shape)}, expected batch {B} "
                         f"and {M} heads as in value {tuple(value.shape)}")
    if tuple(attention_weights.shape) != (B, Lq, M, L, P):
        raise ValueError(f"attention_weights has shape {tuple(attention_weights.shape)}, "
                         f"expected {(B, Lq, M, L, P)} (B, Lq, M, L, P)")
    if tuple(spatial_shapes.shape) != (L, 2) or tuple(level_start_index.shape) != (L,):
        raise ValueError(f"spatial_shapes {tuple(spatial_shapes.shape)} and level_start_index "
                         f"{tuple(level_start_index.shape)}: expected ({L}, 2) and ({L},) for {L} levels")
    if spatial_shapes.dtype != torch.int64 or level_start_index.dtype != torch.int64:
        raise ValueError(f"spatial_shapes ({spatial_shapes.dtype}) and level_start_index "
                         f"({level_start_index.dtype}): expected torch.int64")
    devices = {t.device for t in (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)}
    if len(devices) != 1:
        raise ValueError(f"inputs are on devices {sorted(map(str, devices))}: expected one device")
    per_image = math.prod(value.shape[1:])
    if per_image >= 2**31:
        raise ValueError(f"value has shape {tuple(value.shape)}: {per_image} elements per batch element, expected "
                         "fewer than 2^31 (the kernels' int32 offsets); use ms_deform_attn_pytorch")
    if block_q < 1 or block_q & (block_q - 1):
        raise ValueError(f"block_q {block_q}: expected a power of two")


def ms_deform_attn_triton(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                          block_q=TRITON_BLOCK_Q):
    """Multi-scale deformable attention (Zhu et al., Eq. 3) with the Triton kernels described above.

    Same conventions and result as `ms_deform_attn_pytorch`, plus `level_start_index` (L,), the offset of each
    level in the flattened memory. Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set
    before triton was first imported; elsewhere it raises (`model.resolve_attn_impl` picks the PyTorch
    reference there). `block_q` queries (a power of two) share one program.

    Precision: the kernels compute in float32 only. fp16/bf16 (or float64) inputs are cast to float32, the
    output is cast back to `value`'s dtype, and autograd casts the gradients back to each input's dtype.
    """
    if triton is None:
        raise RuntimeError("ms_deform_attn_triton needs triton, which is not importable; "
                           "use ms_deform_attn_pytorch")
    if not (value.is_cuda or triton_interpreted()):
        raise ValueError(f"ms_deform_attn_triton got tensors on {value.device}: expected CUDA tensors, "
                         "or TRITON_INTERPRET=1 set before triton is first imported")
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, block_q)
    out = MSDeformAttnFunction.apply(value.float(), spatial_shapes, level_start_index, sampling_locations.float(),
                                     attention_weights.float(), block_q)
    return out.to(value.dtype)
