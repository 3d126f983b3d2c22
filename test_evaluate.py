"""Tests for evaluate.py (per-layer AP, OV-COCO AP50, LVIS, score maps, a folder of images) and for
model.LabelEmbeddingClassifier. CPU, tiny `shapes` checkpoints and hand-built COCO sets, no network."""
import contextlib
import glob
import io
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch import nn

import build
import data
import evaluate
import train
from conftest import COCO_80, TINY, TINY_MODEL, parse_args
from model import (Backbone, DeformableDETR, DeformableTransformer, Joiner, LabelEmbeddingClassifier,
                   PositionEmbeddingSine, PostProcess)

DEC_LAYERS = 2  # conftest.TINY's decoder layers

# OV-COCO ground truth on two 64x64 images: two base, two novel and one left-out category, one box each.
OV_BOXES = {"person": (1, [2, 2, 20, 20]), "dog": (1, [30, 2, 20, 20]), "stop sign": (1, [2, 30, 20, 20]),
            "car": (2, [2, 2, 25, 25]), "airplane": (2, [35, 35, 20, 20])}


@pytest.fixture(scope="module")
def checkpoint(cache, tmp_path_factory):
    """A baseline trained one epoch on 8 tiny shapes images (a few seconds)."""
    out = tmp_path_factory.mktemp("run")
    argv = ["--data-path", str(cache / "shapes"), "--output-dir", str(out), *TINY, "--epochs", "1",
            "--eval-every", "0", "--method", "baseline"]
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(parse_args(*argv))
    return str(out / "checkpoint.pth")


def val_files(cache):
    return sorted(glob.glob(str(cache / "shapes" / "*" / "val" / "*.png")))


def run_main(*argv):
    """evaluate.main in-process; returns (its log dict, what it printed)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        log = evaluate.main(list(argv))
    return log, buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Per-layer AP (Table 9)
# ----------------------------------------------------------------------------------------------------------
def test_per_layer_has_one_row_per_decoder_layer_and_the_last_is_the_normal_evaluation(checkpoint, tmp_path):
    log_file = str(tmp_path / "eval.jsonl")
    per, printed = run_main("--resume", checkpoint, "--per-layer", "--log", log_file)
    normal, _ = run_main("--resume", checkpoint, "--log", log_file)
    assert len(per["per_layer"]) == DEC_LAYERS and all(len(row) == 12 for row in per["per_layer"])
    assert per["per_layer"][-1] == normal["coco_stats"]
    lines = printed.strip().splitlines()
    table = lines[lines.index(next(line for line in lines if line.split()[:2] == ["layer", "AP"])) + 1:]
    assert [int(row.split()[0]) for row in table] == list(range(1, DEC_LAYERS + 1))
    logged = [json.loads(line) for line in open(log_file)]
    assert logged[0]["per_layer"] == per["per_layer"] and logged[1]["coco_stats"] == normal["coco_stats"]


class LayerStub(nn.Module):
    """Decoder layer 1 puts a query on every ground-truth box with its class; layer 2 puts them in a corner."""

    def __init__(self, batches, num_classes):
        super().__init__()
        self.targets = [targets for _, _, targets in batches]
        self.num_classes = num_classes

    def forward(self, images, mask):
        targets = self.targets.pop(0)
        Q = max(len(t["boxes"]) for t in targets) + 1
        logits = torch.full((len(targets), Q, self.num_classes), -10.0)
        right = torch.tensor([0.98, 0.98, 0.01, 0.01]).repeat(len(targets), Q, 1)  # (B, Q, 4)
        wrong = right.clone()
        for b, t in enumerate(targets):
            n = len(t["boxes"])
            logits[b, torch.arange(n), t["labels"]] = 10.0
            right[b, :n] = t["boxes"]
        return {"pred_logits": logits, "pred_boxes": wrong,
                "aux_outputs": [{"pred_logits": logits, "pred_boxes": right}]}


def test_per_layer_rows_are_in_decoder_order_known_answer(checkpoint, cache):
    args = build.checkpoint_args(torch.load(checkpoint, weights_only=False), {})
    dataset = build.build_dataset("val", args)
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=data.collate_fn))
    stub = LayerStub(batches, len(dataset.cat_names))
    per, _ = evaluate.evaluate(stub, PostProcess(), batches, dataset, "cpu", per_layer=True)
    # Layer 1 finds everything; layer 2, the final output, finds nothing.
    assert [row[0] for row in per] == pytest.approx([1.0, 0.0])


def test_per_layer_cli_reports_the_last_layer_as_the_model(checkpoint, monkeypatch):
    """The model's own row (coco_stats) is decoder layer 2's, not layer 1's: a stub whose layers differ."""
    args = build.checkpoint_args(torch.load(checkpoint, weights_only=False), {})
    dataset = build.build_dataset("val", args)
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, collate_fn=data.collate_fn))
    stub = LayerStub(batches, len(dataset.cat_names))
    monkeypatch.setattr(evaluate, "checkpoint_detector", lambda *a, **k: (stub, PostProcess()))
    log, _ = run_main("--resume", checkpoint, "--per-layer")
    assert [row[0] for row in log["per_layer"]] == pytest.approx([1.0, 0.0])
    assert log["coco_stats"] == log["per_layer"][-1]


