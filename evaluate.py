"""Evaluation: COCO AP, per-decoder-layer AP, OV-COCO AP50, LVIS AP, discriminative score maps and detection
on a folder of images (paper §4.1-4.2, Tables 1-4 and 9, Appendix A.1 and A.3, Figure 3).

`evaluate(...)` is what training calls after an epoch. The detector, its checkpoint and the val set come from
build.py, which train.py imports too; this module never imports train.py.
`python evaluate.py --resume CKPT` rebuilds the detector from the checkpoint's own arguments (--dataset,
--data-path, --val-json/--val-images, --device, --batch-size, --attn-impl and --min-size/--max-size override
them) as a plain Deformable DETR (AlignNet and DynQL act during training only) and runs one of three modes
(`--pretrained FOLDER|hf:ORG/NAME` instead scores transformers' Deformable DETR on a COCO-format val set):
  default          AP of the val set with pycocotools: AP, AP50, AP75, APs, APm, APl (Tables 1, 4-8);
                   --per-layer: one row per decoder layer (Table 9, Appendix A.3);
                   an open-vocabulary checkpoint (--novel-classes, ov-coco): AP50 on the novel, base and all
                   categories too (Table 3);
                   --dataset lvis: AP, AP50, AP75, APr, APc, APf with the optional `lvis` package (Table 2).
  --visualize N    one PNG per val image for the first N: detections | discriminative score map (Appendix A.1,
                   Figure 3); --compare CKPT2 adds a row for a second checkpoint (e.g. baseline vs CLIP-DETR).
  --images DIR     detections on every image of a folder, or on one image file (photos turned as their EXIF
                   orientation says): a COCO-style results JSON and annotated PNGs.
`--resume CKPT --export-onnx FILE` writes the checkpoint's inference graph as ONNX (dynamic batch, height and width;
the reference attention; class names in its metadata), and `--onnx FILE --images DIR` (instead of --resume) runs
--images through that file in onnxruntime: onnx_export.py says what is inside and outside the graph.
Every results record carries its `category_name`. An open-vocabulary checkpoint detects any names:
--classes NAME [NAME ...] (or --classes-file, one name per line) scores each query against the text embeddings of
exactly those names, computed as its training label dictionary was (its CLIP model and tag, cached), or read from
--label-embeddings FILE: a .pt of {"names": [K strings], "embeddings": (K, D) tensor} (rows looked up by name), or a
plain (K, D) .pt/.npy table with rows in --classes order. With --images the PNGs and records name those classes
(category_id is the name's 1-based place in --classes); on a val set the names are matched to its categories by
name, every name must be one of them, and AP covers the named categories (novel: those the checkpoint did not
train on).
Every flag a mode takes acts the same on the eager and the ONNX path (`check_values`); one a mode would ignore is
refused by name. No mode writes over a file it reads (build.check_writes, before any work): --output, --log,
--export-onnx and the PNGs of --images and --visualize, by their exact names, against the checkpoints, the
images, the val set and every other input.

The file holds no equation; the paper content is the protocols above and the score map of Appendix A.1:
the l2-norm over C of the encoder memory at every location, min-max normalized, values below 0.5 left out.

Shape legend: B batch, Q queries, K classes, L feature levels, C model width, H_l x W_l a padded level-l
memory map, H x W an image in pixels.

Deviations from the paper:
  - Score map: the encoder memory has L levels and Appendix A.1 does not say how they are combined. Each
    level's l2-norm map is cut to the part the image covers (padding removed), upsampled bilinearly to the
    image size, and the L maps are averaged; min-max normalization is per image.
  - Figure 3 draws detections and score map over one image; here they are two panels side by side, so the
    boxes do not hide the map.
  - Per-layer AP covers the decoder layers (as Table 9), not the two-stage encoder proposals.
  - LVIS keeps 300 detections per image (the LVIS protocol); COCO keeps 100.
  - OV-COCO AP50 is pycocotools' AP at IoU 0.5 with the categories restricted to novel, base or both; the
    15 COCO categories outside the benchmark are scored by the head but have no annotations, so they take
    detection slots without entering any number.
  - `coco_stats` treats an annotation without 'iscrowd' (LVIS has none) as not crowd, which pycocotools needs.
"""
import argparse
import contextlib
import io
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader, Dataset
from torchvision.utils import draw_bounding_boxes

import data
from build import (build_dataset, build_transforms, build_val_batches, check_dataset_flags, check_device,
                   check_output_path, check_writes, checkpoint_args, checkpoint_classes, checkpoint_detector,
                   checkpoint_vocabulary, class_split, dataset_files, hf_detector, hf_evaluation_checkpoint,
                   load_checkpoint)
from errors import (ArgumentParser, InputError, append_line, error_line, is_distributed, read_text, user_file,
                    write_atomically, write_json)
from model import PostProcess
from onnx_export import ONNX_FORMAT, ONNX_MIN_SIDE, OnnxDetector, export_onnx, require_package

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_STAT_NAMES = ("AP", "AP50", "AP75", "APr", "APc", "APf")
SCORE_MAP_THRESHOLD = 0.5  # Appendix A.1 / Figure 3: regions scoring below 0.5 are left out

# Box colours, one per class index (cycled): saturated, so they stand out on photos and on the score map.
BOX_COLORS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
              (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212))
# A 'jet'-like colour ramp (position in [0, 1], RGB): blue for the lowest scores shown, red for the highest.
COLORMAP = ((0.0, (0, 0, 255)), (0.25, (0, 255, 255)), (0.5, (0, 255, 0)), (0.75, (255, 255, 0)),
            (1.0, (255, 0, 0)))


# ----------------------------------------------------------------------------------------------------------
# Predictions and COCO AP
# ----------------------------------------------------------------------------------------------------------
def gather_predictions(store):
    """Merge {image_id: prediction} from every rank; the padded sampler's repeated images collapse."""
    if not is_distributed():
        return store
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, store)
    return {k: v for part in parts for k, v in part.items()}


