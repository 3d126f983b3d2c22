"""Pairing and order (issue 31, class 4): wherever two lists are paired (predictions and ground truth, class rows and
category names, label-table rows and names, boxes and their images), the tests give them in an order that differs
from the natural one, so that pairing by position instead of by the matcher, the name or the image shows.

  the criterion    perfect predictions in permuted query order give zero box loss on every decoder layer and on
                   the two-stage encoder proposals, for images whose ground truth is not in any sorted order
  DynQL Eq. 10     DynQuery slot (s, i) of image b is scored against GT i of image b, images without GT between
  AlignNet Eq. 1   each box is pooled from its own image's memory
  categories       a resume on a dataset whose categories were reordered is refused; a val set numbering the
                   categories otherwise is scored by name; COCO heads' rows and named label tables by id and name

CPU only, no network. Shape legend: B batch, Q queries, K classes, S DynQuery sets, G padded set size, N GT boxes.
"""
import types

import pytest
import torch

import build
import data
import evaluate
import train
from alignnet import AlignNet
from conftest import QUICK_RUN, oracle_for, parse_args, write_distinct_coco
from dynql import DynQL, dynql_loss, dynql_set_losses
from errors import InputError
from label_dictionary import label_embeddings
from matcher import SetCriterion, box_losses
from model import PostProcess

