"""Sizes and geometry (issue 31, class 3): wherever a size, a padding mask or a box crosses a function, the tests
use non-square images of odd sizes, where a (w, h) slip, a mask derived from the wrong level or a box scaled by
the other side shows, and photos in all eight EXIF orientations.

  the detector   every level's padding mask and position encoding, the valid ratios, the encoder's reference
                 points and the decoder's per-level reference boxes
  the data       flip, resize, crop, the training and evaluation pipelines of `shapes` and COCO, BatchResize and
                 collate padding: each box lies on the pixels of its object; ONNX padding of a small batch
  photos         all eight EXIF orientations: the header's size, the pixels, the boxes of an annotated photo, a
                 JSON that gives the stored size, and detection on a folder of such photos
  predictions    perfect predictions of padded batches come back as the annotated boxes in file pixels

CPU only, no network, a fraction of a second each. Shape legend: B batch, C model width, L levels, H x W a padded
batch, h x w an image, H_l x W_l a level's padded map.
"""
import itertools
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw

import data
import evaluate
from conftest import oracle_for, OracleDetector
from data import collate_fn
from model import DeformableDecoder, DeformableEncoder, DeformableTransformer, PostProcess
from onnx_export import OnnxDetector

# ----------------------------------------------------------------------------------------------------------
# The detector: masks, position encodings, valid ratios and reference points of odd, non-square batches
# ----------------------------------------------------------------------------------------------------------
# (height, width) of the images of a batch: odd, non-square, landscape and portrait. For images 1 and 3 the stride-64
# level's mask resized from C5's differs from the image's own (asserted below, so that the test tells them apart).
BATCHES = [((67, 101), (23, 45), (61, 33), (25, 13))]


@pytest.fixture(scope="module")
def levels(tiny_detr):
    """(detector, [(mask (B, H, W), srcs, masks, pos, valid ratios (B, L, 2))] of BATCHES)."""
    detr = tiny_detr(enc_layers=1).eval()
    out = []
    for sizes in BATCHES:
        images, mask, _ = collate_fn([(torch.randn(3, h, w), {}) for h, w in sizes])
        with torch.no_grad():
            srcs, masks, pos = detr.features(images, mask)
            ratios = detr.transformer.encode(srcs, masks, pos)["valid_ratios"]
        out.append((mask, srcs, masks, pos, ratios))
    return detr, out


def test_every_levels_mask_and_position_encoding_come_from_the_images_own_mask(levels):
    """Official Deformable DETR: every level's mask, the extra stride-64 one included, is the image's padding mask
    resized (nearest) to that level, and its position encoding is the sine encoding of that mask; the levels are
    ceil(H / stride) x ceil(W / stride)."""
    detr, batches = levels
    for mask, srcs, masks, pos, _ in batches:
        H, W = mask.shape[-2:]
        assert [tuple(s.shape[-2:]) for s in srcs] == [(math.ceil(H / s), math.ceil(W / s)) for s in (8, 16, 32, 64)]
        for src, m, p in zip(srcs, masks, pos):
            expected = F.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]  # (B, H_l, W_l)
            assert torch.equal(m, expected), (tuple(mask.shape), tuple(src.shape))
            torch.testing.assert_close(p, detr.backbone[1](expected), rtol=0, atol=0)
        via_c5 = F.interpolate(masks[2][None].float(), size=masks[3].shape[-2:]).to(torch.bool)[0]
        for b in (1, 3):
            assert not torch.equal(via_c5[b], masks[3][b]), "these sizes must tell the image's mask from C5's"


def test_valid_ratios_are_the_width_and_height_fractions_of_the_image_on_every_level(levels):
    """valid_ratio: (valid columns / W_l, valid rows / H_l), known answer on one map; through `encode` on odd,
    non-square batches each level's ratios are those of its own mask."""
    mask = torch.ones(2, 5, 7, dtype=torch.bool)  # (B, H, W)
    mask[0] = False
    mask[1, :3, :4] = False
    torch.testing.assert_close(DeformableTransformer.valid_ratio(mask), torch.tensor([[1.0, 1.0], [4 / 7, 3 / 5]]))
    for _, _, masks, _, ratios in levels[1]:
        for lvl, m in enumerate(masks):
            H_l, W_l = m.shape[-2:]
            for b in range(len(m)):
                rows, cols = int((~m[b, :, 0]).sum()), int((~m[b, 0]).sum())
                assert ratios[b, lvl].tolist() == pytest.approx([cols / W_l, rows / H_l]), (lvl, b)


