"""Data: COCO-format datasets, Deformable-DETR transforms, padded batches, the `shapes` demo set, OV-COCO split.

Everything the detector sees comes through `CocoDetection`: COCO 2017 and LVIS v1 (paper §4.1, Tables 1-2),
OV-COCO (paper §4.2, Table 3), any COCO-format JSON with an image folder, and the embedded procedural `shapes`
set, which is written once to disk in COCO layout so that the CPU demo runs exactly the code a COCO run runs.
Category names come from the JSON, because CLIP's label dictionary (AlignNet, Eq. 1) is built from them. A JSON is
read as UTF-8 (a byte-order mark allowed); every id it relies on (images, categories, annotations) is a unique
integer. `COCO_ROW_NAMES` names the rows of released COCO detectors' 91-row class heads.

The transforms follow Deformable DETR (Zhu et al., 2021), which took them from DETR: random horizontal flip,
then either a multi-scale resize (shorter side 480-800 step 32, longer side at most 1333) or a resize to
400/500/600, a random crop of 384-600 px and the multi-scale resize; evaluation resizes to 800/1333; ImageNet
mean/std. `--min-size`/`--max-size` (default 800/1333) scale all of these sizes by min_size / 800; `shapes` has
its own small pipeline (`dataset_transforms`): flips per image, and a shorter side drawn per batch for all of its
images (`BatchResize`), whose batches hold one aspect each (`GroupedBatchSampler`, in evaluation too), so that
little is padding. Inside the pipeline boxes are absolute xyxy pixels; the dataset turns them into the normalized
cxcywh boxes that the matcher and the losses expect.

Paper content held here: the datasets of §4 and the OV-COCO base/novel split of §4.2. No equations.

Shape legend:
    B  batch size
    N  ground-truth instances (of one image inside a target dict)
    M  annotations of a whole JSON file
    K  classes (categories of the JSON, in `cat_ids` order)
    H, W  image height and width in pixels

Deviations from the paper:
    - `shapes` (coloured solid shapes on a textured background, 8 plain-English categories) is not in the paper;
      it is the default dataset so that training and evaluation run on a CPU in minutes.
    - `shapes` trains with one scale per batch and batches of one aspect (landscape or portrait); Deformable DETR
      draws a scale per image and batches at random (COCO here too). A padded batch was 1.52x its images' area in
      random batches, 1.16x grouped; a demo step takes 0.83x the time. Its evaluation batches are grouped as well:
      the detector's output depends on how much of its batch is padding (build.build_val_batches).
    - OV-COCO: the class head lists every category of the JSON (80 for COCO). Training keeps only the 48 base
      categories' annotations as targets and evaluation keeps the 65 benchmark categories; the `coco`
      attribute holds only the kept annotations, so pycocotools scores exactly those categories. Images left
      without targets are kept as negatives, as Deformable DETR keeps empty images. Open vocabulary on any
      dataset (train.py --novel-classes) is the same with the held-out categories dropped from training only.
    - LVIS v1 is read as a COCO-format JSON (names as written there, e.g. 'aerosol_can'); its federated
      evaluation protocol is not reproduced by this loader.
    - Resizing under a max_size truncates the lowered shorter side where Deformable DETR rounds it, so the
      longer side never exceeds max_size (rounding can overshoot it by one pixel).
    - An image whose size disagrees with the JSON's width/height is an error (DETR trusts the JSON), since
      its boxes would not fit the pixels: checked in the headers of up to HEADER_CHECKS images when the dataset
      is built, and for every image when it is loaded.
    - Images are read as displayed: a photo's EXIF orientation is applied (DETR reads the stored pixels;
      detectron2 and annotation tools turn them), so its width/height and boxes are those of the turned photo.
    - 16-bit grey images are scaled to 8 bits; PIL's convert("RGB"), which DETR uses, clips them at 255.
"""

import collections
import contextlib
import difflib
import inspect
import io
import json
import os
import random
import shutil
import tempfile
import warnings
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageOps
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision.ops import box_convert

from errors import InputError, read_text, user_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per-instance fields of a target dict: a crop or a filter must index all of them together.
INSTANCE_FIELDS = ("boxes", "labels", "area", "iscrowd")

# Image headers read when a dataset is built (all of them up to this many, else every k-th, at most this many): a
# header is a few KB, so 1000 cost about a second even on slow disks, while all 118k of COCO train would cost
# minutes. Every image's size is still checked when it is loaded.
HEADER_CHECKS = 1000

# PIL modes of 16-bit (and 32-bit integer) grey images, whose convert("RGB") clips at 255 instead of scaling.
WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# EXIF orientations that swap width and height (90/270-degree rotations, with or without a mirror).
EXIF_TRANSPOSED = (5, 6, 7, 8)


# What Pillow raises for a file it cannot decode: OSError (UnidentifiedImageError, truncated data), SyntaxError
# (some broken PNG chunks), DecompressionBombError (absurd sizes).
UNREADABLE_IMAGE = (OSError, SyntaxError, Image.DecompressionBombError)


def _unreadable(path, err):
    return InputError(f"image {path} cannot be read ({type(err).__name__}: {err}); expected a PNG/JPEG file")