# Ground truth of three images, deliberately in no sorted order (labels, boxes), the middle image without any.
GT = [{"labels": torch.tensor([2, 0, 3]),
       "boxes": torch.tensor([[0.7, 0.3, 0.2, 0.3], [0.2, 0.6, 0.3, 0.2], [0.45, 0.45, 0.1, 0.4]])},
      {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
      {"labels": torch.tensor([1, 1]), "boxes": torch.tensor([[0.6, 0.7, 0.4, 0.2], [0.3, 0.25, 0.25, 0.3]])}]
K, Q = 4, 6


def perfect(targets, order, num_queries=Q, num_classes=K):
    """Predictions with GT j of image b at query order[b][j] (logit +20 on its class, -20 elsewhere) and
    low-scoring far-off boxes at the other queries: {pred_logits (B, Q, K), pred_boxes (B, Q, 4)}."""
    B = len(targets)
    logits = torch.full((B, num_queries, num_classes), -20.0)
    boxes = torch.tensor([0.9, 0.9, 0.05, 0.05]).repeat(B, num_queries, 1)
    for b, (t, queries) in enumerate(zip(targets, order)):
        queries = torch.tensor(queries, dtype=torch.int64)
        logits[b, queries, t["labels"]] = 20.0
        boxes[b, queries] = t["boxes"]
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_perfect_predictions_in_permuted_query_order_lose_nothing_on_every_layer_and_the_proposals():
    """The criterion pairs each matched query with the GT the matcher gave it: each decoder layer and the
    encoder proposals hold the GT at other query positions, and every box term is 0 and every class term ~0."""
    outputs = perfect(GT, [[4, 0, 2], [], [5, 1]])
    outputs["aux_outputs"] = [perfect(GT, [[1, 5, 3], [], [0, 2]]), perfect(GT, [[2, 3, 0], [], [4, 3]])]
    objects = [dict(t, labels=torch.zeros_like(t["labels"])) for t in GT]  # proposals are class-agnostic
    outputs["enc_outputs"] = perfect(objects, [[9, 2, 6], [], [0, 11]], num_queries=12, num_classes=1)
    losses = SetCriterion(num_classes=K)(outputs, GT)
    assert len(losses) == 12
    for key, value in losses.items():
        assert abs(value.item()) < 1e-6, (key, value.item())
    # Pairing the queries with the GT in annotation order instead would not be free: the test can tell.
    pairs_in_annotation_order = outputs["pred_boxes"][0, :3]
    assert box_losses(pairs_in_annotation_order, GT[0]["boxes"], 1)["loss_bbox"] > 0.5


def test_dynql_scores_slot_s_i_of_each_image_against_its_own_gt_i():
    """Eq. 10 with an image without GT between two others and GT in no sorted order: predictions that repeat each
    DynQuery's reference box (rho = 0: the GT box itself) and name its GT's class lose nothing, but in set 1, whose
    boxes are moved by 0.1 in cx: exactly that shows, in the total and in set 1's beta alone. A detector answering
    the slots of the images in the other order does lose."""
    torch.manual_seed(0)
    dynql = DynQL(d_model=8, betas=(0.2, 0.6, 0.2), rho=0.0)
    layout = dynql(torch.randn(5, 8), GT, num_queries=Q, proposal_queries=lambda p: (torch.zeros(*p.shape[:-1], 8),))
    S, G = layout.num_sets, layout.group_size
    assert (S, G) == (3, 3) and layout.valid.tolist() == [[True] * 3, [False] * 3, [True, True, False]]
    logits = torch.full((3, S, G, K), -20.0)
    for b, t in enumerate(GT):
        logits[b, :, torch.arange(len(t["labels"])), t["labels"]] = 20.0
    boxes = layout.reference.view(3, S, G, 4).clone()
    boxes[:, 1, :, 0] += 0.1
    outputs = [{"pred_logits": logits.flatten(1, 2), "pred_boxes": boxes.flatten(1, 2)}] * 2  # two decoder layers
    losses = dynql_loss(outputs, layout, GT, num_instances=5)
    assert len(losses) == 6
    for key, value in losses.items():
        if "giou" in key:
            assert value > 0, key
        else:  # L1: set 1's five DynQueries off by 0.1 each, over S * N; focal: ~0
            assert value.item() == pytest.approx(0.1 * 5 / (S * 5) if "bbox" in key else 0.0, abs=1e-6), key
    per_beta = dynql_set_losses(outputs, layout, GT)
    assert per_beta["dynql_b0.6_bbox"] == pytest.approx(0.1, abs=1e-6) and per_beta["dynql_b0.6_giou"] > 0
    for key in ("dynql_b0.2_ce", "dynql_b0.2_bbox", "dynql_b0.2_giou", "dynql_b0.6_ce"):
        assert abs(per_beta[key]) < 1e-6, key
    swapped = [{k: v.flip(0) for k, v in out.items()} for out in outputs]  # image 0's answers for image 2's slots
    assert dynql_loss(swapped, layout, GT, num_instances=5)["loss_dynql_bbox"] > 0.1


def test_alignnet_pools_each_box_from_its_own_images_memory():
    """Eq. 1 inside AlignNet.forward: boxes of images 0 and 2 (image 1 has none) are pooled from their own image's
    memory, so the loss equals Eq. 4-5 on z_enc computed with image indices [0, 0, 0, 2, 2] by hand."""
    torch.manual_seed(0)
    net = AlignNet(label_embeddings=torch.randn(K, 6), d_model=8)
    memory = [torch.randn(3, 8, 6, 5), torch.randn(3, 8, 3, 3)]  # one very different map per image
    ratios = torch.ones(3, 2, 2)
    boxes, labels = torch.cat([t["boxes"] for t in GT]), torch.cat([t["labels"] for t in GT])
    by_hand = net.alignment_loss(net.similarity(
        net.object_encoded_feature(memory, ratios, boxes, torch.tensor([0, 0, 0, 2, 2])),
        net.object_attribute_feature(labels, boxes)))
    torch.testing.assert_close(net(memory, ratios, GT), by_hand)
    other = net.alignment_loss(net.similarity(
        net.object_encoded_feature(memory, ratios, boxes, torch.tensor([0, 0, 1, 1, 2])),
        net.object_attribute_feature(labels, boxes)))
    assert not torch.allclose(other, by_hand), "the test must tell the image indices apart"


# ----------------------------------------------------------------------------------------------------------
# Categories: resume, evaluation, released heads, label tables
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("names, refused", [(["red", "blue", "green"], False), (["blue", "red", "green"], True),
                                            (["red", "blue"], True), (["red", "blue", "green", "grey"], True),
                                            (["red", "blue", "teal"], True)])
def test_resume_needs_the_checkpoints_category_names_in_the_same_order(names, refused):
    """Row k of the class head was trained on the checkpoint's category k: the same names in another order (or
    another set of names) is refused, naming what changed."""
    ckpt = {"classes": {"ids": [1, 2, 3], "names": ["red", "blue", "green"]}}
    dataset = types.SimpleNamespace(cat_names=names)
    if not refused:
        train.check_resume_classes(ckpt, dataset, "ckpt.pth")
        return
    with pytest.raises(InputError, match="same category names in the same order") as err:
        train.check_resume_classes(ckpt, dataset, "ckpt.pth")
    if names == ["blue", "red", "green"]:
        assert "0: 'red' -> 'blue'; 1: 'blue' -> 'red'" in str(err.value)


def write_three_class_set(root, ids):
    """Three noise images with one box of each of 'red', 'blue', 'green', numbered by `ids` (name -> id); the
    category list is written in yet another order. Returns (folder, ann_file)."""
    cats = [{"id": ids[n], "name": n} for n in ("green", "red", "blue")]
    anns = [{"id": 10 * i + k, "image_id": i, "category_id": ids[n], "bbox": box, "area": box[2] * box[3],
             "iscrowd": 0}
            for i in (1, 2, 3) for k, (n, box) in enumerate([("red", [3, 4, 20, 15]), ("blue", [24, 9, 17, 25]),
                                                             ("green", [8, 30, 33, 11])])]
    return write_distinct_coco(root / "img", root / "ann.json", [(61, 45), (45, 61), (57, 47)], anns, cats)


@pytest.mark.slow
def test_resume_on_a_dataset_whose_categories_were_renumbered_is_refused_and_the_checkpoint_kept(tmp_path, capsys):
    """Through train.py: a run on categories red=1, blue=2, green=3, resumed on the same images and names numbered
    blue=1, green=2, red=3 (class rows in another order), stops with one line; the checkpoint is untouched."""
    folder, first = write_three_class_set(tmp_path / "a", {"red": 1, "blue": 2, "green": 3})
    _, renumbered = write_three_class_set(tmp_path / "b", {"blue": 1, "green": 2, "red": 3})
    out = tmp_path / "out"
    common = [*QUICK_RUN, "--dataset", "custom", "--train-images", folder, "--val-images", folder,
              "--output-dir", out]
    train.main(parse_args(*common, "--train-json", first, "--val-json", first))
    before = (out / "checkpoint.pth").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.cli([str(a) for a in [*common, "--train-json", renumbered, "--val-json", renumbered, "--resume",
                                    "auto", "--epochs", "2"]])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and "0: 'red' -> 'blue'" in lines[0], lines
    assert (out / "checkpoint.pth").read_bytes() == before


def test_a_val_set_numbering_the_categories_otherwise_is_scored_by_name(tmp_path):
    """The model's classes are red, blue, green (its head's rows); the val JSON numbers them green=2, red=9,
    blue=4. Perfect predictions score AP 1, and every detection carries the val id of its class's name."""
    folder, ann_file = write_three_class_set(tmp_path, {"green": 2, "red": 9, "blue": 4})
    dataset = data.CocoDetection(folder, ann_file, transforms=data.make_transforms("val", eval_size=None))
    assert dataset.cat_names == ["green", "blue", "red"]
    model_classes = ["red", "blue", "green"]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=data.collate_fn)
    stats, results = evaluate.evaluate(oracle_for(dataset, model_classes), PostProcess(), loader, dataset, "cpu",
                                       class_names=model_classes)
    assert stats[0] == pytest.approx(1.0)
    assert results and all(r["category_id"] == {"green": 2, "red": 9, "blue": 4}[r["category_name"]]
                           for r in results)