def test_encoder_reference_points_are_pixel_centres_at_the_same_image_place_on_every_level():
    """Each memory location's reference point is its own pixel centre on its own level ((j + 0.5) / W_l,
    (i + 0.5) / H_l of the padded map), and on every other level the same place relative to the image."""
    shapes = torch.tensor([[5, 7], [3, 4]])  # (L, 2) as (H_l, W_l)
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[4 / 7, 3 / 5], [2 / 4, 2 / 3]]])  # (B, L, 2) as (w, h)
    ref = DeformableEncoder.reference_points(shapes, ratios, "cpu")  # (B, S_all, L, 2)
    start = 0
    for lvl, (H, W) in enumerate(shapes.tolist()):
        for b, i, j in itertools.product(range(2), range(H), range(W)):
            point = ref[b, start + i * W + j]  # (L, 2) as (x, y)
            torch.testing.assert_close(point[lvl], torch.tensor([(j + 0.5) / W, (i + 0.5) / H]))
            in_image = point / ratios[b]  # (L, 2): relative to the image, the same on every level
            torch.testing.assert_close(in_image, in_image[lvl].expand(2, 2))
        start += H * W
    # One point by hand: image 1, level 0, row 1, column 3 -> x = 3.5 / 4 valid columns, y = 1.5 / 3 valid rows.
    torch.testing.assert_close(ref[1, 1 * 7 + 3], torch.tensor([[0.875 * 4 / 7, 0.5 * 3 / 5],
                                                                [0.875 * 2 / 4, 0.5 * 2 / 3]]))


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_decoder_reference_boxes_are_scaled_to_each_levels_valid_part(monkeypatch, ref_dim):
    """A decoder reference (cx, cy[, w, h]) relative to the image reaches the deformable attention of level l as
    (cx * w_l, cy * h_l[, w * w_l, h * h_l]), (w_l, h_l) the level's valid ratios."""
    torch.manual_seed(0)
    decoder = DeformableDecoder(dict(d_model=32, d_ffn=64, dropout=0.0, n_levels=2, n_heads=4, n_points=2), 1)
    seen = []
    real = decoder.layers[0].cross_attn.forward
    monkeypatch.setattr(decoder.layers[0].cross_attn, "forward",
                        lambda query, reference, *rest: seen.append(reference) or real(query, reference, *rest))
    shapes = torch.tensor([[5, 7], [3, 4]])
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[4 / 7, 3 / 5], [2 / 4, 2 / 3]]])  # (B, L, 2) as (w, h)
    reference = torch.tensor([[[0.5, 0.25, 0.2, 0.4][:ref_dim]], [[0.3, 0.9, 0.6, 0.1][:ref_dim]]])  # (B, 1, 2|4)
    with torch.no_grad():
        decoder(torch.randn(2, 1, 32), torch.randn(2, 1, 32), reference, torch.randn(2, 47, 32), shapes,
                torch.tensor([0, 35]), ratios, torch.zeros(2, 47, dtype=torch.bool))
    (per_level,) = seen  # (B, 1, L, 2|4)
    for b, lvl in itertools.product(range(2), range(2)):
        w_l, h_l = ratios[b, lvl].tolist()
        expected = reference[b, 0] * torch.tensor([w_l, h_l, w_l, h_l][:ref_dim])
        torch.testing.assert_close(per_level[b, 0, lvl], expected)


