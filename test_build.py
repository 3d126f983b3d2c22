"""Tests for build.py, the one map from command-line arguments to objects: datasets of every layout (COCO,
OV-COCO, LVIS, custom, shapes) at the sizes the flags give, the label table's flags, the cache folder, and the
errors of a missing or half layout. CPU, tiny sizes, tmp_path only."""
import ast
import importlib.metadata
import json
import os
import random
import re

import pytest
import torch

import build
import data
import errors
import label_dictionary
from conftest import COCO_80, HERE, ann, parse_args, write_coco


def dataset_args(*argv):
    """train.py's arguments of a dataset command line (its defaults filled in, as build.py receives them)."""
    return parse_args(*argv)


def test_lvis_style_coco_url_images_are_found_in_either_folder(tmp_path):
    images = [{"id": 139, "coco_url": "http://images.cocodataset.org/val2017/000000000139.jpg",
               "width": 30, "height": 20},
              {"id": 9, "coco_url": "http://images.cocodataset.org/train2017/000000000009.jpg",
               "width": 20, "height": 30}]
    cats = [{"id": 1, "name": "aerosol_can", "synset": "aerosol.n.02"}]
    anns = [ann(1, 139, 1, [1, 2, 3, 4]), ann(2, 9, 1, [2, 2, 4, 4])]
    write_coco(tmp_path / "val2017", tmp_path / "annotations" / "lvis_v1_val.json", images[:1], anns, cats)
    write_coco(tmp_path / "train2017", tmp_path / "annotations" / "lvis_v1_val.json", images[1:], anns, cats)
    with open(tmp_path / "annotations" / "lvis_v1_val.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    ds = build.build_dataset("val", dataset_args("--dataset", "lvis", "--data-path", tmp_path))
    assert ds.image_path(139) == str(tmp_path / "val2017" / "000000000139.jpg")
    assert ds.image_path(9) == str(tmp_path / "train2017" / "000000000009.jpg")
    assert [int(ds[i][1]["image_id"]) for i in range(2)] == [9, 139]
    assert ds.cat_names == ["aerosol_can"]


def test_build_custom_dataset(small_coco):
    folder, ann_file = small_coco
    args = dataset_args("--dataset", "custom", "--train-json", ann_file, "--train-images", folder,
                        "--val-json", ann_file, "--val-images", folder)
    image, target = build.build_dataset("val", args)[0]
    assert image.shape == (3, 666, 1332), "shorter side lowered from 800 so that the longer fits 1333"
    assert target["orig_size"].tolist() == [50, 100] and target["size"].tolist() == list(image.shape[1:])
    args.val_json = None
    with pytest.raises(ValueError, match="needs --val-json: a COCO-format JSON"):
        build.build_dataset("val", args)


def test_custom_dataset_min_size_max_size(small_coco):
    """--min-size/--max-size reach the custom pipelines: evaluation at min_size, training never above it."""
    folder, ann_file = small_coco
    args = dataset_args("--dataset", "custom", "--train-json", ann_file, "--train-images", folder,
                        "--val-json", ann_file, "--val-images", folder, "--min-size", 40, "--max-size", 120)
    image, _ = build.build_dataset("val", args)[0]
    assert image.shape == (3, 40, 80), "50x100 image: shorter side 40"
    train = build.build_dataset("train", args)
    for seed in range(6):
        random.seed(seed)
        image, _ = train[0]
        assert min(image.shape[1:]) <= 40 and max(image.shape[1:]) <= 120, image.shape
    args.min_size, args.max_size = 80, 60
    with pytest.raises(ValueError, match="--min-size 80"):
        build.build_dataset("val", args)


def test_build_shapes_dataset(tmp_path):
    """shapes is evaluated with its shorter side at shapes_min_size (longer side at most shapes_max_size); its
    training batches are resized as one, to a shorter side drawn among its scales per batch."""
    args = dataset_args("--dataset", "shapes", "--data-path", tmp_path, "--shapes-num-train", 6,
                        "--shapes-num-val", 1, "--shapes-min-size", 64, "--shapes-max-size", 80,
                        "--shapes-max-objects", 2)
    train, val = build.build_dataset("train", args), build.build_dataset("val", args)
    assert len(train) == 6 and len(val) == 1 and train.cat_names == val.cat_names
    _, target = val[0]
    assert min(target["size"].tolist()) == 64 or max(target["size"].tolist()) == 80
    batch_sampler, collate = build.build_train_batches(args, train, range(len(train)))
    assert isinstance(batch_sampler, data.GroupedBatchSampler) and isinstance(collate, data.BatchResize)
    assert data.shapes_scales(64) == (48, 64)
    drawn = set()
    for seed in range(8):
        random.seed(seed)
        _, _, targets = collate([train[i] for i in range(4)])
        sizes = [t["size"].tolist() for t in targets]
        capped = [s for s in sizes if max(s) == 80]  # the longer side at its cap: the shorter one lowered
        sides = {min(s) for s in sizes if s not in capped}
        assert len(sides) <= 1 and all(max(s) <= 80 for s in sizes), sizes
        drawn |= sides
    assert drawn == {48, 64}


def test_build_ov_coco_keeps_base_for_training_and_65_for_evaluation(tmp_path):
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(COCO_80)]
    images = [{"id": 1, "file_name": "1.jpg", "width": 64, "height": 48}]
    anns = [ann(i + 1, 1, c["id"], [1, 1, 5, 5]) for i, c in enumerate(cats)]
    for split in ("train", "val"):
        write_coco(tmp_path / f"{split}2017", tmp_path / "annotations" / f"instances_{split}2017.json",
                   images, anns, cats)
    args = dataset_args("--dataset", "ov-coco", "--data-path", tmp_path)
    train, val = build.build_dataset("train", args), build.build_dataset("val", args)
    assert train.cat_names == val.cat_names == list(COCO_80)
    train_names = {train.cat_names[i] for i in train[0][1]["labels"].tolist()}
    val_names = {val.cat_names[i] for i in val[0][1]["labels"].tolist()}
    assert train_names == set(data.OV_COCO_BASE)
    assert val_names == set(data.OV_COCO_BASE) | set(data.OV_COCO_NOVEL)
    coco = build.build_dataset("val", dataset_args("--dataset", "coco", "--data-path", tmp_path))
    assert len(coco[0][1]["labels"]) == 80