def load_rgb(path):
    """An image file as an 8-bit RGB PIL image, as displayed; unreadable files are an InputError naming the path.

    A photo is turned the way its EXIF orientation says (PIL.ImageOps.exif_transpose), as annotation tools show
    it (and as detectron2 reads training images), so boxes drawn on the displayed photo fit the pixels. 16-bit
    grey is scaled to 8 bits (PIL's convert would clip it, turning it white).
    """
    try:
        with Image.open(path) as f:
            image = ImageOps.exif_transpose(f)
            image.load()
            if image.mode in WIDE_GREY_MODES:
                wide = np.asarray(image, dtype=np.float64)  # (H, W)
                return Image.fromarray(np.clip(wide / 257.0, 0, 255).round().astype(np.uint8)).convert("RGB")
            return image.convert("RGB")
    except FileNotFoundError:
        raise
    except UNREADABLE_IMAGE as err:
        raise _unreadable(path, err) from None


def displayed_size(path):
    """(width, height) of an image as displayed (its EXIF orientation applied) and that orientation, from the
    header alone (no pixels are decoded)."""
    try:
        with Image.open(path) as f:
            (w, h), orientation = f.size, f.getexif().get(0x0112)  # 0x0112: the EXIF Orientation tag
    except UNREADABLE_IMAGE as err:
        raise _unreadable(path, err) from None
    return ((h, w) if orientation in EXIF_TRANSPOSED else (w, h)), orientation


def size_mismatch(path, size, orientation, info, ann_file):
    """The error for an image whose displayed size is not the JSON's width x height, naming an EXIF rotation."""
    w, h = size
    json_size = (info["width"], info["height"])
    message = f"image {path} is {w}x{h} but {ann_file} says {json_size[0]}x{json_size[1]} (width x height)"
    if orientation in EXIF_TRANSPOSED and json_size == (h, w):
        message += (f" as displayed: its EXIF orientation {orientation} turns the stored {h}x{w} pixels, and images "
                    "are read as displayed (as annotation tools show them); fix width/height, and the boxes if "
                    "they were drawn on the stored pixels")
    return InputError(message)


# ----------------------------------------------------------------------------------------------------------
# Transforms: (PIL image, target with absolute xyxy boxes) -> (image, target)
# A target of None passes through untouched, so that images without annotations (a folder of pictures to
# predict on) go through the same evaluation pipeline.
# ----------------------------------------------------------------------------------------------------------

def hflip(image, target):
    """Mirror the image left-right; box x-coordinates become W - x (and x_min, x_max swap roles)."""
    w, _ = image.size
    if target is None:
        return TF.hflip(image), None
    target = dict(target)
    boxes = target["boxes"]
    target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    return TF.hflip(image), target


def resized_size(w, h, size, max_size=None):
    """(new_h, new_w) with the shorter side `size` and the aspect ratio kept; the shorter side is lowered
    when the longer one would exceed `max_size` (Deformable DETR's rule, integer truncation included)."""
    short, long = float(min(w, h)), float(max(w, h))
    if max_size is not None and long / short * size > max_size:
        # Truncating (the official code rounds) keeps the longer side <= max_size: rounding up can add a pixel.
        size = int(max_size * short / long)
    if min(w, h) == size:
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize(image, target, size, max_size=None):
    """Resize so that the shorter side is `size` (longer side at most `max_size`); boxes and areas follow."""
    w, h = image.size
    new_h, new_w = resized_size(w, h, size, max_size)
    image = TF.resize(image, [new_h, new_w])
    if target is None:
        return image, None
    ratio_w, ratio_h = new_w / w, new_h / h
    target = dict(target)
    target["boxes"] = target["boxes"] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=torch.float32)
    target["area"] = target["area"] * (ratio_w * ratio_h)
    return image, target


def crop(image, target, top, left, height, width):
    """Cut a region; boxes are clipped to it and those left with no area are dropped with all their fields."""
    image = TF.crop(image, top, left, height, width)
    if target is None:
        return image, None
    target = dict(target)
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    corners = boxes.reshape(-1, 2, 2)  # (N, 2 corners, xy)
    corners = torch.min(corners, torch.tensor([width, height], dtype=torch.float32)).clamp(min=0)
    keep = (corners[:, 1, :] > corners[:, 0, :]).all(dim=1)
    target["boxes"] = corners.reshape(-1, 4)  # (N, 4)
    target["area"] = (corners[:, 1, :] - corners[:, 0, :]).prod(dim=1)
    for field in INSTANCE_FIELDS:
        target[field] = target[field][keep]
    return image, target


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


class RandomHorizontalFlip:
    """Flip with probability p."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, target):
        if random.random() < self.p:
            return hflip(image, target)
        return image, target


class RandomResize:
    """Resize the shorter side to one of `sizes`, chosen uniformly; the longer side stays <= max_size."""

    def __init__(self, sizes, max_size=None):
        if not sizes:
            raise ValueError(f"RandomResize needs at least one size, got {sizes!r}")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image, target):
        # One size draws nothing: evaluation must not advance the training run's random stream.
        size = self.sizes[0] if len(self.sizes) == 1 else random.choice(self.sizes)
        return resize(image, target, size, self.max_size)


class RandomSizeCrop:
    """Crop a region whose width and height are drawn uniformly from [min_size, max_size] (capped by the
    image), at a uniformly random position."""

    def __init__(self, min_size, max_size):
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop needs 0 < min_size <= max_size, got ({min_size}, {max_size})")
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image, target):
        w, h = image.size
        # An image smaller than min_size is cropped to at most its own size instead of failing.
        crop_w = random.randint(min(self.min_size, w), min(w, self.max_size))
        crop_h = random.randint(min(self.min_size, h), min(h, self.max_size))
        top = random.randint(0, h - crop_h)
        left = random.randint(0, w - crop_w)
        return crop(image, target, top, left, crop_h, crop_w)


class RandomSelect:
    """Apply `first` with probability p, otherwise `second`."""

    def __init__(self, first, second, p=0.5):
        self.first = first
        self.second = second
        self.p = p

    def __call__(self, image, target):
        if random.random() < self.p:
            return self.first(image, target)
        return self.second(image, target)


class ToTensor:
    """PIL image -> float tensor (3, H, W) in [0, 1]."""

    def __call__(self, image, target):
        return TF.to_tensor(image), target


class Normalize:
    """Standardize pixels with the backbone's (ImageNet) mean and std."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, image, target):
        return TF.normalize(image, mean=self.mean, std=self.std), target