# ----------------------------------------------------------------------------------------------------------
# Discriminative score map (Appendix A.1) and drawing
# ----------------------------------------------------------------------------------------------------------
def test_score_map_known_answer_ignores_padding():
    # One level, C = 2, padded to 3x3; the image covers the top-left 2x2, whose vector norms are 3, 4, 0, 5.
    level = torch.full((1, 2, 3, 3), 100.0)  # padding with a huge norm must not matter
    level[0, :, :2, :2] = torch.tensor([[[3.0, 0.0], [0.0, 3.0]], [[0.0, 4.0], [0.0, 4.0]]])
    valid_ratios = torch.tensor([[[2 / 3, 2 / 3]]])
    score = evaluate.discriminative_score_map([level], valid_ratios, [(2, 2)])[0]
    # min-max of [[3, 4], [0, 5]] is [[0.6, 0.8], [0, 1]]; nothing falls below 0.5 but the 0.
    torch.testing.assert_close(score, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    # Channel 1 scaled by 1/4: norms 3, 1, 0, sqrt(10); 1 / sqrt(10) = 0.32 is left out.
    scaled = evaluate.discriminative_score_map([level * torch.tensor([1.0, 0.25])[None, :, None, None]],
                                               valid_ratios, [(2, 2)])[0]
    torch.testing.assert_close(scaled, torch.tensor([[3 / math.sqrt(10), 0.0], [0.0, 1.0]]))


def test_score_map_valid_region_of_a_non_square_padded_map():
    # One level padded to 3x4 (H x W); the image covers 2 rows and 3 columns: valid (w, h) = (3/4, 2/3).
    level = torch.full((1, 1, 3, 4), 100.0)  # padding with a huge norm must not matter
    level[0, 0, :2, :3] = torch.tensor([[3.0, 4.0, 0.0], [5.0, 4.5, 2.5]])
    score = evaluate.discriminative_score_map([level], torch.tensor([[[3 / 4, 2 / 3]]]), [(2, 3)])[0]
    torch.testing.assert_close(score, torch.tensor([[0.6, 0.8, 0.0], [1.0, 0.9, 0.5]]))


def test_score_map_averages_levels_and_renders_at_the_requested_size():
    torch.manual_seed(0)
    fine = torch.randn(2, 4, 8, 6)
    constant = torch.zeros(2, 4, 4, 3)
    constant[:, 0] = 7.0  # a level with the same norm everywhere shifts the average, not its min-max
    ratios = torch.ones(2, 2, 2)
    alone = evaluate.discriminative_score_map([fine], ratios[:, :1], [(8, 6), (16, 12)])
    both = evaluate.discriminative_score_map([fine, constant], ratios, [(8, 6), (16, 12)])
    torch.testing.assert_close(alone[0], both[0])
    assert both[1].shape == (16, 12)
    for score in both:
        assert score.max() == 1.0 and (score == 0).any()
        assert ((score == 0) | (score >= 0.5)).all()
    assert (evaluate.discriminative_score_map([constant], ratios[:, :1], [(4, 3)] * 2)[0] == 0).all()


def test_overlay_keeps_the_image_where_the_map_is_left_out():
    image = torch.full((3, 4, 5), 100, dtype=torch.uint8)
    score = torch.zeros(4, 5)
    score[1, 2], score[2, 3] = 0.5, 1.0
    out = evaluate.overlay_score_map(image, score)
    changed = (out != image).any(0)
    assert changed.tolist() == (score > 0).tolist()
    assert out[:, 2, 3].tolist() == [round(0.4 * 100 + 0.6 * 255), 40, 40]  # red end of the ramp
    assert out[:, 1, 2].tolist() == [40, 40, round(0.4 * 100 + 0.6 * 255)]  # blue end


def test_draw_detections_draws_only_above_the_threshold():
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    pred = {"scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([0, 1]),
            "boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0], [0.0, 0.0, 39.0, 39.0]])}
    out = evaluate.draw_detections(image, pred, ["red circle", "green square"], score_threshold=0.3)
    assert out[:, 20, 5].tolist() == list(evaluate.BOX_COLORS[0])  # left edge of the kept box
    assert (out[:, 39, :] == 0).all() and (out[:, 20, 20] == 0).all()  # dropped box's edge, kept box's inside
    assert torch.equal(evaluate.draw_detections(image, pred, ["a", "b"], score_threshold=0.95), image)


def test_visualize_writes_panels_with_the_image_aspect_ratio(checkpoint, cache, tmp_path):
    out = tmp_path / "vis"
    log, _ = run_main("--resume", checkpoint, "--visualize", "2", "--output-dir", str(out))
    names = [os.path.basename(p) for p in val_files(cache)[:2]]
    assert sorted(os.path.basename(p) for p in log["visualized"]) == names
    for name in names:
        original = np.asarray(Image.open(glob.glob(str(cache / "shapes" / "*" / "val" / name))[0]).convert("RGB"))
        png = np.asarray(Image.open(out / name))
        h, w = original.shape[:2]
        assert png.shape == (h, 2 * w, 3)  # [detections | score map], each the image's own size
        score_panel = png[12:, w:]  # below the label strip
        assert score_panel.std() > 0
        assert (score_panel != original[12:]).any()  # the map is drawn over the image

    log, _ = run_main("--resume", checkpoint, "--visualize", "1", "--compare", checkpoint, "--output-dir", str(out))
    png = np.asarray(Image.open(log["visualized"][0]))
    h, w = Image.open(val_files(cache)[0]).size[::-1]
    assert png.shape == (2 * h, 2 * w, 3)
    assert np.array_equal(png[:h], png[h:])  # one checkpoint twice: identical rows


# ----------------------------------------------------------------------------------------------------------
# OV-COCO (Table 3)
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def ov_coco(tmp_path):
    """A COCO 2017 layout with the 80 COCO names and the OV_BOXES annotations in train and val."""
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(COCO_80)]
    images = [{"id": i, "file_name": f"{i:012d}.png", "width": 64, "height": 64} for i in (1, 2)]
    anns = [{"id": k + 1, "image_id": img, "category_id": COCO_80.index(n) + 1, "bbox": box, "area": 400.0,
             "iscrowd": 0} for k, (n, (img, box)) in enumerate(OV_BOXES.items())]
    os.makedirs(tmp_path / "annotations")
    for split in ("train", "val"):
        os.makedirs(tmp_path / f"{split}2017")
        for img in images:
            Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / f"{split}2017" / img["file_name"])
        with open(tmp_path / "annotations" / f"instances_{split}2017.json", "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    return tmp_path


def detection(name, box, score=0.9):
    img, _ = OV_BOXES[name]
    return {"image_id": img, "category_id": COCO_80.index(name) + 1, "bbox": box, "score": score}


def test_ov_coco_split_and_what_each_split_keeps(ov_coco):
    args = parse_args("--dataset", "ov-coco", "--data-path", ov_coco)
    val = build.build_dataset("val", args)
    base, novel = data.ov_coco_split(val.cat_names)
    assert len(base) == 48 and len(novel) == 17 and not set(base) & set(novel)
    kept = lambda ds: {ds.coco.cats[a["category_id"]]["name"] for a in ds.coco.anns.values()}  # noqa: E731
    assert kept(val) == {"person", "dog", "car", "airplane"}  # the left-out 'stop sign' is not scored
    assert kept(build.build_dataset("train", args)) == {"person", "car"}  # base annotations only


def test_ov_coco_ap50_novel_comes_only_from_novel_categories(ov_coco):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ov_coco / "annotations" / "instances_val2017.json"))  # stop sign annotation included
    base, novel = data.ov_coco_split(COCO_80)
    hits = [detection("person", [2, 2, 20, 20]), detection("car", [2, 2, 25, 25]), detection("dog", [30, 2, 20, 20])]
    misses = [detection("airplane", [0, 50, 10, 10]), detection("stop sign", [40, 40, 10, 10])]
    ov = evaluate.ov_coco_ap50(gt, hits + misses, base, novel)
    # novel: dog 1, airplane 0; base: person 1, car 1; all: the 4 of them (a left-out stop sign would make 3/5).
    assert ov == pytest.approx({"novel": 0.5, "base": 1.0, "all": 0.75})
    without_base = evaluate.ov_coco_ap50(gt, hits[2:] + misses, base, novel)
    assert without_base == pytest.approx({"novel": 0.5, "base": 0.0, "all": 0.25})
    with pytest.raises(ValueError, match="red circle"):
        evaluate.ov_coco_ap50(gt, hits, base + ["red circle"], novel)


