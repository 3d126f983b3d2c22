"""Tests for data.py: shapes generation, the COCO-format dataset contract, transforms, collate, OV-COCO split.
CPU, tiny sizes, tmp_path only. (build_dataset, which reads the command line, is tested in test_build.py.)"""

import json
import os
import random
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision.ops import box_iou

import data
from conftest import COCO_80, COCO_IDS, ann, write_coco

OV_COCO_LEFT_OUT = {
    "traffic light", "fire hydrant", "stop sign", "parking meter", "sports ball", "baseball bat",
    "baseball glove", "tennis racket", "wine glass", "hot dog", "potted plant", "dining table", "cell phone",
    "teddy bear", "hair drier",
}
TINY_SHAPES = dict(num_train=3, num_val=1, min_size=48, max_size=64, max_objects=3)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return data.make_shapes(str(root), num_train=12, num_val=3, seed=0)


# ---------------------------------------------------------------------------------------------- shapes

def read_tree(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_shapes_same_arguments_give_identical_bytes_and_other_seed_differs(tmp_path):
    first = data.make_shapes(str(tmp_path / "a"), seed=3, **TINY_SHAPES)
    second = data.make_shapes(str(tmp_path / "b"), seed=3, **TINY_SHAPES)
    other = data.make_shapes(str(tmp_path / "c"), seed=4, **TINY_SHAPES)
    tree_a = read_tree(os.path.dirname(first["train_images"]))
    tree_b = read_tree(os.path.dirname(second["train_images"]))
    tree_c = read_tree(os.path.dirname(other["train_images"]))
    assert len(tree_a) == 3 + 1 + 2
    assert tree_a == tree_b
    assert tree_a["annotations/instances_train.json"] != tree_c["annotations/instances_train.json"]
    assert tree_a["train/000001.png"] != tree_c["train/000001.png"]


def test_shapes_is_a_valid_coco_set(shapes):
    for split, count in (("train", 12), ("val", 3)):
        coco = COCO(shapes[f"{split}_json"])
        assert len(coco.getImgIds()) == count
        for img in coco.imgs.values():
            low, high = data.SHAPES_DEFAULTS["min_size"], data.SHAPES_DEFAULTS["max_size"]
            assert low <= img["width"] <= high and low <= img["height"] <= high
            with Image.open(os.path.join(shapes[f"{split}_images"], img["file_name"])) as f:
                assert f.size == (img["width"], img["height"])
            boxes = [a["bbox"] for a in coco.imgToAnns[img["id"]]]
            assert 1 <= len(boxes) <= 6
            for x, y, w, h in boxes:
                assert x >= 0 and y >= 0 and w > 0 and h > 0
                assert x + w <= img["width"] and y + h <= img["height"]
    coco = COCO(shapes["train_json"])
    assert any(img["width"] != img["height"] for img in coco.imgs.values())


def test_shapes_categories_are_plain_english(shapes):
    coco = COCO(shapes["train_json"])
    names = [c["name"] for c in coco.loadCats(coco.getCatIds())]
    assert coco.getCatIds() == list(range(1, 9))
    assert len(set(names)) == 8
    assert all(re.fullmatch(r"[a-z]+ [a-z]+", n) for n in names)
    assert "red circle" in names and "blue triangle" in names


def test_shapes_has_small_medium_large_and_overlapping_objects(shapes):
    coco = COCO(shapes["train_json"])
    areas = np.array([a["area"] for a in coco.anns.values()])
    assert (areas < 32 ** 2).any()
    assert ((areas >= 32 ** 2) & (areas < 96 ** 2)).any()
    assert (areas >= 96 ** 2).any()
    overlapping = 0
    for img_id in coco.getImgIds():
        xywh = torch.tensor([a["bbox"] for a in coco.imgToAnns[img_id]], dtype=torch.float32)
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        iou = box_iou(xyxy, xyxy)
        overlapping += int((iou.triu(diagonal=1) > 0).sum())
    assert overlapping > 0


def test_shapes_annotated_objects_stay_visible(shapes):
    """Objects hidden beyond MAX_OCCLUDED are not annotated: every annotated box shows its own fill colour
    on at least 30% of its shape (a star, the thinnest form, fills about 36% of its box)."""
    coco = COCO(shapes["train_json"])
    fills = {i + 1: np.array(fill) for i, (_, _, fill) in enumerate(data.SHAPES_CATEGORIES)}
    for img in coco.imgs.values():
        with Image.open(os.path.join(shapes["train_images"], img["file_name"])) as f:
            pixels = np.asarray(f.convert("RGB")).astype(np.int64)
        for a in coco.imgToAnns[img["id"]]:
            x, y, w, h = a["bbox"]
            region = pixels[y:y + h, x:x + w]
            own = (np.abs(region - fills[a["category_id"]]).max(axis=-1) <= 12).sum()
            assert own >= 0.3 * 0.36 * w * h, (img["file_name"], a)


def test_shapes_show_no_unannotated_object(shapes):
    """Objects too hidden to annotate are not painted either, and shapes of one colour never overlap: every
    pixel in a fill colour lies inside an annotated box of that colour's category."""
    coco = COCO(shapes["train_json"])
    fills = {i + 1: np.array(fill) for i, (_, _, fill) in enumerate(data.SHAPES_CATEGORIES)}
    for img in coco.imgs.values():
        with Image.open(os.path.join(shapes["train_images"], img["file_name"])) as f:
            pixels = np.asarray(f.convert("RGB")).astype(np.int64)
        for category_id, fill in fills.items():
            stray = np.abs(pixels - fill).max(axis=-1) <= 12  # (H, W)
            for a in coco.imgToAnns[img["id"]]:
                if a["category_id"] == category_id:
                    x, y, w, h = a["bbox"]
                    stray[y:y + h, x:x + w] = False
            assert not stray.any(), (img["file_name"], category_id, int(stray.sum()))


def test_shapes_of_one_colour_never_overlap():
    """Crowded tiny images: two squares of one category never intersect (a square fills its box, so box
    overlap is shape overlap), while squares of different categories do."""
    squares = [i for i, (_, form, _) in enumerate(data.SHAPES_CATEGORIES) if form == "square"]
    same = different = 0
    for seed in range(60):
        _, objects = data._shapes_image(np.random.default_rng(seed), min_size=64, max_size=72, max_objects=12)
        boxes = [(c, torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32))
                 for c, (x, y, w, h) in objects if c in squares]
        for i, (ci, bi) in enumerate(boxes):
            for cj, bj in boxes[i + 1:]:
                hit = bool(box_iou(bi, bj) > 0)
                same += hit and ci == cj
                different += hit and ci != cj
    assert same == 0 and different > 0