# Deformable DETR's evaluation size on COCO: shorter side 800, longer side at most 1333.
COCO_MIN_SIZE, COCO_MAX_SIZE = 800, 1333


def paper_sizes(min_size=COCO_MIN_SIZE, max_size=COCO_MAX_SIZE):
    """make_transforms arguments of Deformable DETR for a shorter side `min_size`: at 800 the paper's 11 training
    scales 480..800 step 32, resize to 400/500/600 and crop 384-600 px, evaluation at 800; other sizes scale all
    of these by min_size / 800."""
    r = min_size / 800
    scales = tuple(sorted({max(1, round(s * r)) for s in range(480, 801, 32)}))  # (11,) at 800
    crop = (max(1, round(384 * r)), max(1, round(600 * r)))
    crop_resize = tuple(max(1, round(s * r)) for s in (400, 500, 600))
    return dict(scales=scales, max_size=max_size, crop=crop, crop_resize=crop_resize, eval_size=min_size)


def make_transforms(image_set, scales=tuple(range(480, 801, 32)), max_size=1333, crop=(384, 600),
                    crop_resize=(400, 500, 600), eval_size=800):
    """Deformable DETR's pipelines. 'train': flip, then either a multi-scale resize or resize-crop-resize
    (`crop=None` leaves only the multi-scale resize). 'val': shorter side `eval_size` (`None`: native size)."""
    finish = [ToTensor(), Normalize()]
    if image_set == "train":
        multi_scale = RandomResize(scales, max_size=max_size)
        if crop is None:
            return Compose([RandomHorizontalFlip(), multi_scale, *finish])
        crop_then_resize = Compose([RandomResize(crop_resize), RandomSizeCrop(*crop), multi_scale])
        return Compose([RandomHorizontalFlip(), RandomSelect(multi_scale, crop_then_resize), *finish])
    if image_set == "val":
        if eval_size is None:
            return Compose(finish)
        return Compose([RandomResize([eval_size], max_size=max_size), *finish])
    raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")


# ----------------------------------------------------------------------------------------------------------
# COCO-format dataset
# ----------------------------------------------------------------------------------------------------------

def _load_coco_json(ann_file):
    """Parse a COCO-format JSON (UTF-8, errors.read_text); a file that is not JSON or lacks a required section is an
    InputError."""
    text = read_text(ann_file, "annotation file", "a COCO-format JSON file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"annotation file {ann_file} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise InputError(f"annotation file {ann_file} must hold a JSON object, found {type(data).__name__}")
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise InputError(f"annotation file {ann_file} lacks {missing}; a COCO-format file needs "
                         "'images', 'annotations' and 'categories'")
    for key in ("images", "annotations", "categories"):
        section = data[key]
        if not isinstance(section, list):
            raise InputError(f"annotation file {ann_file}: '{key}' is {json.dumps(section)[:40]} (a "
                             f"{type(section).__name__}), expected a list of objects")
        bad = next((entry for entry in section if not isinstance(entry, dict)), None)
        if bad is not None:
            raise InputError(f"annotation file {ann_file}: '{key}' holds {json.dumps(bad)[:40]}, expected an "
                             "object for every entry")
    return data


def _check_categories(categories, ann_file):
    """Sorted (ids, names); every category needs an id and a unique, non-empty name (CLIP reads the names)."""
    names, seen = {}, set()
    for cat in categories:
        if "id" not in cat:
            raise InputError(f"annotation file {ann_file}: category {cat!r} has no 'id', expected an 'id' and a "
                             "'name' in every category")
        if not _is_int(cat["id"]):
            raise InputError(f"annotation file {ann_file}: category id {cat['id']!r} is a {type(cat['id']).__name__}, "
                             "expected an integer")
        if cat["id"] in names:
            raise InputError(f"annotation file {ann_file}: category id {cat['id']} is used by more than one "
                             "category, expected unique ids")
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"annotation file {ann_file}: category id {cat['id']} has no name "
                             "(expected a non-empty 'name' string)")
        if name in seen:
            raise InputError(f"annotation file {ann_file}: category name {name!r} is used by more than one id, "
                             "expected unique names (CLIP reads them)")
        names[cat["id"]] = name
        seen.add(name)
    if not names:
        raise InputError(f"annotation file {ann_file} has no categories, expected at least one in 'categories'")
    cat_ids = sorted(names)
    return cat_ids, [names[c] for c in cat_ids]


