"""Evaluation that scores the wrong thing (issue 31, class 6): every val image is scored exactly once on every
batching path, a set with nothing to score says so, the evaluation schedule counts epochs from 1, and a --dataset
override leaves the checkpoint's class head as it was trained.

  batching paths   aspect-grouped batches (`shapes`), plain batches (every other dataset), the DistributedSampler
                   of 2 and 3 ranks gathered, evaluate.py's own loader, and --images folders, all with a number of
                   images that is not a multiple of the batch: perfect predictions (conftest.OracleDetector) score
                   AP 1 only if no image is dropped, and the oracle counts how often it saw each image
  nothing to score a val set of crowd regions only, or without annotations, and categories or images without ground
                   truth: no AP (pycocotools would report -1), said as such by evaluate.py and by a training epoch
  schedule         --eval-every N evaluates after epochs N, 2N, ... (counted from 1) and after the last
  overrides        evaluate.py --dataset X builds the class head of the checkpoint's own dataset

CPU only, no network; nothing here trains (the tests that build detectors are in the full tier).
Shape legend: B batch, Q queries, K classes.
"""
import contextlib
import io
import itertools
import math
import os
import types

import pytest
import torch
from pycocotools.coco import COCO

import build
import data
import evaluate
import train
from conftest import (COCO_80, COCO_IDS, TINY, TINY_MODEL, OracleDetector, oracle_for, parse_args,
                      write_distinct_coco)
from model import LabelEmbeddingClassifier, PostProcess

# 7 landscape and 4 portrait images (odd sizes): 11 is a multiple of no batch size used here, and each aspect group
# leaves images over, so a short batch (mixed, for `shapes`) always comes at the end.
SIZES = [(61, 45), (57, 47), (63, 41), (59, 49), (65, 45), (53, 51), (67, 43), (45, 61), (47, 57), (41, 63), (49, 59)]
CATEGORIES = [{"id": 4, "name": "square"}, {"id": 2, "name": "disc"}]


def annotations(num_images, crowd=False):
    """One or two boxes per image (a second 'disc' on every other image), all inside the smallest image."""
    anns = []
    for image_id in range(1, num_images + 1):
        boxes = [(4, [3, 4, 20, 15])] + ([(2, [25, 20, 14, 18])] if image_id % 2 else [])
        for cat, box in boxes:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": int(crowd)})
    return anns


@pytest.fixture(scope="module")
def eleven(tmp_path_factory):
    """(folder, ann_file) of the 11-image set."""
    root = tmp_path_factory.mktemp("eleven")
    return write_distinct_coco(root / "img", root / "ann.json", SIZES, annotations(len(SIZES)), CATEGORIES)


def val_set(files):
    return data.CocoDetection(*files, transforms=data.make_transforms("val", max_size=77, eval_size=45))


def batching_args(tiny_args, kind, batch_size):
    """train.py's arguments with the batching of dataset kind `kind` ('shapes': aspect groups; 'custom': plain)."""
    args = tiny_args("--batch-size", batch_size)
    args.dataset = kind
    return args


def assert_scored_once(stats, results, dataset, oracle=None):
    """AP 1 (so no image was left out), and each image's ground truth found once in the results."""
    assert stats is not None and stats[0] == pytest.approx(1.0), stats
    found = sorted((r["image_id"], r["category_id"]) for r in results if r["score"] > 0.5)
    expected = sorted((a["image_id"], a["category_id"]) for a in dataset.coco.anns.values())
    assert found == expected
    if oracle is not None:
        assert oracle.seen == [1] * len(dataset), oracle.seen


@pytest.mark.parametrize("kind, batch_size", list(itertools.product(["shapes", "custom"], [2, 3, 4])))
def test_every_val_image_is_scored_once_in_batches_that_do_not_divide_the_set(eleven, tiny_args, kind, batch_size):
    """The val batches of train.py (make_loaders) and of evaluate.py (build_val_batches over the dataset): aspect
    groups for `shapes`, plain batches for the others."""
    dataset = val_set(eleven)
    args = batching_args(tiny_args, kind, batch_size)
    _, _, train_val_loader = train.make_loaders(args, dataset, dataset, 0, 1)
    evaluate_loader = torch.utils.data.DataLoader(dataset, collate_fn=data.collate_fn,
                                                  batch_sampler=build.build_val_batches(args, dataset,
                                                                                        range(len(dataset))))
    for loader in (train_val_loader, evaluate_loader):
        sizes = [len(batch) for batch in loader.batch_sampler]
        assert sum(sizes) == 11 and min(sizes) < batch_size, "a short batch must come, else nothing is tested"
        oracle = oracle_for(dataset)
        assert_scored_once(*evaluate.evaluate(oracle, PostProcess(), loader, dataset, "cpu"), dataset, oracle)