def test_shapes_set_is_reused_and_new_arguments_get_a_new_folder(tmp_path, monkeypatch):
    paths = data.make_shapes(str(tmp_path), **TINY_SHAPES)
    stamp = os.stat(paths["train_json"]).st_mtime_ns
    png = os.path.join(paths["train_images"], "000001.png")
    png_stamp = os.stat(png).st_mtime_ns
    with monkeypatch.context() as m:
        m.setattr(data, "_write_shapes_split", lambda *a, **k: pytest.fail("a finished set was regenerated"))
        assert data.make_shapes(str(tmp_path), **TINY_SHAPES) == paths
    assert os.stat(paths["train_json"]).st_mtime_ns == stamp
    assert os.stat(png).st_mtime_ns == png_stamp
    assert os.listdir(tmp_path) == [os.path.basename(os.path.dirname(paths["train_images"]))]
    other = data.make_shapes(str(tmp_path), **{**TINY_SHAPES, "num_train": 2})
    assert other["train_json"] != paths["train_json"]
    assert len(os.listdir(other["train_images"])) == 2
    assert len(os.listdir(tmp_path)) == 2


@pytest.mark.parametrize("change", [dict(num_train=4), dict(num_val=2), dict(seed=1), dict(min_size=50),
                                    dict(max_size=70), dict(max_objects=2), dict(version=data.SHAPES_VERSION + 1)],
                         ids=lambda change: next(iter(change)))
def test_every_argument_of_a_shapes_set_is_in_its_folder_name(change, tmp_path, monkeypatch):
    """A set generated for one (arguments, drawing version) is never served for another: each one changed alone
    generates a set of its own, in a folder of its own, from exactly the changed arguments."""
    calls = []

    def write_split(folder, split_code, **kwargs):
        os.makedirs(folder)
        calls.append(kwargs | {"version": data.SHAPES_VERSION})
        return {"images": [], "annotations": [], "categories": []}

    monkeypatch.setattr(data, "_write_shapes_split", write_split)
    first = data.make_shapes(str(tmp_path), **TINY_SHAPES)
    change = dict(change)
    if "version" in change:
        monkeypatch.setattr(data, "SHAPES_VERSION", change["version"])
    other = data.make_shapes(str(tmp_path), **{**TINY_SHAPES, **{k: v for k, v in change.items() if k != "version"}})
    assert os.path.dirname(other["train_json"]) != os.path.dirname(first["train_json"])
    assert len(calls) == 4, "the changed arguments were served the first set"
    expected = {"seed": 0, **TINY_SHAPES, "version": data.SHAPES_VERSION, **change}
    split_sizes = {"train": expected.pop("num_train"), "val": expected.pop("num_val")}
    assert calls[2:] == [dict(expected, num_images=n) for n in split_sizes.values()]


