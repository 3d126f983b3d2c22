"""Every option of train.py and evaluate.py reaches what it configures, or is refused where it would mean nothing.

The tables below are checked against the parsers (`parser._actions`): an option added to either parser without a
row here fails `test_every_option_of_*_has_a_row`, and every row is a test of its own. A row says, for a value that
differs from the default (and from the other rows' values, so that two flags swapped are told apart; 0 where 0 is
allowed), which object holds it once the command has run: the optimizer's parameter groups, the model, the datasets
and loaders, the schedule, the training loop's calls, the evaluator's datasets and loaders, the exporter's metadata,
the files written. The same object of a run without the option must hold something else (the plain tiny run; for
evaluate.py, the mode's run with the other rows), so a row cannot pass by chance.
Rows that share a command line run together (a few builds of the tiny detector, no training step, no inference):
`train.main` runs whole, its steps, evaluations and checkpoint writes replaced by recorders; `evaluate.main` runs
whole, its predictions, score maps, exports and ONNX sessions replaced by recorders.

train.py: an option either acts, is refused (a dataset flag the dataset does not read, two sources of the same
weights, a variant that cannot be built), or is said to be unused (a flag of a training module the --method does not
build: a sweep over Table 4 passes every method the same flags). evaluate.py has seven modes (the val set's AP with
--resume, --per-layer, --visualize, --images, --export-onnx, --onnx, --pretrained); for every option and every mode the
table says whether the option acts, is refused (with a message naming it), or is what selects the mode.

No equations; no tensors beyond those the rows inspect. Deviations from the paper: none (the paper has no CLI).
"""
import contextlib
import io
import json
import os
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

import build
import data
import evaluate
import model as model_module
import train
from conftest import RESNET18, TINY_SHAPES, share_resnet18, write_coco
from errors import InputError
from model import MSDeformAttn
from onnx_export import ONNX_FORMAT
from transformers_checkpoint import resnet_name

# The training loop runs with its steps recorded, not made: the scheduler steps after no optimizer step.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")

# The tiny detector of conftest.TINY_MODEL without --no-progress (a row of its own), on the CPU.
MODEL = ["--hidden-dim", "32", "--dim-feedforward", "64", "--enc-layers", "1", "--dec-layers", "2", "--nheads", "4",
         "--num-queries", "10", "--batch-size", "2", "--num-workers", "0", "--device", "cpu"]
SHAPES = [*TINY_SHAPES, *MODEL]
NAMES = [name for name, _, _ in data.SHAPES_CATEGORIES]
TABLE_WIDTH = 12  # the label dictionary's width in these tests


def options(parser):
    return [action.dest for action in parser._actions if action.option_strings and action.dest != "help"]


TRAIN_OPTIONS = options(train.get_parser())
EVAL_OPTIONS = options(evaluate.get_parser())


# ----------------------------------------------------------------------------------------------------------
# Recorders
# ----------------------------------------------------------------------------------------------------------
def fake_label_table(names):
    """A (K, TABLE_WIDTH) label dictionary whose row depends on the name alone (as CLIP's does)."""
    rows = [torch.randn(TABLE_WIDTH, generator=torch.Generator().manual_seed(sum(map(ord, n)) * 31 + len(n)))
            for n in names]
    return F.normalize(torch.stack(rows), dim=-1)


def record_label_tables(mp, calls):
    """build.label_embeddings without CLIP: the arguments of each call are recorded; a label file is read as usual."""
    real = build.label_embeddings

    def label_embeddings(names, **kwargs):
        calls.append(dict(kwargs, names=list(names)))
        if kwargs.get("embeddings_file"):
            return real(names, **kwargs)
        return fake_label_table(names)
    mp.setattr(build, "label_embeddings", label_embeddings)


def imagenet_resnet(name):
    """The stand-in for torchvision's ImageNet download: a ResNet whose stem holds 0.5 everywhere."""
    fn_name, _, _ = model_module._RESNETS[name]
    resnet = {"resnet18": RESNET18}.get(fn_name) or getattr(torchvision.models, fn_name)  # not the shared one
    resnet = resnet(weights=None, norm_layer=model_module.FrozenBatchNorm2d)
    with torch.no_grad():
        resnet.conv1.weight.fill_(0.5)
    return resnet




class Progress:
    def __init__(self, seen, **kwargs):
        seen.progress.append(kwargs)

    def update(self, n):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def run_train(argv, cwd):
    """train.main of `argv` in the folder `cwd` (where the default --output-dir lands), its training steps,
    evaluations and checkpoint writes recorded instead of made: what the run built and what its loop was asked."""
    seen = types.SimpleNamespace(labels=[], steps=[], evaluated=[], saved=[], progress=[], logs=set(),
                                 out=io.StringIO())
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(seen.out):
        mp.chdir(cwd)
        share_resnet18(mp)
        record_label_tables(mp, seen.labels)
        mp.setattr(train, "native_bf16", lambda device: False)  # --amp auto is off on every machine here
        mp.setattr(model_module, "load_imagenet_resnet", imagenet_resnet)
        real_build_run = train.build_run

        def build_run(*a):
            run = seen.run = real_build_run(*a)
            seen.torch_seed = torch.initial_seed()
            seen.train_loader = run.train_loader
            run.train_loader = [None] * len(run.train_loader)  # no batch is loaded: the steps are recorded
            return run

        def train_step(model, criterion, batch, optimizer, device, **kwargs):
            seen.steps.append(dict(kwargs, device=device))
            return 0.0, {"loss_ce": 0.0}

        def save_epoch_checkpoint(run, epoch):
            seen.saved.append(epoch)
            run.saved_epoch = epoch

        mp.setattr(train, "build_run", build_run)
        mp.setattr(train, "train_step", train_step)
        mp.setattr(train, "evaluate_epoch", lambda run, log: seen.evaluated.append(log["epoch"]))
        mp.setattr(train, "save_epoch_checkpoint", save_epoch_checkpoint)
        mp.setattr(train, "tqdm", lambda **kwargs: Progress(seen, **kwargs))
        real_write_log = train.write_log

        def write_log(path, history):
            seen.logs.add(os.path.dirname(os.path.abspath(path)))
            real_write_log(path, history)
        mp.setattr(train, "write_log", write_log)
        args = train.finalize_args(train.get_parser().parse_args([str(a) for a in argv]))
        train.main(args)
    seen.out = seen.out.getvalue()
    seen.cwd = cwd
    seen.detr = seen.run.detr
    seen.epochs = [int(step["where"].split()[1]) for step in seen.steps]
    return seen


