"""Tests for open vocabulary on any dataset and any vocabulary at inference: train.py --novel-classes, evaluate.py
--classes / --classes-file / --label-embeddings (build.class_split, build.checkpoint_vocabulary, build.set_vocabulary,
label_dictionary's named label table and per-name encoding). CPU, the tiny `shapes` set with 'green square' and
'blue triangle' held out, and a label table from a file (torch.randn of a fixed generator), so every number is
deterministic."""
import contextlib
import io
import json
import os
import re
import shutil

import pytest
import torch
from pycocotools.coco import COCO

import build
import data
import evaluate
import train
from conftest import COCO_80, TINY, parse_args
from model import LabelEmbeddingClassifier

SHAPES = [name for name, _, _ in data.SHAPES_CATEGORIES]
# The tiny val set holds a green square (image 1), a red circle and a blue triangle (image 2): both held-out
# classes have boxes to find, and one base class does.
NOVEL = ["green square", "blue triangle"]
NEW = "magenta hexagon"  # a name no shapes image has: the label file holds a row for it too
WIDTH = 16


@pytest.fixture(scope="module")
def label_file(tmp_path_factory):
    """A named label table: the 8 shapes names and NEW, rows from a fixed generator."""
    names = list(reversed(SHAPES)) + [NEW]  # not in category order: rows are looked up by name
    table = torch.randn(len(names), WIDTH, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("labels") / "labels.pt"
    torch.save({"names": names, "embeddings": table}, path)
    return path, names, table


@pytest.fixture(scope="module")
def ov_run(cache, label_file, tmp_path_factory):
    """A few training steps through train.py's command line with two classes held out: (checkpoint, output)."""
    out = tmp_path_factory.mktemp("ov-run")
    argv = ["--data-path", str(cache / "shapes"), "--output-dir", str(out), *TINY, "--epochs", "1", "--max-steps",
            "2", "--method", "baseline", "--novel-classes", *NOVEL, "--label-embeddings", str(label_file[0])]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        train.cli(argv)
    return str(out / "checkpoint.pth"), buffer.getvalue()


@pytest.fixture(scope="module")
def val_images(cache, tmp_path_factory):
    """The tiny val set's two images in a folder of their own."""
    folder = tmp_path_factory.mktemp("images")
    for path in sorted((cache / "shapes").glob("shapes-*-n8-2-px64-96-o3/val/*.png")):
        shutil.copy(path, folder / path.name)
    assert len(os.listdir(folder)) == 2
    return folder


def run_cli(module, argv, capsys):
    """module.cli(argv) that must stop on bad input: (exit status, stderr lines)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        module.cli([str(a) for a in argv])
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


# ----------------------------------------------------------------------------------------------------------
# Training with held-out classes
# ----------------------------------------------------------------------------------------------------------
def test_novel_classes_leave_training_and_stay_in_evaluation(tiny_args):
    args = tiny_args("--novel-classes", *NOVEL)
    closed = tiny_args()
    train_set, val_set = build.build_dataset("train", args), build.build_dataset("val", args)
    assert train_set.cat_names == val_set.cat_names == SHAPES  # the head keeps a row for every class
    names = lambda ds: [ds.cat_names[k] for i in range(len(ds)) for k in ds[i][1]["labels"].tolist()]  # noqa: E731
    held_out = [n for n in names(build.build_dataset("train", closed)) if n in NOVEL]
    assert held_out, "the tiny train set must hold a novel box for this test to mean anything"
    assert sorted(names(train_set)) == sorted(n for n in names(build.build_dataset("train", closed)) if n not in NOVEL)
    assert sorted(names(val_set)) == sorted(names(build.build_dataset("val", closed)))
    assert build.class_split(args, SHAPES) == ([n for n in SHAPES if n not in NOVEL], [n for n in SHAPES if n in NOVEL])


def test_novel_rows_are_never_trained_as_positives_or_negatives(tiny_args, label_file):
    """The training loss and every gradient are the same whatever the novel classes' rows hold."""
    args = tiny_args("--novel-classes", *NOVEL, "--label-embeddings", label_file[0], "--dynql-betas", "0.5")
    torch.manual_seed(0)
    model, criterion, _ = build.build_model(args, SHAPES)
    heads = [h for h in model.class_embed if isinstance(h, LabelEmbeddingClassifier)]
    assert len(heads) == args.dec_layers
    dataset = build.build_dataset("train", args)
    images, mask, targets = data.collate_fn([dataset[i] for i in range(2)])
    novel = [SHAPES.index(n) for n in NOVEL]

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(1)  # DynQL's noised boxes
        losses = train.compute_losses(criterion, model.train()(images, mask, targets), targets)
        total = sum(losses.values())
        total.backward()
        return total.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    before, grads = loss_and_grads()
    with torch.no_grad():
        for head in heads:
            head.label_embeddings[novel] = torch.randn(len(novel), WIDTH)
        model.alignnet.f_cls[novel] = torch.randn(len(novel), WIDTH)
    after, grads_after = loss_and_grads()
    assert torch.equal(before, after)
    assert grads.keys() == grads_after.keys() and all(torch.equal(grads[k], grads_after[k]) for k in grads)
    # ... while a base class's row does move the loss.
    with torch.no_grad():
        for head in heads:
            head.label_embeddings[SHAPES.index("red circle")] = torch.randn(WIDTH)
    assert not torch.equal(before, loss_and_grads()[0])


@pytest.mark.parametrize("flags, expected", [
    (["--novel-classes", "green squre", "blue triangle"], ["'green squre'", "did you mean 'green square'", *SHAPES]),
    (["--novel-classes", *SHAPES], ["holds out all 8 categories", "at least one base category"]),
    (["--dataset", "ov-coco", "--novel-classes", "cat"], ["ov-coco holds out OVR-CNN's 17", "--dataset coco"]),
])
def test_bad_novel_classes_are_one_line(flags, expected, cache, tmp_path, capsys):
    argv = ["--data-path", cache / "shapes", "--output-dir", tmp_path, *TINY, "--epochs", "1", "--max-steps", "1",
            "--method", "baseline", "--clip-model", "ViT-S-32-alt", *flags]
    code, err = run_cli(train, argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert all(part in err[0] for part in expected), err[0]


def test_ov_coco_split_through_the_novel_classes_path():
    """ov-coco is COCO with OVR-CNN's novel classes: base = its 48 (not the 63 other COCO categories)."""
    ov = parse_args("--dataset", "ov-coco")
    assert build.class_split(ov, COCO_80) == data.ov_coco_split(COCO_80)
    coco = parse_args("--dataset", "coco", "--novel-classes", *data.OV_COCO_NOVEL)
    base, novel = build.class_split(coco, COCO_80)
    assert novel == data.ov_coco_split(COCO_80)[1] and len(base) == 63


# ----------------------------------------------------------------------------------------------------------
# Evaluation: novel / base / all
# ----------------------------------------------------------------------------------------------------------
def ground_truth_of(names, dataset):
    """Predictions {image_id: ...} that put one box on every ground-truth box of the categories `names`."""
    preds = {}
    for image_id in dataset.ids:
        anns = [a for a in dataset.coco.imgToAnns[image_id] if dataset.coco.cats[a["category_id"]]["name"] in names]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        labels = [dataset.label_of[a["category_id"]] for a in anns]
        preds[image_id] = {"scores": torch.full((len(anns),), 0.9), "labels": torch.tensor(labels, dtype=torch.long),
                           "boxes": boxes.float()}
    return preds


def test_training_and_evaluation_report_novel_base_all(ov_run, monkeypatch):
    ckpt, printed = ov_run
    assert "AP50 (Table 3)" in printed and "novel   base    all" in printed
    args = build.checkpoint_args(torch.load(ckpt, weights_only=False), {})
    dataset = build.build_dataset("val", args)

    def novel_only(model, postprocess, loader, device, per_layer=False):
        preds = ground_truth_of(NOVEL, dataset)
        return preds, [preds]
    monkeypatch.setattr(evaluate, "predict", novel_only)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        log = evaluate.main(["--resume", ckpt])
    # Found: the green square and the blue triangle (novel); missed: the red circle (base).
    assert log["ov_ap50"] == pytest.approx({"novel": 1.0, "base": 0.0, "all": 2 / 3})
    assert "novel   base    all" in buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Any vocabulary at inference
# ----------------------------------------------------------------------------------------------------------
def reference_scores(ckpt_path, label_file, images):
    """The model's own sigmoid scores (Q, K) and boxes (Q, 4) xywh in pixels of each image, with the whole label
    file as its dictionary in the file's row order: what every detection is checked against."""
    ckpt = torch.load(ckpt_path, weights_only=False)
    args = build.checkpoint_args(ckpt, {})
    model, _ = build.checkpoint_detector(ckpt, args, ckpt["classes"]["names"], ckpt_path, vocabulary=label_file[2])
    folder = evaluate.ImageFolder(images, sorted(os.listdir(images)), build.build_transforms("val", args))
    out = []
    with torch.no_grad():
        for index in range(len(folder)):
            batch, mask, targets = data.collate_fn([folder[index]])
            pred = model(batch, mask)
            h, w = targets[0]["orig_size"].tolist()
            cx, cy, bw, bh = (pred["pred_boxes"][0] * torch.tensor([w, h, w, h])).unbind(-1)  # (Q, 4) in pixels
            out.append((pred["pred_logits"][0].sigmoid(), torch.stack([cx - bw / 2, cy - bh / 2, bw, bh], -1)))
    return out


@pytest.mark.parametrize("names", [["white star", NEW, "blue triangle"], list(reversed(SHAPES))],
                         ids=["subset", "permutation"])
def test_images_with_classes_name_each_detection_by_the_row_that_scored_it(names, ov_run, label_file, val_images,
                                                                          tmp_path, monkeypatch):
    ckpt = ov_run[0]
    drawn = []
    monkeypatch.setattr(evaluate, "draw_detections", lambda image, pred, class_names, score_threshold:
                        drawn.append(list(class_names)) or image)
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("\n".join(names) + "\n\n")
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        log = evaluate.main(["--resume", ckpt, "--images", str(val_images), "--classes-file", str(classes_file),
                             "--label-embeddings", str(label_file[0]), "--output-dir", str(out), "--batch-size", "1"])
    assert log["classes"] == names and drawn == [names, names]  # the PNGs show the given names
    results = json.load(open(out / "results.json"))
    assert {r["category_name"] for r in results} <= set(names) and len(results) == 2 * min(100, 10 * len(names))
    reference = reference_scores(ckpt, label_file, val_images)
    file_names = label_file[1]
    for r in results:
        assert r["category_id"] == names.index(r["category_name"]) + 1
        scores, boxes = reference[r["image_id"]]
        query = (boxes - torch.tensor(r["bbox"])).abs().amax(-1).argmin()  # the query that made this box
        assert (boxes[query] - torch.tensor(r["bbox"])).abs().max() < 2e-3
        assert scores[query, file_names.index(r["category_name"])].item() == pytest.approx(r["score"], abs=2e-5)


def test_swapped_in_training_rows_score_exactly_as_the_checkpoints_own(ov_run, label_file, val_images):
    """The label file's rows, looked up by name and swapped in, give bitwise the logits of the checkpoint's own
    dictionary for its 8 classes."""
    ckpt_path = ov_run[0]
    ckpt = torch.load(ckpt_path, weights_only=False)
    args = build.checkpoint_args(ckpt, {})
    own, _ = build.checkpoint_detector(ckpt, args, SHAPES, ckpt_path)
    names, table = build.checkpoint_vocabulary(ckpt, args, None, label_file[0])
    assert names == label_file[1]
    swapped, _ = build.checkpoint_detector(ckpt, args, SHAPES, ckpt_path, vocabulary=table)
    image = evaluate.ImageFolder(val_images, sorted(os.listdir(val_images)), build.build_transforms("val", args))[1]
    batch, mask, _ = data.collate_fn([image])
    with torch.no_grad():
        expected, got = own(batch, mask)["pred_logits"], swapped(batch, mask)["pred_logits"]
    assert torch.equal(got[..., [names.index(n) for n in SHAPES]], expected)


def test_random_text_encoder_at_inference_is_the_one_that_built_the_training_table(tiny_args, tmp_path):
    """--clip-pretrained none: a training name typed at inference, among other names and in another order, gets
    exactly (bitwise) its training row, so it scores exactly as in training."""
    args = tiny_args("--novel-classes", *NOVEL)  # RN50, the demo's: a batch of names rounds differently there
    with contextlib.redirect_stdout(io.StringIO()):
        model, _, _ = build.build_model(args, SHAPES)
    ckpt = {"model": model.state_dict(), "args": vars(args), "classes": {"ids": list(range(1, 9)), "names": SHAPES}}
    # Three names: on x86 a batch of 3 text sequences rounds differently from a batch of 8 (4 happens not to).
    asked = ["white star", NEW, "green square"]
    with contextlib.redirect_stdout(io.StringIO()):
        names, table = build.checkpoint_vocabulary(ckpt, build.checkpoint_args(ckpt, {}), asked)
    build.set_vocabulary(model, table)
    rows = model.class_embed[0].label_embeddings
    trained = ckpt["model"]["class_embed.0.label_embeddings"]
    for k, name in enumerate(asked):
        if name in SHAPES:
            assert torch.equal(rows[k], trained[SHAPES.index(name)]), name
    assert not torch.equal(rows[1], rows[0])


def test_classes_on_a_val_set_with_other_categories_match_by_name(ov_run, label_file, cache, tmp_path, monkeypatch,
                                                                  capsys):
    """A COCO-format val set with other ids in another order, without 'white star', plus a category the checkpoint
    never saw: --classes (in yet another order) is matched by name. Predictions that put class k on every box of
    the k-th name but the red circles' find the others only if label k becomes that name's id in this val set."""
    ckpt = ov_run[0]
    source = json.load(open(next((cache / "shapes").glob("shapes-*-n8-2-px64-96-o3/annotations/instances_val.json"))))
    renamed = {c["id"]: 100 - c["id"] for c in source["categories"]}
    source["categories"] = [{"id": renamed[c["id"]], "name": c["name"]} for c in source["categories"]
                            if c["name"] != "white star"]  # no box of it in the tiny val set
    source["categories"].append({"id": 7, "name": NEW})
    for a in source["annotations"]:
        a["category_id"] = renamed[a["category_id"]]
    source["annotations"].append({"id": 99, "image_id": 1, "category_id": 7, "bbox": [1, 1, 9, 9], "area": 81,
                                  "iscrowd": 0})
    val_json = tmp_path / "val.json"
    val_json.write_text(json.dumps(source))
    images = next((cache / "shapes").glob("shapes-*-n8-2-px64-96-o3/val"))
    names = asked = [NEW, "red circle", "blue triangle", "green square"]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(val_json))

    def all_but_red_circles(model, postprocess, loader, device, per_layer=False):
        assert model.class_embed[0].label_embeddings.shape[0] == len(asked)
        preds = {}
        for image_id in gt.getImgIds():
            anns = [a for a in gt.imgToAnns[image_id] if gt.cats[a["category_id"]]["name"] in asked
                    and gt.cats[a["category_id"]]["name"] != "red circle"]
            preds[image_id] = {"scores": torch.full((len(anns),), 0.9),
                               "labels": torch.tensor([asked.index(gt.cats[a["category_id"]]["name"]) for a in anns]),
                               "boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in
                                                      (a["bbox"] for a in anns)]).reshape(-1, 4).float()}
        return preds, [preds]
    monkeypatch.setattr(evaluate, "predict", all_but_red_circles)
    flags = ["--resume", ckpt, "--dataset", "custom", "--val-json", val_json, "--val-images", images,
             "--label-embeddings", label_file[0], "--output", tmp_path / "results.json"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        log = evaluate.main([str(a) for a in [*flags, "--classes", *names]])
    assert log["coco_stats"][1] == pytest.approx(3 / 4)
    # Novel: the held-out classes and the name the checkpoint's dataset never had; base: the red circle.
    assert log["ov_ap50"] == pytest.approx({"novel": 1.0, "base": 0.0, "all": 3 / 4})
    records = json.load(open(tmp_path / "results.json"))
    ids = {c["name"]: c["id"] for c in source["categories"]}
    assert records and all(r["category_id"] == ids[r["category_name"]] for r in records)
    # A val category left out of --classes leaves the AP (a note says so); a name the val set lacks is an error.
    asked = names[:3]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        log = evaluate.main([str(a) for a in [*flags, "--classes", *asked]])
    note = next(line for line in buffer.getvalue().splitlines() if line.startswith("note:"))
    assert "the val set's other 5 are left out" in note and "green square" in note
    assert log["coco_stats"][1] == pytest.approx(2 / 3)
    code, err = run_cli(evaluate, [*flags, "--classes", *names, "white star"], capsys)
    assert code == 2 and len(err) == 1 and "'white star'" in err[0] and "red circle" in err[0]


# ----------------------------------------------------------------------------------------------------------
# What cannot work is one line
# ----------------------------------------------------------------------------------------------------------
def test_closed_set_checkpoint_with_classes_is_one_line(tiny_args, tmp_path, capsys, val_images):
    args = tiny_args("--method", "baseline")
    model, _, _ = build.build_model(args, SHAPES)
    ckpt = tmp_path / "closed.pth"
    torch.save({"model": model.state_dict(), "args": vars(args), "classes": {"ids": list(range(1, 9)),
                                                                             "names": SHAPES}}, ckpt)
    code, err = run_cli(evaluate, ["--resume", ckpt, "--images", val_images, "--classes", "white star"], capsys)
    assert code == 2 and len(err) == 1
    assert "fixed class head" in err[0] and "--novel-classes" in err[0], err[0]


def test_offline_without_cache_or_file_is_one_line_naming_the_options(ov_run, val_images, tmp_path, capsys):
    """A checkpoint of real CLIP weights, no network, no cached table for the names."""
    ckpt = torch.load(ov_run[0], weights_only=False)
    ckpt["args"].update(clip_model="RN50", clip_pretrained="openai", label_embeddings=None)
    path = tmp_path / "openai.pth"
    torch.save(ckpt, path)
    code, err = run_cli(evaluate, ["--resume", path, "--images", val_images, "--classes", NEW], capsys)
    assert code == 2 and len(err) == 1
    for option in ("'RN50/openai'", "connect to the internet", "--label-embeddings FILE", "drop --classes"):
        assert option in err[0], err[0]


def test_checkpoint_trained_on_a_label_file_needs_one_at_inference(ov_run, val_images, capsys):
    code, err = run_cli(evaluate, ["--resume", ov_run[0], "--images", val_images, "--classes", NEW], capsys)
    assert code == 2 and len(err) == 1 and "--label-embeddings FILE" in err[0]


@pytest.mark.parametrize("content, flags, match", [
    ({"names": ["a", "b"], "rows": torch.ones(2, 3)}, [], "expected exactly 'names'"),
    ({"names": ["a", "a"], "embeddings": torch.ones(2, 3)}, [], r"names \['a'\] more than once"),
    ({"names": ["a", "b", "c"], "embeddings": torch.ones(2, 3)}, [], "3 names and 2 rows"),
    ({"names": ["a", "b"], "embeddings": torch.ones(2, 3)}, ["--classes", "c"], r"no row named \['c'\]; its 2 names"),
    (torch.ones(2, WIDTH), [], "plain table that names no classes"),
    ({"names": ["a", "b"], "embeddings": torch.eye(2, 3)}, [], "3 wide.*projects into 16"),
])
def test_bad_label_files_at_inference_are_one_line(content, flags, match, ov_run, val_images, tmp_path, capsys):
    path = tmp_path / "labels.pt"
    torch.save(content, path)
    code, err = run_cli(evaluate, ["--resume", ov_run[0], "--images", val_images, "--label-embeddings", path, *flags],
                        capsys)
    assert code == 2 and len(err) == 1
    assert re.search(match, err[0]), err[0]


@pytest.mark.parametrize("flags, match", [
    (["--classes", "a", "--classes-file", "f.txt"], "give one of them"),
    (["--classes", "a", "b", "a"], "names ['a'] more than once"),
    (["--visualize", "1", "--classes", "a"], "--visualize draws the checkpoints' own classes"),
])
def test_vocabulary_flag_combinations(flags, match, ov_run, capsys):
    code, err = run_cli(evaluate, ["--resume", ov_run[0], *flags], capsys)
    assert code == 2 and len(err) == 1 and match in err[0], err


def test_a_classes_file_saved_by_notepad_names_the_classes_as_written(ov_run, label_file, val_images, tmp_path):
    """UTF-8 with a byte-order mark and CRLF line ends, as Windows Notepad saves it: the first name has no hidden
    \\ufeff (it would miss its row, or be another class)."""
    names = ["white star", NEW]
    classes_file = tmp_path / "classes.txt"
    classes_file.write_bytes("\r\n".join(names).encode("utf-8-sig") + b"\r\n")
    with contextlib.redirect_stdout(io.StringIO()):
        log = evaluate.main(["--resume", ov_run[0], "--images", str(val_images), "--classes-file", str(classes_file),
                             "--label-embeddings", str(label_file[0]), "--output-dir", str(tmp_path / "out")])
    assert log["classes"] == names
    assert {r["category_name"] for r in json.load(open(tmp_path / "out" / "results.json"))} == set(names)


@pytest.mark.parametrize("classes, why", [
    (["red box", "Red Box"], "CLIP's tokenizer lower-cases text"),
    ([" ".join(["striped"] * 80) + " cat", " ".join(["striped"] * 80) + " dog"], "77-token context"),
])
def test_classes_clip_cannot_tell_apart_are_one_line(classes, why, ov_run, val_images, tmp_path, capsys):
    """--classes embedded by the checkpoint's CLIP model (here its random-weight encoder) as training did."""
    ckpt = torch.load(ov_run[0], weights_only=False)
    ckpt["args"].update(clip_model="ViT-S-32-alt", clip_pretrained="none", label_embeddings=None)
    path = tmp_path / "clip.pth"
    torch.save(ckpt, path)
    code, err = run_cli(evaluate, ["--resume", path, "--images", val_images, "--output-dir", tmp_path / "out",
                                   "--classes", *classes], capsys)
    assert code == 2 and len(err) == 1 and why in err[0] and "cannot tell them apart" in err[0], err
    assert not (tmp_path / "out").exists()