def test_interrupted_shapes_generation_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(folder, *args, **kwargs):
        os.makedirs(folder)
        Image.new("RGB", (8, 8)).save(os.path.join(folder, "000001.png"))
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_write_shapes_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.make_shapes(str(tmp_path), **TINY_SHAPES)
    assert os.listdir(tmp_path) == []


def test_publish_keeps_a_set_another_process_finished_first(tmp_path):
    final, late = tmp_path / "set", tmp_path / ".set.tmp"
    for folder in (final, late):
        os.makedirs(folder)
        (folder / "owner.txt").write_text(folder.name)
    data._publish(str(late), str(final))
    assert (final / "owner.txt").read_text() == "set"
    with pytest.raises(OSError):
        data._publish(str(tmp_path / "never-written"), str(tmp_path / "other"))


def test_shapes_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        data.make_shapes(str(tmp_path), num_train=0)
    with pytest.raises(ValueError, match="min_size"):
        data.make_shapes(str(tmp_path), min_size=300, max_size=200)
    with pytest.raises(ValueError, match="max_objects"):
        data.make_shapes(str(tmp_path), max_objects=0)
    assert os.listdir(tmp_path) == []


def test_item_contract_known_answer(small_coco):
    ds = data.CocoDetection(*small_coco)
    assert ds.cat_ids == [3, 7] and ds.cat_names == ["cat", "dog"] and ds.label_of == {3: 0, 7: 1}
    assert ds.ids == [5] and len(ds) == 1
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 50, 100)
    assert target["boxes"].dtype == torch.float32
    # Annotations are ordered as in the file: dog [10, 20, 30, 10] then cat covering the whole image.
    assert torch.allclose(target["boxes"], torch.tensor([[0.25, 0.5, 0.3, 0.2], [0.5, 0.5, 1.0, 1.0]]))
    assert target["labels"].tolist() == [1, 0] and target["labels"].dtype == torch.int64
    assert target["image_id"].dtype == torch.int64 and target["image_id"].ndim == 0 and int(target["image_id"]) == 5
    assert target["orig_size"].tolist() == [50, 100] and target["size"].tolist() == [50, 100]
    assert target["area"].tolist() == [300.0, 5000.0] and target["iscrowd"].tolist() == [0, 0]


def test_item_contract_on_shapes_with_train_transforms(shapes):
    ds = data.CocoDetection(shapes["train_images"], shapes["train_json"],
                            transforms=data.make_transforms("train", scales=(128, 160), max_size=200,
                                                            crop=(64, 128), crop_resize=(140, 160)))
    random.seed(0)
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.ndim == 3 and image.shape[0] == 3 and image.dtype == torch.float32
        assert target["size"].tolist() == list(image.shape[1:])
        assert max(image.shape[1:]) <= 200
        boxes = target["boxes"]
        assert boxes.shape == (len(target["labels"]), 4)
        assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > 0).all()
        assert ((boxes[:, :2] - boxes[:, 2:] / 2) >= -1e-6).all()
        assert ((boxes[:, :2] + boxes[:, 2:] / 2) <= 1 + 1e-6).all()
        assert ((target["labels"] >= 0) & (target["labels"] < 8)).all()