# ----------------------------------------------------------------------------------------------------------
# What the rows look at
# ----------------------------------------------------------------------------------------------------------
def attn_modules(detr):
    return [m for m in detr.modules() if isinstance(m, MSDeformAttn)]


def resize_of(transforms):
    """(sizes, max_size) of the one RandomResize of an evaluation pipeline."""
    resize = next(t for t in transforms.transforms if isinstance(t, data.RandomResize))
    return tuple(resize.sizes), resize.max_size


def image_sides(dataset):
    sides = [side for img in dataset.coco.imgs.values() for side in (img["width"], img["height"])]
    return min(sides), max(sides)


def boxes_per_image(dataset):
    counts = {}
    for ann in dataset.coco.anns.values():
        counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
    return max(counts.values())


def untrained_classes(seen):
    """The names the class head never trains on (its train mask), None for a linear head."""
    head = seen.detr.class_embed[0]
    mask = getattr(head, "train_mask", None)
    return None if mask is None else [n for n, trained in zip(seen.run.train_set.cat_names, mask) if not trained]


def annotations_of(dataset, name):
    cat_id = dataset.cat_ids[dataset.cat_names.index(name)]
    return sum(ann["category_id"] == cat_id for ann in dataset.coco.anns.values())


def epochs_lr_dropped_at(seen):
    history = seen.run.history
    return [h["epoch"] for before, h in zip(history, history[1:]) if h["lr"] < before["lr"]]


def steps_per_epoch(seen):
    return max(seen.epochs.count(e) for e in set(seen.epochs))


def stem(detr):
    conv1 = detr.backbone[0].body.conv1.weight
    return bool((conv1 == 0.5).all()), conv1.requires_grad


def dropouts(detr):
    return ({m.p for m in detr.transformer.modules() if isinstance(m, nn.Dropout)}
            | {m.dropout for m in detr.transformer.modules() if isinstance(m, nn.MultiheadAttention)})


# ----------------------------------------------------------------------------------------------------------
# train.py's table
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Acts:
    """The option's argv, added to the command line of `profile`, makes observe(run) == expected; the plain tiny run
    observes something else."""
    profile: str
    argv: list
    observe: object
    expected: object


@dataclass
class Refused:
    """The option's argv, added to the command line of `context`, is an error naming `names`."""
    argv: list
    names: str
    context: str = "shapes"


@dataclass
class Noted:
    """The option's argv, added to the command line of `context`, runs and prints `note`."""
    argv: list
    note: str
    context: str = "shapes"