def test_build_dataset_errors(tmp_path):
    missing = str(tmp_path / "coco-nowhere")
    with pytest.raises(FileNotFoundError, match="coco-nowhere.*train2017"):
        build.build_dataset("train", dataset_args("--dataset", "coco", "--data-path", missing))
    os.makedirs(tmp_path / "half" / "train2017")
    with pytest.raises(FileNotFoundError, match=r"instances_train2017\.json not found"):
        build.build_dataset("train", dataset_args("--dataset", "coco", "--data-path", tmp_path / "half"))
    with pytest.raises(FileNotFoundError, match="lvis_v1"):
        build.build_dataset("val", dataset_args("--dataset", "lvis", "--data-path", tmp_path / "half"))
    with pytest.raises(ValueError, match="data-path"):
        build.build_dataset("train", dataset_args("--dataset", "coco"))
    with pytest.raises(ValueError, match="'voc'"):
        args = dataset_args("--dataset", "coco", "--data-path", tmp_path)
        args.dataset = "voc"  # past the parser's choices, as a hand-made namespace could be
        build.build_dataset("train", args)
    with pytest.raises(ValueError, match="'test'"):
        build.build_dataset("test", dataset_args("--data-path", tmp_path))


def test_label_table_maps_its_flags(tmp_path):
    """--label-embeddings FILE is the table's source, rows L2-normalized, in the order of the names given."""
    torch.save(torch.eye(3) * 2, tmp_path / "eye.pt")
    args = dataset_args("--label-embeddings", tmp_path / "eye.pt", "--clip-model", "RN50", "--clip-pretrained",
                        "openai")
    torch.testing.assert_close(build.build_label_table(args, ["red circle", "blue triangle", "green square"]),
                               torch.eye(3))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP_DETR_CACHE", str(tmp_path))
    assert errors.cache_dir() == str(tmp_path)
    monkeypatch.delenv("CLIP_DETR_CACHE")
    assert errors.cache_dir() == os.path.expanduser("~/.cache/clip-detr")