def test_crowd_excluded_and_empty_boxes_dropped_with_one_warning(tmp_path):
    images = [{"id": 1, "file_name": "1.png", "width": 40, "height": 30},
              {"id": 2, "file_name": "2.png", "width": 40, "height": 30}]
    anns = [ann(1, 1, 1, [5, 5, 10, 10]),
            ann(2, 1, 1, [0, 0, 40, 30], iscrowd=1),
            ann(3, 1, 1, [45, 5, 10, 10]),   # wholly right of the image
            ann(4, 2, 1, [5, 5, 0, 10]),     # zero width
            ann(5, 2, 1, [30, 20, 20, 20])]  # partly outside: clipped, kept
    folder, ann_file = write_coco(tmp_path / "img", tmp_path / "ann.json", images, anns, [{"id": 1, "name": "x"}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.CocoDetection(folder, ann_file)
        targets = [ds[i][1] for i in range(len(ds))]
    assert len(caught) == 1 and "2 boxes" in str(caught[0].message) and ann_file in str(caught[0].message)
    assert ds.num_dropped == 2
    assert len(targets[0]["boxes"]) == 1 and len(targets[1]["boxes"]) == 1
    assert torch.allclose(targets[1]["boxes"], torch.tensor([[35 / 40, 25 / 30, 10 / 40, 10 / 30]]))
    assert 2 in ds.coco.anns, "crowd regions stay in the evaluation ground truth"


def test_no_warning_when_nothing_is_dropped(small_coco):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.CocoDetection(*small_coco)


def test_image_without_annotations_has_empty_target(tmp_path):
    images = [{"id": 1, "file_name": "1.png", "width": 20, "height": 10}]
    folder, ann_file = write_coco(tmp_path / "img", tmp_path / "ann.json", images, [], [{"id": 1, "name": "x"}])
    _, target = data.CocoDetection(folder, ann_file, transforms=data.make_transforms("val", eval_size=20))[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["size"].tolist() == [20, 40]


def test_keep_cat_names_filters_targets_not_the_class_list(tmp_path):
    images = [{"id": 1, "file_name": "1.png", "width": 40, "height": 40}]
    anns = [ann(1, 1, 1, [0, 0, 10, 10]), ann(2, 1, 5, [10, 10, 10, 10]), ann(3, 1, 5, [20, 20, 10, 10])]
    cats = [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]
    folder, ann_file = write_coco(tmp_path / "img", tmp_path / "ann.json", images, anns, cats)
    ds = data.CocoDetection(folder, ann_file, keep_cat_names=["airplane"])
    assert ds.cat_names == ["person", "airplane"]
    assert ds[0][1]["labels"].tolist() == [1, 1]
    assert sorted(ds.coco.anns) == [2, 3]
    with pytest.raises(ValueError, match="giraffe"):
        data.CocoDetection(folder, ann_file, keep_cat_names=["giraffe"])



def test_image_size_disagreeing_with_json_is_an_error(tmp_path):
    images = [{"id": 1, "file_name": "1.png", "width": 20, "height": 10}]
    folder, ann_file = write_coco(tmp_path / "img", tmp_path / "ann.json", images, [], [{"id": 1, "name": "x"}])
    Image.new("RGB", (11, 10)).save(os.path.join(folder, "1.png"))
    with pytest.raises(ValueError, match=r"1\.png is 11x10"):
        data.CocoDetection(folder, ann_file)[0]


# ---------------------------------------------------------------------------------------------- errors

def test_missing_image_folder(small_coco, tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.CocoDetection(missing, small_coco[1])


def test_missing_annotation_file(small_coco, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        data.CocoDetection(small_coco[0], str(tmp_path / "missing.json"))


def test_malformed_json(small_coco, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        data.CocoDetection(small_coco[0], str(bad))
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="bad.json"):
        data.CocoDetection(small_coco[0], str(bad))


def test_json_without_a_coco_section(small_coco, tmp_path):
    bad = tmp_path / "partial.json"
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match=r"partial\.json lacks \['categories'\]"):
        data.CocoDetection(small_coco[0], str(bad))


@pytest.mark.parametrize("category", [{"id": 42}, {"id": 42, "name": ""}, {"id": 42, "name": "  "}])
def test_category_without_a_name(small_coco, tmp_path, category):
    bad = tmp_path / "noname.json"
    bad.write_text(json.dumps({"images": [], "annotations": [], "categories": [category]}))
    with pytest.raises(ValueError, match="category id 42 has no name"):
        data.CocoDetection(small_coco[0], str(bad))


def test_annotation_with_unknown_category(small_coco, tmp_path):
    bad = tmp_path / "unknown.json"
    bad.write_text(json.dumps({"images": [], "annotations": [ann(17, 1, 9, [0, 0, 1, 1])],
                               "categories": [{"id": 1, "name": "x"}]}))
    with pytest.raises(ValueError, match="annotation 17 has category_id 9"):
        data.CocoDetection(small_coco[0], str(bad))


# A JSON as editors save it, and as they may save it wrongly; the category name holds a non-ASCII letter.
BRULEE = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "crème brûlée"}]}


@pytest.mark.parametrize("encoding, ascii, error", [
    ("utf-8", False, None), ("utf-8-sig", False, None),
    ("latin-1", False, r"is not UTF-8 \(with or without a byte-order mark\) text: byte 0xe8 at offset 70"),
    ("utf-16", False, "is not UTF-8 .* byte 0xff at offset 0"),
    ("utf-16-le", True, "is not UTF-8 .* it holds NUL bytes"),  # ASCII letters: valid UTF-8 but for the NULs
])
def test_annotation_files_are_utf8_with_or_without_a_byte_order_mark(encoding, ascii, error, small_coco, tmp_path):
    path = tmp_path / f"{encoding}.json"
    path.write_bytes(json.dumps(BRULEE, ensure_ascii=ascii).encode(encoding))
    if error is None:
        assert data.CocoDetection(small_coco[0], str(path)).cat_names == ["crème brûlée"]
    else:
        with pytest.raises(ValueError, match=f"annotation file {re.escape(str(path))} {error}"):
            data.CocoDetection(small_coco[0], str(path))


@pytest.mark.parametrize("annotations, error", [
    ([ann(4, 5, 3, [0, 0, 5, 5]), ann(4, 5, 7, [1, 1, 5, 5])], "annotation id 4 is used by more than one annotation"),
    ([ann(4, 5, 3, [0, 0, 5, 5]), ann(4, 5, 3, [1, 1, 5, 5], iscrowd=1)], "annotation id 4 is used by more than one"),
    ([{k: v for k, v in ann(4, 5, 3, [0, 0, 5, 5]).items() if k != "id"}],
     "annotation {.* has no 'id', expected a unique integer"),
    ([ann("4", 5, 3, [0, 0, 5, 5])], "annotation '4' has id '4' \\(a str\\), expected an integer"),
    ([ann(4.0, 5, 3, [0, 0, 5, 5])], "annotation 4.0 has id 4.0 \\(a float\\)"),
    ([ann(True, 5, 3, [0, 0, 5, 5])], "annotation True has id True \\(a bool\\)"),
    ([ann(4, 5.0, 3, [0, 0, 5, 5])], "annotation 4 has image_id 5.0 \\(a float\\), expected an integer"),
    ([ann(4, 5, "3", [0, 0, 5, 5])], "annotation 4 has category_id '3' \\(a str\\), expected an integer"),
], ids=["twice", "twice, one crowd", "missing", "string", "float", "boolean", "float image_id",
        "string category_id"])
def test_every_annotation_has_a_unique_integer_id(annotations, error, small_coco, tmp_path):
    """pycocotools indexes annotations by id: a repeated one kept one box twice and lost the other (wrong AP), a
    missing one ended in its KeyError. Each is named with the file, whichever category it has (held out too)."""
    path = tmp_path / "ids.json"
    images = [{"id": 5, "file_name": "a.png", "width": 100, "height": 50}]
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]}))
    for dropped in ((), ["cat"]):
        with pytest.raises(ValueError, match=f"annotation file {re.escape(str(path))}: {error}"):
            data.CocoDetection(small_coco[0], str(path), drop_cat_names=dropped)