def train_table(p):
    """dest -> its rows; `p` holds the paths the rows name (fixture train_paths)."""
    return {
        # data
        "dataset": [Acts("custom", ["--dataset", "custom"], lambda s: s.run.train_set.ann_file, p.train_json)],
        "data_path": [Acts("all", ["--data-path", p.other], lambda s: s.run.train_set.ann_file.startswith(p.other),
                           True),
                      Refused(["--data-path", p.other], "--data-path", context="custom")],
        "train_json": [Acts("custom", ["--train-json", p.train_json], lambda s: s.run.train_set.ann_file, p.train_json),
                       Refused(["--train-json", p.train_json], "--train-json")],
        "train_images": [Acts("custom", ["--train-images", p.train_images], lambda s: s.run.train_set.img_folders,
                              [p.train_images]),
                         Refused(["--train-images", p.train_images], "--train-images")],
        "val_json": [Acts("custom", ["--val-json", p.val_json], lambda s: s.run.val_set.ann_file, p.val_json),
                     Refused(["--val-json", p.val_json], "--val-json")],
        "val_images": [Acts("custom", ["--val-images", p.val_images], lambda s: s.run.val_set.img_folders,
                            [p.val_images]),
                       Refused(["--val-images", p.val_images], "--val-images")],
        "num_workers": [Acts("all", ["--num-workers", "2"],
                             lambda s: (s.train_loader.num_workers, s.run.val_loader.num_workers), (2, 2))],
        "min_size": [Acts("all", ["--min-size", "60"],
                          lambda s: (tuple(s.train_loader.collate_fn.sizes), resize_of(s.run.val_set.transforms)[0]),
                          (data.shapes_scales(60), (60,))),
                     Acts("custom", ["--min-size", "50"], lambda s: resize_of(s.run.val_set.transforms)[0], (50,))],
        "max_size": [Acts("all", ["--max-size", "100"],
                          lambda s: (s.train_loader.collate_fn.max_size, resize_of(s.run.val_set.transforms)[1]),
                          (100, 100)),
                     Acts("custom", ["--max-size", "70"], lambda s: resize_of(s.run.val_set.transforms)[1], 70)],
        **{f"shapes_{key}": [Acts("all", [f"--shapes-{key.replace('_', '-')}", value], observe, expected),
                             Refused([f"--shapes-{key.replace('_', '-')}", value], f"--shapes-{key.replace('_', '-')}",
                                     context="custom")]
           for key, value, observe, expected in [
               ("num_train", "6", lambda s: len(s.run.train_set), 6),
               ("num_val", "5", lambda s: len(s.run.val_set), 5),
               ("min_size", "70", lambda s: image_sides(s.run.train_set)[0] >= 70, True),
               ("max_size", "90", lambda s: image_sides(s.run.train_set)[1] <= 90, True),
               ("max_objects", "1", lambda s: boxes_per_image(s.run.train_set), 1),
               ("seed", "5", lambda s: s.run.train_set.ann_file, p.shapes_seed_5)]},
        "novel_classes": [Acts("all", ["--novel-classes", p.novel],
                               lambda s: (untrained_classes(s), p.novel in s.run.train_set.cat_names,
                                          annotations_of(s.run.train_set, p.novel)), ([p.novel], True, 0)),
                          Refused(["--dataset", "ov-coco", "--novel-classes", "dog"], "--novel-classes",
                                  context="bare")],
        # detector
        "backbone": [Acts("all", ["--backbone", "resnet34"],
                          lambda s: resnet_name(s.detr.backbone[0].body), "resnet34")],
        "pretrained_backbone": [Acts("all", ["--pretrained-backbone"], lambda s: stem(s.detr), (True, False)),
                                Refused(["--pretrained", p.official, "--pretrained-backbone"],
                                        "--pretrained-backbone")],
        "pretrained": [Acts("dynql", ["--pretrained", p.official],
                            lambda s: (bool((s.detr.transformer.level_embed == 0.25).all()),
                                       s.detr.backbone[0].body.conv1.weight.requires_grad), (True, False))],
        "hidden_dim": [Acts("all", ["--hidden-dim", "64"],
                            lambda s: (s.detr.transformer.d_model, s.detr.input_proj[0][0].out_channels), (64, 64))],
        "dim_feedforward": [Acts("all", ["--dim-feedforward", "48"],
                                 lambda s: {m.out_features for n, m in s.detr.transformer.named_modules()
                                            if n.endswith("linear1")}, {48})],
        "enc_layers": [Acts("all", ["--enc-layers", "3"], lambda s: len(s.detr.transformer.encoder.layers), 3),
                       Acts("plain", ["--enc-layers", "0"], lambda s: len(s.detr.transformer.encoder.layers), 0)],
        "dec_layers": [Acts("all", ["--dec-layers", "1"],
                            lambda s: (s.detr.transformer.decoder.num_layers, len(s.detr.transformer.decoder.layers)),
                            (1, 1))],
        "nheads": [Acts("all", ["--nheads", "2"],
                        lambda s: {m.n_heads for m in attn_modules(s.detr)}
                        | {m.num_heads for m in s.detr.modules() if isinstance(m, nn.MultiheadAttention)}, {2})],
        "num_queries": [Acts("all", ["--num-queries", "7"],
                             lambda s: (s.detr.num_queries, s.detr.transformer.two_stage_num_proposals), (7, 7)),
                        Acts("custom", ["--num-queries", "9"],
                             lambda s: getattr(s.detr, "query_embed", nn.Embedding(1, 1)).num_embeddings, 9)],
        "num_feature_levels": [Acts("all", ["--num-feature-levels", "5"],
                                    lambda s: (len(s.detr.input_proj), s.detr.transformer.level_embed.shape[0],
                                               {m.n_levels for m in attn_modules(s.detr)}), (5, 5, {5}))],
        "enc_n_points": [Acts("all", ["--enc-n-points", "6"],
                              lambda s: {layer.self_attn.n_points for layer in s.detr.transformer.encoder.layers},
                              {6})],
        "dec_n_points": [Acts("all", ["--dec-n-points", "8"],
                              lambda s: {layer.cross_attn.n_points for layer in s.detr.transformer.decoder.layers},
                              {8})],
        "dropout": [Acts("all", ["--dropout", "0.2"], lambda s: dropouts(s.detr), {0.2})],
        "with_box_refine": [Acts("plain", ["--no-two-stage", "--no-with-box-refine"],
                                 lambda s: (s.detr.with_box_refine, len({id(m) for m in s.detr.bbox_embed})),
                                 (False, 1)),
                            Refused(["--no-with-box-refine"], "--with-box-refine")],
        "two_stage": [Acts("custom", ["--no-two-stage"],
                           lambda s: (s.detr.two_stage, s.detr.transformer.two_stage, s.detr.with_box_refine),
                           (False, False, True)),
                      Refused(["--no-two-stage", "--method", "dynql"], "--two-stage")],
        "attn_impl": [Acts("all", ["--attn-impl", "gather"], lambda s: {m.attn_impl for m in attn_modules(s.detr)},
                           {"gather"})],
        # CLIP-DETR
        "method": [Acts("custom", ["--method", "baseline"], lambda s: (s.detr.alignnet, s.detr.dynql), (None, None)),
                   Acts("plain", ["--method", "alignnet"],
                        lambda s: (s.detr.alignnet is not None, s.detr.dynql, s.detr.align_loss), (True, None, True)),
                   Acts("dynql", ["--method", "dynql"],
                        lambda s: (s.detr.dynql is not None, s.detr.align_loss,
                                   s.detr.alignnet.logit_beta.requires_grad),
                        (True, False, False))],
        "align_feature": [Acts("all", ["--align-feature", "label+bbox"],
                               lambda s: (s.detr.alignnet.align_feature, s.detr.alignnet.attr_proj.in_features),
                               ("label+bbox", TABLE_WIDTH + 4)),
                          Noted(["--method", "baseline", "--align-feature", "label"],
                                "note: --align-feature not used by --method baseline")],
        "align_loss_coef": [Acts("all", ["--align-loss-coef", "3"], lambda s: {k["align_loss_coef"] for k in s.steps},
                                 {3.0}),
                            Acts("plain", ["--align-loss-coef", "0"], lambda s: {k["align_loss_coef"] for k in s.steps},
                                 {0.0}),
                            Noted(["--method", "dynql", "--align-loss-coef", "2"],
                                  "note: --align-loss-coef not used by --method dynql")],
        "dynql_betas": [Acts("all", ["--dynql-betas", "0.2", "0.6"], lambda s: list(s.detr.dynql.betas), [0.2, 0.6]),
                        Noted(["--method", "alignnet", "--dynql-betas", "0.5"],
                              "note: --dynql-betas not used by --method alignnet")],
        "dynql_rho": [Acts("all", ["--dynql-rho", "0.5"], lambda s: s.detr.dynql.rho, 0.5),
                      Acts("dynql", ["--dynql-rho", "0"], lambda s: s.detr.dynql.rho, 0.0),
                      Noted(["--method", "baseline", "--dynql-rho", "0.5"],
                            "note: --dynql-rho not used by --method baseline")],
        "clip_model": [Acts("dynql", ["--clip-model", "ViT-B-32"], lambda s: {c["model_name"] for c in s.labels},
                            {"ViT-B-32"}),
                       Noted(["--label-embeddings", p.labels, "--clip-model", "ViT-B-32"],
                             "note: --clip-model not used: --label-embeddings replaces the CLIP text encoder")],
        "clip_pretrained": [Acts("dynql", ["--clip-pretrained", "openai"],
                                 lambda s: {c["pretrained"] for c in s.labels}, {"openai"}),
                            Noted(["--label-embeddings", p.labels, "--clip-pretrained", "openai"],
                                  "note: --clip-pretrained not used: --label-embeddings replaces the CLIP text "
                                  "encoder")],
        "label_embeddings": [Acts("all", ["--label-embeddings", p.labels],
                                  lambda s: torch.allclose(s.detr.alignnet.f_cls, label_rows(p.labels), atol=1e-6),
                                  True),
                             Noted(["--method", "baseline", "--label-embeddings", p.labels],
                                   "note: --label-embeddings not used: --method baseline")],
        # optimisation
        "lr": [Acts("all", ["--lr", "3e-4"], lambda s: initial_lrs(s)[::2], pytest.approx([3e-4, 3e-5])),
               Acts("plain", ["--lr", "0"], lambda s: initial_lrs(s)[::2], [0.0, 0.0])],
        "lr_backbone": [Acts("all", ["--lr-backbone", "5e-5"], lambda s: initial_lrs(s)[1], 5e-5),
                        Acts("plain", ["--lr-backbone", "0"], lambda s: initial_lrs(s)[1], 0.0)],
        "weight_decay": [Acts("all", ["--weight-decay", "3e-3"],
                              lambda s: {g["weight_decay"] for g in s.run.optimizer.param_groups}, {3e-3}),
                         Acts("plain", ["--weight-decay", "0"],
                              lambda s: {g["weight_decay"] for g in s.run.optimizer.param_groups}, {0.0})],
        "clip_max_norm": [Acts("all", ["--clip-max-norm", "0.5"], lambda s: {k["clip_max_norm"] for k in s.steps},
                               {0.5}),
                          Acts("plain", ["--clip-max-norm", "0"], lambda s: {k["clip_max_norm"] for k in s.steps},
                               {0.0})],
        "batch_size": [Acts("all", ["--batch-size", "3"],
                            lambda s: (s.train_loader.batch_sampler.batch_size,
                                       s.run.val_loader.batch_sampler.batch_size), (3, 3))],
        "epochs": [Acts("all", ["--epochs", "3"], lambda s: sorted(set(s.epochs)), [0, 1, 2])],
        "lr_drop": [Acts("all", ["--lr-drop", "1"], epochs_lr_dropped_at, [1]),
                    Acts("dynql", ["--lr-drop", "0"], lambda s: s.run.history[0]["lr"], pytest.approx(0.1 * 1e-3))],
        "amp": [Acts("all", ["--amp", "bf16"], lambda s: {k["amp_dtype"] for k in s.steps}, {torch.bfloat16}),
                Refused(["--amp", "fp16"], "--amp fp16")],
        "max_steps": [Acts("all", ["--max-steps", "1"], steps_per_epoch, 1)],
        # run
        "device": [Acts("all", ["--device", "cpu:0"], lambda s: (s.run.device, {k["device"] for k in s.steps}),
                        (torch.device("cpu:0"), {torch.device("cpu:0")})),
                   Refused(["--device", "tpu"], "--device")],
        "seed": [Acts("all", ["--seed", "7"], lambda s: (s.torch_seed, s.run.train_sampler.seed,
                                                         s.run.val_loader.generator.initial_seed()), (7, 7, 7)),
                 Acts("plain", ["--seed", "0"], lambda s: (s.torch_seed, s.run.train_sampler.seed), (0, 0))],
        "output_dir": [Acts("all", ["--output-dir", p.output_dir], lambda s: s.logs, {p.output_dir})],
        "resume": [Acts("resume", ["--resume", p.checkpoint], lambda s: (s.epochs[0], s.run.saved_epoch), (1, 4))],
        "eval_every": [Acts("all", ["--eval-every", "2"], lambda s: s.evaluated, [1, 2]),
                       Acts("custom", ["--eval-every", "0"], lambda s: s.evaluated, [1])],
        "no_progress": [Acts("all", ["--no-progress"], lambda s: len(s.progress), 0)],
    }