def test_ov_coco_evaluation_reports_novel_base_all(ov_coco, tmp_path, monkeypatch):
    """The CLI path: a checkpoint of the 80-class head, and predictions that find exactly the novel objects."""
    table = tmp_path / "labels.pt"
    torch.save(torch.randn(len(COCO_80), 16), table)
    args = parse_args(
        "--dataset", "ov-coco", "--data-path", str(ov_coco), *TINY_MODEL, "--backbone", "resnet18", "--method",
        "baseline", "--device", "cpu", "--label-embeddings", str(table))
    model, _, _ = build.build_model(args, COCO_80)
    assert isinstance(model.class_embed[0], LabelEmbeddingClassifier)
    ckpt = str(tmp_path / "ov.pth")
    torch.save({"model": model.state_dict(), "args": vars(args)}, ckpt)
    table.unlink()  # evaluation must use the dictionary the checkpoint carries, not the training-time file

    def novel_only(model, postprocess, loader, device, per_layer=False):
        preds = {}
        for name in ("dog", "airplane"):
            img, (x, y, w, h) = OV_BOXES[name]
            preds[img] = {"scores": torch.tensor([0.9]), "labels": torch.tensor([COCO_80.index(name)]),
                          "boxes": torch.tensor([[x, y, x + w, y + h]], dtype=torch.float32)}
        return preds, [preds]
    monkeypatch.setattr(evaluate, "predict", novel_only)
    log, printed = run_main("--resume", ckpt)
    assert log["ov_coco"] == pytest.approx({"novel": 1.0, "base": 0.0, "all": 0.5})
    assert "novel   base    all" in printed