# ---------------------------------------------------------------------------------------------- transforms

def test_hflip_known_answer():
    image = Image.new("RGB", (100, 50))
    image.putpixel((10, 20), (255, 0, 0))
    target = {"boxes": torch.tensor([[10.0, 20.0, 40.0, 30.0]])}
    flipped, out = data.hflip(image, target)
    assert out["boxes"].tolist() == [[60.0, 20.0, 90.0, 30.0]]
    assert flipped.getpixel((89, 20)) == (255, 0, 0)
    assert target["boxes"].tolist() == [[10.0, 20.0, 40.0, 30.0]], "the input target is not modified"
    assert data.RandomHorizontalFlip(p=0.0)(image, target)[1]["boxes"].tolist() == [[10.0, 20.0, 40.0, 30.0]]
    assert data.RandomHorizontalFlip(p=1.0)(image, target)[1]["boxes"].tolist() == [[60.0, 20.0, 90.0, 30.0]]


def test_resized_size_keeps_aspect_and_caps_the_longer_side():
    assert data.resized_size(200, 100, 80) == (80, 160)
    assert data.resized_size(100, 200, 80) == (160, 80)
    assert data.resized_size(200, 100, 80, max_size=120) == (60, 120)
    assert data.resized_size(640, 480, 800, max_size=1333) == (800, 1066)
    assert data.resized_size(50, 50, 50) == (50, 50)


def test_resized_size_never_exceeds_max_size():
    """Over a grid of sizes: the longer side stays <= max_size (rounding the lowered shorter side, as the
    official code does, overshoots by a pixel for e.g. 20x55 -> 151 > 150), and the aspect ratio is kept
    to within a pixel."""
    for w in range(20, 400, 13):
        for h in range(20, 400, 11):
            for size in (48, 64, 100):
                for max_size in (100, 133, 150):
                    new_h, new_w = data.resized_size(w, h, size, max_size)
                    assert max(new_h, new_w) <= max_size, (w, h, size, max_size)
                    if max(w, h) / min(w, h) * size <= max_size:
                        assert min(new_h, new_w) == size
                    assert abs(new_w - new_h * w / h) <= 1 or abs(new_h - new_w * h / w) <= 1