def write_label_file(path):
    """A named label table of the shapes names (TABLE_WIDTH wide), seeded."""
    rows = torch.randn(len(NAMES), TABLE_WIDTH, generator=torch.Generator().manual_seed(3))
    torch.save({"names": NAMES, "embeddings": rows}, path)


def label_rows(path):
    table = torch.load(path, weights_only=True)
    return F.normalize(table["embeddings"][[table["names"].index(n) for n in NAMES]].float(), dim=-1)


def initial_lrs(seen):
    return [group["initial_lr"] for group in seen.run.optimizer.param_groups]


def contexts(p):
    """The command line each profile's rows are added to: the tiny `shapes` run, or a custom set (COCO defaults,
    two epochs), or no dataset flag at all ("bare", for a refusal that needs none)."""
    custom = ["--dataset", "custom", "--backbone", "resnet18", "--epochs", "2", "--train-json", p.train_json,
              "--train-images", p.train_images, "--val-json", p.val_json, "--val-images", p.val_images]
    return dict.fromkeys(("shapes", "all", "plain", "dynql", "resume"), SHAPES) | {
        "custom": [*MODEL, *custom], "bare": MODEL}


@pytest.fixture(scope="module")
def train_paths(tmp_path_factory, cache):
    """The files the rows name: a custom train and val set with the shapes category names, a named label table, an
    official-format checkpoint of the tiny detector, a checkpoint of epoch 0 to resume."""
    root = tmp_path_factory.mktemp("train-flags")
    p = types.SimpleNamespace(other=str(root / "other-shapes"), output_dir=str(root / "run"),
                              labels=str(root / "labels.pt"), official=str(root / "official.pth"))
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(NAMES)]
    images = [{"id": i, "file_name": f"{i}.png", "width": 40 + 8 * i, "height": 48} for i in (1, 2, 3)]
    anns = [{"id": i, "image_id": i, "category_id": i, "bbox": [4, 4, 20, 16], "area": 320, "iscrowd": 0}
            for i in (1, 2, 3)]
    p.train_images, p.train_json = write_coco(root / "train", root / "train.json", images, anns, cats)
    p.val_images, p.val_json = write_coco(root / "val", root / "val.json", images[:2], anns[:2], cats)
    write_label_file(p.labels)
    shapes = {key: int(value) for key, value in zip(["num_train", "num_val", "min_size", "max_size", "max_objects"],
                                                      ["6", "5", "70", "90", "1"])}
    p.shapes_seed_5 = data.make_shapes(p.other, seed=5, **shapes)["train_json"]
    # The held-out class of the rows: one the set has boxes of, so that removing them shows.
    with open(p.shapes_seed_5) as f:
        p.novel = NAMES[json.load(f)["annotations"][0]["category_id"] - 1]
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        share_resnet18(mp)
        record_label_tables(mp, [])
        args = train.finalize_args(train.get_parser().parse_args(
            [*map(str, SHAPES), "--output-dir", str(root / "first")]))
        run = train.build_run(args, 0, 1, None, None)
        with torch.no_grad():
            run.detr.transformer.level_embed.fill_(0.25)
        torch.save(run.detr.state_dict(), p.official)
        train.save_epoch_checkpoint(run, 0)
    p.checkpoint = str(root / "first" / "checkpoint.pth")
    return p