# ----------------------------------------------------------------------------------------------------------
# The data: each box lies on the pixels of its object, through every transform and pipeline
# ----------------------------------------------------------------------------------------------------------
BACKGROUND = (90, 90, 90)
FILLS = {"red": (230, 40, 40), "blue": (40, 40, 230), "green": (40, 200, 40)}
# Category ids in another order than the names, so a label taken for an id shows.
CATEGORIES = [{"id": 7, "name": "red"}, {"id": 3, "name": "blue"}, {"id": 5, "name": "green"}]
# Two photos, (width, height) odd and not square, landscape and portrait; each object is (name, painted pixel
# edges x0, y0, x1, y1, annotated [x, y, w, h]). The green ones are annotated past the image's right and bottom
# edges, as exports do: the dataset clips them to the image.
PHOTOS = {
    (97, 61): [("red", (10, 7, 40, 30), [10, 7, 30, 23]), ("blue", (55, 3, 90, 24), [55, 3, 35, 21]),
               ("green", (70, 40, 97, 61), [70, 40, 45, 35])],
    (59, 83): [("red", (5, 50, 30, 80), [5, 50, 25, 30]), ("blue", (35, 5, 55, 31), [35, 5, 20, 26]),
               ("green", (41, 60, 59, 83), [41, 60, 30, 40])],
}


def painted(size, objects):
    """A grey PIL image of `size` (w, h) with every object's rectangle (pixel edges) filled in its colour."""
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    for name, (x0, y0, x1, y1), *_ in objects:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=FILLS[name])
    return image


def colour_box(image, name):
    """Pixel edges (x0, y0, x1, y1) of the pixels of `name`'s colour in an image (3, H, W) in [0, 1] (a pixel of
    an edge counts when it is mostly that colour); None where there is none."""
    fill = torch.tensor(FILLS[name], dtype=torch.float32) / 255
    ys, xs = torch.nonzero(((image - fill[:, None, None]).abs() < 0.25).all(0), as_tuple=True)
    if not len(xs):
        return None
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def assert_boxes_on_their_pixels(image, boxes, names, where, tolerance=1.5):
    """Every box (absolute xyxy) lies on its object's pixels to within `tolerance` pixels (resampling blurs an edge
    by one); an object without a box (cropped away) has no pixel left; no pixel is black (a crop reaching past
    the photo's edges would fill there)."""
    assert image.min() > 0.05, f"{where}: black pixels, from outside the photo"
    for name in FILLS:
        found = colour_box(image, name)
        mine = [box for box, n in zip(boxes.tolist(), names) if n == name]
        if not mine:
            assert found is None, f"{where}: {name} is in the image but its box was dropped"
            continue
        box, = mine
        if min(box[2] - box[0], box[3] - box[1]) < 3:
            continue  # a sliver of an object cut by a crop: too thin to find by its colour
        assert found is not None, f"{where}: {name} has a box {box} but no pixel"
        assert max(abs(a - b) for a, b in zip(found, box)) <= tolerance, (where, name, box, found)


def unnormalized(image):
    """A Normalize'd image (3, H, W) back in [0, 1]."""
    mean, std = torch.tensor(data.IMAGENET_MEAN)[:, None, None], torch.tensor(data.IMAGENET_STD)[:, None, None]
    return image * std + mean


def pil_target(objects):
    """The pipeline's target of a painted photo: absolute xyxy boxes (the painted edges), labels, area, iscrowd."""
    boxes = torch.tensor([edges for _, edges, _ in objects], dtype=torch.float32)
    return {"boxes": boxes, "labels": torch.arange(len(objects)), "area": (boxes[:, 2:] - boxes[:, :2]).prod(1),
            "iscrowd": torch.zeros(len(objects), dtype=torch.int64)}


def check_pil(image, target, objects, where):
    names = [objects[k][0] for k in target["labels"].tolist()]
    assert_boxes_on_their_pixels(TF.to_tensor(image), target["boxes"], names, where)