def test_resize_scales_boxes_and_area():
    image = Image.new("RGB", (200, 100))
    target = {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "area": torch.tensor([1600.0])}
    out_image, out = data.resize(image, target, 50)
    assert out_image.size == (100, 50)
    assert out["boxes"].tolist() == [[10.0, 5.0, 30.0, 25.0]]
    assert out["area"].tolist() == [400.0]
    random.seed(1)
    for _ in range(10):
        img, _ = data.RandomResize((48, 64, 80, 96), max_size=150)(Image.new("RGB", (97, 41)), target)
        assert max(img.size) <= 150
        assert abs(img.size[0] / img.size[1] - 97 / 41) < 0.05


def test_resize_scales_x_and_y_by_their_own_ratios():
    """7x3 to shorter side 4 gives 9x4 (truncated): x scales by 9/7, y by 4/3. A box covering the image
    covers the resized image."""
    target = {"boxes": torch.tensor([[0.0, 0.0, 7.0, 3.0], [0.0, 1.5, 3.5, 3.0]]), "area": torch.tensor([21.0, 5.25])}
    out_image, out = data.resize(Image.new("RGB", (7, 3)), target, 4)
    assert out_image.size == (9, 4)
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 0.0, 9.0, 4.0], [0.0, 2.0, 4.5, 4.0]]))
    torch.testing.assert_close(out["area"], torch.tensor([36.0, 9.0]))


def test_crop_clips_boxes_and_drops_the_ones_outside():
    image = Image.new("RGB", (100, 100))
    target = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [70.0, 70.0, 90.0, 90.0], [40.0, 0.0, 60.0, 20.0]]),
              "labels": torch.tensor([0, 1, 2]), "area": torch.tensor([400.0, 400.0, 400.0]),
              "iscrowd": torch.zeros(3, dtype=torch.int64)}
    cropped, out = data.crop(image, target, top=20, left=0, height=50, width=50)
    assert cropped.size == (50, 50)
    assert out["boxes"].tolist() == [[10.0, 0.0, 30.0, 10.0]]
    assert out["labels"].tolist() == [0] and out["area"].tolist() == [200.0] and len(out["iscrowd"]) == 1


def test_random_size_crop_respects_its_range():
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "area": torch.zeros(0), "iscrowd": torch.zeros(0, dtype=torch.int64)}
    random.seed(2)
    for _ in range(10):
        img, _ = data.RandomSizeCrop(20, 40)(Image.new("RGB", (60, 30)), target)
        assert 20 <= img.size[0] <= 40 and 20 <= img.size[1] <= 30


def test_normalize_uses_imagenet_statistics():
    image = Image.new("RGB", (4, 3), (255, 0, 128))
    tensor, _ = data.Compose([data.ToTensor(), data.Normalize()])(image, {})
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert torch.allclose(tensor[:, 0, 0], torch.tensor(expected))


def test_make_transforms_pipelines():
    image = Image.new("RGB", (640, 480))
    target = {"boxes": torch.tensor([[0.0, 0.0, 640.0, 480.0]]), "labels": torch.tensor([0]),
              "area": torch.tensor([640.0 * 480]), "iscrowd": torch.tensor([0])}
    tensor, _ = data.make_transforms("val")(image, target)
    assert tensor.shape == (3, 800, 1066)
    assert data.make_transforms("val", eval_size=None)(image, target)[0].shape == (3, 480, 640)
    random.seed(0)
    for _ in range(4):
        tensor, out = data.make_transforms("train")(image, target)
        assert 480 <= min(tensor.shape[1:]) <= 800 and max(tensor.shape[1:]) <= 1333
        assert len(out["boxes"]) == 1
    without_target = data.make_transforms("val")(image, None)
    assert without_target[0].shape == (3, 800, 1066) and without_target[1] is None
    for _ in range(4):
        assert data.make_transforms("train", crop_resize=(500,))(image, None)[1] is None
    with pytest.raises(ValueError, match="test"):
        data.make_transforms("test")


# ---------------------------------------------------------------------------------------------- collate