@pytest.mark.parametrize("kind, world", list(itertools.product(["shapes", "custom"], [2, 3])))
def test_every_val_image_is_scored_once_across_torchrun_ranks(eleven, tiny_args, monkeypatch, kind, world):
    """Under torchrun each rank predicts its DistributedSampler's share in batches of 3 (11 images: the sampler
    pads the shares with repeats); the gathered predictions hold every image once and score AP 1."""
    dataset = val_set(eleven)
    args = batching_args(tiny_args, kind, 3)
    oracle = oracle_for(dataset)
    loaders = [train.make_loaders(args, dataset, dataset, rank, world)[2] for rank in range(world)]
    stores = [evaluate.predict(oracle, PostProcess(), loader, "cpu")[0] for loader in loaders]
    assert min(oracle.seen) == 1 and sum(oracle.seen) == math.ceil(11 / world) * world, oracle.seen
    monkeypatch.setattr(evaluate, "is_distributed", lambda: True)
    monkeypatch.setattr(evaluate.dist, "get_world_size", lambda: world)
    monkeypatch.setattr(evaluate.dist, "all_gather_object", lambda parts, store: parts.__setitem__(slice(None), stores))
    assert_scored_once(*evaluate.evaluate(oracle, PostProcess(), loaders[0], dataset, "cpu"), dataset)


def test_every_image_of_a_folder_is_detected_once(eleven, tmp_path):
    """--images on 11 images in batches of 4: a detection record set and a PNG for every image."""
    folder = eleven[0]
    names = sorted(os.listdir(folder))
    transforms = data.make_transforms("val", max_size=77, eval_size=45)
    images = evaluate.ImageFolder(folder, names, transforms)
    oracle = OracleDetector([(images[i][0], torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.tensor([0]))
                             for i in range(len(names))], num_classes=1)
    results, paths = evaluate.detect_folder(oracle, PostProcess(), folder, class_names=["thing"], cat_ids=[1],
                                            device="cpu", transforms=transforms, output_dir=str(tmp_path / "out"),
                                            batch_size=4)
    assert oracle.seen == [1] * 11
    assert sorted(r["file_name"] for r in results if r["score"] > 0.5) == names
    assert sorted(os.path.basename(p) for p in paths) == names


def hand_made_checkpoint(path, args, class_names, model_state=None):
    """A checkpoint file as train.py writes it, without training: its arguments and classes (and weights if
    given)."""
    torch.save({"model": model_state or {}, "args": vars(args), "classes": {"ids": list(range(1, len(class_names) + 1)),
                                                                           "names": list(class_names)}}, path)
    return str(path)


def evaluate_with_oracle(monkeypatch, *argv):
    """evaluate.main in-process with the checkpoint's detector replaced by an oracle of its val set: (log, printed,
    the oracle)."""
    made = {}

    def oracle_detector(ckpt, args, class_names, source, vocabulary=None):
        made["oracle"] = oracle_for(build.build_dataset("val", args), class_names)
        return made["oracle"], build.build_postprocess(args)
    monkeypatch.setattr(evaluate, "checkpoint_detector", oracle_detector)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        log = evaluate.main([str(a) for a in argv])
    return log, buffer.getvalue(), made["oracle"]


@pytest.mark.parametrize("kind", ["shapes", "custom"])
def test_evaluate_py_scores_every_val_image_once(eleven, tmp_path, monkeypatch, cache, kind):
    """evaluate.py --resume CKPT --batch-size 3 builds its own loader: a `shapes` checkpoint (11 generated val
    images, aspect groups) and a custom-set one (plain batches)."""
    if kind == "shapes":
        args = parse_args("--output-dir", tmp_path, "--data-path", cache / "shapes", *TINY, "--shapes-num-val", 11)
    else:
        args = parse_args("--output-dir", tmp_path, *TINY_MODEL, "--dataset", "custom", "--val-json", eleven[1],
                          "--val-images", eleven[0], "--min-size", 45, "--max-size", 77)
    names = build.build_dataset("val", args).cat_names
    ckpt = hand_made_checkpoint(tmp_path / "ckpt.pth", args, names)
    log, _, oracle = evaluate_with_oracle(monkeypatch, "--resume", ckpt, "--batch-size", 3)
    assert log["coco_stats"][0] == pytest.approx(1.0) and oracle.seen == [1] * 11