def to_coco_results(predictions, cat_ids, cat_names=None):
    """Post-processed predictions {image_id: {scores, labels, boxes xyxy}} -> COCO results list (xywh); label k
    is category cat_ids[k], named cat_names[k] in the record's 'category_name' when names are given."""
    results = []
    for image_id, pred in predictions.items():
        boxes = pred["boxes"].clone()
        boxes[:, 2:] -= boxes[:, :2]
        for score, label, box in zip(pred["scores"].tolist(), pred["labels"].tolist(), boxes.tolist()):
            named = {} if cat_names is None else {"category_name": cat_names[label]}
            results.append({"image_id": int(image_id), "category_id": int(cat_ids[label]), **named,
                            "bbox": [round(v, 3) for v in box], "score": round(score, 5)})
    return results


def has_ground_truth(coco_gt, image_ids=None, cat_ids=None):
    """True when a non-crowd box of the evaluated images and categories exists: else there is nothing to score."""
    images = None if image_ids is None else set(image_ids)
    cats = None if cat_ids is None else set(cat_ids)
    return any(not ann.get("iscrowd", 0) and (images is None or ann["image_id"] in images)
               and (cats is None or ann["category_id"] in cats) for ann in coco_gt.anns.values())


def coco_stats(coco_gt, results, image_ids=None, cat_ids=None):
    """The 12 COCOeval numbers (AP, AP50, AP75, APs, APm, APl, AR...) of the evaluated images and categories;
    None when they hold no ground-truth box (pycocotools would print -1 everywhere); all 0 without detections.

    A category without ground truth among the evaluated images scores -1 and is left out of every mean.
    """
    if not has_ground_truth(coco_gt, image_ids, cat_ids):
        return None
    if not results:
        return [0.0] * 12
    for ann in coco_gt.anns.values():
        ann.setdefault("iscrowd", 0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        if cat_ids is not None:
            ev.params.catIds = sorted(cat_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(x) for x in ev.stats]


@torch.no_grad()
def predict(model, postprocess, loader, device, per_layer=False):
    """Run the detector over a loader. Returns ({image_id: prediction} of the last decoder layer, and with
    per_layer a list of such dicts, decoder layer 1 first; else [last layer])."""
    model.eval()
    layers = None
    for images, mask, targets in loader:
        outputs = model(images.to(device), mask.to(device))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        ids = [int(t["image_id"]) for t in targets]
        heads = (outputs.get("aux_outputs", []) + [outputs]) if per_layer else [outputs]
        if layers is None:
            layers = [{} for _ in heads]
        for store, head in zip(layers, heads):
            for image_id, pred in zip(ids, postprocess(head, sizes)):
                store[image_id] = {k: v.cpu() for k, v in pred.items()}
    layers = layers or [{}]
    return layers[-1], layers


def val_cat_ids(class_names, dataset, *, subset=False):
    """The val set's category id of each of the model's classes (its head's rows, `class_names`), matched by name:
    a val JSON may number its categories otherwise. Names that only one side has are an InputError naming them;
    with `subset` (a vocabulary asked for with --classes) the val set may have categories the model is not asked
    for, which are left out of the AP."""
    if list(class_names) == list(dataset.cat_names):
        return list(dataset.cat_ids)
    only_model = [n for n in class_names if n not in dataset.cat_names]
    only_val = [] if subset else [n for n in dataset.cat_names if n not in class_names]
    if only_model or only_val:
        raise InputError(f"the model has {len(class_names)} classes and {dataset.ann_file} {len(dataset.cat_names)}: "
                         f"only the model has {only_model[:5]}{' ...' if len(only_model) > 5 else ''}, only the val "
                         f"set has {only_val[:5]}{' ...' if len(only_val) > 5 else ''}; expected the same category "
                         "names (they are matched by name, not by id)")
    id_of = dict(zip(dataset.cat_names, dataset.cat_ids))
    return [id_of[name] for name in class_names]


def evaluate(model, postprocess, loader, dataset, device, per_layer=False, class_names=None, subset=False):
    """(stats, results): the 12 COCO stats of the last decoder layer (with per_layer a list of them, decoder layer 1
    first, Table 9) and the COCO results list of the last layer, predictions gathered from every rank.

    `class_names`: the model's classes (default: the val set's), matched to the val categories by name; the stats
    cover those categories (`val_cat_ids`, `subset`) and every record carries its `category_name`."""
    class_names = dataset.cat_names if class_names is None else class_names
    cat_ids = val_cat_ids(class_names, dataset, subset=subset)
    _, layers = predict(model, postprocess, loader, device, per_layer)
    layers = [gather_predictions(store) for store in layers]
    results = [to_coco_results(store, cat_ids, class_names) for store in layers]
    per = [coco_stats(dataset.coco, r, list(store), cat_ids) for r, store in zip(results, layers)]
    return (per if per_layer else per[-1]), results[-1]


def print_table(title, columns, rows, row_label=None):
    """A title, a header and one line per row of numbers in [0, 1], shown in percent; 'n/a' where there was nothing
    to score (None, or pycocotools' -1 for a size range without ground truth); with `row_label`, a first column
    numbering the rows from 1 (Table 9's decoder layers)."""
    lead = (lambda label: f"{label:>6} ") if row_label else (lambda label: "")
    cell = lambda v: f"{'n/a':>6}" if v is None or v < 0 else f"{100 * v:6.1f}"  # noqa: E731
    lines = [title, lead(row_label) + " ".join(f"{n:>6}" for n in columns)]
    lines += [lead(k) + " ".join(cell(v) for v in row) for k, row in enumerate(rows, start=1)]
    print("\n".join(lines))


def nothing_to_score(dataset):
    """The line printed instead of AP for a val set without a ground-truth box."""
    return (f"nothing to score: {dataset.ann_file} has no (non-crowd) annotation on its {len(dataset)} images, so "
            "no AP is computed")


# ----------------------------------------------------------------------------------------------------------
# OV-COCO (Table 3) and LVIS (Table 2)
# ----------------------------------------------------------------------------------------------------------
def ov_coco_ap50(coco_gt, results, base_names, novel_names, image_ids=None):
    """Table 3's numbers (OV-COCO, or any open-vocabulary split): AP50 over the novel, the base and all
    (base + novel) categories, as a dict; a group without categories is left out.

    Each is pycocotools' AP at IoU 0.5 with the evaluated categories restricted, so a detection or an
    annotation of a category outside a group cannot move that group's number.
    """
    ids_of = {cat["name"]: cat_id for cat_id, cat in coco_gt.cats.items()}
    unknown = sorted((set(base_names) | set(novel_names)) - set(ids_of))
    if unknown:
        raise InputError(f"open-vocabulary categories {unknown} are not in the ground truth, expected names of its "
                         "categories")
    if set(base_names) & set(novel_names):
        raise InputError(f"categories {sorted(set(base_names) & set(novel_names))} are both base and novel")
    groups = {"novel": novel_names, "base": base_names, "all": list(base_names) + list(novel_names)}
    stats = {group: coco_stats(coco_gt, results, image_ids, [ids_of[n] for n in names])
             for group, names in groups.items() if names}
    return {group: None if s is None else s[1] for group, s in stats.items()}


def ov_key(dataset):
    """The log key of Table 3's numbers: 'ov_coco' for ov-coco (as before open vocabulary on any dataset)."""
    return "ov_coco" if dataset == "ov-coco" else "ov_ap50"


def lvis_api():
    """(LVIS, LVISEval) from the optional `lvis` package; a clear error when it is missing."""
    try:
        from lvis import LVIS, LVISEval
    except ImportError:
        raise InputError("--dataset lvis needs the optional 'lvis' package: pip install lvis (with NumPy >= 1.24 "
                         "the PyPI release 0.5.3 fails on np.float; then use pip install "
                         "git+https://github.com/lvis-dataset/lvis-api.git)") from None
    return LVIS, LVISEval


def lvis_stats(ann_file, results):
    """LVIS v1 federated evaluation of bounding boxes: {AP, AP50, AP75, APr, APc, APf} (Table 2)."""
    LVIS, LVISEval = lvis_api()
    if not results:
        return {name: 0.0 for name in LVIS_STAT_NAMES}
    # LVISEval keeps the protocol's 300 detections per image itself (the keyword's name differs by version).
    ev = LVISEval(LVIS(ann_file), results, "bbox")
    ev.run()
    numbers = ev.get_results()
    return {name: float(numbers[name]) for name in LVIS_STAT_NAMES}


# ----------------------------------------------------------------------------------------------------------
# Discriminative score map (Appendix A.1) and drawing (Figure 3)
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encoder_memory(model, images, mask):
    """The encoder output of a batch as L maps (B, C, H_l, W_l) and the valid ratios (B, L, 2) as (w, h)."""
    srcs, masks, pos = model.features(images, mask)
    enc = model.transformer.encode(srcs, masks, pos)
    return model.memory_levels(enc), enc["valid_ratios"]


def discriminative_score_map(memory_levels, valid_ratios, sizes, threshold=SCORE_MAP_THRESHOLD):
    """Appendix A.1: per image, the l2-norm of the encoder memory at every location, min-max normalized to
    [0, 1], with the values below `threshold` set to 0 (left out). Returns B maps (H_b, W_b).

    memory_levels: L maps (B, C, H_l, W_l), padded; valid_ratios (B, L, 2) the (w, h) fraction of each padded
    map that the image covers; sizes: B pairs (H_b, W_b) to render at (each image's unpadded extent).
    The L levels are combined by averaging their upsampled maps (the appendix does not say how).
    """
    if len(memory_levels) != valid_ratios.shape[1]:
        raise ValueError(f"{len(memory_levels)} memory levels but valid_ratios has {valid_ratios.shape[1]}, "
                         f"expected the same number")
    if len(sizes) != valid_ratios.shape[0]:
        raise ValueError(f"{len(sizes)} sizes for a batch of {valid_ratios.shape[0]} images, expected one each")
    norms = [level.float().norm(dim=1) for level in memory_levels]  # L x (B, H_l, W_l)
    maps = []
    for b, (height, width) in enumerate(sizes):
        upsampled = []
        for level, norm in enumerate(norms):
            H_l, W_l = norm.shape[-2:]
            valid_w, valid_h = (valid_ratios[b, level] * valid_ratios.new_tensor([W_l, H_l])).round().long().tolist()
            region = norm[b, :max(valid_h, 1), :max(valid_w, 1)]
            upsampled.append(F.interpolate(region[None, None], size=(int(height), int(width)), mode="bilinear",
                                           align_corners=False)[0, 0])  # (H_b, W_b)
        score = torch.stack(upsampled).mean(dim=0)  # (L, H_b, W_b) -> (H_b, W_b)
        low, high = score.min(), score.max()
        # A constant map distinguishes nothing: it is left out entirely rather than divided by zero.
        score = (score - low) / (high - low) if high > low else torch.zeros_like(score)
        maps.append(score.masked_fill(score < threshold, 0.0))
    return maps


def colorize(values):
    """Values in [0, 1], any shape (...) -> RGB uint8 (..., 3) along COLORMAP."""
    positions = [p for p, _ in COLORMAP]
    channels = [np.interp(values, positions, [rgb[c] for _, rgb in COLORMAP]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def overlay_score_map(image, score, threshold=SCORE_MAP_THRESHOLD, alpha=0.6):
    """Blend a score map (H, W) over an image (3, H, W) uint8; locations scored 0 (left out) keep the image.

    The colour ramp spans [threshold, 1], the range that is drawn.
    """
    if score.shape != image.shape[-2:]:
        raise ValueError(f"score map of shape {tuple(score.shape)} for an image of {tuple(image.shape[-2:])}, "
                         f"expected the same (H, W)")
    values = score.cpu().numpy()
    ramp = np.clip((values - threshold) / (1 - threshold), 0, 1)
    color = torch.from_numpy(colorize(ramp)).permute(2, 0, 1).float()  # (H, W, 3) -> (3, H, W)
    blended = (1 - alpha) * image.float() + alpha * color
    return torch.where(torch.from_numpy(values > 0)[None], blended.round(), image.float()).to(torch.uint8)


def draw_detections(image, pred, class_names, score_threshold=0.3):
    """Boxes scoring at least `score_threshold` on an image (3, H, W) uint8, labelled 'name score'."""
    keep = pred["scores"] >= score_threshold
    if not keep.any():
        return image.clone()
    height, width = image.shape[-2:]
    boxes = pred["boxes"][keep].float().clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    labels = pred["labels"][keep].tolist()
    texts = [f"{class_names[k]} {s:.2f}" for k, s in zip(labels, pred["scores"][keep].tolist())]
    colors = [BOX_COLORS[k % len(BOX_COLORS)] for k in labels]
    return draw_bounding_boxes(image, boxes, labels=texts, colors=colors, width=2)


def label_panel(image, text):
    """Write `text` in the top-left corner of an image (3, H, W) uint8, on a black strip so it reads anywhere."""
    canvas = Image.fromarray(image.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((2, 1), text)
    draw.rectangle((0, 0, right + 2, bottom + 1), fill=(0, 0, 0))
    draw.text((2, 1), text, fill=(255, 255, 255))
    return TF.pil_to_tensor(canvas)


def save_png(image, path):
    """Write an image (3, H, W) uint8 as a PNG (errors.write_atomically: a full disk is one line, no half PNG)."""
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
    write_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))


def score_map_png(output_dir, image_path):
    """Where `visualize` writes the PNG of a val image: its file's stem, .png, in `output_dir`."""
    return os.path.join(output_dir, os.path.splitext(os.path.basename(image_path))[0] + ".png")


@torch.no_grad()
def visualize(detectors, dataset, postprocess, indices, output_dir, *, device, score_threshold=0.3):
    """Figure 3 for the val images `indices`: one PNG each, a row [detections | score map] per detector.

    detectors: (label, model, class names) triples, drawn top to bottom, each detector's boxes named by its own
    classes; each panel has the original image's size. Returns the paths written.
    """
    os.makedirs(output_dir, exist_ok=True)
    paths = []
    for index in indices:
        image_t, target = dataset[index]
        images, mask, _ = data.collate_fn([(image_t, target)])
        images, mask = images.to(device), mask.to(device)
        image_id = int(target["image_id"])
        file_path = dataset.image_path(image_id)
        original = TF.pil_to_tensor(data.load_rgb(file_path))  # (3, H, W) uint8
        size = target["orig_size"].tolist()
        rows = []
        for label, model, class_names in detectors:
            model.eval()
            pred = postprocess(model(images, mask), target["orig_size"][None].to(device))[0]
            pred = {k: v.cpu() for k, v in pred.items()}
            # In eval mode forward returns no memory, so the encoder runs once more for the map.
            levels, valid_ratios = encoder_memory(model, images, mask)
            score = discriminative_score_map(levels, valid_ratios, [size])[0].cpu()
            detections = draw_detections(original, pred, class_names, score_threshold)
            rows.append(torch.cat([label_panel(detections, f"{label}: detections"),
                                   label_panel(overlay_score_map(original, score), f"{label}: score map")], dim=2))
        path = score_map_png(output_dir, file_path)
        save_png(torch.cat(rows, dim=1), path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------
# A folder of images
# ----------------------------------------------------------------------------------------------------------
def list_images(path):
    """(folder, names PIL can decode, names it cannot, subfolder names) of `path`: a folder's entries, each sorted,
    or one image file (an unreadable one is an InputError naming it).

    Every file is decoded once here (verify() passes truncated JPEGs); beside a detector's forward pass that
    costs little. Subfolders are not searched.
    """
    if os.path.isfile(path):
        data.load_rgb(path)
        return os.path.dirname(path) or ".", [os.path.basename(path)], [], []
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--images: {path} not found (expected a folder of images or one image file)")
    folder = path
    entries = sorted(os.listdir(folder))
    subfolders = [n for n in entries if os.path.isdir(os.path.join(folder, n))]
    good, bad = [], []
    for name in (n for n in entries if os.path.isfile(os.path.join(folder, n))):
        try:
            data.load_rgb(os.path.join(folder, name))
            good.append(name)
        except InputError:
            bad.append(name)
    return folder, good, bad, subfolders


class ImageFolder(Dataset):
    """Images of a folder with the evaluation transforms; the target holds only image_id (the index in
    `names`) and orig_size, which is what `predict` reads."""

    def __init__(self, folder, names, transforms):
        self.folder, self.names, self.transforms = folder, list(names), transforms

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        image = data.load_rgb(os.path.join(self.folder, self.names[index]))
        target = {"image_id": torch.tensor(index), "orig_size": torch.tensor([image.height, image.width])}
        image, _ = self.transforms(image, None)
        return image, target


def png_names(names):
    """Output PNG name per input file: its stem, or the whole name where two files share a stem."""
    stems = [os.path.splitext(n)[0] for n in names]
    return [(s if stems.count(s) == 1 else n) + ".png" for s, n in zip(stems, names)]


def detect_folder(model, postprocess, path, *, class_names, cat_ids, device, transforms, output_dir,
                  batch_size=1, num_workers=0, score_threshold=0.3, listing=None):
    """Detections on every image of the folder `path` (or on the one image file `path`; `listing`: what
    `list_images(path)` returned, if it was called already): (COCO results list with 'file_name', PNG paths).

    Unreadable files, and subfolders, are named in one warning line each on stderr and skipped; photos are
    turned as their EXIF orientation says (boxes refer to the turned image). The results keep every detection
    of the post-processing (a results file is scored later at any threshold); the PNGs draw those scoring
    at least `score_threshold`.
    """
    folder, names, skipped, subfolders = listing or list_images(path)
    if skipped:
        print(f"warning: skipped {len(skipped)} file(s) in {folder} that are not readable images: "
              f"{', '.join(skipped)}", file=sys.stderr)
    if subfolders:
        print(f"warning: skipped {len(subfolders)} subfolder(s) of {folder} (not searched): {', '.join(subfolders)}",
              file=sys.stderr)
    if not names:
        raise InputError(f"--images: no image in {folder} (found {len(skipped)} other file(s)), expected at least "
                         "one image PIL can read")
    loader = DataLoader(ImageFolder(folder, names, transforms), batch_size=batch_size, collate_fn=data.collate_fn,
                        num_workers=num_workers)
    final, _ = predict(model, postprocess, loader, device)
    results = to_coco_results(final, cat_ids, class_names)
    for det in results:
        det["file_name"] = names[det["image_id"]]
    paths = []
    for index, (name, out_name) in enumerate(zip(names, png_names(names))):
        image = TF.pil_to_tensor(data.load_rgb(os.path.join(folder, name)))  # (3, H, W) uint8
        paths.append(os.path.join(output_dir, out_name))
        save_png(draw_detections(image, final[index], class_names, score_threshold), paths[-1])
    return results, paths


# ----------------------------------------------------------------------------------------------------------
# The ONNX modes: --export-onnx and --onnx (the graph and its runner are onnx_export.py's)
# ----------------------------------------------------------------------------------------------------------
# Flags that mean nothing to each ONNX mode: rejected rather than silently ignored.
EXPORT_UNUSED = ("images", "visualize", "per_layer", "compare", "output", "device", "attn_impl", "classes",
                 "classes_file", "label_embeddings", "pretrained", "num_workers", "score_threshold", "output_dir")
ONNX_UNUSED = ("visualize", "per_layer", "compare", "device", "attn_impl", "dataset", "data_path", "val_json",
               "val_images", "classes", "classes_file", "label_embeddings", "export_onnx")


def flags_given(cli, keys):
    """The command-line spelling of those of `keys` that were given a value other than their default (or False)."""
    defaults = get_parser()
    return [f"--{k.replace('_', '-')}" for k in keys if getattr(cli, k) not in (None, False, defaults.get_default(k))]


def check_onnx_cli(cli):
    """Reject ONNX flag combinations that mean nothing, and missing packages, before any work is done."""
    if cli.export_onnx:
        if not cli.resume:
            raise InputError("--export-onnx FILE exports a checkpoint of train.py: add --resume CKPT")
        unused = flags_given(cli, EXPORT_UNUSED)
        if unused:
            raise InputError(f"--export-onnx runs alone (on the CPU, through the reference attention): drop "
                             f"{' '.join(unused)}; then run --onnx FILE --images DIR")
        check_output_path(cli.export_onnx, "--export-onnx", folder=False)
        require_package("onnx", "--export-onnx")
        require_package("onnxscript", "--export-onnx")
    if cli.onnx:
        if not cli.images:
            raise InputError("--onnx FILE detects on a folder: add --images DIR (AP and score maps need --resume CKPT)")
        unused = flags_given(cli, ONNX_UNUSED)
        if unused:
            raise InputError(f"--onnx runs the exported graph in onnxruntime on the CPU, with the transforms "
                             f"stored in it: drop {' '.join(unused)}")
        require_package("onnxruntime", "--onnx")


def check_no_val_set(cli, ckpt, mode):
    """--images and --export-onnx take the checkpoint's classes and no val set: the val-set flags are refused, but
    for a checkpoint that predates stored classes, whose val set they find its class names in."""
    given = flags_given(cli, ("dataset", "data_path", "val_json", "val_images"))
    if given and "classes" in ckpt:
        raise InputError(f"{mode} uses no val set (the checkpoint names its classes): drop {' '.join(given)}")


def export_onnx_mode(cli):
    """--resume CKPT --export-onnx FILE: the checkpoint's detector, traced on the CPU. Returns the log dict."""
    ckpt = load_checkpoint(cli.resume)
    check_no_val_set(cli, ckpt, "--export-onnx")
    overrides = {key: getattr(cli, key) for key in OVERRIDES if getattr(cli, key) is not None}
    args = checkpoint_args(ckpt, overrides | {"device": "cpu"})
    cat_ids, cat_names = checkpoint_classes(ckpt, args)
    model, postprocess = checkpoint_detector(ckpt, args, cat_names, cli.resume)
    method = ckpt["args"].get("method", "baseline")
    metadata = dict(format=ONNX_FORMAT, class_names=cat_names, cat_ids=cat_ids, dataset=args.dataset,
                    min_size=args.min_size, max_size=args.max_size, batch_size=args.batch_size,
                    num_select=postprocess.num_select, min_side=ONNX_MIN_SIDE, method=method,
                    checkpoint=os.path.basename(cli.resume))
    size = export_onnx(model, cli.export_onnx, metadata=metadata)
    print(f"wrote {cli.export_onnx} ({size / 2**20:.1f} MiB, --method {method} as plain Deformable DETR): images "
          f"(B, 3, H, W) float32 and mask (B, H, W) bool in, pred_logits (B, {model.num_queries}, "
          f"{model.num_classes}) and pred_boxes (B, {model.num_queries}, 4) out; B >= 1 and H, W >= "
          f"{ONNX_MIN_SIDE} dynamic")
    return {"checkpoint": cli.resume, "method": method, "dataset": args.dataset, "onnx": cli.export_onnx,
            "bytes": size}


def onnx_images_mode(cli, listing=None):
    """--onnx FILE --images DIR: `detect_folder` through onnxruntime (`listing`: list_images of DIR). Returns (log,
    results). The flags act as on the eager path (check_cli validated them for both); unset, the graph's stored
    values stand in for the checkpoint's."""
    detector = OnnxDetector(cli.onnx)
    meta = detector.metadata
    given = lambda key: meta[key] if getattr(cli, key) is None else getattr(cli, key)  # noqa: E731
    transforms = data.dataset_transforms("val", shapes=meta["dataset"] == "shapes", min_size=given("min_size"),
                                         max_size=given("max_size"))
    results, paths = detect_folder(
        detector, PostProcess(num_select=meta["num_select"]), cli.images, class_names=meta["class_names"],
        cat_ids=meta["cat_ids"], device=torch.device("cpu"), transforms=transforms, output_dir=output_folder(cli),
        batch_size=given("batch_size"), num_workers=cli.num_workers or 0, score_threshold=score_threshold(cli),
        listing=listing)
    print(f"wrote {len(paths)} annotated PNGs to {output_folder(cli)} (onnxruntime, {cli.onnx})")
    return {"onnx": cli.onnx, "dataset": meta["dataset"], "images": cli.images, "num_images": len(paths),
            "num_detections": len(results)}, results


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
# What --images and --visualize draw and where, unless told otherwise.
DRAW_THRESHOLD = 0.3
DEFAULT_OUTPUT_DIR = os.path.join("outputs", "eval")


def output_folder(cli):
    return cli.output_dir or DEFAULT_OUTPUT_DIR


def score_threshold(cli):
    return DRAW_THRESHOLD if cli.score_threshold is None else cli.score_threshold


# Flags that override the checkpoint's own arguments.
OVERRIDES = ("dataset", "data_path", "val_json", "val_images", "device", "batch_size", "attn_impl", "min_size",
             "max_size")


def get_parser():
    p = ArgumentParser("CLIP-DETR evaluation", description=__doc__.split("\n")[0])
    p.add_argument("--resume", default=None, metavar="CKPT", help="a checkpoint written by train.py")
    p.add_argument("--pretrained", default=None, metavar="FOLDER|hf:ORG/NAME",
                   help="instead of --resume: transformers' Deformable DETR (a save_pretrained folder or hub id), "
                        "scored on --dataset coco --data-path DIR or --dataset custom --val-json/--val-images")
    p.add_argument("--onnx", default=None, metavar="FILE",
                   help="instead of --resume, with --images: detect through this graph of --export-onnx in "
                        "onnxruntime (CPU)")
    p.add_argument("--export-onnx", default=None, metavar="FILE",
                   help="with --resume: write the checkpoint's inference graph to FILE as ONNX and stop")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's")
    p.add_argument("--data-path", default=None)
    p.add_argument("--val-json", default=None)
    p.add_argument("--val-images", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None, help="image-loading processes (default: 0, none)")
    p.add_argument("--min-size", type=int, default=None,
                   help="evaluation shorter side, pixels (default: the checkpoint's)")
    p.add_argument("--max-size", type=int, default=None, help="longest image side, pixels (default: the checkpoint's)")
    p.add_argument("--attn-impl", default=None, choices=["auto", "pytorch", "gather", "triton"])
    p.add_argument("--output", default=None, metavar="JSON",
                   help="write the COCO results JSON here (with --images, default OUTPUT_DIR/results.json)")
    p.add_argument("--log", default=None, metavar="JSONL", help="append one JSON line with the numbers here")
    p.add_argument("--per-layer", action="store_true", help="AP of every decoder layer (Table 9)")
    p.add_argument("--visualize", type=int, default=None, metavar="N",
                   help="write detection and score-map PNGs of the first N val images (no AP is computed)")
    p.add_argument("--compare", default=None, metavar="CKPT2", help="with --visualize: a second row for CKPT2")
    p.add_argument("--score-threshold", type=float, default=None,
                   help=f"with --images or --visualize: draw detections scoring at least this (default: "
                        f"{DRAW_THRESHOLD})")
    p.add_argument("--images", default=None, metavar="DIR|FILE",
                   help="detect on every image of a folder, or on one image file (no AP)")
    p.add_argument("--output-dir", default=None,
                   help=f"with --images or --visualize: where PNGs are written (default: {DEFAULT_OUTPUT_DIR})")
    v = p.add_argument_group("vocabulary (open-vocabulary checkpoints: train.py --novel-classes, --dataset ov-coco)")
    v.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                   help="detect exactly these names (default: the checkpoint's classes), embedded with the "
                        "checkpoint's CLIP model and tag as its training label dictionary was (cached); with --images "
                        "and on a val set whose categories are matched by name")
    v.add_argument("--classes-file", default=None, metavar="FILE", help="--classes read from a file, one name a line")
    v.add_argument("--label-embeddings", default=None, metavar="FILE",
                   help="read the names' text embeddings from FILE instead of CLIP: a .pt holding {'names': [K "
                        "strings], 'embeddings': (K, D) float tensor} (rows looked up by name; without --classes "
                        "its names are the vocabulary), or a plain (K, D) .pt/.npy table, rows in --classes order")
    return p


def check_cli(cli):
    """Reject flag combinations that mean nothing, before any work is done."""
    sources = [flag for flag, value in (("--resume", cli.resume), ("--pretrained", cli.pretrained),
                                        ("--onnx", cli.onnx)) if value]
    if len(sources) != 1:
        raise InputError(f"give one of --resume CKPT (written by train.py), --pretrained FOLDER|hf:ORG/NAME and "
                         f"--onnx FILE{'' if not sources else ', not ' + ' and '.join(sources)}")
    if cli.onnx or cli.export_onnx:
        check_onnx_cli(cli)
    vocabulary = flags_given(cli, ("classes", "classes_file", "label_embeddings"))
    if cli.pretrained and vocabulary:
        raise InputError(f"--pretrained: a released Deformable DETR has a fixed class head and cannot score other "
                         f"names; {' and '.join(vocabulary)} need(s) an open-vocabulary checkpoint of train.py "
                         "(--novel-classes or --dataset ov-coco), given with --resume")
    if cli.pretrained and (cli.images or cli.visualize is not None):
        raise InputError("--pretrained is scored on a val set; --images and --visualize take a train.py checkpoint "
                         "(--resume), whose class names they draw")
    if cli.compare and cli.visualize is None:
        raise InputError("--compare CKPT2 needs --visualize N (it adds a second row to the score-map PNGs)")
    if cli.visualize is not None and cli.visualize < 1:
        raise InputError(f"--visualize {cli.visualize}: expected a number of images >= 1")
    if cli.images and (cli.visualize is not None or cli.per_layer):
        raise InputError("--images runs alone: drop --visualize and --per-layer (they need the val set)")
    if cli.visualize is not None and cli.per_layer:
        raise InputError("--visualize computes no AP: run --per-layer separately")
    check_values(cli)
    if cli.visualize is not None and flags_given(cli, VISUALIZE_UNUSED):
        raise InputError(f"--visualize runs the val images one at a time and writes PNGs, no results: drop "
                         f"{' '.join(flags_given(cli, VISUALIZE_UNUSED))}")
    if not (cli.images or cli.visualize is not None) and flags_given(cli, ("score_threshold", "output_dir")):
        raise InputError(f"{' and '.join(flags_given(cli, ('score_threshold', 'output_dir')))} only act on the PNGs "
                         "of --images or --visualize: drop them, or add one of those")
    if cli.classes and cli.classes_file:
        raise InputError("--classes and --classes-file both name the vocabulary: give one of them")
    if cli.visualize is not None and (cli.classes or cli.classes_file or cli.label_embeddings):
        raise InputError("--visualize draws the checkpoints' own classes: drop --classes/--classes-file/"
                         "--label-embeddings, or detect the names with --images")
    # Files named by a flag, once the flags make sense together: a folder given for one is named as such.
    for flag, path, expected in (("--onnx", cli.onnx, "an .onnx file written by evaluate.py --export-onnx"),
                                 ("--classes-file", cli.classes_file, "a text file, one name a line"),
                                 ("--label-embeddings", cli.label_embeddings, "a .pt or .npy file")):
        if path:
            user_file(path, flag, expected)


# Flags --visualize has no use for: it draws one image at a time and writes no results JSON.
VISUALIZE_UNUSED = ("output", "batch_size", "num_workers")


def check_values(cli):
    """The values of the numeric flags, whichever mode takes them: one check for the eager and the ONNX paths, so
    a value one refuses the other cannot quietly replace by a default (--min-size 0 is not 'unset')."""
    for flag, value, low in (("--batch-size", cli.batch_size, 1), ("--num-workers", cli.num_workers, 0),
                             ("--min-size", cli.min_size, 1), ("--max-size", cli.max_size, 1)):
        if value is not None and value < low:
            raise InputError(f"{flag} {value}: expected a number >= {low}")
    if cli.min_size is not None and cli.max_size is not None and cli.min_size > cli.max_size:
        raise InputError(f"--min-size {cli.min_size} / --max-size {cli.max_size}: expected min-size <= max-size")
    if cli.score_threshold is not None and not 0 <= cli.score_threshold <= 1:
        raise InputError(f"--score-threshold {cli.score_threshold}: expected a score in [0, 1]")


def requested_classes(cli):
    """The names of --classes or --classes-file (stripped, blank lines skipped), each once; None if neither."""
    if cli.classes_file:
        text = read_text(cli.classes_file, "--classes-file", "a text file, one name a line")
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if not names:
            raise InputError(f"--classes-file {cli.classes_file} names no class, expected one name a line")
    else:
        names = [n.strip() for n in cli.classes] if cli.classes else None
    if names is not None:
        flag = "--classes-file" if cli.classes_file else "--classes"
        if not all(names):
            raise InputError(f"{flag}: an empty name, expected non-empty class names")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InputError(f"{flag} names {twice} more than once, expected each name once")
    return names


def results_path(cli):
    """Where the results JSON goes: --output, else with --images OUTPUT_DIR/results.json; None if nowhere."""
    return cli.output or (os.path.join(output_folder(cli), "results.json") if cli.images else None)


def writes_and_reads(cli, listing=None, pngs=()):
    """(flag, path) of every file this command writes, and of every file and folder it reads that its flags name,
    for build.check_writes: with --images the PNG of each image `listing` (list_images) found, and `pngs` (the
    score maps of --visualize) once known."""
    writes = [("--output-dir", os.path.join(output_folder(cli), name)) for name in png_names(listing[1])
              ] if listing is not None else []
    writes += [("--output-dir", path) for path in pngs]
    writes += [(flag, path) for flag, path in (("--output" if cli.output else "--output-dir", results_path(cli)),
                                              ("--log", cli.log), ("--export-onnx", cli.export_onnx)) if path]
    reads = [(flag, path) for flag, path in (
        ("--resume", cli.resume), ("--compare", cli.compare), ("--onnx", cli.onnx), ("--pretrained", cli.pretrained),
        ("--images", cli.images), ("--classes-file", cli.classes_file), ("--label-embeddings", cli.label_embeddings),
        ("--val-json", cli.val_json), ("--val-images", cli.val_images)) if path]
    return writes, reads


def main(argv=None):
    """Run one mode (see the module docstring); returns the dict that --log appends."""
    cli = get_parser().parse_args(argv)
    check_cli(cli)
    for path, flag in ((cli.output, "--output"), (cli.log, "--log")):
        if path:
            check_output_path(path, flag, folder=False)
    if cli.images or cli.visualize is not None:
        check_output_path(output_folder(cli), "--output-dir")
    # The images are listed (and decoded once) before anything else: the PNGs' names are those of the files.
    listing = list_images(cli.images) if cli.images else None
    check_writes(*writes_and_reads(cli, listing))
    if cli.export_onnx:
        log, results = export_onnx_mode(cli), None
    else:
        log, results = onnx_images_mode(cli, listing) if cli.onnx else checkpoint_mode(cli, listing)
    output = results_path(cli)
    if output and results is not None:
        write_json(output, results)
        print(f"wrote {len(results)} detections to {output}")
    if cli.log:
        append_line(cli.log, json.dumps(log))
    return log


def checkpoint_mode(cli, listing=None):
    """--resume CKPT or --pretrained SOURCE: --images (the files `listing` found), --visualize or the val set's AP.
    Returns (log, results)."""
    ckpt = hf_evaluation_checkpoint(cli.pretrained) if cli.pretrained else load_checkpoint(cli.resume)
    overrides = {key: getattr(cli, key) for key in OVERRIDES if getattr(cli, key) is not None}
    args = checkpoint_args(ckpt, overrides, cli.num_workers or 0)
    if cli.images:
        check_no_val_set(cli, ckpt, "--images")
    check_dataset_flags(args.dataset, [key for key in ("data_path", "val_json", "val_images") if getattr(cli, key)])
    log = {"checkpoint": cli.resume or cli.pretrained, "method": ckpt["args"].get("method", "baseline"),
           "dataset": args.dataset}
    if args.dataset == "lvis":
        if cli.per_layer:
            raise InputError("--per-layer reports COCO AP (Table 9); LVIS is scored with its own protocol")
        if not cli.images and (cli.classes or cli.classes_file or cli.label_embeddings):
            raise InputError("--classes on LVIS: its federated AP covers all of its categories; detect the names "
                             "with --images, or evaluate LVIS with the checkpoint's own classes")
        lvis_api()  # a missing package must fail before a whole inference run, not after
    device = check_device(args.device, "--device" if cli.device else "--device (the checkpoint's; override it)")
    if not cli.images:
        # The val set comes from the checkpoint's arguments: its files are known now, before any work.
        writes, reads = writes_and_reads(cli)
        check_writes(writes, reads + dataset_files("val", args))
    names = requested_classes(cli)
    vocabulary = None
    if names is not None or cli.label_embeddings:
        vocabulary = checkpoint_vocabulary(ckpt, args, names, cli.label_embeddings, cli.resume)
        log["classes"] = vocabulary[0]
    if cli.images:
        return log, detect_images(cli, ckpt, args, device, log, vocabulary, listing)
    if cli.visualize is not None:
        return visualize_val_set(cli, ckpt, args, device, overrides, log), None
    return log, score_val_set(cli, ckpt, args, device, log, vocabulary)


def detect_images(cli, ckpt, args, device, log, vocabulary=None, listing=None):
    """--images DIR: detections on every image of a folder (`listing`: list_images of it), with the checkpoint's val
    pipeline, of its classes or of `vocabulary` (names, table), whose name k is category_id k + 1."""
    cat_ids, cat_names = checkpoint_classes(ckpt, args)
    model, postprocess = checkpoint_detector(ckpt, args, cat_names, cli.resume,
                                             None if vocabulary is None else vocabulary[1])
    if vocabulary is not None:
        cat_names = vocabulary[0]
        cat_ids = list(range(1, len(cat_names) + 1))
    results, paths = detect_folder(model, postprocess, cli.images, class_names=cat_names, cat_ids=cat_ids,
                                   device=device, transforms=build_transforms("val", args),
                                   output_dir=output_folder(cli), batch_size=args.batch_size,
                                   num_workers=args.num_workers, score_threshold=score_threshold(cli),
                                   listing=listing)
    print(f"wrote {len(paths)} annotated PNGs to {output_folder(cli)}")
    log.update(images=cli.images, num_images=len(paths), num_detections=len(results))
    return results


def visualize_val_set(cli, ckpt, args, device, overrides, log):
    """--visualize N [--compare CKPT2]: detections and score maps (Figure 3) of the first N val images."""
    dataset = build_dataset("val", args)
    indices = range(min(cli.visualize, len(dataset)))
    writes, reads = writes_and_reads(cli, pngs=[score_map_png(output_folder(cli), dataset.image_path(dataset.ids[i]))
                                                for i in indices])
    check_writes(writes, reads + dataset_files("val", args))
    _, class_names = checkpoint_classes(ckpt, args)
    val_cat_ids(class_names, dataset)
    model, postprocess = checkpoint_detector(ckpt, args, class_names, cli.resume)
    detectors = [(log["method"], model, class_names)]
    if cli.compare:
        ckpt2 = load_checkpoint(cli.compare, "--compare")
        # The second detector runs where the first does (its checkpoint may name a device this machine lacks).
        args2 = checkpoint_args(ckpt2, {k: v for k, v in overrides.items() if k == "attn_impl"}
                                | {"device": str(device)})
        # Its head's rows are its own classes, in its own order: its boxes are named by them, and they must be the
        # val set's categories as the first checkpoint's are (matched by name).
        _, class_names2 = checkpoint_classes(ckpt2, args2)
        val_cat_ids(class_names2, dataset)
        detectors.append((ckpt2["args"].get("method", "baseline"),
                          checkpoint_detector(ckpt2, args2, class_names2, cli.compare)[0].to(device), class_names2))
    paths = visualize(detectors, dataset, postprocess, indices, output_folder(cli), device=device,
                      score_threshold=score_threshold(cli))
    print(f"wrote {len(paths)} score-map PNGs to {output_folder(cli)}")
    log.update(visualized=paths)
    return log


def score_val_set(cli, ckpt, args, device, log, vocabulary=None):
    """The default mode: AP of the val set (COCO, per decoder layer, open-vocabulary AP50, or LVIS); returns the
    results. With `vocabulary` (names, table) the model scores those names, each matched to the val category
    of that name, and AP covers those categories."""
    dataset = build_dataset("val", args)
    if vocabulary is None:
        # A released COCO model's head is laid out for the val set's categories when it is loaded.
        class_names = dataset.cat_names if cli.pretrained else checkpoint_classes(ckpt, args)[1]
        val_cat_ids(class_names, dataset)  # the same names, before a model is built
        model, postprocess = (hf_detector(cli.pretrained, args, dataset) if cli.pretrained
                              else checkpoint_detector(ckpt, args, class_names, cli.resume))
        split = class_split(args, class_names)
    else:
        class_names = vocabulary[0]
        data.check_category_names(class_names, dataset.cat_names, what="--classes",
                                  where=f"the val set {dataset.ann_file}")
        trained_on = checkpoint_classes(ckpt, args)[1]
        model, postprocess = checkpoint_detector(ckpt, args, trained_on, cli.resume, vocabulary[1])
        left_out = [n for n in dataset.cat_names if n not in set(class_names)]
        if left_out:
            print(f"note: AP covers the {len(class_names)} categories of --classes; the val set's other "
                  f"{len(left_out)} are left out: {', '.join(left_out[:20])}{' ...' if len(left_out) > 20 else ''}")
        # Novel: every name the checkpoint did not train on, whether held out in training or never in its dataset.
        base = set(class_split(argparse.Namespace(**ckpt["args"]), trained_on)[0])
        split = [n for n in class_names if n in base], [n for n in class_names if n not in base]
    loader = DataLoader(dataset, batch_sampler=build_val_batches(args, dataset, range(len(dataset))),
                        collate_fn=data.collate_fn, num_workers=args.num_workers)
    title = f"{args.dataset} val, {log['method']}"
    if args.dataset == "lvis":
        final, _ = predict(model, postprocess, loader, device)
        results = to_coco_results(final, val_cat_ids(class_names, dataset, subset=vocabulary is not None), class_names)
        log["lvis"] = lvis_stats(dataset.ann_file, results)
        print_table(title, list(log["lvis"]), [list(log["lvis"].values())])
        return results
    stats, results = evaluate(model, postprocess, loader, dataset, device, per_layer=cli.per_layer,
                              class_names=class_names, subset=vocabulary is not None)
    if (stats[-1] if cli.per_layer else stats) is None:
        log["coco_stats"] = None
        print(nothing_to_score(dataset))
        return results
    if cli.per_layer:
        log["per_layer"], log["coco_stats"] = stats, stats[-1]
        print_table(f"{title}, per decoder layer", STAT_NAMES, [s[:6] for s in stats], row_label="layer")
    else:
        log["coco_stats"] = stats
        print_table(title, STAT_NAMES, [stats[:6]])
    if split is not None:
        ov = log[ov_key(args.dataset)] = ov_coco_ap50(dataset.coco, results, *split, image_ids=dataset.ids)
        print_table(f"{title}, AP50 (Table 3)", list(ov), [list(ov.values())])
    return results


def cli(argv=None):
    """main() with bad input reported as one line on stderr and exit status 2; bugs keep their traceback."""
    try:
        return main(argv)
    except (InputError, FileNotFoundError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