def test_collate_pads_bottom_right_and_masks_exactly_the_padding():
    a = torch.rand(3, 4, 5) + 1
    b = torch.rand(3, 6, 3) + 1
    images, mask, targets = data.collate_fn([(a, {"k": 0}), (b, {"k": 1})])
    assert images.shape == (2, 3, 6, 5) and mask.shape == (2, 6, 5) and mask.dtype == torch.bool
    assert torch.equal(images[0, :, :4, :5], a) and torch.equal(images[1, :, :6, :3], b)
    expected = torch.ones(2, 6, 5, dtype=torch.bool)
    expected[0, :4, :5] = False
    expected[1, :6, :3] = False
    assert torch.equal(mask, expected)
    assert (images.sum(dim=1) == 0).equal(mask), "padding is zero and real pixels are non-zero here"
    assert [t["k"] for t in targets] == [0, 1]
    with pytest.raises(ValueError, match="empty batch"):
        data.collate_fn([])


# ---------------------------------------------------------------------------------------------- COCO's names

def test_the_names_of_a_released_coco_head_are_coco_2017s_in_id_order():
    """data.COCO_NAMES names the rows of the official heads; a typo or two swapped names would load those classes'
    rows into the wrong classes. COCO_80 is the test suite's own copy of COCO 2017's list."""
    assert data.COCO_NAMES == COCO_80
    assert [data.COCO_ROW_NAMES[i] for i in COCO_IDS] == list(COCO_80)
    assert [row for row, name in enumerate(data.COCO_ROW_NAMES) if name is None] == [
        0, 12, 26, 29, 30, 45, 66, 68, 69, 71, 83]


# ---------------------------------------------------------------------------------------------- OV-COCO

def test_ov_coco_split_is_the_48_17_ovr_cnn_split():
    base, novel = set(data.OV_COCO_BASE), set(data.OV_COCO_NOVEL)
    assert len(data.OV_COCO_BASE) == len(base) == 48
    assert len(data.OV_COCO_NOVEL) == len(novel) == 17
    assert not base & novel
    assert (base | novel) <= set(COCO_80)
    assert set(COCO_80) - base - novel == OV_COCO_LEFT_OUT
    assert novel == {"airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
                     "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors"}


def test_ov_coco_split_of_a_dataset():
    assert data.ov_coco_split(["dog", "traffic light", "person", "cat"]) == (["person"], ["dog", "cat"])
    with pytest.raises(ValueError, match="OV-COCO"):
        data.ov_coco_split(["red circle", "green square"])


def test_paper_sizes_at_800_and_scaled():
    at_800 = data.paper_sizes(800, 1333)
    assert at_800 == dict(scales=tuple(range(480, 801, 32)), max_size=1333, crop=(384, 600),
                          crop_resize=(400, 500, 600), eval_size=800), "Deformable DETR's values at 800"
    at_400 = data.paper_sizes(400, 666)
    assert at_400["scales"] == tuple(range(240, 401, 16)) and at_400["crop"] == (192, 300)
    assert at_400["crop_resize"] == (200, 250, 300) and (at_400["eval_size"], at_400["max_size"]) == (400, 666)


def test_an_exif_rotated_photo_is_read_as_displayed_with_its_boxes(tmp_path):
    """A square photo stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to display), annotated
    as displayed: the dataset gives the displayed pixels, so the box lies on the red square. (The size check
    cannot see a square photo's rotation.)"""
    stored = Image.new("RGB", (40, 40), (0, 0, 0))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # top-left when stored; top-right once turned clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    os.makedirs(tmp_path / "img")
    stored.save(tmp_path / "img" / "photo.jpg", exif=exif, quality=100)
    images = [{"id": 1, "file_name": "photo.jpg", "width": 40, "height": 40}]
    with open(tmp_path / "ann.json", "w") as f:
        json.dump({"images": images, "annotations": [ann(1, 1, 1, [30, 0, 10, 10])],
                   "categories": [{"id": 1, "name": "red square"}]}, f)
    image, target = data.CocoDetection(str(tmp_path / "img"), str(tmp_path / "ann.json"),
                                       transforms=data.ToTensor())[0]
    assert (target["boxes"][0] * 40).tolist() == [35, 5, 10, 10]  # cxcywh of the annotated box, in pixels
    inside = image[:, 1:9, 31:39]  # (3, 8, 8) inside the box, away from JPEG's blurred edges
    assert inside[0].min() > 0.8 and inside[1:].max() < 0.2, "the box must lie on the red square"