@pytest.fixture(scope="module")
def train_runs(train_paths, tmp_path_factory):
    """profile -> the recorded run of its command line (every row of that profile at once), built once."""
    table, done = train_table(train_paths), {}

    def get(profile):
        if profile not in done:
            argv = list(contexts(train_paths)[profile])
            for rows in table.values():
                argv += [a for row in rows if isinstance(row, Acts) and row.profile == profile for a in row.argv]
            done[profile] = run_train(argv, tmp_path_factory.mktemp(profile))
        return done[profile]
    return get


def test_every_option_of_train_py_has_a_row():
    """A new option of train.py needs a row here: the value it reaches, and where it is refused or unused."""
    table = train_table(types.SimpleNamespace(**{k: "PATH" for k in ("other", "output_dir", "labels", "official",
                                                                      "train_images", "train_json", "val_images",
                                                                      "val_json", "shapes_seed_5", "checkpoint",
                                                                      "novel")}))
    assert sorted(table) == sorted(TRAIN_OPTIONS)
    assert all(any(isinstance(row, Acts) for row in rows) for rows in table.values())


@pytest.mark.parametrize("dest", TRAIN_OPTIONS)
def test_train_option_reaches_what_it_configures(dest, train_paths, train_runs, capsys):
    """Each row of `dest`: the value is where it belongs (and the plain tiny run has something else there), or the
    option is refused naming it, or it is said to be unused."""
    for row in train_table(train_paths)[dest]:
        if isinstance(row, Acts):
            assert row.observe(train_runs(row.profile)) == row.expected, (dest, row.profile)
            assert row.observe(train_runs("shapes")) != row.expected, f"{dest}: the plain run has the value too"
        elif isinstance(row, Refused):
            with pytest.raises((InputError, FileNotFoundError), match=row.names) as error:
                parse(train_paths, row)
            assert "\n" not in str(error.value)
        else:
            parse(train_paths, row)
            assert row.note in capsys.readouterr().out, dest


def parse(paths, row):
    """train.py's arguments of a row's command line, as train.cli makes them before any work."""
    argv = [*contexts(paths)[row.context], *row.argv, "--output-dir", paths.output_dir]
    return train.finalize_args(train.get_parser().parse_args([str(a) for a in argv]))


# ----------------------------------------------------------------------------------------------------------
# evaluate.py's table
# ----------------------------------------------------------------------------------------------------------
MODES = ("ap", "per-layer", "visualize", "images", "export", "onnx", "pretrained")
MODE = "selects the mode (its run is test_evaluate_mode_runs_as_its_flags_say)"
EMPTY = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}


@dataclass
class EActs:
    """The option's argv, added to the mode's command line, makes observe(run) == expected; the mode's own run
    observes something else. Rows of one mode and `group` run as one command line."""
    argv: list
    observe: object
    expected: object
    group: int = 0


@dataclass
class ERefused:
    """The option's argv, added to the mode's command line, is an error naming `names` (default: the flag)."""
    argv: list
    names: str = None


class FakeOnnxDetector:
    """OnnxDetector without onnxruntime: the metadata an export writes; `predict` is recorded, so it never runs."""
    metadata = dict(format=ONNX_FORMAT, class_names=NAMES, cat_ids=list(range(1, len(NAMES) + 1)), dataset="shapes",
                    min_size=64, max_size=96, batch_size=2, num_select=100, min_side=32, method="baseline")

    def __init__(self, path):
        self.path = path