def test_ov_coco_encoder_proposals_come_from_a_class_agnostic_objectness_head(tmp_path):
    """In open-vocabulary mode only the decoder scores CLIP rows; the two-stage encoder ranks its
    proposals by one objectness logit, not by the CLIP row of 'person'."""
    table = tmp_path / "labels.pt"
    torch.save(torch.randn(len(COCO_80), 16), table)
    args = parse_args(
        "--dataset", "ov-coco", *TINY_MODEL, "--backbone", "resnet18", "--method", "clip-detr", "--device", "cpu",
        "--label-embeddings", str(table), "--dynql-betas", "0.5")
    torch.manual_seed(0)
    model, criterion, _ = build.build_model(args, COCO_80)
    layers = args.dec_layers
    assert all(isinstance(head, LabelEmbeddingClassifier) for head in model.class_embed[:layers])
    objectness = model.class_embed[layers]
    assert isinstance(objectness, nn.Linear) and objectness.out_features == 1
    assert model.transformer.decoder.class_embed[layers] is objectness
    targets = [{"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]]),
                "labels": torch.tensor([COCO_80.index("person"), COCO_80.index("car")])}]
    out = model.train()(torch.randn(1, 3, 128, 128), torch.zeros(1, 128, 128, dtype=torch.bool), targets)
    assert out["enc_outputs"]["pred_logits"].shape[-1] == 1
    assert out["pred_logits"].shape[-1] == len(COCO_80)
    losses = train.compute_losses(criterion, out, targets)
    losses["loss_ce_enc"].backward()
    assert objectness.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# The open-vocabulary classifier
