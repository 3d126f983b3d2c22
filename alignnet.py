"""AlignNet: the CLIP label dictionary and the instance-level alignment loss of CLIP-DETR.

Paper: "Adapting CLIP for DETR-based Object Detection", Sec. 3.2, Eq. 1-5. AlignNet runs during
training only: it pools the encoder memory inside every ground-truth box (Eq. 1), builds a category- and
scale-aware attribute feature from the CLIP text embedding of the box's class and its size (Eq. 2-3), and
aligns the two with a symmetric contrastive loss over all N instances of the local batch (Eq. 4-5).
DynQL (dynql.py) reuses the attribute feature z_attr of Eq. 3 as its well-informed query content.

The label dictionary f_cls is the L2-normalized CLIP text embedding of "a photo of a {name}" for every
category, in category order. It is computed once per (model, pretrained tag, prompt, names) and cached
on disk, so that later runs need neither the network nor the CLIP weights. Each name is encoded on its own,
so its row depends on the name alone: a name asked for at inference, among any other names, gets exactly
the row it had in training.

A label-embeddings file is a (K, D) table (.pt or .npy) whose rows follow the class order, or a named table:
a .pt holding {"names": [K strings], "embeddings": (K, D) float tensor}, whose rows are looked up by name
(training picks its categories' rows; inference the names asked for).

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
      sampling (about one sample per memory pixel), i.e. the average of the memory inside the box,
      as SPEC §4 asks; the paper does not name the pooling size.
    - Eq. 2's [w, h] are the box size normalized by the image size; the Table 5 variants are
      selectable: 'label' (f_cls only), 'label+bbox' ([cx, cy, w, h]) and 'label+scale' (default).
    - beta of Eq. 4 is exp(logit_beta), initialised at 1/0.07 and capped at 100 as CLIP's logit
      scale; the paper only calls it a learnable logit.
    - With no instance in the batch the loss is 0 * (sum of the parameters) instead of undefined, so
      that distributed data parallel training sees a gradient for every parameter on every rank.
    - pretrained='none' gives a seeded random-weight text encoder, for offline smoke runs only.
"""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, roi_align

from errors import InputError, read_torch_file, save_torch
from errors import cache_dir as default_cache_dir

ALIGN_FEATURES = ('label', 'label+bbox', 'label+scale')
# Columns that Eq. 2 appends to f_cls, per Table 5 variant.
_BOX_COLUMNS = {'label': [], 'label+bbox': [0, 1, 2, 3], 'label+scale': [2, 3]}


class ClipWeightsUnavailableError(InputError):
    """The CLIP weights for the label dictionary cannot be had (no network, no cache, no file)."""


TABLE_VERSION = 2


def _cache_path(cache_dir, model_name, pretrained, prompt, class_names):
    """Cache file of one label dictionary, keyed by everything that changes its rows."""
    if cache_dir is None:
        cache_dir = default_cache_dir()
    # The last item names how rows are computed (one name per forward pass since version 2): a table computed
    # otherwise differs in the last bits and must not be served for it.
    key = json.dumps([model_name, pretrained, prompt, list(class_names), TABLE_VERSION])
    digest = hashlib.sha1(key.encode('utf-8')).hexdigest()
    return Path(cache_dir).expanduser() / 'label_embeddings' / f'{digest}.pt'