def run_evaluate(argv, cwd):
    """evaluate.main of `argv` in the folder `cwd`, its predictions, score maps, exports and ONNX sessions recorded
    instead of made (an empty detection list per image): what each mode built and what it was asked."""
    seen = types.SimpleNamespace(datasets=[], predict=[], models=[], labels=[], loaded=[], visualize=None,
                                 detect=None, export=None, out=io.StringIO(), cwd=cwd)
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(seen.out):
        mp.chdir(cwd)
        share_resnet18(mp)
        record_label_tables(mp, seen.labels)
        real_build_dataset = build.build_dataset

        def build_dataset(*a):
            seen.datasets.append(real_build_dataset(*a))
            return seen.datasets[-1]

        def predict(model, postprocess, loader, device, per_layer=False):
            seen.predict.append(dict(loader=loader, device=device, per_layer=per_layer))
            ids = getattr(loader.dataset, "ids", range(len(loader.dataset)))
            layers = [{int(i): dict(EMPTY) for i in ids}
                      for _ in range(model.transformer.decoder.num_layers if per_layer else 1)]
            return layers[-1], layers

        def visualize(detectors, dataset, postprocess, indices, output_dir, **kwargs):
            seen.visualize = dict(detectors=detectors, dataset=dataset, indices=indices, output_dir=output_dir,
                                  **kwargs)
            return []

        def recorded(real, name):
            def call(*a, **kwargs):
                result = real(*a, **kwargs)
                seen.models.append(result[0])
                return result
            mp.setattr(evaluate, name, call)

        def detect_folder(*a, **kwargs):
            seen.detect = kwargs
            return real_detect_folder(*a, **kwargs)
        real_detect_folder = evaluate.detect_folder

        def export_onnx(model, path, metadata):
            seen.export = dict(model=model, path=path, metadata=metadata)
            return 1
        for module in (build, evaluate):
            mp.setattr(module, "build_dataset", build_dataset)
        mp.setattr(evaluate, "predict", predict)
        mp.setattr(evaluate, "visualize", visualize)
        recorded(evaluate.checkpoint_detector, "checkpoint_detector")
        recorded(evaluate.hf_detector, "hf_detector")
        mp.setattr(build, "load_pretrained", lambda model, source, cat_ids: seen.loaded.append(source))
        mp.setattr(evaluate, "detect_folder", detect_folder)
        mp.setattr(evaluate, "export_onnx", export_onnx)
        mp.setattr(evaluate, "OnnxDetector", FakeOnnxDetector)
        mp.setattr(evaluate, "require_package", lambda module, flag: None)  # onnxscript alone imports in seconds
        seen.log = evaluate.main([str(a) for a in argv])
    seen.out = seen.out.getvalue()
    return seen


def val_set(seen):
    return seen.datasets[-1] if seen.datasets else None


def loader_of(seen):
    return seen.predict[-1]["loader"]


def drawn(seen, key):
    """What the PNGs of --visualize or --images were drawn with."""
    return (seen.visualize or seen.detect or {}).get(key)


def eval_transforms(seen):
    """The evaluation pipeline the mode's images went through."""
    if seen.detect is not None:
        return seen.detect["transforms"]
    return (seen.visualize or {}).get("dataset", val_set(seen)).transforms


def written(seen, name):
    return os.path.isfile(os.path.join(seen.cwd, name))


def class_rows(seen):
    return seen.models[-1].class_embed[0].label_embeddings