def test_labels_stay_with_their_boxes_when_the_json_interleaves_images(tmp_path):
    """Real exports interleave the annotations of different images (and crowd regions among them): every box
    must keep its own label, in any order of the JSON."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2, 3)]
    cats = [{"id": c, "name": n} for c, n in ((5, "cat"), (2, "dog"), (9, "emu"))]
    spec = [(3, 9, [60, 60, 30, 30]), (1, 2, [0, 0, 10, 10]), (2, 5, [5, 5, 20, 20]), (1, 9, [40, 40, 20, 10]),
            (3, 2, [0, 50, 10, 40]), (2, 2, [70, 10, 20, 20]), (1, 5, [80, 80, 15, 15]), (3, 5, [10, 10, 5, 5])]
    anns = [ann(k + 1, img, cat, box) for k, (img, cat, box) in enumerate(spec)]
    anns.insert(3, ann(99, 2, 9, [0, 0, 100, 100], iscrowd=1))
    folder, ann_file = write_coco(tmp_path / "img", tmp_path / "ann.json", images, anns, cats)
    ds = data.CocoDetection(folder, ann_file)  # no transforms: boxes are cxcywh of the 100x100 image
    label_name = dict(enumerate(ds.cat_names))
    for index, image_id in enumerate(ds.ids):
        _, target = ds[index]
        got = sorted((label_name[int(label)], [round(100 * v, 3) for v in box.tolist()])
                     for label, box in zip(target["labels"], target["boxes"]))
        want = sorted(({5: "cat", 2: "dog", 9: "emu"}[cat], [x + w / 2, y + h / 2, w, h])
                      for img, cat, (x, y, w, h) in spec if img == image_id)
        assert got == want, image_id


def test_grouped_batches_hold_one_group_each_and_every_index_once():
    groups = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]  # index -> group
    order = [3, 8, 0, 1, 10, 2, 5, 4, 9, 6, 7]
    batches = list(data.GroupedBatchSampler(order, groups, batch_size=2))
    # A batch as soon as a group holds two, in the sampler's order; 6 is left alone at the end and dropped.
    assert batches == [[3, 0], [8, 1], [10, 5], [2, 4], [9, 7]]
    assert len(data.GroupedBatchSampler(order, groups, batch_size=2)) == len(batches) == 11 // 2
    mixed = list(data.GroupedBatchSampler([0, 1, 2, 3, 4], [0, 1, 0, 1, 2], batch_size=2))
    assert mixed == [[0, 2], [1, 3]], "leftovers of different groups make mixed batches, a short one is dropped"
    leftovers = list(data.GroupedBatchSampler([0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 2], batch_size=4))
    assert leftovers == [[0, 3, 1, 4]] and len(data.GroupedBatchSampler(range(6), [0] * 6, 4)) == 1


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 20])
def test_grouped_evaluation_batches_keep_every_index(batch_size):
    """drop_last=False (evaluation): every index exactly once, the short batches at the end, len() = what comes."""
    groups = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]
    order = [3, 8, 0, 1, 10, 2, 5, 4, 9, 6, 7]
    sampler = data.GroupedBatchSampler(order, groups, batch_size=batch_size, drop_last=False)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(11)) and len(sampler) == len(batches)
    pure = 5 // batch_size + 6 // batch_size  # group 0 holds 5 indices, group 1 holds 6
    assert all(len({groups[i] for i in b}) == 1 for b in batches[:pure]), batches
    assert all(len(b) == batch_size for b in batches[:-1]), "only the last batch is short"


def test_batch_resize_gives_a_batch_one_scale_and_keeps_the_boxes():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    batch = [(torch.rand(3, h, w), {"boxes": boxes, "labels": torch.tensor([1]), "area": torch.tensor([80.0]),
                                   "size": torch.tensor([h, w])}) for h, w in ((40, 60), (50, 50), (30, 90))]
    random.seed(0)
    images, mask, targets = data.BatchResize([20, 24], max_size=48)(batch)
    sizes = [t["size"].tolist() for t in targets]
    side = min(sizes[0])
    assert side in (20, 24) and sizes[1] == [side, side], sizes
    assert max(sizes[2]) <= 48 and sizes[2][0] == min(side, 48 // 3), "the longer side capped at max_size"
    assert all(torch.equal(t["boxes"], boxes) for t in targets), "normalized boxes do not change with the scale"
    h, w = sizes[0]
    assert targets[0]["area"].item() == pytest.approx(80.0 * h * w / (40 * 60))
    assert images.shape[-2:] == (max(s[0] for s in sizes), max(s[1] for s in sizes))
    assert (~mask[0, :h, :w]).all() and mask[0].sum() == mask.shape[1] * mask.shape[2] - h * w


def test_aspect_groups_read_the_json_sizes(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": w, "height": h}
              for i, (w, h) in enumerate(((30, 20), (20, 30), (25, 25)), start=1)]
    folder, ann_file = write_coco(tmp_path / "img", tmp_path / "ann.json", images, [], [{"id": 1, "name": "x"}])
    assert data.CocoDetection(folder, ann_file).aspect_groups() == [1, 0, 1]