# ----------------------------------------------------------------------------------------------------------
# Nothing to score
# ----------------------------------------------------------------------------------------------------------
def coco_of(anns, num_images=3):
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "width": 50, "height": 40} for i in range(1, num_images + 1)],
                  "annotations": anns, "categories": CATEGORIES}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def test_coco_stats_is_none_where_there_is_no_ground_truth_to_score():
    """pycocotools reports -1 for a set without ground truth: coco_stats says None instead, for crowd regions
    only, no annotations, and a choice of categories or images that holds none; with detections or without."""
    detections = [{"image_id": 1, "category_id": 4, "bbox": [3, 4, 20, 15], "score": 0.9}]
    crowd_only = coco_of(annotations(3, crowd=True))
    some = coco_of([dict(a, iscrowd=int(a["image_id"] != 2)) for a in annotations(3)])  # image 2 has real GT
    for gt, image_ids, cat_ids in [(crowd_only, None, None), (coco_of([]), None, None), (some, [1, 3], None),
                                   (some, None, [99]), (some, [1, 3], [4])]:
        for results in (detections, []):
            assert evaluate.coco_stats(gt, results, image_ids, cat_ids) is None, (image_ids, cat_ids)
    stats = evaluate.coco_stats(some, [dict(detections[0], image_id=2)], [2], [4])
    assert stats is not None and stats[0] == pytest.approx(1.0)
    assert evaluate.ov_coco_ap50(some, detections, ["square"], ["disc"], image_ids=[1, 3]) == \
        {"novel": None, "base": None, "all": None}


@pytest.mark.parametrize("crowd", [True, False], ids=["crowd regions only", "no annotations"])
def test_a_val_set_with_nothing_to_score_says_so_in_evaluate_py_and_in_training(tmp_path, monkeypatch, crowd):
    """evaluate.py prints 'nothing to score' and logs None, as train.py's evaluation of an epoch does (its console
    line says so too), instead of pycocotools' -1."""
    anns = annotations(len(SIZES), crowd=True) if crowd else []
    folder, ann_file = write_distinct_coco(tmp_path / "img", tmp_path / "ann.json", SIZES, anns, CATEGORIES)
    args = parse_args("--output-dir", tmp_path / "out", *TINY_MODEL, "--dataset", "custom", "--val-json", ann_file,
                      "--val-images", folder, "--min-size", 45, "--max-size", 77)
    ckpt = hand_made_checkpoint(tmp_path / "ckpt.pth", args, ["disc", "square"])
    log, printed, _ = evaluate_with_oracle(monkeypatch, "--resume", ckpt)
    assert log["coco_stats"] is None and "nothing to score" in printed and "-100.0" not in printed, printed
    dataset = val_set((folder, ann_file))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=data.collate_fn)
    run = types.SimpleNamespace(detr=oracle_for(dataset), postprocess=PostProcess(), val_loader=loader,
                                val_set=dataset, device=torch.device("cpu"), train_set=dataset, args=args)
    record = {"epoch": 0, "time_s": 1.0, "train_loss": 1.0}
    train.evaluate_epoch(run, record)
    assert record["coco_stats"] is None and train.epoch_line(0, record).endswith("(nothing to score)")


# ----------------------------------------------------------------------------------------------------------
# The evaluation schedule
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("epochs, every, evaluated", [(5, 0, [4]), (5, 1, [0, 1, 2, 3, 4]), (5, 2, [1, 3, 4]),
                                                      (6, 3, [2, 5]), (5, 7, [4]), (1, 2, [0])])