@pytest.mark.parametrize("size", list(PHOTOS))
def test_flip_resize_and_crop_keep_each_box_on_its_pixels(size):
    objects = PHOTOS[size]
    photo, target = painted(size, objects), pil_target(objects)
    check_pil(photo, target, objects, "as painted")
    check_pil(*data.hflip(photo, target), objects, "hflip")
    for short, max_size in ((37, None), (45, 77), (50, 60), (71, None)):
        check_pil(*data.resize(photo, target, short, max_size), objects, f"resize {short} {max_size}")
    w, h = size
    for top, left, height, width in ((0, 0, h, w), (5, 9, 37, 29), (h - 21, w - 33, 21, 33), (11, 0, 17, w)):
        check_pil(*data.crop(photo, target, top, left, height, width), objects, f"crop {top} {left} {height} {width}")
    random.seed(0)
    for step in range(20):
        check_pil(*data.RandomSizeCrop(15, 45)(photo, target), objects, f"RandomSizeCrop draw {step}")


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory):
    """The two painted photos as a COCO-format set (PNG, exact pixels); returns (folder, ann_file)."""
    root = tmp_path_factory.mktemp("photos")
    os.makedirs(root / "img")
    ids = {c["name"]: c["id"] for c in CATEGORIES}
    images, annotations = [], []
    for image_id, (size, objects) in enumerate(PHOTOS.items(), start=1):
        painted(size, objects).save(root / "img" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": size[0], "height": size[1]})
        for name, _, bbox in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[name],
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
    with open(root / "ann.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return str(root / "img"), str(root / "ann.json")


def check_item(image, target, dataset, where, normalized=True):
    """A dataset item (or a batch slot): its normalized cxcywh boxes, scaled by its `size`, lie on the pixels."""
    h, w = target["size"].tolist()
    cx, cy, bw, bh = (target["boxes"] * torch.tensor([w, h, w, h])).unbind(1)
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], 1)  # (N, 4) xyxy pixels
    names = [dataset.cat_names[k] for k in target["labels"].tolist()]
    assert_boxes_on_their_pixels(unnormalized(image) if normalized else image, boxes, names, where)


PIPELINES = {  # name: (image_set, shapes); sizes: shorter side 45 (odd), longer side at most 77
    "coco train": ("train", False), "shapes train": ("train", True), "coco val": ("val", False),
    "shapes val": ("val", True)}


@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_every_pipeline_keeps_each_box_on_its_pixels(photo_set, pipeline):
    """Through CocoDetection (clipping at load, normalization by the transformed size) and the pipeline of each
    dataset kind, 20 random draws each: flips, multi-scale resizes and COCO's random crops included."""
    image_set, shapes = PIPELINES[pipeline]
    transforms = data.dataset_transforms(image_set, shapes=shapes, min_size=45, max_size=77)
    dataset = data.CocoDetection(*photo_set, transforms=transforms)
    random.seed(0)
    for draw, index in itertools.product(range(20 if image_set == "train" else 1), range(len(dataset))):
        image, target = dataset[index]
        h, w = target["size"].tolist()
        assert (h, w) == tuple(image.shape[-2:])
        if pipeline != "coco train":  # the others keep the aspect ratio (COCO's training crops do not)
            w0, h0 = list(PHOTOS)[index]
            assert abs(w - h * w0 / h0) <= 1 or abs(h - w * h0 / w0) <= 1, (pipeline, index)
        check_item(image, target, dataset, f"{pipeline}, image {index}, draw {draw}")


def test_batch_resize_and_collate_padding_keep_each_box_on_its_pixels_in_its_slot(photo_set):
    """`shapes` training batches: BatchResize resizes a landscape and a portrait photo to one drawn scale, collate
    pads them bottom/right; each slot's boxes, scaled by that image's own `size` (not the padded batch's), lie on
    its pixels, and the mask marks exactly the padding."""
    transforms = data.dataset_transforms("train", shapes=True, min_size=45, max_size=77)
    dataset = data.CocoDetection(*photo_set, transforms=transforms)
    resize = data.BatchResize(data.shapes_scales(45), max_size=77)
    random.seed(0)
    for draw in range(10):
        items = [dataset[0], dataset[1]]
        images, mask, targets = resize(items)
        for b, target in enumerate(targets):
            h, w = target["size"].tolist()
            h0, w0 = items[b][0].shape[-2:]
            assert abs(w - h * w0 / h0) <= 1 or abs(h - w * h0 / w0) <= 1, "the aspect ratio is kept"
            assert not mask[b, :h, :w].any() and mask[b].sum() == mask[b].numel() - h * w
            slot = images[b].clone()
            slot[:, mask[b]] = 1.0  # padding reads as white here: no object's colour
            check_item(slot, target, dataset, f"batch slot {b}, draw {draw}")