# ----------------------------------------------------------------------------------------------------------
def test_label_embedding_classifier_scores_cosine_similarity():
    table = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # normalized inside
    head = LabelEmbeddingClassifier(label_embeddings=table, d_model=2).eval()
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(2))
        head.proj.bias.zero_()
    bias = -math.log(99)
    logits = head(torch.tensor([[[3.0, 0.0]]]))  # (1, 1, 2) -> (1, 1, 3)
    torch.testing.assert_close(logits, torch.tensor([[[1 / 0.07, 0.0, math.sqrt(0.5) / 0.07]]]) + bias)
    with torch.no_grad():
        head.logit_scale.fill_(math.log(1000.0))
    torch.testing.assert_close(head(torch.tensor([1.0, 0.0])), torch.tensor([100.0, 0.0, 100 * math.sqrt(0.5)]) + bias)


def test_label_embedding_classifier_masks_unseen_classes_in_training_only():
    torch.manual_seed(0)
    head = LabelEmbeddingClassifier(label_embeddings=torch.randn(4, 8), d_model=6, train_classes=[0, 2])
    same = LabelEmbeddingClassifier(label_embeddings=torch.randn(4, 8), d_model=6,
                                    train_classes=torch.tensor([True, False, True, False]))
    assert torch.equal(head.train_mask, same.train_mask)
    h = torch.randn(3, 5, 6)
    logits = head.train()(h)
    assert (logits[..., [1, 3]] == -1e4).all() and (logits[..., [0, 2]] > -100).all()
    logits[..., [1, 3]].sum().backward()
    assert head.proj.weight.grad.abs().sum() == 0  # unseen classes push nothing as negatives
    eval_logits = head.eval()(h)
    assert (eval_logits > -100).all()
    torch.testing.assert_close(eval_logits[..., [0, 2]], logits[..., [0, 2]])


@pytest.mark.parametrize("kwargs, match", [
    (dict(label_embeddings=torch.randn(4)), r"\(K, D\)"),
    (dict(label_embeddings=torch.randn(4, 8), train_classes=[0, 4]), r"\[0, 3\]"),
    (dict(label_embeddings=torch.randn(4, 8), train_classes=torch.zeros(3, dtype=torch.bool)), r"\(4,\)"),
    (dict(label_embeddings=torch.randn(4, 8), train_classes=[]), "no class"),
])
def test_label_embedding_classifier_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LabelEmbeddingClassifier(d_model=6, **kwargs)