def test_eval_every_n_counts_epochs_from_one_and_always_evaluates_the_last(epochs, every, evaluated):
    """Epochs are numbered from 0 in the log; --eval-every N means after N epochs, 2N, ...: epochs N-1, 2N-1, ...,
    and the last one."""
    args = types.SimpleNamespace(epochs=epochs, eval_every=every)
    assert [e for e in range(epochs) if train.evaluation_due(e, args)] == evaluated


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step:UserWarning")  # no optimizer step here
def test_a_run_evaluates_on_its_schedule_and_a_resume_catches_up_a_missed_evaluation(tiny_args, monkeypatch,
                                                                                     tmp_path):
    """Through train.main (the steps and the scoring stubbed out): --epochs 5 --eval-every 2 evaluates after epochs
    1, 3 and 4. A run killed after epoch 3's checkpoint, before its evaluation, evaluates epoch 3 when resumed; one
    killed after epoch 2's does not evaluate epoch 2 (it was not due); both go on to epochs 3 and 4."""
    evaluated = []
    monkeypatch.setattr(train, "train_one_epoch", lambda *a, **k: {"loss": 0.0})
    monkeypatch.setattr(train, "evaluate_epoch", lambda run, log: evaluated.append(log["epoch"]) or
                        log.update(coco_stats=[0.5] * 12))
    real_save = train.save_epoch_checkpoint
    monkeypatch.setattr(train, "save_epoch_checkpoint", lambda run, epoch: None)
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        train.main(tiny_args("--epochs", 5, "--eval-every", 2, out=tmp_path / "run"))
    assert evaluated == [1, 3, 4]
    monkeypatch.setattr(train, "save_epoch_checkpoint", real_save)
    with quiet:
        train.main(tiny_args("--epochs", 1, out=tmp_path / "one"))  # a real checkpoint to edit
    monkeypatch.setattr(train, "save_epoch_checkpoint", lambda run, epoch: None)
    for killed_after in (3, 2):
        ckpt = torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=False)
        ckpt["epoch"] = killed_after
        ckpt["log"] = [{"epoch": e, "lr": 0.1, "time_s": 0.0} for e in range(killed_after + 1)]
        torch.save(ckpt, tmp_path / f"killed{killed_after}.pth")
        evaluated.clear()
        with quiet:
            train.main(tiny_args("--epochs", 5, "--eval-every", 2, "--resume", tmp_path / f"killed{killed_after}.pth",
                                 out=tmp_path / f"resumed{killed_after}"))
        assert evaluated == [3, 4], (killed_after, evaluated)


# ----------------------------------------------------------------------------------------------------------
# A --dataset override keeps the checkpoint's class head
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco_checkpoints(coco_dir, tmp_path_factory):
    """Untrained tiny checkpoints of an ov-coco run (the open-vocabulary head over COCO's 80 CLIP rows) and of a
    coco run (a linear head): {dataset: path}."""
    root = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for dataset in ("ov-coco", "coco"):
        args = parse_args("--output-dir", root, *TINY_MODEL, "--backbone", "resnet18", "--dataset", dataset,
                          "--data-path", coco_dir, "--label-embeddings", coco_dir / "labels.pt", "--method",
                          "baseline", "--min-size", 80, "--max-size", 96)
        torch.manual_seed(0)
        model, _, _ = build.build_model(args, list(COCO_80))
        torch.save({"model": model.state_dict(), "args": vars(args),
                    "classes": {"ids": COCO_IDS, "names": list(COCO_80)}}, root / f"{dataset}.pth")
        paths[dataset] = str(root / f"{dataset}.pth")
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("trained, override", [("ov-coco", "coco"), ("coco", "ov-coco")])
def test_a_dataset_override_keeps_the_class_head_of_the_checkpoints_dataset(coco_checkpoints, trained, override):
    """The head was trained for the checkpoint's dataset: an ov-coco checkpoint scored on coco keeps its
    open-vocabulary head, a coco one scored on ov-coco its linear head; both load strictly. The detections kept per
    image are the scored set's protocol (LVIS: 300)."""
    ckpt = torch.load(coco_checkpoints[trained], weights_only=False)
    args = build.checkpoint_args(ckpt, {"dataset": override})
    with contextlib.redirect_stdout(io.StringIO()):
        model, postprocess = build.checkpoint_detector(ckpt, args, list(COCO_80), coco_checkpoints[trained])
    assert isinstance(model.class_embed[0], LabelEmbeddingClassifier) == (trained == "ov-coco")
    torch.testing.assert_close(model.state_dict()["class_embed.0.bias"], ckpt["model"]["class_embed.0.bias"])
    assert postprocess.num_select == 100
    assert build.build_postprocess(build.checkpoint_args(ckpt, {"dataset": "lvis"})).num_select == 300


@pytest.mark.slow
@pytest.mark.parametrize("trained, override", [("ov-coco", "coco"), ("coco", "ov-coco")])
def test_evaluate_py_scores_a_checkpoint_on_another_dataset_with_its_own_head(coco_checkpoints, coco_dir, trained,
                                                                              override):
    """Through evaluate.py: --dataset coco on an ov-coco checkpoint and --dataset ov-coco on a coco one run to AP."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        log = evaluate.main(["--resume", coco_checkpoints[trained], "--dataset", override, "--data-path",
                             str(coco_dir), "--device", "cpu"])
    assert log["dataset"] == override and log["coco_stats"] is not None, buffer.getvalue()