def read_embeddings_file(path):
    """(names, table): a label-embeddings file's names (None for a plain table) and its (K, D) rows of finite
    numbers. A .pt holds a plain tensor or {"names": [K strings], "embeddings": (K, D) tensor}; a .npy a plain
    array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label embeddings file '{path}' not found (expected a .pt or .npy file "
                                f"with one row per class)")
    if path.suffix not in ('.pt', '.npy'):
        raise InputError(f"label embeddings file '{path}' has suffix '{path.suffix}', expected .pt or .npy")
    names = None
    if path.suffix == '.pt':
        table = read_torch_file(path, 'label embeddings file', weights_only=True)
        if isinstance(table, dict):
            names, table = _named_table(path, table)
    else:
        try:
            table = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:  # numpy's ways of saying 'not an .npy file'
            raise InputError(f"label embeddings file '{path}' cannot be read as .npy ({err})") from None
    if isinstance(table, np.ndarray) and table.dtype.kind == 'f':
        table = torch.from_numpy(table)
    if not isinstance(table, torch.Tensor) or not table.is_floating_point():
        what = f"{type(table).__name__} of dtype {table.dtype}" if hasattr(table, 'dtype') else type(table).__name__
        raise InputError(f"label embeddings file '{path}' holds a {what}, expected a floating-point tensor")
    if table.ndim != 2:
        raise InputError(f"label embeddings file '{path}' holds a tensor of shape {tuple(table.shape)}, "
                         f"expected 2 dimensions (classes, embedding width)")
    if names is not None and len(names) != table.shape[0]:
        raise InputError(f"label embeddings file '{path}' has {len(names)} names and {table.shape[0]} rows, "
                         "expected one name per row")
    bad_rows = (~torch.isfinite(table)).any(dim=1).nonzero().flatten().tolist()  # (rows with a NaN/Inf,)
    if bad_rows:
        raise InputError(f"label embeddings file '{path}' has NaN or Inf in rows {bad_rows[:10]}"
                         f"{' ...' if len(bad_rows) > 10 else ''}, expected finite numbers")
    # Eq. 4 and the dictionary compare directions: an all-zero row has none (normalizing it gives 0 or NaN).
    zero_rows = (table == 0).all(dim=1).nonzero().flatten().tolist()  # (rows of zeros,)
    if zero_rows:
        raise InputError(f"label embeddings file '{path}' has all-zero rows {zero_rows[:10]}"
                         f"{' ...' if len(zero_rows) > 10 else ''}, expected a non-zero embedding for every class")
    return names, table


def _read_cache(path, num_classes):
    """The cached table at `path`, or None when there is none. A cache file that is not a (K, D) float table of
    finite numbers (a kill mid-write by an older version, a full disk, a stray file) is said to be unreadable
    and recomputed, not an error: the cache is the project's own file, not the user's input."""
    if not path.is_file():
        return None
    try:
        table = read_torch_file(path, 'label dictionary cache', weights_only=True)
        if not (torch.is_tensor(table) and table.is_floating_point() and table.ndim == 2
                and table.shape[0] == num_classes and torch.isfinite(table).all()):
            raise InputError(f"label dictionary cache {path} holds no ({num_classes}, D) table of finite numbers")
    except InputError as err:
        print(f"{err}: recomputing it")
        return None
    return table


def _named_table(path, content):
    """(names, embeddings) of a named table {"names": [...], "embeddings": tensor}, names checked."""
    if set(content) != {'names', 'embeddings'}:
        raise InputError(f"label embeddings file '{path}' holds a dict with keys {sorted(map(str, content))}, "
                         "expected exactly 'names' (a list of K strings) and 'embeddings' (a (K, D) tensor)")
    names = content['names']
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise InputError(f"label embeddings file '{path}': 'names' is a {type(names).__name__}, expected a list "
                         "of strings")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"label embeddings file '{path}' names {twice[:5]} more than once, expected each name "
                         "once")
    return list(names), content['embeddings']


def _load_embeddings_file(path, class_names):
    """The (K, D) rows of `class_names` from a label-embeddings file: a plain table's rows in class order, a
    named table's rows looked up by name."""
    names, table = read_embeddings_file(path)
    if names is None:
        if table.shape[0] != len(class_names):
            raise InputError(f"label embeddings file '{path}' has {table.shape[0]} rows, "
                             f"expected {len(class_names)} (one per class)")
        return table
    missing = [n for n in class_names if n not in names]
    if missing:
        raise InputError(f"label embeddings file '{path}' has no row named {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; its {len(names)} names: "
                         f"{', '.join(map(repr, names[:50]))}{' ...' if len(names) > 50 else ''}")
    return table[[names.index(n) for n in class_names]]  # (K, D) in class order