def eval_table(p):
    """dest -> {mode: MODE, or its rows}; `p` holds the paths the rows name (fixture eval_paths)."""
    custom = ["--dataset", "custom", "--val-json", p.val_json, "--val-images", p.val_images]
    val_modes, image_modes = ("ap", "per-layer", "pretrained"), ("images", "onnx")

    def rows(argv, observe, expected, modes, group=0, refused=(), mode=()):
        """The option acts in `modes`, is refused in `refused`, selects the mode in `mode`."""
        table = {m: [EActs(argv, observe, expected, group)] for m in modes}
        return table | {m: [ERefused(argv)] for m in refused} | {m: MODE for m in mode}

    def refused_but(argv, mode):
        return {m: MODE if m in mode else [ERefused(argv)] for m in MODES}

    dataset_rows = dict(modes=("ap", "per-layer", "visualize"), refused=("images", "export", "onnx"))
    table = {
        "resume": refused_but(["--resume", p.checkpoint], ("ap", "per-layer", "visualize", "images", "export")),
        "pretrained": refused_but(["--pretrained", p.hf], ("pretrained",)),
        "onnx": refused_but(["--onnx", p.onnx], ("onnx",)),
        "export_onnx": refused_but(["--export-onnx", "more.onnx"], ("ap", "export")),
        "dataset": rows(custom, lambda s: val_set(s).ann_file, p.val_json, **dataset_rows, mode=("pretrained",)),
        "data_path": rows(["--data-path", p.other], lambda s: val_set(s).ann_file.startswith(p.other), True,
                          ("ap", "per-layer", "visualize"), 1, ("images", "export", "onnx", "pretrained")),
        "val_json": rows(custom, lambda s: val_set(s).ann_file, p.val_json, **dataset_rows, mode=("pretrained",)),
        "val_images": rows(custom, lambda s: val_set(s).img_folders, [p.val_images], **dataset_rows,
                           mode=("pretrained",)),
        "device": rows(["--device", "cpu:0"],
                       lambda s: s.predict[-1]["device"] if s.predict else s.visualize["device"], torch.device("cpu:0"),
                       (*val_modes, "visualize", "images"), refused=("export", "onnx")),
        "batch_size": rows(["--batch-size", "3"], lambda s: loader_of(s).batch_sampler.batch_size, 3,
                           (*val_modes, *image_modes), refused=("visualize",))
        | {"export": [EActs(["--batch-size", "3"], lambda s: s.export["metadata"]["batch_size"], 3)]},
        "num_workers": rows(["--num-workers", "1"], lambda s: loader_of(s).num_workers, 1, (*val_modes, *image_modes),
                            refused=("visualize", "export")),
        "min_size": rows(["--min-size", "50"], lambda s: resize_of(eval_transforms(s))[0], (50,),
                         (*val_modes, "visualize", *image_modes))
        | {"export": [EActs(["--min-size", "50"], lambda s: s.export["metadata"]["min_size"], 50)]},
        "max_size": rows(["--max-size", "70"], lambda s: resize_of(eval_transforms(s))[1], 70,
                         (*val_modes, "visualize", *image_modes))
        | {"export": [EActs(["--max-size", "70"], lambda s: s.export["metadata"]["max_size"], 70)]},
        "attn_impl": rows(["--attn-impl", "gather"], lambda s: {m.attn_impl for m in attn_modules(s.models[-1])},
                          {"gather"}, (*val_modes, "visualize", "images"), refused=("export", "onnx")),
        "output": rows(["--output", "out.json"], lambda s: written(s, "out.json"), True, (*val_modes, *image_modes),
                       refused=("visualize", "export")),
        "log": rows(["--log", "eval.jsonl"], lambda s: written(s, "eval.jsonl") and json.load(
            open(os.path.join(s.cwd, "eval.jsonl"))) == json.loads(json.dumps(s.log)), True, MODES),
        "per_layer": rows(["--per-layer"], lambda s: (s.predict[-1]["per_layer"], "per_layer" in s.log), (True, True),
                          ("pretrained",), refused=("visualize", "images", "export", "onnx"), mode=("ap", "per-layer")),
        "visualize": refused_but(["--visualize", "1"], ("ap", "visualize")),
        "compare": rows(["--compare", p.checkpoint], lambda s: len(s.visualize["detectors"]), 2, ("visualize",),
                        refused=("ap", "per-layer", "images", "export", "onnx", "pretrained")),
        "score_threshold": rows(["--score-threshold", "0.6"], lambda s: drawn(s, "score_threshold"), 0.6,
                                ("visualize", *image_modes), refused=(*val_modes, "export")),
        "images": refused_but(["--images", p.images], ("ap", "images", "onnx")),
        "output_dir": rows(["--output-dir", "pngs"], lambda s: drawn(s, "output_dir"), "pngs",
                           ("visualize", *image_modes), refused=(*val_modes, "export")),
        "classes": rows(["--classes", NAMES[1], NAMES[3]], lambda s: s.log.get("classes"), [NAMES[1], NAMES[3]],
                        ("ap", "per-layer", "images"), refused=("visualize", "export", "onnx", "pretrained")),
        "classes_file": rows(["--classes-file", p.classes_file], lambda s: s.log.get("classes"), [NAMES[5], NAMES[6]],
                             ("ap", "per-layer", "images"), 1, ("visualize", "export", "onnx", "pretrained")),
        "label_embeddings": rows(["--label-embeddings", p.labels], lambda s: torch.allclose(
            class_rows(s), label_rows(p.labels)[[NAMES.index(n) for n in s.log.get("classes", NAMES)]], atol=1e-6),
            True,
            ("ap", "per-layer", "images"), refused=("visualize", "export", "onnx", "pretrained")),
    }
    for m in ("visualize", *image_modes):  # 0 draws every detection
        table["score_threshold"][m].append(EActs(["--score-threshold", "0"], lambda s: drawn(s, "score_threshold"),
                                                 0.0, group=1))
    # A val-set flag without --dataset custom would be ignored by the checkpoint's `shapes` set.
    for key, argv in (("val_json", ["--val-json", p.val_json]), ("val_images", ["--val-images", p.val_images])):
        for m in ("ap", "per-layer", "visualize"):
            table[key][m] = [*table[key][m], ERefused(argv)]
    return table


MODE_ARGV = {"ap": lambda p: ["--resume", p.checkpoint],
             "per-layer": lambda p: ["--resume", p.checkpoint, "--per-layer"],
             "visualize": lambda p: ["--resume", p.checkpoint, "--visualize", "1"],
             "images": lambda p: ["--resume", p.checkpoint, "--images", p.images],
             "export": lambda p: ["--resume", p.checkpoint, "--export-onnx", "model.onnx"],
             "onnx": lambda p: ["--onnx", p.onnx, "--images", p.images],
             "pretrained": lambda p: ["--pretrained", p.hf, "--dataset", "custom", "--val-json", p.val_json,
                                      "--val-images", p.val_images]}

# What each mode's own run did: the mode's selecting flags acted.
MODE_DONE = {"ap": lambda s, p: (s.predict[-1]["per_layer"], "coco_stats" in s.log, s.log["checkpoint"]),
             "per-layer": lambda s, p: (s.predict[-1]["per_layer"], s.log["checkpoint"]),
             "visualize": lambda s, p: (len(s.visualize["detectors"]), list(s.visualize["indices"]),
                                        s.log["checkpoint"]),
             "images": lambda s, p: (s.detect is not None, s.log["num_images"], s.log["checkpoint"]),
             "export": lambda s, p: (s.export["path"], s.export["metadata"]["class_names"], s.log["checkpoint"]),
             "onnx": lambda s, p: (s.detect["class_names"], s.log["num_images"], s.log["onnx"]),
             "pretrained": lambda s, p: (s.loaded, val_set(s).ann_file, val_set(s).img_folders)}
MODE_EXPECTED = {"ap": lambda p: (False, True, p.checkpoint), "per-layer": lambda p: (True, p.checkpoint),
                 "visualize": lambda p: (1, [0], p.checkpoint), "images": lambda p: (True, 2, p.checkpoint),
                 "export": lambda p: ("model.onnx", NAMES, p.checkpoint), "onnx": lambda p: (NAMES, 2, p.onnx),
                 "pretrained": lambda p: ([p.hf], p.val_json, [p.val_images])}