def test_onnx_detector_pads_a_small_batch_bottom_right_and_marks_it_in_the_mask():
    """OnnxDetector pads a batch below the graph's minimum side as collate_fn pads: rows at the bottom, columns at
    the right, each by its own amount, the mask True there (here with a stand-in for the onnxruntime session)."""
    feeds = []

    class Session:
        def run(self, names, inputs):
            feeds.append(inputs)
            return np.zeros((2, 3, 5), np.float32), np.zeros((2, 3, 4), np.float32)

    detector = OnnxDetector.__new__(OnnxDetector)
    detector.session, detector.min_side = Session(), 65
    for h, w in ((41, 97), (97, 41), (31, 47), (65, 65)):
        images = torch.rand(2, 3, h, w) + 1  # no pixel is 0, so the padding shows
        mask = torch.zeros(2, h, w, dtype=torch.bool)
        mask[1, h - 5:] = True  # image 1 is already padded at the bottom
        out = detector(images, mask)
        assert out["pred_logits"].shape == (2, 3, 5) and out["pred_boxes"].shape == (2, 3, 4)
        fed_images, fed_mask = feeds[-1]["images"], feeds[-1]["mask"]
        H, W = max(h, 65), max(w, 65)
        assert fed_images.shape == (2, 3, H, W) and fed_mask.shape == (2, H, W), (h, w)
        assert np.array_equal(fed_images[:, :, :h, :w], images.numpy()) and (fed_images[:, :, h:] == 0).all()
        assert (fed_images[:, :, :, w:] == 0).all()
        expected = np.ones((2, H, W), dtype=bool)
        expected[:, :h, :w] = mask.numpy()
        assert np.array_equal(fed_mask, expected), (h, w)


# ----------------------------------------------------------------------------------------------------------
# Photos in all eight EXIF orientations
# ----------------------------------------------------------------------------------------------------------
# Where each EXIF orientation puts the stored rows and columns on the display, from the EXIF specification's table
# (1: as stored; 2: mirrored; 3: turned 180; 4: flipped; 5: transposed; 6: turned 90 clockwise; 7: transverse;
# 8: turned 90 counter-clockwise), written with numpy, not with the library the code reads photos with.
DISPLAY = {1: lambda s: s, 2: lambda s: s[:, ::-1], 3: lambda s: s[::-1, ::-1], 4: lambda s: s[::-1],
           5: lambda s: s.transpose(1, 0, 2), 6: lambda s: np.rot90(s, -1), 7: lambda s: np.rot90(s, -1)[::-1],
           8: lambda s: np.rot90(s, 1)}
STORE = {1: lambda d: d, 2: lambda d: d[:, ::-1], 3: lambda d: d[::-1, ::-1], 4: lambda d: d[::-1],
         5: lambda d: d.transpose(1, 0, 2), 6: lambda d: np.rot90(d, 1), 7: lambda d: np.rot90(d[::-1], 1),
         8: lambda d: np.rot90(d, -1)}
EXIF_SIZE = (97, 61)  # (w, h) of every photo as displayed: the first painted photo