def test_label_embedding_classifier_as_the_detector_head():
    torch.manual_seed(0)
    transformer = DeformableTransformer(d_model=32, n_heads=4, num_encoder_layers=1, num_decoder_layers=2, d_ffn=64,
                                        two_stage_num_proposals=10)
    head = LabelEmbeddingClassifier(label_embeddings=torch.randn(3, 8), d_model=32, train_classes=[0, 1])
    model = DeformableDETR(Joiner(Backbone("resnet18"), PositionEmbeddingSine(16)), transformer, num_classes=3,
                           num_queries=10, class_head=head)
    # 128 px: the stride-64 level keeps 2x2 locations, which GroupNorm needs in training.
    images, mask = torch.randn(1, 3, 128, 128), torch.zeros(1, 128, 128, dtype=torch.bool)
    out = model.train()(images, mask)
    for layer in out["aux_outputs"] + [out]:
        assert layer["pred_logits"].shape == (1, 10, 3) and (layer["pred_logits"][..., 2] == -1e4).all()
    with torch.no_grad():
        assert (model.eval()(images, mask)["pred_logits"][..., 2] > -100).all()
    # The decoder layers carry the dictionary; the two-stage encoder head is the class-agnostic objectness.
    assert {f"class_embed.{i}.label_embeddings" for i in range(2)} <= set(model.state_dict())
    assert out["enc_outputs"]["pred_logits"].shape[-1] == 1


# ----------------------------------------------------------------------------------------------------------
# LVIS (Table 2)
# ----------------------------------------------------------------------------------------------------------
def test_lvis_without_the_package_is_a_clear_error(checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "lvis", None)  # makes `import lvis` raise ImportError
    message = "--dataset lvis needs the optional 'lvis' package: pip install lvis"
    with pytest.raises(ValueError, match=message):
        evaluate.lvis_stats("lvis_v1_val.json", [])
    with pytest.raises(ValueError, match=message):  # before any dataset or inference
        run_main("--resume", checkpoint, "--dataset", "lvis", "--data-path", "/nonexistent")


def test_lvis_stats_known_answer(tmp_path):
    pytest.importorskip("lvis")
    gt = {"images": [{"id": 1, "width": 64, "height": 64, "coco_url": "http://x/000000000001.jpg",
                      "neg_category_ids": [3], "not_exhaustive_category_ids": []}],
          "categories": [{"id": 1, "name": "a", "frequency": "r"}, {"id": 2, "name": "b", "frequency": "c"},
                         {"id": 3, "name": "c", "frequency": "f"}],
          "annotations": [{"id": k + 1, "image_id": 1, "category_id": k + 1, "bbox": [x, x, 20, 20], "area": 400,
                           "segmentation": [[x, x, x + 20, x, x + 20, x + 20, x, x + 20]]}
                          for k, x in enumerate((2, 30))]}
    ann_file = tmp_path / "lvis_v1_val.json"
    ann_file.write_text(json.dumps(gt))
    results = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20], "score": 0.9},  # rare: found
               {"image_id": 1, "category_id": 2, "bbox": [0, 40, 5, 5], "score": 0.9},  # common: missed
               {"image_id": 1, "category_id": 3, "bbox": [30, 30, 20, 20], "score": 0.8}]  # frequent: no GT
    stats = evaluate.lvis_stats(str(ann_file), results)
    assert stats == pytest.approx({"AP": 0.5, "AP50": 0.5, "AP75": 0.5, "APr": 1.0, "APc": 0.0, "APf": -1.0})