@pytest.fixture(scope="module")
def eval_paths(tmp_path_factory, cache):
    """An open-vocabulary checkpoint of the tiny `shapes` detector (held-out class NAMES[0], random weights), a custom
    val set with the shapes category names, a folder of two images, a named label table, a --classes-file, a
    transformers checkpoint folder (config.json; its weights are never read) and an ONNX file name."""
    root = tmp_path_factory.mktemp("eval-flags")
    p = types.SimpleNamespace(other=str(root / "other-shapes"), labels=str(root / "labels.pt"), onnx=str(root / "exported.onnx"),
                              scratch=str(root),
                              classes_file=str(root / "classes.txt"), hf=str(root / "hf"), images=str(root / "images"))
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(NAMES)]
    images = [{"id": i, "file_name": f"{i}.png", "width": w, "height": h}
              for i, (w, h) in ((1, (40, 56)), (2, (64, 48)))]
    anns = [{"id": i, "image_id": i, "category_id": i, "bbox": [4, 4, 20, 16], "area": 320, "iscrowd": 0}
            for i in (1, 2)]
    p.val_images, p.val_json = write_coco(root / "val", root / "val.json", images, anns, cats)
    with open(p.onnx, "wb") as f:  # read by FakeOnnxDetector only: it needs to exist, as evaluate.py checks
        f.write(b"graph")
    os.makedirs(p.images)
    for name, size in (("a.png", (40, 56)), ("b.png", (64, 48))):
        Image.new("RGB", size, (90, 120, 150)).save(os.path.join(p.images, name))
    write_label_file(p.labels)
    with open(p.classes_file, "w") as f:
        f.write(f"{NAMES[5]}\n\n{NAMES[6]}\n")
    os.makedirs(p.hf)
    with open(os.path.join(p.hf, "config.json"), "w") as f:
        json.dump(dict(model_type="deformable_detr", backbone="resnet18", use_timm_backbone=True, d_model=32,
                       encoder_layers=1, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                       encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10), f)
    open(os.path.join(p.hf, "model.safetensors"), "wb").close()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        share_resnet18(mp)
        record_label_tables(mp, [])
        args = train.finalize_args(train.get_parser().parse_args(
            [*SHAPES, "--method", "baseline", "--novel-classes", NAMES[0], "--output-dir", str(root / "run")]))
        train.save_epoch_checkpoint(train.build_run(args, 0, 1, None, None), 0)
    p.checkpoint = str(root / "run" / "checkpoint.pth")
    return p


@pytest.fixture(scope="module")
def eval_runs(eval_paths, tmp_path_factory):
    """(mode, group) -> the recorded run of the mode's command line with that group's rows (None: none of them)."""
    table, done = eval_table(eval_paths), {}

    def get(mode, group=None):
        if (mode, group) not in done:
            argv = MODE_ARGV[mode](eval_paths)
            if group is not None:
                argv = argv + [a for cells in table.values() if isinstance(cells.get(mode), list)
                               for row in cells[mode] if isinstance(row, EActs) and row.group == group
                               for a in row.argv]
            done[mode, group] = run_evaluate(argv, tmp_path_factory.mktemp(mode))
        return done[mode, group]
    return get


def test_every_option_of_evaluate_py_has_a_row_for_every_mode():
    """A new option of evaluate.py needs a row here for each mode: where it acts and where it is refused."""
    table = eval_table(types.SimpleNamespace(**{k: "PATH" for k in ("checkpoint", "hf", "onnx", "other", "val_json",
                                                                      "val_images", "images", "labels",
                                                                      "classes_file")}))
    assert sorted(table) == sorted(EVAL_OPTIONS)
    assert all(sorted(cells) == sorted(MODES) for cells in table.values()), [k for k, c in table.items()
                                                                              if sorted(c) != sorted(MODES)]


def groups_of(table, mode):
    return sorted({row.group for cells in table.values() if isinstance(cells[mode], list)
                   for row in cells[mode] if isinstance(row, EActs)})


def plain_run(table, mode, eval_runs, group=None):
    """The run a row of `group` is compared with: another group's (which lacks the row's flags), or the mode's own
    command line where the mode has one group only."""
    others = [g for g in groups_of(table, mode) if g != group]
    return eval_runs(mode, others[-1]) if others and group is not None else eval_runs(mode)


@pytest.mark.parametrize("mode", MODES)
def test_evaluate_mode_runs_as_its_flags_say(mode, eval_paths, eval_runs):
    run = plain_run(eval_table(eval_paths), mode, eval_runs, group=0)
    assert MODE_DONE[mode](run, eval_paths) == MODE_EXPECTED[mode](eval_paths)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dest", EVAL_OPTIONS)
def test_evaluate_option_acts_or_is_refused(dest, mode, eval_paths, eval_runs):
    """In `mode`, `dest` reaches what it configures (the mode's own run has something else there), or is refused
    with one line naming it."""
    table = eval_table(eval_paths)
    cells = table[dest][mode]
    if cells == MODE:
        return
    for row in cells:
        if isinstance(row, EActs):
            assert row.observe(eval_runs(mode, row.group)) == row.expected
            assert row.observe(plain_run(table, mode, eval_runs, row.group)) != row.expected, \
                "a run without the option has the value too"
        else:
            flag = row.names or f"--{dest.replace('_', '-')}"
            with pytest.raises((InputError, FileNotFoundError), match=flag) as error:
                run_evaluate([*MODE_ARGV[mode](eval_paths), *map(str, row.argv)], eval_paths.scratch)
            assert "\n" not in str(error.value)


def test_pretrained_scores_a_shapes_set_too(eval_paths, tmp_path, monkeypatch):
    """--pretrained --dataset shapes: the hub model's arguments carry the `shapes` set's too (without them the set
    could not be built: an AttributeError). Their values are made the tiny set's here, not added."""
    tiny = dict(zip(TINY_SHAPES[::2], TINY_SHAPES[1::2]))
    sizes = {key: int(tiny[f"--{key.replace('_', '-')}"]) for key in build.HF_EVALUATION_DEFAULTS
             if f"--{key.replace('_', '-')}" in tiny}
    monkeypatch.setattr(build, "HF_EVALUATION_DEFAULTS", build.HF_EVALUATION_DEFAULTS | sizes)
    seen = run_evaluate(["--pretrained", eval_paths.hf, "--dataset", "shapes"], tmp_path)
    assert val_set(seen).cat_names == NAMES and len(val_set(seen)) == int(tiny["--shapes-num-val"])