def test_an_empty_cache_variable_means_the_default_not_the_current_folder(monkeypatch, tmp_path):
    """CLIP_DETR_CACHE= (set, empty) put the label dictionaries and the shapes set into the current folder; every
    cache goes to the default folder instead."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLIP_DETR_CACHE", "")
    monkeypatch.chdir(tmp_path)
    default = str(tmp_path / "home" / ".cache" / "clip-detr")
    assert errors.cache_dir() == default
    args = parse_args("--output-dir", tmp_path / "out")
    assert build.dataset_location("val", args)[0][0].startswith(default + os.sep)
    label_dictionary.label_embeddings(["red circle", "blue triangle"], model_name="ViT-S-32-alt", pretrained="none")
    assert os.listdir(os.path.join(default, "label_embeddings")) and sorted(os.listdir(tmp_path)) == ["home"]


# Every module of the project: the .py files beside this one that are neither tests nor the test scaffolding.
PROJECT = tuple(sorted(name[:-3] for name in os.listdir(HERE)
                       if name.endswith(".py") and not name.startswith("test_") and name != "conftest.py"))


def project_imports(name):
    """The project modules that module `name` imports (anywhere in the file)."""
    tree = ast.parse(open(os.path.join(HERE, f"{name}.py")).read())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    return names & set(PROJECT)


def below(graph, name):
    """The modules `name` imports, directly or through others."""
    found, todo = set(), list(graph[name])
    while todo:
        module = todo.pop()
        if module not in found:
            found.add(module)
            todo.extend(graph[module])
    return found


def test_the_structure_reads_top_down():
    """No two files import each other (directly or around a circle); train.py and evaluate.py are peers over
    build.py (evaluate never imports train); nothing below build.py reads an argparse namespace."""
    graph = {name: project_imports(name) for name in PROJECT}

    def visit(name, path):
        assert name not in path, f"import circle: {' -> '.join(path + [name])}"
        for child in sorted(graph[name]):
            visit(child, path + [name])
    for name in PROJECT:
        visit(name, [])
    assert "build" in graph["train"] and "build" in graph["evaluate"] and "train" not in graph["evaluate"]
    lower = below(graph, "build")
    assert {"errors", "model", "matcher", "alignnet", "dynql", "data", "label_dictionary",
            "transformers_checkpoint"} <= lower
    for name in lower:
        source = open(os.path.join(HERE, f"{name}.py")).read()
        assert not re.search(r"\bargs\.|getattr\(args\b", source), f"{name}.py reads the command line"


@pytest.mark.slow
def test_the_full_suite_has_every_test_requirement():
    """The fast tier skips the tests of a missing optional package (transformers, onnx, ...) with a reason; the full
    suite must never skip them silently: every package of requirements-test.txt is installed where it runs."""
    names = []
    with open(os.path.join(HERE, "requirements-test.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):
                names.append(re.split(r"[<>=!~\[; ]", line)[0])
    assert "transformers" in names and "onnxruntime" in names
    missing = []
    for name in names:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    assert not missing, f"not installed: {missing}; run pip install -r requirements-test.txt"


# ----------------------------------------------------------------------------------------------------------
# The constants the paper and the official Deformable DETR fix
# ----------------------------------------------------------------------------------------------------------
def test_coco_defaults_are_the_papers_setup(tmp_path):
    """§4.1: learning rate 2e-4, 12 epochs with the drop at epoch 10, CLIP RN50x64 label embeddings, five DynQuery
    sets from 0.1 to 0.9 at rho 1, AlignNet on label + scale; the rest as the official Deformable DETR (batch 2 per
    GPU, backbone lr 2e-5, weight decay 1e-4, gradient clip 0.1, 300 queries, 6 + 6 layers of width 256, FFN 1024,
    8 heads, 4 levels and points, dropout 0.1, seed 42) with box refinement and two-stage."""
    args = parse_args("--dataset", "coco", "--device", "cpu", "--output-dir", tmp_path)
    paper = dict(lr=2e-4, epochs=12, lr_drop=[10], clip_model="RN50x64", clip_pretrained="openai",
                 dynql_betas=[0.1, 0.3, 0.5, 0.7, 0.9], dynql_rho=1.0, align_feature="label+scale", method="clip-detr",
                 align_loss_coef=1.0)
    official = dict(batch_size=2, lr_backbone=2e-5, weight_decay=1e-4, clip_max_norm=0.1, num_queries=300,
                    enc_layers=6, dec_layers=6, hidden_dim=256, dim_feedforward=1024, nheads=8, num_feature_levels=4,
                    enc_n_points=4, dec_n_points=4, dropout=0.1, seed=42, backbone="resnet50", with_box_refine=True,
                    two_stage=True)
    assert {key: getattr(args, key) for key in paper | official} == paper | official


def test_optimizer_has_the_official_groups_and_adamw_constants(tmp_path):
    """Official parameter groups: the ResNet (backbone.0) at --lr-backbone, every sampling-offset and
    reference-point projection at 0.1 x --lr, everything else at --lr; frozen parameters in none. AdamW keeps
    its defaults, as the official code does: betas (0.9, 0.999), eps 1e-8, the one --weight-decay for all."""
    args = parse_args("--method", "baseline", "--no-two-stage", "--hidden-dim", "32", "--dim-feedforward", "32",
                      "--enc-layers", "1", "--dec-layers", "1", "--nheads", "4", "--num-queries", "5",
                      "--lr", "3e-4", "--lr-backbone", "5e-5", "--weight-decay", "3e-3", "--output-dir", tmp_path)
    detr = build.build_model(args, ["a", "b"])[0]
    detr.backbone[0].freeze_stem_and_layer1()
    optimizer = build.build_optimizer(detr, args)
    group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
    for name, p in detr.named_parameters():
        expected = (None if not p.requires_grad else 1 if name.startswith("backbone.0.") else
                    2 if "sampling_offsets" in name or "reference_points" in name else 0)
        assert group_of.get(id(p)) == expected, name
    assert "transformer.reference_points.weight" in dict(detr.named_parameters())
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([3e-4, 5e-5, 3e-5])
    for group in optimizer.param_groups:
        assert (group["betas"], group["eps"], group["weight_decay"], group["amsgrad"]) == ((0.9, 0.999), 1e-8, 3e-3,
                                                                                          False)


def test_the_training_criterion_has_the_official_constants(tmp_path):
    """Matching cost 2 focal + 5 L1 + 2 GIoU, focal alpha 0.25 and gamma 2 in the matcher and in the losses (the
    set criterion's and DynQL's), loss weights 2 / 5 / 2 and 1 for Eq. 5: the training run's objects, not only
    the classes' defaults."""
    import inspect

    import dynql
    import matcher
    args = parse_args("--method", "baseline", "--hidden-dim", "32", "--dim-feedforward", "32", "--enc-layers", "1",
                      "--dec-layers", "1", "--nheads", "4", "--num-queries", "5", "--output-dir", tmp_path)
    with torch.device("meta"):
        _, criterion, _ = build.build_model(args, ["a", "b"])
    m = criterion.matcher
    assert (m.cost_class, m.cost_bbox, m.cost_giou, m.alpha, m.gamma, criterion.focal_alpha) == (2, 5, 2, 0.25, 2, 0.25)
    defaults = lambda fn: {k: v.default for k, v in inspect.signature(fn).parameters.items()  # noqa: E731
                           if v.default is not inspect.Parameter.empty}
    assert defaults(matcher.focal_loss) == dict(alpha=0.25, gamma=2.0)
    assert defaults(dynql.dynql_loss)["focal_alpha"] == defaults(dynql.dynql_set_losses)["focal_alpha"] == 0.25
    assert matcher.weight_dict(["loss_ce", "loss_bbox", "loss_giou", "loss_align"]) == dict(
        loss_ce=2.0, loss_bbox=5.0, loss_giou=2.0, loss_align=1.0)