def test_coco_results_map_labels_to_non_contiguous_category_ids():
    """COCO's ids run 1..90 with gaps: label k is cat_ids[k], not k + 1; boxes become xywh."""
    predictions = {7: {"scores": torch.tensor([0.9, 0.5]), "labels": torch.tensor([2, 0]),
                       "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 5.0, 5.0]])}}
    results = evaluate.to_coco_results(predictions, cat_ids=[1, 13, 90])
    assert [(r["image_id"], r["category_id"], r["bbox"]) for r in results] == [
        (7, 90, [10.0, 20.0, 30.0, 40.0]), (7, 1, [0.0, 0.0, 5.0, 5.0])]


def test_predictions_are_not_changed_by_what_reads_them():
    """The same predictions feed the JSON, the per-layer table and the PNGs: converting or drawing them must leave
    them as they were (an in-place xyxy -> xywh would hand the next reader converted boxes)."""
    predictions = {7: {"scores": torch.tensor([0.9, 0.5]), "labels": torch.tensor([1, 0]),
                       "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 5.0, 5.0]])}}
    before = {k: v.clone() for k, v in predictions[7].items()}
    first = evaluate.to_coco_results(predictions, cat_ids=[1, 2])
    assert evaluate.to_coco_results(predictions, cat_ids=[1, 2]) == first
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    evaluate.draw_detections(image, predictions[7], ["a", "b"], score_threshold=0.0)
    assert all(torch.equal(predictions[7][k], before[k]) for k in before) and not image.any()


def test_folder_pngs_draw_the_boxes_the_json_holds(checkpoint, cache, tmp_path, monkeypatch):
    """--images: the PNG of an image draws exactly the JSON's detections above the threshold (xywh -> xyxy)."""
    drawn = {}
    real_draw = evaluate.draw_detections

    def recording_draw(image, pred, class_names, score_threshold=0.3):
        drawn[len(drawn)] = {k: v.clone() for k, v in pred.items()}
        return real_draw(image, pred, class_names, score_threshold)
    monkeypatch.setattr(evaluate, "draw_detections", recording_draw)
    folder = tmp_path / "photos"
    folder.mkdir()
    for source in val_files(cache)[:2]:
        (folder / os.path.basename(source)).write_bytes(open(source, "rb").read())
    log, _ = run_main("--resume", checkpoint, "--images", str(folder), "--output-dir", str(tmp_path / "out"))
    results = json.load(open(tmp_path / "out" / "results.json"))
    for index, pred in drawn.items():
        json_boxes = torch.tensor([r["bbox"] for r in results if r["image_id"] == index])  # (n, 4) xywh
        json_boxes[:, 2:] += json_boxes[:, :2]
        torch.testing.assert_close(pred["boxes"], json_boxes, atol=1e-3, rtol=0)


def _override_cases(cache, tmp_path):
    """Each flag that overrides a checkpoint's argument: (its flags, how to see that it reached the evaluation)."""
    val_json = sorted(glob.glob(str(cache / "shapes" / "*" / "annotations" / "instances_val.json")))[0]
    val_images = os.path.join(os.path.dirname(os.path.dirname(val_json)), "val")
    custom = ["--dataset", "custom", "--val-json", val_json, "--val-images", val_images]
    other = str(tmp_path / "other-shapes")
    return {
        "dataset": (custom, lambda run: run["dataset"].ann_file == val_json),
        "data_path": (["--data-path", other], lambda run: run["dataset"].ann_file.startswith(other)),
        "val_json": (custom, lambda run: run["dataset"].ann_file == val_json),
        "val_images": (custom, lambda run: run["dataset"].img_folders == [val_images]),
        "device": (["--device", "cpu"], lambda run: run["device"] == torch.device("cpu")),
        "batch_size": (["--batch-size", "1"], lambda run: run["loader"].batch_sampler.batch_size == 1),
        "attn_impl": (["--attn-impl", "gather"],
                      lambda run: run["model"].transformer.encoder.layers[0].self_attn.attn_impl == "gather"),
        "min_size": (["--min-size", "48"], lambda run: min(run["dataset"][0][0].shape[1:]) == 48),
        "max_size": (["--min-size", "80", "--max-size", "88"], lambda run: max(run["dataset"][0][0].shape[1:]) <= 88),
    }


@pytest.mark.parametrize("key", list(evaluate.OVERRIDES))
def test_every_override_reaches_the_evaluation(key, checkpoint, cache, tmp_path, monkeypatch):
    """A flag parsed but not applied would evaluate the checkpoint's own setting and say nothing."""
    cases = _override_cases(cache, tmp_path)
    assert set(cases) == set(evaluate.OVERRIDES), "every override needs a case here"
    flags, reached = cases[key]
    ckpt = torch.load(checkpoint, weights_only=False)
    ckpt["args"]["device"] = "cuda:7"  # a device this machine lacks: only --device cpu makes it run
    torch.save(ckpt, tmp_path / "ckpt.pth")
    run = {}
    real_build, real_predict = evaluate.build_dataset, evaluate.predict
    monkeypatch.setattr(evaluate, "build_dataset", lambda *a: run.setdefault("dataset", real_build(*a)))

    def recording_predict(model, postprocess, loader, device, *rest):
        run.update(model=model, loader=loader, device=device)
        return real_predict(model, postprocess, loader, device, *rest)
    monkeypatch.setattr(evaluate, "predict", recording_predict)
    run_main("--resume", str(tmp_path / "ckpt.pth"), *flags, *([] if key == "device" else ["--device", "cpu"]))
    assert reached(run), key


def test_coco_stats_accepts_annotations_without_iscrowd():
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "width": 50, "height": 50}], "categories": [{"id": 3, "name": "a"}],
                  "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [5, 5, 20, 20], "area": 400}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    stats = evaluate.coco_stats(gt, [{"image_id": 1, "category_id": 3, "bbox": [5, 5, 20, 20], "score": 0.9}])
    assert stats[0] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------
# A folder of images, command-line checks
# ----------------------------------------------------------------------------------------------------------
def test_images_folder_reports_non_images_and_processes_the_rest(checkpoint, cache, tmp_path, capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    sources = val_files(cache)[:2]
    for source, name in zip(sources, ("b.png", "a.jpg")):
        Image.open(source).save(folder / name)
    (folder / "notes.txt").write_text("not a picture")
    (folder / "nested").mkdir()
    out = tmp_path / "out"
    log = evaluate.main(["--resume", checkpoint, "--images", str(folder), "--output-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: skipped 1 file(s) in {folder} that are not readable images: notes.txt",
                   f"warning: skipped 1 subfolder(s) of {folder} (not searched): nested"]
    results = json.load(open(out / "results.json"))
    assert {(d["image_id"], d["file_name"]) for d in results} == {(0, "a.jpg"), (1, "b.png")}
    assert {"category_id", "bbox", "score"} <= set(results[0]) and log["num_images"] == 2
    for name, source in (("a.png", sources[1]), ("b.png", sources[0])):
        assert Image.open(out / name).size == Image.open(source).size


def test_png_names_keep_stems_unless_they_collide():
    assert evaluate.png_names(["a.jpg", "a.png", "b.jpeg"]) == ["a.jpg.png", "a.png.png", "b.png"]


@pytest.mark.parametrize("argv, match", [
    (["--compare", "X"], "--compare CKPT2 needs --visualize"),
    (["--visualize", "0"], "expected a number of images >= 1"),
    (["--images", "DIR", "--per-layer"], "--images runs alone"),
    (["--visualize", "2", "--per-layer"], "computes no AP"),
    (["--score-threshold", "1.5"], r"expected a score in \[0, 1\]"),
])
def test_cli_rejects_meaningless_combinations(argv, match):
    with pytest.raises(ValueError, match=match):
        evaluate.main(["--resume", "unused.pth", *argv])


def test_images_folder_errors(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        evaluate.main(["--resume", checkpoint, "--images", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("#")
    with pytest.raises(ValueError, match="no image in"):
        evaluate.main(["--resume", checkpoint, "--images", str(tmp_path / "empty"), "--output-dir", str(tmp_path)])