def _clip_checkpoint(model_name, pretrained, num_classes):
    """(local path, QuickGELU flag) of the CLIP weights for a pretrained tag, downloaded if not cached.

    The download is done here, before open_clip builds the model, so that exactly this step's failure
    (a Hugging Face hub miss, FileNotFoundError, or a URL error, URLError; both OSError) becomes one
    clear message. huggingface_hub honours HF_HUB_OFFLINE=1 by looking only at its local cache, which
    fails at once; without that flag and without network it retries for about 45 s before failing.
    """
    import open_clip  # here, not at the top: see label_embeddings
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        raise InputError(f"unknown CLIP pretrained tag '{pretrained}' for model '{model_name}', expected one of "
                         f"{open_clip.list_pretrained_tags_by_model(model_name) + ['none']}")
    try:
        return open_clip.download_pretrained(tag_cfg), tag_cfg.get('quick_gelu', False)
    except OSError as error:
        raise ClipWeightsUnavailableError(
            f"cannot load CLIP weights '{model_name}/{pretrained}' (offline?): connect to the internet once to "
            f"cache the label dictionary, pass --label-embeddings FILE (.pt/.npy with {num_classes} rows), "
            f"or use --clip-pretrained none for a random-weight text encoder") from error


def _encode_with_clip(class_names, *, model_name, pretrained, prompt, device):
    """Embed the prompted class names with the CLIP text encoder; returns (K, D) float32 on the CPU."""
    import open_clip  # here, not at the top: see label_embeddings
    if pretrained == 'none':
        checkpoint, quick_gelu = None, False
    else:
        checkpoint, quick_gelu = _clip_checkpoint(model_name, pretrained, len(class_names))
    # The random encoder is seeded inside a forked RNG: the caller's random stream (training seed, per-rank
    # seeds) must not depend on whether the table was cached.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # OpenAI's tags were trained with QuickGELU; open_clip's plain configs use GELU unless told.
        # pretrained_text=False: the full checkpoint (or none) is the only weight source, never a hub text tower.
        model = open_clip.create_model(model_name, pretrained=checkpoint, force_quick_gelu=quick_gelu,
                                       pretrained_text=False, device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    tokens = tokenizer([prompt.format(name) for name in class_names]).to(device)  # (K, context length)
    # One name per forward pass: a batch's matrix products round differently with its size, so a row would
    # depend on the names beside it, and a name asked for at inference would not score as it did in training.
    with torch.no_grad():
        f_cls = torch.cat([model.encode_text(tokens[k:k + 1]) for k in range(len(class_names))])  # (K, D)
    return f_cls.float().cpu()


def label_embeddings(class_names, *, model_name='RN50x64', pretrained='openai', prompt='a photo of a {}',
                     cache_dir=None, embeddings_file=None, device='cpu'):
    """The label dictionary f_cls (Sec. 3.2): one L2-normalized CLIP text embedding per class, (K, D).

    Sources, first match wins: `embeddings_file` (.pt/.npy: rows in class order, or a named table whose rows
    are looked up by name, see `read_embeddings_file`); the on-disk cache under
    `cache_dir` (default $CLIP_DETR_CACHE or ~/.cache/clip-detr); the open_clip text encoder of
    `model_name`/`pretrained`, whose table is then cached. pretrained='none' uses random weights seeded
    with 0 (for offline smoke runs; it says so).
    """
    class_names = list(class_names)
    if not class_names:
        raise ValueError("class_names is empty, expected at least one class name")
    if embeddings_file is not None:
        table = _load_embeddings_file(embeddings_file, class_names)
    else:
        if '{}' not in prompt:
            raise ValueError(f"prompt '{prompt}' has no '{{}}' placeholder for the class name")
        # open_clip is imported where a table is looked up, not with this module: with transformers installed it
        # imports it too (1.5 s), which every command would pay before it could report a bad flag.
        import open_clip
        if model_name not in open_clip.list_models():
            raise InputError(f"unknown CLIP model '{model_name}', expected one of open_clip.list_models(), "
                             f"e.g. RN50x64, RN50, ViT-B-32")
        path = _cache_path(cache_dir, model_name, pretrained, prompt, class_names)
        table = _read_cache(path, len(class_names))
        if table is None:
            table = _encode_with_clip(class_names, model_name=model_name, pretrained=pretrained, prompt=prompt,
                                      device=device)
            save_torch(path, table)
        if pretrained == 'none':
            print(f"label dictionary: RANDOM-weight CLIP text encoder '{model_name}' (--clip-pretrained none); "
                  f"for smoke runs only")
    return F.normalize(table.float(), dim=-1).to(device)


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