def check_category_names(names, categories, *, what, where):
    """Raise an InputError naming those of `names` that are not among `categories` (with close spellings),
    and listing the categories: `what` says whose names they are (a flag), `where` whose categories."""
    unknown = [n for n in names if n not in set(categories)]
    if not unknown:
        return
    close = {n: difflib.get_close_matches(n, categories, n=1) for n in unknown}
    hints = "; ".join(f"{n!r}: did you mean {m[0]!r}?" for n, m in close.items() if m)
    shown = ", ".join(map(repr, categories[:100])) + (f" ... ({len(categories)} in all)" if len(categories) > 100
                                                      else "")
    raise InputError(f"{what}: {unknown} {'is' if len(unknown) == 1 else 'are'} not among the categories of "
                     f"{where}{' (' + hints + ')' if hints else ''}; its categories: {shown}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_images(images, ann_file):
    """Every image needs a unique integer id, a positive integer width and height, and a file_name or (LVIS)
    coco_url; a repeated id would attach one image's boxes to another file."""
    seen = set()
    for img in images:
        missing = [key for key in ("id", "width", "height") if key not in img]
        if not img.get("file_name") and not img.get("coco_url"):
            missing.append("file_name or coco_url")
        if missing:
            raise InputError(f"annotation file {ann_file}: image {img.get('id', img)!r} lacks {missing}, expected "
                             "an id, width, height and a file_name (or coco_url) in every image")
        if not _is_int(img["id"]):
            raise InputError(f"annotation file {ann_file}: image id {img['id']!r} is a {type(img['id']).__name__}, "
                             "expected an integer")
        if img["id"] in seen:
            raise InputError(f"annotation file {ann_file}: image id {img['id']} is used by more than one image "
                             f"({img.get('file_name') or img.get('coco_url')} is one), expected unique ids")
        seen.add(img["id"])
        for key in ("width", "height"):
            if not _is_int(img[key]) or img[key] < 1:
                raise InputError(f"annotation file {ann_file}: image {img['id']} has {key} {img[key]!r}, expected "
                                 "a positive integer (pixels)")


def _check_annotations(annotations, ann_file):
    """Every annotation needs a unique integer id (pycocotools indexes them by id: a repeated one keeps one box
    twice and loses the other), and integer image and category ids (which must name an image and a category of
    the file: checked where they are read)."""
    seen = set()
    for ann in annotations:
        if "id" not in ann:
            raise InputError(f"annotation file {ann_file}: annotation {json.dumps(ann)[:80]} has no 'id', expected a "
                             "unique integer id in every annotation")
        for key in ("id", "image_id", "category_id"):
            if key in ann and not _is_int(ann[key]):
                raise InputError(f"annotation file {ann_file}: annotation {ann['id']!r} has {key} {ann[key]!r} (a "
                                 f"{type(ann[key]).__name__}), expected an integer")
        if ann["id"] in seen:
            raise InputError(f"annotation file {ann_file}: annotation id {ann['id']} is used by more than one "
                             "annotation, expected unique ids")
        seen.add(ann["id"])


class CocoDetection(Dataset):
    """A COCO-format detection dataset giving (image (3, H, W) float, target dict) pairs.

    `img_folder` is one folder or a sequence of folders searched in order (LVIS v1 draws its images from both
    COCO train2017 and val2017). `keep_cat_names` keeps only those categories' annotations as targets (and in
    `coco`), and `drop_cat_names` removes those categories' (an open-vocabulary run's held-out novel classes,
    named by `drop_flag` in errors), while `cat_ids` / `cat_names` / `label_of` still cover every category of
    the JSON, so the class head's rows are the same for training and evaluation.

    Target: boxes (N, 4) float32 normalized cxcywh w.r.t. the transformed image, labels (N,) int64 in
    [0, K), image_id int64 scalar, orig_size [h, w] of the file, size [h, w] after transforms, area, iscrowd.
    Crowd regions are not targets (they stay in `coco` for evaluation); boxes with no area once clipped to the
    image are dropped and counted in one warning for the whole dataset.
    """

    def __init__(self, img_folder, ann_file, transforms=None, keep_cat_names=None, drop_cat_names=(),
                 drop_flag="drop_cat_names"):
        folders = [img_folder] if isinstance(img_folder, (str, os.PathLike)) else list(img_folder)
        for folder in folders:
            if os.path.isfile(folder):
                raise InputError(f"image folder {folder} is a file, expected a folder of images")
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"image folder {folder} not found (expected a folder of images)")
        user_file(ann_file, "annotation file", "a COCO-format JSON file")
        self.img_folders = [os.fspath(f) for f in folders]
        self.ann_file = os.fspath(ann_file)
        self.transforms = transforms

        data = _load_coco_json(ann_file)
        self.cat_ids, self.cat_names = _check_categories(data["categories"], ann_file)
        self.label_of = {cat_id: label for label, cat_id in enumerate(self.cat_ids)}
        _check_images(data["images"], ann_file)
        _check_annotations(data["annotations"], ann_file)

        if keep_cat_names is None:
            kept_ids = set(self.cat_ids)
        else:
            unknown = sorted(set(keep_cat_names) - set(self.cat_names))
            if unknown:
                raise InputError(f"keep_cat_names {unknown} are not categories of {ann_file}")
            keep = set(keep_cat_names)
            kept_ids = {c for c, n in zip(self.cat_ids, self.cat_names) if n in keep}
        check_category_names(drop_cat_names, self.cat_names, what=drop_flag, where=ann_file)
        kept_ids -= {c for c, n in zip(self.cat_ids, self.cat_names) if n in set(drop_cat_names)}
        data["annotations"] = [a for a in data["annotations"] if self._checked_cat(a) in kept_ids]

        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs)
        self.num_dropped = self._index_targets(data["annotations"])
        self.num_boxes = len(self._boxes)
        self._paths = self._find_files()
        self._check_headers()
        if self.num_dropped:
            warnings.warn(f"{ann_file}: dropped {self.num_dropped} boxes with no area after clipping to the image",
                          stacklevel=2)

    def _checked_cat(self, ann):
        cat_id = ann.get("category_id")
        if cat_id not in self.label_of:
            raise InputError(f"annotation file {self.ann_file}: annotation {ann.get('id')!r} has category_id "
                             f"{cat_id!r}, which is not among the file's categories")
        return cat_id

    def _index_targets(self, annotations):
        """Clip every non-crowd box to its image once, at load time; returns how many were left empty."""
        for ann in annotations:
            bbox = ann.get("bbox")
            if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                               for v in bbox)):
                raise InputError(f"annotation file {self.ann_file}: annotation {ann.get('id')!r} has bbox "
                                 f"{bbox!r}, expected [x, y, w, h] of finite numbers")
            # pycocotools' evaluation reads both keys of every annotation (else a KeyError after an epoch).
            ann.setdefault("iscrowd", 0)
            ann.setdefault("area", bbox[2] * bbox[3])
            if not isinstance(ann["area"], (int, float)) or isinstance(ann["area"], bool):
                raise InputError(f"annotation file {self.ann_file}: annotation {ann.get('id')!r} has area "
                                 f"{ann['area']!r}, expected a number")
            if ann.get("image_id") not in self.coco.imgs:
                raise InputError(f"annotation file {self.ann_file}: annotation {ann.get('id')!r} refers to "
                                 f"image_id {ann.get('image_id')!r}, which is not among the file's images")
        anns = [a for a in annotations if not a["iscrowd"]]
        image_ids = np.array([a["image_id"] for a in anns], dtype=np.int64)
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)  # (M, 4)
        labels = np.array([self.label_of[a["category_id"]] for a in anns], dtype=np.int64)
        area = np.array([a["area"] for a in anns], dtype=np.float32)
        sizes = np.array([[self.coco.imgs[i]["width"], self.coco.imgs[i]["height"]] for i in image_ids],
                         dtype=np.float64).reshape(-1, 2)  # (M, 2) as (w, h)
        x0y0 = np.clip(xywh[:, :2], 0, sizes)
        x1y1 = np.clip(xywh[:, :2] + xywh[:, 2:], 0, sizes)
        keep = (x1y1 > x0y0).all(axis=1)
        order = np.argsort(image_ids[keep], kind="stable")
        self._boxes = np.concatenate([x0y0, x1y1], axis=1)[keep][order].astype(np.float32)  # (M', 4) xyxy
        self._labels = labels[keep][order]
        self._area = area[keep][order]
        kept_ids = image_ids[keep][order]
        starts = np.searchsorted(kept_ids, self.ids, side="left")
        ends = np.searchsorted(kept_ids, self.ids, side="right")
        self._span = {img_id: (int(s), int(e)) for img_id, s, e in zip(self.ids, starts, ends)}
        return int((~keep).sum())

    def _find_files(self):
        """{image id: path}, each file looked up in the folders in order; missing files are one error.

        One directory listing per folder instead of a stat per image: 118k COCO names take well under a second.
        """
        listed = [set(os.listdir(folder)) for folder in self.img_folders]
        paths, missing = {}, []
        for img_id in self.ids:
            info = self.coco.imgs[img_id]
            name = info.get("file_name") or os.path.basename(urlparse(info["coco_url"]).path)
            found = [os.path.join(folder, name) for folder, names in zip(self.img_folders, listed)
                     if name in names or (os.sep in name and os.path.isfile(os.path.join(folder, name)))]
            if found:
                paths[img_id] = found[0]
            else:
                missing.append(name)
        if missing:
            raise FileNotFoundError(f"annotation file {self.ann_file}: {len(missing)} of {len(self.ids)} images not "
                                    f"found in {', '.join(self.img_folders)}: {', '.join(missing[:5])}"
                                    f"{' ...' if len(missing) > 5 else ''}")
        return paths

    def _check_headers(self):
        """Compare the JSON's width x height with the file headers (PIL reads no pixels) of at most HEADER_CHECKS images
        spread over the set, so a wrong or unreadable file is found before training rather than an epoch in."""
        step = max(1, -(-len(self.ids) // HEADER_CHECKS))
        for img_id in self.ids[::step]:
            path = self._paths[img_id]
            size, orientation = displayed_size(path)
            info = self.coco.imgs[img_id]
            if size != (info["width"], info["height"]):
                raise size_mismatch(path, size, orientation, info, self.ann_file)

    def aspect_groups(self):
        """Per index, 1 for a landscape image (width >= height, from the JSON) and 0 for a portrait one."""
        return [int(self.coco.imgs[img_id]["width"] >= self.coco.imgs[img_id]["height"]) for img_id in self.ids]

    def image_path(self, img_id):
        """The file of an image: its file_name, or for LVIS the basename of its coco_url, in the folders."""
        return self._paths[img_id]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        img_id = self.ids[index]
        path = self.image_path(img_id)
        image = load_rgb(path)
        w, h = image.size
        info = self.coco.imgs[img_id]
        if (w, h) != (info["width"], info["height"]):
            raise size_mismatch(path, (w, h), displayed_size(path)[1], info, self.ann_file)
        start, end = self._span[img_id]
        target = {
            "boxes": torch.from_numpy(self._boxes[start:end].copy()),
            "labels": torch.from_numpy(self._labels[start:end].copy()),
            "area": torch.from_numpy(self._area[start:end].copy()),
            "iscrowd": torch.zeros(end - start, dtype=torch.int64),
            "image_id": torch.tensor(img_id, dtype=torch.int64),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        if isinstance(image, Image.Image):
            image = TF.to_tensor(image)
        out_h, out_w = image.shape[-2:]
        target["size"] = torch.tensor([out_h, out_w], dtype=torch.int64)
        scale = torch.tensor([out_w, out_h, out_w, out_h], dtype=torch.float32)
        target["boxes"] = box_convert(target["boxes"], in_fmt="xyxy", out_fmt="cxcywh") / scale
        return image, target


def collate_fn(batch):
    """Pad a list of (image (3, H, W), target) to the batch's largest size, bottom/right, with zeros.

    Returns images (B, 3, Hmax, Wmax), mask (B, Hmax, Wmax) bool with True on padding, and the targets list.
    """
    if not batch:
        raise ValueError("collate_fn got an empty batch; expected at least one (image, target) pair")
    images, targets = zip(*batch)
    h_max = max(img.shape[1] for img in images)
    w_max = max(img.shape[2] for img in images)
    padded = images[0].new_zeros((len(images), images[0].shape[0], h_max, w_max))
    mask = torch.ones((len(images), h_max, w_max), dtype=torch.bool)
    for b, img in enumerate(images):
        _, h, w = img.shape
        padded[b, :, :h, :w] = img
        mask[b, :h, :w] = False
    return padded, mask, list(targets)


class BatchResize:
    """A collate_fn for multi-scale training whose images of a batch share their scale: one shorter side drawn
    from `sizes` per batch (the longer side at most `max_size`), every image resized to it, then `collate_fn`.
    With batches of one aspect (`GroupedBatchSampler`) little of the padded batch is then padding. Boxes are
    normalized to their image, so a resize leaves them as they are; `size` and `area` follow."""

    def __init__(self, sizes, max_size):
        if not sizes:
            raise ValueError(f"BatchResize needs at least one size, got {sizes!r}")
        self.sizes, self.max_size = list(sizes), max_size

    def __call__(self, batch):
        size = random.choice(self.sizes)
        resized = []
        for image, target in batch:
            h, w = image.shape[-2:]
            new_h, new_w = resized_size(w, h, size, self.max_size)
            image = TF.resize(image, [new_h, new_w], antialias=True)  # (3, new_h, new_w)
            target = dict(target, size=torch.tensor([new_h, new_w]), area=target["area"] * (new_h * new_w / (h * w)))
            resized.append((image, target))
        return collate_fn(resized)


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of `batch_size` indices that share a group (`group_ids[index]`, e.g. landscape or portrait), in the
    order `sampler` gives them; the indices the groups hold at the end make mixed batches, and a last batch short of
    `batch_size` is dropped with `drop_last` (training) or kept (evaluation, which must see every image). A padded
    batch of one aspect wastes little on padding: torchvision's detection references and detectron2 group their
    batches so too."""

    def __init__(self, sampler, group_ids, batch_size, *, drop_last=True):
        self.sampler, self.group_ids, self.batch_size = sampler, list(group_ids), batch_size
        self.drop_last = drop_last

    def __iter__(self):
        buckets = {}
        for index in self.sampler:
            bucket = buckets.setdefault(self.group_ids[index], [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()
        rest = [index for bucket in buckets.values() for index in bucket]
        end = len(rest) - self.batch_size + 1 if self.drop_last else len(rest)
        for start in range(0, end, self.batch_size):
            yield rest[start:start + self.batch_size]

    def __len__(self):
        if self.drop_last:
            return len(self.sampler) // self.batch_size
        sizes = collections.Counter(self.group_ids[index] for index in self.sampler).values()
        rest = sum(size % self.batch_size for size in sizes)
        return sum(size // self.batch_size for size in sizes) + -(-rest // self.batch_size)


# ----------------------------------------------------------------------------------------------------------
# The embedded `shapes` dataset
# ----------------------------------------------------------------------------------------------------------

# (name, drawn form, RGB fill). Fills are saturated (or white) so they stand out from the grey background.
SHAPES_CATEGORIES = (
    ("red circle", "circle", (220, 30, 30)),
    ("green square", "square", (30, 180, 50)),
    ("blue triangle", "triangle", (40, 70, 230)),
    ("yellow circle", "circle", (240, 220, 30)),
    ("purple square", "square", (150, 50, 200)),
    ("orange triangle", "triangle", (255, 140, 0)),
    ("cyan ellipse", "ellipse", (40, 220, 230)),
    ("white star", "star", (245, 245, 245)),
)
SHAPES_VERSION = 2  # bump when the drawing changes, so that stale cached sets are not reused
MIN_OBJECT_SIDE = 12
MAX_OCCLUDED = 0.7


def _shapes_background(rng, width, height):
    """A grey, slightly tinted background textured with smooth noise at two scales and thin grey strokes."""
    tint = rng.uniform(70, 130) + rng.uniform(-12, 12, size=3)
    texture = np.zeros((height, width), dtype=np.float32)
    for cells, amplitude in ((4, 22.0), (max(width, height) // 12, 9.0)):
        grid = rng.normal(0.0, amplitude, size=(cells, cells)).astype(np.float32)
        texture += np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC))
    pixels = np.clip(tint[None, None, :] + texture[:, :, None], 0, 255).astype(np.uint8)  # (H, W, 3)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        grey = int(np.clip(tint.mean() + rng.uniform(-45, 45), 0, 255))
        points = rng.uniform(0, 1, size=4) * np.array([width, height, width, height])
        draw.line([float(p) for p in points], fill=(grey, grey, grey), width=int(rng.integers(1, 3)))
    return image


def _shape_mask(rng, form, side, max_side):
    """A boolean mask (h, w) of one shape whose longer side is about `side` pixels."""
    if form == "ellipse":
        short = max(MIN_OBJECT_SIDE // 2, int(side / rng.uniform(1.5, 2.3)))
        w, h = (side, short) if rng.random() < 0.5 else (short, side)
    elif form == "triangle":
        w, h = side, int(np.clip(side * rng.uniform(0.8, 1.2), MIN_OBJECT_SIDE, max_side))
    else:
        w = h = side
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if form in ("circle", "ellipse"):
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
    elif form == "square":
        draw.rectangle([0, 0, w - 1, h - 1], fill=255)
    elif form == "triangle":
        draw.polygon([((w - 1) / 2, 0), (w - 1, h - 1), (0, h - 1)], fill=255)
    else:
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42) * (w - 1) / 2
        center = (w - 1) / 2
        draw.polygon([(float(center + r * np.cos(a)), float(center + r * np.sin(a)))
                      for r, a in zip(radii, angles)], fill=255)
    return np.asarray(canvas) > 0


def _shapes_image(rng, *, min_size, max_size, max_objects):
    """One image and its annotations [(category index, [x, y, w, h])]; later objects cover earlier ones.

    Objects are laid out first and painted afterwards: one hidden beyond MAX_OCCLUDED is left out of the
    picture as well as the annotations, so that no visible fragment of an object goes unannotated.
    """
    width, height = (int(s) for s in rng.integers(min_size, max_size + 1, size=2))
    image = _shapes_background(rng, width, height)
    owner = np.full((height, width), -1, dtype=np.int32)
    footprint = np.zeros((len(SHAPES_CATEGORIES), height, width), dtype=bool)  # (K, H, W) per-category cover
    max_side = int(0.75 * min(width, height))
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        category = int(rng.integers(len(SHAPES_CATEGORIES)))
        _, form, fill = SHAPES_CATEGORIES[category]
        # Log-uniform sides give COCO small (< 32^2), medium and large (> 96^2) objects in similar numbers.
        side = int(np.exp(rng.uniform(np.log(MIN_OBJECT_SIDE), np.log(max_side))))
        mask = _shape_mask(rng, form, side, max_side)
        mh, mw = mask.shape
        y0 = int(rng.integers(0, height - mh + 1))
        x0 = int(rng.integers(0, width - mw + 1))
        color = np.clip(np.array(fill) + rng.integers(-12, 13, size=3), 0, 255).astype(np.uint8)
        if footprint[category, y0:y0 + mh, x0:x0 + mw][mask].any():
            continue  # overlapping shapes of one colour would merge into a blob no annotation can describe
        footprint[category, y0:y0 + mh, x0:x0 + mw][mask] = True
        owner[y0:y0 + mh, x0:x0 + mw][mask] = len(objects)
        objects.append((category, mask, x0, y0, color))
    visible = np.bincount(owner[owner >= 0], minlength=len(objects))
    pixels = np.array(image)  # (H, W, 3), writable
    annotations = []
    for (category, mask, x0, y0, color), seen in zip(objects, visible):
        if seen < (1.0 - MAX_OCCLUDED) * mask.sum():
            continue
        mh, mw = mask.shape
        pixels[y0:y0 + mh, x0:x0 + mw][mask] = color
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        box = [x0 + int(cols[0]), y0 + int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        annotations.append((category, box))
    return Image.fromarray(pixels), annotations


def _write_shapes_split(folder, split_code, *, num_images, seed, min_size, max_size, max_objects):
    """Write one split's PNGs to `folder` and return its COCO dict; image i is drawn from its own seeded
    generator, so a split's content does not depend on the order of generation."""
    os.makedirs(folder)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, split_code, index])
        image, objects = _shapes_image(rng, min_size=min_size, max_size=max_size, max_objects=max_objects)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        image.save(os.path.join(folder, file_name), format="PNG", compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for category, box in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category + 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, (name, _, _) in enumerate(SHAPES_CATEGORIES)]
    info = {"description": "CLIP-DETR shapes", "version": str(SHAPES_VERSION)}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def shapes_paths(root, *, num_train=1500, num_val=200, seed=0, min_size=128, max_size=192, max_objects=6):
    """The four paths of the `shapes` set of these arguments under `root` (train/val images and JSONs), whether it
    is generated yet or not: the set lives in root/<key>, the key naming every argument, so other arguments never
    reuse it."""
    key = (f"shapes-v{SHAPES_VERSION}-s{seed}-n{num_train}-{num_val}"
           f"-px{min_size}-{max_size}-o{max_objects}")
    final = os.path.join(root, key)
    return {
        "train_images": os.path.join(final, "train"),
        "val_images": os.path.join(final, "val"),
        "train_json": os.path.join(final, "annotations", "instances_train.json"),
        "val_json": os.path.join(final, "annotations", "instances_val.json"),
    }


def make_shapes(root, *, num_train=1500, num_val=200, seed=0, min_size=128, max_size=192, max_objects=6):
    """Write the `shapes` set once under `root` in COCO layout (`shapes_paths`) and return its four paths.

    It is generated in a temporary folder and moved into place in one step, so an interrupted run leaves nothing
    that looks complete. Same arguments, same bytes. A full disk or a folder that cannot be written is an
    InputError naming `root`.
    """
    if num_train < 1 or num_val < 1:
        raise InputError(f"shapes needs num_train >= 1 and num_val >= 1, got {num_train} and {num_val}")
    if not 2 * MIN_OBJECT_SIDE <= min_size <= max_size:
        raise InputError(f"shapes needs {2 * MIN_OBJECT_SIDE} <= min_size <= max_size, "
                         f"got min_size={min_size}, max_size={max_size}")
    if max_objects < 1:
        raise InputError(f"shapes needs max_objects >= 1, got {max_objects}")
    paths = shapes_paths(root, num_train=num_train, num_val=num_val, seed=seed, min_size=min_size,
                         max_size=max_size, max_objects=max_objects)
    final = os.path.dirname(paths["train_images"])
    if os.path.isdir(final):
        return paths
    key = os.path.basename(final)
    tmp = None
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=root)
        os.makedirs(os.path.join(tmp, "annotations"))
        for split_code, (split, num_images) in enumerate((("train", num_train), ("val", num_val))):
            coco = _write_shapes_split(os.path.join(tmp, split), split_code, num_images=num_images, seed=seed,
                                       min_size=min_size, max_size=max_size, max_objects=max_objects)
            with open(os.path.join(tmp, "annotations", f"instances_{split}.json"), "w") as f:
                json.dump(coco, f)
        _publish(tmp, final)
    except OSError as err:
        raise InputError(f"cannot write the shapes set into {root}: {err.strerror or err} (set --data-path or "
                         "CLIP_DETR_CACHE to a writable folder)") from None
    finally:
        if tmp is not None and os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return paths