@pytest.fixture(scope="module")
def exif_set(tmp_path_factory):
    """The painted photo stored in each of the eight orientations (JPEG, EXIF tag set), so that each displays as
    painted, annotated as displayed; returns (folder, ann_file, JSON dict)."""
    root = tmp_path_factory.mktemp("exif")
    os.makedirs(root / "img")
    shown = np.asarray(painted(EXIF_SIZE, PHOTOS[EXIF_SIZE]))  # (h, w, 3)
    ids = {c["name"]: c["id"] for c in CATEGORIES}
    images, annotations = [], []
    for orientation in range(1, 9):
        stored = np.ascontiguousarray(STORE[orientation](shown))
        assert np.array_equal(DISPLAY[orientation](stored), shown), orientation
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(stored).save(root / "img" / f"o{orientation}.jpg", exif=exif, quality=95, subsampling=0)
        images.append({"id": orientation, "file_name": f"o{orientation}.jpg", "width": EXIF_SIZE[0],
                       "height": EXIF_SIZE[1]})
        for name, _, bbox in PHOTOS[EXIF_SIZE]:
            annotations.append({"id": len(annotations) + 1, "image_id": orientation, "category_id": ids[name],
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
    coco = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    with open(root / "ann.json", "w") as f:
        json.dump(coco, f)
    return str(root / "img"), str(root / "ann.json"), coco


def test_every_exif_orientation_is_read_as_displayed_with_its_size_from_the_header(exif_set):
    folder, _, _ = exif_set
    for orientation in range(1, 9):
        path = os.path.join(folder, f"o{orientation}.jpg")
        assert data.displayed_size(path) == (EXIF_SIZE, orientation)
        image = data.load_rgb(path)
        assert image.size == EXIF_SIZE, orientation
        check_pil(image, pil_target(PHOTOS[EXIF_SIZE]), PHOTOS[EXIF_SIZE], f"orientation {orientation}")


def test_boxes_of_a_photo_annotated_as_displayed_lie_on_its_pixels_in_every_exif_orientation(exif_set):
    folder, ann_file, _ = exif_set
    dataset = data.CocoDetection(folder, ann_file)  # the header check passes for all eight
    for index in range(8):
        image, target = dataset[index]
        assert tuple(target["orig_size"].tolist()) == (EXIF_SIZE[1], EXIF_SIZE[0])
        check_item(image, target, dataset, f"orientation {dataset.ids[index]}", normalized=False)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_json_that_gives_a_photos_stored_size_is_an_error_naming_its_orientation(exif_set, tmp_path, orientation):
    """Width and height swapped in the JSON: for a turned photo (5-8) that is its stored size, and the error says
    so; for the others a plain size mismatch."""
    folder, _, coco = exif_set
    image = dict(next(i for i in coco["images"] if i["id"] == orientation), width=EXIF_SIZE[1], height=EXIF_SIZE[0])
    with open(tmp_path / "ann.json", "w") as f:
        json.dump(dict(coco, images=[image], annotations=[]), f)
    with pytest.raises(data.InputError, match="is 97x61 but") as err:
        data.CocoDetection(folder, str(tmp_path / "ann.json"))
    assert (f"EXIF orientation {orientation}" in str(err.value)) == (orientation >= 5), str(err.value)


def test_detections_on_a_folder_of_turned_photos_are_in_displayed_pixels(exif_set, tmp_path):
    """--images: the perfect predictions of every orientation, through the val resize (odd, non-square sizes),
    padded batches of 3 and the post-processing, come back as the boxes annotated on the displayed photo."""
    folder, _, _ = exif_set
    names = sorted(os.listdir(folder))
    transforms = data.make_transforms("val", max_size=77, eval_size=45)
    folder_set = evaluate.ImageFolder(folder, names, transforms)
    w, h = EXIF_SIZE
    objects = PHOTOS[EXIF_SIZE]
    boxes = torch.tensor([[(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]
                          for _, (x, y, x1, y1), _ in objects for bw, bh in [(x1 - x, y1 - y)]])
    oracle = OracleDetector([(folder_set[i][0], boxes, torch.arange(3)) for i in range(len(names))], num_classes=3)
    results, _ = evaluate.detect_folder(oracle, PostProcess(), folder, class_names=[n for n, *_ in objects],
                                        cat_ids=[1, 2, 3], device="cpu", transforms=transforms,
                                        output_dir=str(tmp_path / "out"), batch_size=3)
    assert oracle.seen == [1] * 8
    for name in names:
        found = {r["category_name"]: r["bbox"] for r in results if r["file_name"] == name and r["score"] > 0.5}
        assert found == {n: pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-3)
                         for n, (x0, y0, x1, y1), _ in objects}, name


# ----------------------------------------------------------------------------------------------------------
# Perfect predictions come back in file pixels
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shapes", [False, True], ids=["coco val", "shapes val"])
def test_perfect_predictions_of_padded_batches_come_back_as_the_annotated_boxes(photo_set, shapes):
    """Val pipeline (resize to odd sizes), a padded batch of a landscape and a portrait photo, predictions relative
    to each unpadded image, PostProcess by each original size, COCO xywh: the annotated boxes (clipped to the
    image, as the detector is trained to predict them) come back to the thousandth of a pixel."""
    transforms = data.dataset_transforms("val", shapes=shapes, min_size=45, max_size=77)
    dataset = data.CocoDetection(*photo_set, transforms=transforms)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_fn)
    _, results = evaluate.evaluate(oracle_for(dataset), PostProcess(), loader, dataset, "cpu")
    for image_id, (size, objects) in enumerate(PHOTOS.items(), start=1):
        found = {r["category_name"]: r["bbox"] for r in results if r["image_id"] == image_id and r["score"] > 0.5}
        assert found == {n: pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-3)
                         for n, (x0, y0, x1, y1), _ in objects}, size