def test_released_coco_heads_give_class_k_the_row_of_its_category_id():
    """A released head has a row per COCO id 0-90: class k takes the row of its name's id (in any order); the
    two-stage encoder head keeps rows 0..K-1 (row 0 is its objectness)."""
    model = types.SimpleNamespace(two_stage=True, transformer=types.SimpleNamespace(
        decoder=types.SimpleNamespace(num_layers=2)))
    rows = torch.arange(91.0)[:, None].repeat(1, 3)  # (91, C): row r holds r
    state = {f"class_embed.{i}.weight": rows.clone() for i in range(3)}
    state["transformer.decoder.class_embed.2.weight"] = rows.clone()
    state["class_embed.0.bias"] = torch.arange(91.0)
    names = [data.COCO_ROW_NAMES[i] for i in (18, 1, 90, 44)]  # a released head's row i is COCO category id i
    build.select_class_rows(state, model, build.class_head_rows(data.COCO_ROW_NAMES, names, "test"))
    for key in ("class_embed.0.weight", "class_embed.1.weight"):
        assert state[key][:, 0].tolist() == [18, 1, 90, 44], key
    assert state["class_embed.0.bias"].tolist() == [18, 1, 90, 44]
    for key in ("class_embed.2.weight", "transformer.decoder.class_embed.2.weight"):
        assert state[key][:, 0].tolist() == [0, 1, 2, 3], key


def test_a_named_label_table_gives_each_class_the_row_of_its_name(tmp_path):
    """A named table's rows are looked up by name, whatever order the file lists them in."""
    table = torch.eye(4)[[2, 0, 3, 1]]  # row of name n: one-hot at a place the test knows
    torch.save({"names": ["green", "red", "grey", "blue"], "embeddings": table}, tmp_path / "named.pt")
    rows = label_embeddings(["red", "blue", "green"], embeddings_file=tmp_path / "named.pt")
    torch.testing.assert_close(rows, table[[1, 3, 0]])