# make_shapes' keyword defaults are the `shapes` defaults everywhere (train.py's --shapes-* flags take them).
SHAPES_DEFAULTS = {name: p.default for name, p in inspect.signature(make_shapes).parameters.items()
                   if p.kind is p.KEYWORD_ONLY}


def _publish(tmp, final):
    """Move a finished folder into place; if another process (another rank) won the race, keep theirs."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not os.path.isdir(final):
            raise


# ----------------------------------------------------------------------------------------------------------
# OV-COCO (paper §4.2, Table 3)
# ----------------------------------------------------------------------------------------------------------

# The OVR-CNN split of COCO 2017 (Zareian et al., "Open-Vocabulary Object Detection Using Captions", CVPR 2021),
# used unchanged by OV-DETR (Zang et al., 2022), Detic and CORA: 48 base and 17 novel categories; the other
# 15 COCO categories have no WordNet synset and are left out of the benchmark.
OV_COCO_BASE = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse", "sheep",
    "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite", "surfboard",
    "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "pizza",
    "donut", "chair", "bed", "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven", "toaster",
    "refrigerator", "book", "clock", "vase", "toothbrush",
)
OV_COCO_NOVEL = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard", "cup",
    "knife", "cake", "couch", "keyboard", "sink", "scissors",
)


# COCO 2017's 80 categories in id order; the ids run from 1 to 90 and leave these ten out. Released COCO detectors
# (the official Deformable DETR, the hub's transformers ports) have a 91-row class head, row i for category id i.
COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
# The name of each row of a 91-row COCO class head (None: an id without a category).
COCO_ROW_NAMES = tuple(dict(zip([i for i in range(1, 91) if i not in COCO_UNUSED_IDS], COCO_NAMES)).get(row)
                       for row in range(91))


def ov_coco_split(cat_names):
    """(base names, novel names) of OV-COCO among `cat_names`, each in `cat_names` order."""
    base = [n for n in cat_names if n in OV_COCO_BASE]
    novel = [n for n in cat_names if n in OV_COCO_NOVEL]
    if not base and not novel:
        raise InputError(f"none of the categories {list(cat_names)[:10]}... are OV-COCO base or novel "
                         "categories; expected COCO 2017 names such as 'person' or 'airplane'")
    return base, novel


# ----------------------------------------------------------------------------------------------------------
# The pipeline of each dataset
# ----------------------------------------------------------------------------------------------------------

def shapes_scales(min_size):
    """The `shapes` training scales: shorter sides a little below min_size (96, 112, 128 at 128), no crop (the
    objects are already small), evaluation at the top one: CPU time grows with pixels, and this is a CPU demo."""
    return tuple(range(min_size * 3 // 4, min_size + 1, 16))


def dataset_transforms(image_set, *, shapes, min_size, max_size):
    """The `image_set` pipeline at a shorter side `min_size` and a longer side at most `max_size`: for the `shapes`
    set its own small one, for every other dataset Deformable DETR's (`paper_sizes`). `shapes` training images
    keep their size here: a batch is resized as one (`BatchResize`)."""
    if not 0 < min_size <= max_size:
        raise InputError(f"--min-size {min_size} / --max-size {max_size}: expected 0 < min-size <= max-size")
    if shapes:
        if image_set == "train":
            return Compose([RandomHorizontalFlip(), ToTensor(), Normalize()])
        return make_transforms(image_set, max_size=max_size, eval_size=min_size)
    return make_transforms(image_set, **paper_sizes(min_size, max_size))
