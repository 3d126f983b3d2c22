"""Training: argument parser, torchrun/DDP set-up, the training loop, checkpoints and logs (paper §4.1 setup).

`python train.py` with no arguments trains the embedded `shapes` dataset on the CPU with CLIP-DETR (AlignNet +
DynQL, a random-weight CLIP text encoder) and ends with its COCO AP table.
`torchrun --nproc_per_node=G train.py --dataset coco --data-path DIR` trains COCO with the paper's setup.
The datasets, the model, the optimizer and the weights a run starts from come from build.py (the one map from
these arguments to objects); evaluation after an epoch is evaluate.py's. This file writes checkpoints and
resumes from them; `main` reads as the list of a run's steps. --amp bf16 autocasts on the CPU or CUDA, --amp fp16
on CUDA only (it needs the gradient scaler); --min-size/--max-size set the image sizes (data.py).

Paper ablations as flags:
  Table 4   --method {baseline,alignnet,dynql,clip-detr}
  Table 5   --align-feature {label,label+bbox,label+scale}
  Table 6/7 --dynql-betas 0.1 0.3 0.5 0.7 0.9   (a list; give it twice for "x2")
  Table 8   --dynql-rho 1.0
  Table 3   --dataset ov-coco; --novel-classes NAME [NAME ...] holds out any categories of any dataset

A run owns its --output-dir (run.lock, checkpoint.pth, log.jsonl): it never writes over another run's files
(`claim_output_dir`) nor over a file it reads (build.check_writes); flags of another kind of dataset are refused.

Every loss term of one step (Eq. 5 `loss_align`, Eq. 10 `loss_dynql_*`, the set-prediction terms) is
logged separately, one JSON line per epoch in OUTPUT_DIR/log.jsonl; with DynQL also `z_attr_norm` (mean
||z_attr|| before Eq. 6's rescaling) and `dynql_b{beta}_{ce,bbox,giou}`, the last layer's DynQL loss per
noise level, which are logged only and not part of the total.

Shape legend: a batch is images (B, 3, H, W), a padding mask (B, H, W) True on padding, and B target dicts
with boxes (n_b, 4) normalized cxcywh and labels (n_b,); B is --batch-size per process.

Deviations from the paper: the `shapes` defaults (small ResNet-18 detector, few queries, short schedule) are
sized for a 2-core CPU; COCO defaults are the paper's.
"""
import argparse
import datetime
import glob
import json
import math
import os
import random
import re
import socket
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
import evaluate
from build import (DATASET_FLAGS, build_dataset, build_model, build_optimizer, build_train_batches, build_val_batches,
                   check_dataset_flags, check_device, check_output_path, check_writes, class_split, dataset_files,
                   default_device, load_checkpoint, load_model_state, load_pretrained)
from dynql import dynql_loss, dynql_set_losses
from errors import (ArgumentParser, TEMP_SUFFIX, InputError, error_line, is_main, save_torch, user_file,
                    write_atomically)
from matcher import global_num_boxes, weight_dict
from model import check_variant

METHODS = ("baseline", "alignnet", "dynql", "clip-detr")

# Flags whose default depends on the dataset: the demo must run in minutes on 2 CPU cores, COCO as in the paper.
DATASET_DEFAULTS = {
    "shapes": dict(backbone="resnet18", hidden_dim=64, dim_feedforward=256, enc_layers=2, dec_layers=3,
                   nheads=4, num_queries=30, enc_n_points=4, dec_n_points=4, batch_size=8, epochs=5,
                   lr_drop=[4], lr=1e-3, lr_backbone=1e-3, dropout=0.0, clip_model="RN50", clip_pretrained="none",
                   device="cpu", num_workers=1, min_size=data.SHAPES_DEFAULTS["min_size"],
                   max_size=data.SHAPES_DEFAULTS["max_size"], amp="auto", eval_every=0),
    "coco": dict(backbone="resnet50", hidden_dim=256, dim_feedforward=1024, enc_layers=6, dec_layers=6, nheads=8,
                 num_queries=300, enc_n_points=4, dec_n_points=4, batch_size=2, epochs=12, lr_drop=[10],
                 lr=2e-4, lr_backbone=2e-5, dropout=0.1, clip_model="RN50x64", clip_pretrained="openai",
                 device=default_device(), num_workers=2, min_size=data.COCO_MIN_SIZE, max_size=data.COCO_MAX_SIZE,
                 amp="off", eval_every=1),
}
for _name in ("custom", "ov-coco", "lvis"):
    DATASET_DEFAULTS[_name] = DATASET_DEFAULTS["coco"]
# The paper's COCO setup where it differs from the COCO defaults (ImageNet weights are a download, so opt-in).
PAPER_SETUP = dict(dataset="coco", pretrained_backbone=True)


def _format_default(value):
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def document_defaults(parser):
    """Every option's help ends with its default; a dataset-dependent one lists it per dataset."""
    for action in parser._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS:
            continue
        if isinstance(action.default, bool):  # on/off flags
            shown = "on" if action.default else "off"
        elif action.dest in DATASET_DEFAULTS["coco"] and action.default is None:
            values = {name: _format_default(DATASET_DEFAULTS[name][action.dest]) for name in ("coco", "shapes")}
            shown = (values["coco"] if values["coco"] == values["shapes"]
                     else ", ".join(f"{name}: {value}" for name, value in values.items()))
        else:
            shown = _format_default(action.default)
        action.help = f"{action.help or ''} (default: {shown})".strip().replace("%", "%%")
    return parser


def get_parser():
    p = ArgumentParser("CLIP-DETR training", description=__doc__.split("\n")[0],
                                epilog="custom, ov-coco and lvis take the coco defaults.")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="shapes", choices=["shapes", "coco", "custom", "ov-coco", "lvis"])
    d.add_argument("--data-path", default=None, help="dataset root (COCO layout); shapes: its cache folder")
    d.add_argument("--train-json", default=None)
    d.add_argument("--train-images", default=None)
    d.add_argument("--val-json", default=None)
    d.add_argument("--val-images", default=None)
    d.add_argument("--num-workers", type=int, default=None)
    d.add_argument("--min-size", type=int, default=None,
                   help="evaluation shorter side, pixels; training draws shorter sides up to it (coco: 480..800 "
                        "step 32 at 800, scaled with it)")
    d.add_argument("--max-size", type=int, default=None, help="longest image side, pixels")
    d.add_argument("--shapes-num-train", type=int, default=data.SHAPES_DEFAULTS["num_train"])
    d.add_argument("--shapes-num-val", type=int, default=data.SHAPES_DEFAULTS["num_val"])
    d.add_argument("--shapes-min-size", type=int, default=data.SHAPES_DEFAULTS["min_size"],
                   help="shortest side of generated shapes images, pixels")
    d.add_argument("--shapes-max-size", type=int, default=data.SHAPES_DEFAULTS["max_size"],
                   help="longest side of generated shapes images, pixels")
    d.add_argument("--shapes-max-objects", type=int, default=data.SHAPES_DEFAULTS["max_objects"])
    d.add_argument("--shapes-seed", type=int, default=data.SHAPES_DEFAULTS["seed"])
    d.add_argument("--novel-classes", nargs="+", default=None, metavar="NAME",
                   help="open vocabulary (shapes, coco, custom, lvis): hold these categories out of training (their "
                        "annotations removed, never trained as positives or negatives), score every class against "
                        "the CLIP label dictionary, and report AP50 on novel, base and all categories (Table 3); "
                        "ov-coco holds out OVR-CNN's 17 itself")

    m = p.add_argument_group("detector (Deformable DETR)")
    m.add_argument("--backbone", default=None, choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    m.add_argument("--pretrained-backbone", action="store_true", help="ImageNet weights via torchvision")
    m.add_argument("--pretrained", default=None, metavar="PATH", help="official Deformable DETR checkpoint (.pth), or "
                   "transformers' (a save_pretrained folder or hf:ORG/NAME, e.g. hf:SenseTime/deformable-detr)")
    m.add_argument("--hidden-dim", type=int, default=None)
    m.add_argument("--dim-feedforward", type=int, default=None)
    m.add_argument("--enc-layers", type=int, default=None)
    m.add_argument("--dec-layers", type=int, default=None)
    m.add_argument("--nheads", type=int, default=None)
    m.add_argument("--num-queries", type=int, default=None)
    m.add_argument("--num-feature-levels", type=int, default=4)
    m.add_argument("--enc-n-points", type=int, default=None)
    m.add_argument("--dec-n-points", type=int, default=None)
    m.add_argument("--dropout", type=float, default=None)
    m.add_argument("--with-box-refine", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--two-stage", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--attn-impl", default="auto", choices=["auto", "pytorch", "gather", "triton"],
                   help="deformable attention: pytorch (the readable reference), gather (CPU fast path), triton (GPU); "
                        "auto: triton on CUDA when importable; on the CPU gather for calls sampling >= 2^20 points "
                        "(COCO-sized encoders), pytorch below")

    c = p.add_argument_group("CLIP-DETR (training only)")
    c.add_argument("--method", default="clip-detr", choices=METHODS, help="Table 4")
    c.add_argument("--align-feature", default="label+scale", choices=["label", "label+bbox", "label+scale"],
                   help="Table 5")
    c.add_argument("--align-loss-coef", type=float, default=1.0)
    c.add_argument("--dynql-betas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9], help="Tables 6-7")
    c.add_argument("--dynql-rho", type=float, default=1.0, help="Table 8")
    c.add_argument("--clip-model", default=None, help="open_clip model name (paper: RN50x64)")
    c.add_argument("--clip-pretrained", default=None, help="open_clip pretrained tag, or 'none' (random weights)")
    c.add_argument("--label-embeddings", default=None, metavar="FILE",
                   help=".pt/.npy table, one row per class in category order, or a .pt of {'names': [...], "
                        "'embeddings': (K, D) tensor} whose rows are looked up by category name")

    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=None)
    o.add_argument("--lr-backbone", type=float, default=None)
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--clip-max-norm", type=float, default=0.1)
    o.add_argument("--batch-size", type=int, default=None, help="per process")
    o.add_argument("--epochs", type=int, default=None)
    o.add_argument("--lr-drop", type=int, nargs="+", default=None, help="epochs where lr is multiplied by 0.1")
    o.add_argument("--amp", default=None, choices=["off", "bf16", "fp16", "auto"],
                   help="autocast on the training device: bf16 on CPU or CUDA, fp16 on CUDA only; auto: bf16 where "
                        "the device computes it natively (CPUs with AVX512-BF16 or AMX, CUDA GPUs that support it), "
                        "else off")
    o.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps (smoke runs)")

    r = p.add_argument_group("run")
    r.add_argument("--device", default=None)
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--output-dir", default="outputs")
    r.add_argument("--resume", default=None, metavar="PATH|auto", help="checkpoint to continue from")
    r.add_argument("--eval-every", type=int, default=None,
                   help="evaluate every N epochs, and after the last; 0: after the last only")
    r.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return document_defaults(p)


def config_line(args):
    """The flags of this run whose effective value differs from the paper's COCO setup, as one command line."""
    flags = []
    for action in get_parser()._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS:
            continue
        paper = PAPER_SETUP.get(action.dest, DATASET_DEFAULTS["coco"].get(action.dest, action.default))
        value = getattr(args, action.dest)
        if value == paper:
            continue
        if isinstance(value, bool):
            # --no-two-stage names itself; a store_true flag that is off is named as missing.
            off = action.option_strings[-1] if len(action.option_strings) > 1 else f"no {action.option_strings[0]}"
            flags.append(action.option_strings[0] if value else off)
        else:
            flags.append(f"{action.option_strings[0]} {_format_default(value)}")
    return "configuration (where it differs from the paper's COCO setup): " + (", ".join(flags) or "none")


# The methods that read each flag of the training modules (Table 4); another method says it does not use it (a sweep
# over the methods passes them all the same flags). DynQL alone keeps AlignNet's Eq. 3 projection, not its loss.
METHOD_FLAGS = {"align_feature": ("alignnet", "dynql", "clip-detr"), "align_loss_coef": ("alignnet", "clip-detr"),
                "dynql_betas": ("dynql", "clip-detr"), "dynql_rho": ("dynql", "clip-detr")}

# Lowest sensible value of numeric flags: below it a run cannot train (0 queries, 0 epochs, ...). The backbone
# always gives C3-C5, so there are at least 3 feature levels (the official single-scale variant is not built here).
FLAG_MINIMUM = dict(hidden_dim=1, dim_feedforward=1, enc_layers=0, dec_layers=1, nheads=1, num_queries=1,
                    num_feature_levels=3, enc_n_points=1, dec_n_points=1, batch_size=1, epochs=1, num_workers=0,
                    max_steps=1, eval_every=0, min_size=1, max_size=1, lr=0, lr_backbone=0, weight_decay=0,
                    clip_max_norm=0, align_loss_coef=0)


def native_bf16(device):
    """True where bf16 autocast pays: the device multiplies bf16 in hardware. On a CPU without AVX512-BF16 or
    AMX, oneDNN emulates bf16 and a step is slower than in float32 (3x measured for the COCO model)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def finalize_args(args):
    """Fill dataset-dependent defaults; reject values and combinations that cannot run or would be ignored."""
    explicit = {key: getattr(args, key) for key in ("clip_model", "clip_pretrained")}
    defaults = get_parser()
    if args.dataset == "shapes":
        # shapes trains at the size it generates unless told otherwise (its defaults are those sizes' defaults).
        args.min_size = args.min_size or args.shapes_min_size
        args.max_size = args.max_size or args.shapes_max_size
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for action in defaults._actions:
        values = getattr(args, action.dest, None)
        if action.type is float and values is not None:
            for value in values if isinstance(values, list) else [values]:
                if not math.isfinite(value):
                    raise InputError(f"{action.option_strings[0]} {value}: expected a finite number")
    for key, low in FLAG_MINIMUM.items():
        value = getattr(args, key)
        if value is not None and value < low:
            raise InputError(f"--{key.replace('_', '-')} {value}: expected a number >= {low}")
    if not 0 <= args.dropout < 1:
        raise InputError(f"--dropout {args.dropout}: expected a probability in [0, 1)")
    if args.label_embeddings:
        user_file(args.label_embeddings, "--label-embeddings", "a .pt or .npy file with one row per class")
    if args.pretrained and args.pretrained_backbone:
        raise InputError(f"--pretrained {args.pretrained} holds the ResNet's weights, which would replace the ImageNet "
                         "ones of --pretrained-backbone: drop --pretrained-backbone")
    if args.method == "baseline" and args.dataset != "ov-coco" and not args.novel_classes and is_main():
        # Not an error: a sweep over Table 4's methods passes every method the same flags.
        given = [flag for flag, value in (("--label-embeddings", args.label_embeddings),
                                          ("--clip-model", explicit.get("clip_model")),
                                          ("--clip-pretrained", explicit.get("clip_pretrained"))) if value]
        if given:
            print(f"note: {' and '.join(given)} not used: --method baseline without --novel-classes builds no label "
                  "dictionary")
    elif args.label_embeddings and is_main():
        clip = [flag for flag, value in (("--clip-model", explicit["clip_model"]),
                                         ("--clip-pretrained", explicit["clip_pretrained"])) if value]
        if clip:
            print(f"note: {' and '.join(clip)} not used: --label-embeddings replaces the CLIP text encoder")
    unused = [f"--{key.replace('_', '-')}" for key, methods in METHOD_FLAGS.items()
              if args.method not in methods and getattr(args, key) != defaults.get_default(key)]
    if unused and is_main():
        print(f"note: {' and '.join(unused)} not used by --method {args.method}")
    if any(epoch < 0 for epoch in args.lr_drop):
        raise InputError(f"--lr-drop {' '.join(map(str, args.lr_drop))}: expected epochs >= 0")
    if args.dataset == "ov-coco" and args.novel_classes:
        raise InputError("--novel-classes with --dataset ov-coco: ov-coco holds out OVR-CNN's 17 novel categories "
                         "itself; for another split use --dataset coco --novel-classes NAME [NAME ...]")
    check_dataset_flags(args.dataset, [key for key in DATASET_FLAGS if getattr(args, key) != defaults.get_default(key)])
    if args.hidden_dim % (2 * args.nheads):
        raise InputError(f"--hidden-dim {args.hidden_dim}: expected a multiple of 2 x --nheads ({2 * args.nheads}); "
                         "the sine position embedding takes half the channels for x and half for y")
    check_device(args.device)
    check_output_path(args.output_dir, "--output-dir")
    if args.amp == "auto":
        args.amp = "bf16" if native_bf16(args.device) else "off"
    if args.amp == "fp16" and not str(args.device).startswith("cuda"):
        raise InputError(f"--amp fp16 needs a CUDA device (its gradient scaler is CUDA-only; got --device "
                         f"{args.device}); use --amp bf16 on the CPU")
    # The model checks its variant when it is built; checked here too, so a bad one fails before any data is read.
    check_variant(two_stage=args.two_stage, with_box_refine=args.with_box_refine,
                  dynql=args.method in ("dynql", "clip-detr"))
    return args


# ----------------------------------------------------------------------------------------------------------
# Losses (the model and the optimizer are built by build.py)
# ----------------------------------------------------------------------------------------------------------
def check_finite_predictions(outputs):
    """Name the predictions holding NaN/Inf (a diverged run) before the Hungarian matcher, whose own error
    ('matrix contains invalid numeric entries') would name nothing; one host sync for all of them."""
    n = len(outputs.get("aux_outputs", [])) + 1
    heads = {f"decoder layer {i + 1}": head for i, head in enumerate(outputs.get("aux_outputs", []))}
    heads[f"decoder layer {n}"] = outputs
    if "enc_outputs" in outputs:
        heads["encoder proposals"] = outputs["enc_outputs"]
    for i, head in enumerate(outputs.get("dynql_outputs", [])):
        heads[f"DynQueries of decoder layer {i + 1}"] = head
    names = [(where, key) for where, head in heads.items() for key in ("pred_logits", "pred_boxes")]
    finite = torch.stack([torch.isfinite(heads[where][key]).all() for where, key in names]).tolist()
    bad = [f"{key} of {where}" for (where, key), ok in zip(names, finite) if not ok]
    if bad:
        raise FloatingPointError(f"non-finite predictions: {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''} "
                                 "(the run diverged: lower --lr or check the data)")


def compute_losses(criterion, outputs, targets):
    """Set-prediction losses (§3.1), plus AlignNet's Eq. 5 and DynQL's Eq. 10 when the model made them."""
    check_finite_predictions(outputs)
    # One all-reduce of the box count per step serves both the conventional and the DynQL normalizer.
    n = global_num_boxes(targets, outputs["pred_logits"].device)
    losses = criterion(outputs, targets, num_boxes=n)
    if "dynql_outputs" in outputs:
        losses.update(dynql_loss(outputs["dynql_outputs"], outputs["dynql_layout"], targets, n))
    if "loss_align" in outputs:
        losses["loss_align"] = outputs["loss_align"]
    return losses


def monitored_values(outputs, targets):
    """Logged, never optimised: the mean ||z_attr|| before Eq. 6's rescaling, and DynQL's last-layer loss per beta,
    so a reader can see which sets learn. Empty without DynQL."""
    if "dynql_outputs" not in outputs:
        return {}
    layout = outputs["dynql_layout"]
    return {"z_attr_norm": layout.z_attr_norm.item(), **dynql_set_losses(outputs["dynql_outputs"], layout, targets)}


# ----------------------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------------------
def init_distributed(args):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: NCCL on CUDA, Gloo on CPU. Returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if str(args.device).startswith("cuda"):
        torch.cuda.set_device(local_rank)
        args.device = f"cuda:{local_rank}"
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), world


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, **state):
    """A kill, a full disk or a failed write leaves the previous checkpoint intact (errors.save_torch)."""
    save_torch(path, state)


# What may differ between a checkpoint's run and the run that resumes it: where and how the run executes, not
# what it trains. Every other flag is fixed by the checkpoint (model, method, data, optimisation, seed).
RESUME_MAY_CHANGE = ("resume", "epochs", "output_dir", "device", "num_workers", "no_progress", "eval_every",
                     "max_steps", "attn_impl", "amp", "data_path", "train_json", "train_images", "val_json",
                     "val_images", "pretrained", "pretrained_backbone")


def check_resume_args(saved, args, source):
    """A resumed run must train what the checkpoint trained: one rule for every flag, those of RESUME_MAY_CHANGE
    aside (a flag the checkpoint predates is not compared). The stored optimizer and scheduler would silently
    keep the old --lr and --lr-drop, a changed --num-queries would resume another model."""
    diff = [f"--{k.replace('_', '-')} {saved[k]!r} in the checkpoint, {value!r} now" for k, value in vars(args).items()
            if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != value]
    # Trained ResNet weights (--pretrained-backbone or --pretrained) freeze the stem and layer1, so the optimizer's
    # parameter groups stored in the checkpoint only fit a run that starts from trained weights too.
    trained = [bool(a.get("pretrained") or a.get("pretrained_backbone")) for a in (saved, vars(args))]
    if trained[0] != trained[1]:
        diff.append(f"the ResNet {'started' if trained[0] else 'did not start'} from trained weights "
                    "(--pretrained-backbone or --pretrained) in the checkpoint, "
                    f"{'does' if trained[1] else 'does not'} now")
    if diff:
        may = ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE if k != "resume")
        raise InputError(f"--resume {source}: the checkpoint was trained with other settings: {'; '.join(diff)} "
                         f"(only {may} may change when resuming)")


RESUME_KEYS = ("model", "args", "optimizer", "scheduler", "epoch", "rng")


def check_resume_classes(ckpt, train_set, source):
    """The class head's rows are the checkpoint's categories: a dataset whose names changed would silently
    train row k under another name."""
    saved = list(ckpt.get("classes", {}).get("names", train_set.cat_names))
    if saved != list(train_set.cat_names):
        changed = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in enumerate(zip(saved, train_set.cat_names)) if a != b]
        raise InputError(f"--resume {source}: the checkpoint was trained on {len(saved)} classes, the dataset now "
                         f"has {len(train_set.cat_names)}{' (' + '; '.join(changed[:3]) + ')' if changed else ''}; "
                         "expected the same category names in the same order")


def check_datasets(train_set, val_set, args, world):
    """Sets a run cannot learn from or would finish without a step on, which would otherwise exit 0."""
    class_split(args, train_set.cat_names)  # held-out classes that leave no base class are named as such
    if train_set.num_boxes == 0:
        raise InputError(f"train set {train_set.ann_file} has no boxes ({len(train_set)} images, no non-crowd "
                         "annotation of a training category), expected at least one to learn from")
    if len(train_set) < args.batch_size * world:
        raise InputError(f"train set {train_set.ann_file} has {len(train_set)} images, fewer than --batch-size "
                         f"{args.batch_size} x {world} process(es): an epoch would have no step")
    if len(val_set) == 0:
        raise InputError(f"val set {val_set.ann_file} has no images, expected at least one to evaluate on")


def evaluation_due(epoch, args):
    return epoch == args.epochs - 1 or (args.eval_every > 0 and (epoch + 1) % args.eval_every == 0)


def merge_log(path, history, last_epoch):
    """The records of epochs up to `last_epoch`: log.jsonl's line where it has one (only it can hold an AP
    measured after the checkpoint was written), else the checkpoint's record."""
    records = {record["epoch"]: record for record in history}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill while appending (older versions appended)
                    continue
                if record.get("epoch", last_epoch + 1) <= last_epoch:
                    records[record["epoch"]] = record
    return [records[epoch] for epoch in sorted(records)]


def write_log(path, history):
    """Rewrite log.jsonl whole (errors.write_atomically): a kill leaves the old or the new file, never half."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in history)
    write_atomically(path, write)


def remove_stale_temporaries(output_dir):
    """A kill during a write leaves checkpoint.pth.<pid-random>.tmp / log.jsonl.<...>.tmp (or, from older
    versions, checkpoint.pth.tmp) behind; the real files are intact."""
    for name in ("checkpoint.pth", "log.jsonl"):
        for path in glob.glob(os.path.join(glob.escape(output_dir), f"{name}*{TEMP_SUFFIX}")):
            os.remove(path)
            print(f"removed {path}, left by an interrupted write")


def resolve_resume(resume, output_dir):
    """'auto' -> OUTPUT_DIR/checkpoint.pth when it exists (else start fresh); a path must exist."""
    if resume == "auto":
        path = os.path.join(output_dir, "checkpoint.pth")
        return path if os.path.isfile(path) else None
    return resume


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------
def to_device(targets, device):
    """Targets on the training device; float boxes (a custom pipeline may make float64 ones) in float32, the
    model's dtype, since AlignNet's ROI pooling and DynQL's reference boxes meet them in the model's own ops."""
    return [{k: v.to(device, torch.float32 if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
             for k, v in t.items()} for t in targets]


def train_step(model, criterion, batch, optimizer, device, *, clip_max_norm=0.1, align_loss_coef=1.0,
               amp_dtype=None, scaler=None, where="step"):
    """One optimisation step on a collated batch; returns (total loss, {term: value}) as Python floats.

    A non-finite total stops training with the offending terms named (`where` says which step it was).
    """
    images, mask, targets = batch
    images, mask, targets = images.to(device), mask.to(device), to_device(targets, device)
    with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
        outputs = model(images, mask, targets)
        losses = compute_losses(criterion, outputs, targets)
        weights = weight_dict(losses, align=align_loss_coef)
        loss = sum(weights[k] * v for k, v in losses.items())
    values = {k: v.item() for k, v in losses.items()} | monitored_values(outputs, targets)
    if not math.isfinite(loss.item()):
        bad = {k: round(v, 4) for k, v in values.items() if not math.isfinite(v)}
        raise FloatingPointError(f"non-finite loss at {where}: {bad} "
                                 f"(all terms: { {k: round(v, 4) for k, v in values.items()} })")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss.item(), values


def train_one_epoch(model, criterion, loader, optimizer, device, epoch, args, scaler=None):
    model.train()
    criterion.train()
    sums, count = {}, 0
    progress = None
    if is_main() and not args.no_progress:
        total = len(loader) if args.max_steps is None else min(len(loader), args.max_steps)
        progress = tqdm(total=total, desc=f"epoch {epoch}", leave=False, file=sys.stdout, mininterval=1.0)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    for step, batch in enumerate(loader):
        if args.max_steps is not None and step >= args.max_steps:
            break
        loss, values = train_step(model, criterion, batch, optimizer, device, clip_max_norm=args.clip_max_norm,
                                  align_loss_coef=args.align_loss_coef, amp_dtype=amp_dtype, scaler=scaler,
                                  where=f"epoch {epoch} step {step}")
        count += 1
        for k, v in {"loss": loss, **values}.items():
            sums[k] = sums.get(k, 0.0) + v
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}")
    if progress is not None:
        progress.close()
    return {k: v / max(count, 1) for k, v in sums.items()} | {"steps": count}


def make_loaders(args, train_set, val_set, rank, world):
    """The shuffle order is a function of (seed, epoch) alone, so a resumed run sees the same batches."""
    train_sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    val_sampler = DistributedSampler(val_set, num_replicas=world, rank=rank, shuffle=False)
    batch_sampler, collate = build_train_batches(args, train_set, train_sampler)
    # Workers are re-created each epoch (not persistent) so their seeds come from the restored RNG on resume.
    train_loader = DataLoader(train_set, batch_sampler=batch_sampler, collate_fn=collate, num_workers=args.num_workers)
    # Its own generator: evaluating must not advance the training RNG (a resumed run would diverge).
    val_loader = DataLoader(val_set, batch_sampler=build_val_batches(args, val_set, val_sampler),
                            collate_fn=data.collate_fn, num_workers=args.num_workers,
                            generator=torch.Generator().manual_seed(args.seed))
    return train_loader, train_sampler, val_loader


@dataclass
class Run:
    """What one training process holds: its place under torchrun, the data, the model (DDP-wrapped under torchrun;
    `detr` is the bare DeformableDETR), the optimisation state and the log records of the epochs so far."""
    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    train_set: object
    val_set: object
    model: torch.nn.Module
    detr: torch.nn.Module
    criterion: torch.nn.Module
    postprocess: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    train_loader: DataLoader
    train_sampler: DistributedSampler
    val_loader: DataLoader
    history: list = field(default_factory=list)
    saved_epoch: int = None  # the epoch checkpoint.pth holds, None before the first save

    @property
    def log_path(self):
        return os.path.join(self.args.output_dir, "log.jsonl")


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def read_resume_checkpoint(args, resume):
    """The checkpoint at `resume`, checked against this run's arguments; None for a fresh start."""
    if not resume:
        return None
    ckpt = load_checkpoint(resume, keys=RESUME_KEYS)
    check_resume_args(ckpt["args"], args, resume)
    return ckpt


def build_run(args, rank, world, ckpt, resume):
    """Datasets, model, optimizer, scheduler and loaders of a run, checked against the checkpoint it resumes."""
    train_set, val_set = build_dataset("train", args), build_dataset("val", args)
    check_datasets(train_set, val_set, args, world)
    evaluate.val_cat_ids(train_set.cat_names, val_set)  # the val set names the same classes (in any numbering)
    if ckpt is not None:
        check_resume_classes(ckpt, train_set, resume)
    device = torch.device(args.device)
    detr, criterion, postprocess = build_model(args, train_set.cat_names)
    detr.to(device)
    if args.pretrained:
        load_pretrained(detr, args.pretrained, train_set.cat_names)
    model = detr
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            detr, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(detr, args)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_drop, gamma=0.1)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None
    train_loader, train_sampler, val_loader = make_loaders(args, train_set, val_set, rank, world)
    return Run(args, rank, world, device, train_set, val_set, model, detr, criterion, postprocess, optimizer,
               scheduler, scaler, train_loader, train_sampler, val_loader)


def restore(run, ckpt, resume):
    """Continue from a checkpoint: weights, optimizer, scheduler, scaler, RNG and log. Returns the next epoch."""
    load_model_state(run.detr, ckpt["model"], resume)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    # A rank the checkpoint has no state for (the run now has more processes) keeps main's seed + rank: given rank 0's
    # state, it would draw every number as rank 0 does.
    if run.rank < len(ckpt["rng"]):
        set_rng_state(ckpt["rng"][run.rank])
    run.saved_epoch = ckpt["epoch"]
    if is_main():
        print(f"resumed from {resume} at epoch {ckpt['epoch'] + 1}")
    run.history = merge_log(run.log_path, ckpt.get("log", []), ckpt["epoch"])
    last = run.history[-1] if run.history and run.history[-1]["epoch"] == ckpt["epoch"] else None
    if last is not None and "coco_stats" not in last and evaluation_due(ckpt["epoch"], run.args):
        # Killed between the checkpoint and its evaluation: evaluate that epoch now (no RNG is drawn).
        evaluate_epoch(run, last)
    if is_main():
        write_log(run.log_path, run.history)
    return ckpt["epoch"] + 1


def announce(run):
    """Rank 0 says what trains on what, and warns when COCO-sized data starts from random weights."""
    args = run.args
    if not is_main():
        return
    if args.dataset != "shapes" and not (args.pretrained_backbone or args.pretrained):
        print("warning: training from a random ResNet (no --pretrained-backbone, no --pretrained): the paper "
              "starts from ImageNet weights; expect far lower AP")
    if not evaluate.has_ground_truth(run.val_set.coco):
        print(f"warning: {evaluate.nothing_to_score(run.val_set)}: epochs are trained, not scored")
    n_params = sum(p.numel() for p in run.detr.parameters() if p.requires_grad)
    print(f"{args.method} on {args.dataset}: {len(run.train_set)} train / {len(run.val_set)} val images, "
          f"{len(run.train_set.cat_names)} classes, {n_params / 1e6:.2f} M trainable parameters, "
          f"{run.world} process(es) on {run.device}, total batch {run.world * args.batch_size}")


def save_epoch_checkpoint(run, epoch):
    """Checkpoint before evaluating: a kill during a long COCO evaluation must not lose the epoch. The checkpoint
    carries the log records, so a resumed run rewrites what a kill kept out of log.jsonl."""
    rngs = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if is_main():
        save_checkpoint(os.path.join(run.args.output_dir, "checkpoint.pth"), model=run.detr.state_dict(),
                        optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(), epoch=epoch,
                        args=vars(run.args), rng=rngs, scaler=run.scaler.state_dict() if run.scaler else None,
                        classes={"ids": run.train_set.cat_ids, "names": run.train_set.cat_names}, log=run.history)
    run.saved_epoch = epoch


def evaluate_epoch(run, log):
    """COCO stats of the val set into `log`, and for an open-vocabulary run AP50 on novel, base and all (Table 3)."""
    log["coco_stats"], results = evaluate.evaluate(run.detr, run.postprocess, run.val_loader, run.val_set, run.device,
                                                   class_names=run.train_set.cat_names)
    split = class_split(run.args, run.val_set.cat_names)
    if split is not None and is_main():
        log[evaluate.ov_key(run.args.dataset)] = evaluate.ov_coco_ap50(run.val_set.coco, results, *split,
                                                                       image_ids=run.val_set.ids)


def epoch_line(epoch, log):
    """The console line of an epoch: the last decoder layer's loss terms (log.jsonl has every layer's and the
    proposals'), the epoch's time, and AP when it was evaluated."""
    losses = " ".join(f"{k[6:]}={v:.3f}" for k, v in log.items()
                      if k.startswith("train_loss") and not re.search(r"_(\d+|enc)$", k))
    stats = log.get("coco_stats")
    ap = f" AP={stats[0]:.3f} AP50={stats[1]:.3f}" if stats else " (nothing to score)" if "coco_stats" in log else ""
    return f"epoch {epoch}: {losses} ({log['time_s']} s){ap}"


def run_epoch(run, epoch):
    """Train one epoch, checkpoint it, evaluate it when due, log it. Returns its COCO stats (None if not evaluated)."""
    run.train_sampler.set_epoch(epoch)
    t0 = time.time()
    train_stats = train_one_epoch(run.model, run.criterion, run.train_loader, run.optimizer, run.device, epoch,
                                  run.args, run.scaler)
    log = {"epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"], "time_s": round(time.time() - t0, 1),
           **{f"train_{k}": round(v, 5) for k, v in train_stats.items()}}
    run.scheduler.step()
    run.history.append(log)
    save_epoch_checkpoint(run, epoch)
    if evaluation_due(epoch, run.args):
        evaluate_epoch(run, log)
    if is_main():
        write_log(run.log_path, run.history)
        print(epoch_line(epoch, log), flush=True)
    return log.get("coco_stats")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training; the message says where it stopped and how to go on."""


LOCK_NAME = "run.lock"


def _lock_owner_alive(owner):
    """Whether the process named in a lock file ("host pid") still runs; one on another host counts as alive."""
    host, _, pid = owner.partition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return host != socket.gethostname()
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


# The files a run writes into its --output-dir besides run.lock: another run's are never written over.
RUN_FILES = ("checkpoint.pth", "log.jsonl")


def claim_output_dir(output_dir, resume):
    """Make `output_dir` this run's: refuse while another live run writes there (its run.lock names it), and when
    it holds another run's checkpoint or log, which this run would overwrite: any run, fresh or resumed from a
    checkpoint elsewhere, except one that continues the folder's own checkpoint (--resume auto, or --resume naming
    that file). A lock left by a killed run is taken over. Returns the lock's path; the caller removes it when the
    run ends."""
    lock = os.path.join(output_dir, LOCK_NAME)
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            with open(lock) as f:
                owner = f.read().strip()
            if attempt or _lock_owner_alive(owner):
                raise InputError(f"--output-dir {output_dir} is in use by another training run ({owner or 'unknown'}, "
                                 f"see {lock}): wait for it, choose another --output-dir, or delete the lock if that "
                                 "run has ended") from None
            os.remove(lock)
            print(f"removed {lock} of an ended run ({owner})")
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    checkpoint = os.path.join(output_dir, "checkpoint.pth")
    continues = (bool(resume) and os.path.isfile(checkpoint) and os.path.exists(resume)
                 and os.path.samefile(resume, checkpoint))
    others = [name for name in RUN_FILES if os.path.isfile(os.path.join(output_dir, name))]
    if others and not continues:
        os.remove(lock)
        how = (f"this run resumes {resume} instead" if resume else
               "continue it with --resume auto" if os.path.isfile(checkpoint) else "it holds no checkpoint to resume")
        raise InputError(f"--output-dir {output_dir} holds {' and '.join(others)} of an earlier run, which this run "
                         f"would overwrite ({how}): choose another --output-dir")
    return lock


def claim_output_dir_on_every_rank(args, resume, world):
    """Rank 0 claims the output folder; every rank stops with its answer, so none waits for a peer that left."""
    lock, problem = None, None
    if is_main():
        try:
            lock = claim_output_dir(args.output_dir, resume)
        except InputError as err:
            problem = str(err)
    if world > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise InputError(problem)
    return lock


def check_resume_on_every_rank(given, resume, world):
    """Under torchrun every rank resumes from a checkpoint it can read, or none does. A rank without one (--resume
    auto on a machine whose --output-dir lacks rank 0's checkpoint, a --resume PATH missing on its machine) would
    start afresh beside the others, with its own weights and epochs: every rank stops with the same line instead."""
    if world == 1:
        return
    found = [None] * world
    dist.all_gather_object(found, bool(resume) and os.path.isfile(resume))
    if any(found) and not all(found):
        lacking = [rank for rank, ok in enumerate(found) if not ok]
        having = [rank for rank, ok in enumerate(found) if ok]
        raise InputError(f"--resume {given}: rank(s) {lacking} find no checkpoint ({resume or 'none in --output-dir'}) "
                         f"where rank(s) {having} do: every machine needs the checkpoint at the path it resumes from "
                         "(shared storage, or checkpoint.pth copied to every machine and --resume PATH)")


def run_writes_and_reads(args, resume):
    """(flag, path) of the files a run writes into --output-dir, and of the files and folders it reads, for
    build.check_writes. The checkpoint it resumes is its own to write over (--resume auto, or --resume naming
    OUTPUT_DIR/checkpoint.pth), the one documented case; claim_output_dir guards the folder's other files."""
    writes = [("--output-dir", os.path.join(args.output_dir, name)) for name in (*RUN_FILES, LOCK_NAME)]
    own = os.path.join(args.output_dir, "checkpoint.pth")
    continues = bool(resume) and os.path.isfile(own) and os.path.isfile(resume) and os.path.samefile(resume, own)
    reads = [(flag, path) for flag, path in (("--resume", None if continues else resume),
                                             ("--pretrained", args.pretrained),
                                             ("--label-embeddings", args.label_embeddings)) if path]
    reads += [read for image_set in ("train", "val") for read in dataset_files(image_set, args)]
    return writes, reads


def train_epochs(run, start_epoch):
    """Epochs start_epoch .. args.epochs - 1; returns the last COCO stats. Ctrl-C becomes Interrupted, saying
    which epoch it stopped and which one the checkpoint holds."""
    args, stats, epoch = run.args, None, start_epoch
    try:
        for epoch in range(start_epoch, args.epochs):
            stats = run_epoch(run, epoch) or stats
    except KeyboardInterrupt:
        path = os.path.join(args.output_dir, "checkpoint.pth")
        kept = ("no checkpoint was written yet" if run.saved_epoch is None else
                f"{path} holds epoch {run.saved_epoch}: continue with --resume auto")
        raise Interrupted(f"interrupted in epoch {epoch} of {args.epochs} (epochs count from 0); {kept}") from None
    return stats


def train(args, rank, world, ckpt, resume):
    """Build the run, restore the checkpoint if any (a --resume past the last epoch only says so), train the
    epochs left and print the final AP table."""
    run = build_run(args, rank, world, ckpt, resume)
    start_epoch = restore(run, ckpt, resume) if ckpt is not None else 0
    if start_epoch >= args.epochs:
        if is_main():
            print(f"nothing to train: {resume} finished epoch {start_epoch} of --epochs {args.epochs}; give a "
                  "larger --epochs to train on")
        return None
    announce(run)
    t_start = time.time()
    stats = train_epochs(run, start_epoch)
    if is_main():
        print(f"training time {datetime.timedelta(seconds=int(time.time() - t_start))}")
        if stats is not None:
            evaluate.print_table(f"{args.dataset} val, {args.method}", evaluate.STAT_NAMES, [stats[:6]])
        ov = run.history[-1].get(evaluate.ov_key(args.dataset)) if run.history else None
        if ov is not None:
            evaluate.print_table(f"{args.dataset} val, {args.method}, AP50 (Table 3)", list(ov), [list(ov.values())])
    return stats


def main(args):
    """Train args.epochs epochs (from a checkpoint with --resume); returns the last COCO stats."""
    rank, world = init_distributed(args)
    if is_main():
        print(config_line(args), flush=True)
    seed_everything(args.seed + rank)
    resume = resolve_resume(args.resume, args.output_dir) if args.resume else None
    check_resume_on_every_rank(args.resume, resume, world)
    check_writes(*run_writes_and_reads(args, resume))
    os.makedirs(args.output_dir, exist_ok=True)
    lock = claim_output_dir_on_every_rank(args, resume, world)
    try:
        if is_main():
            remove_stale_temporaries(args.output_dir)
        stats = train(args, rank, world, read_resume_checkpoint(args, resume), resume)
    finally:
        if lock is not None and os.path.exists(lock):
            os.remove(lock)
    if world > 1:
        dist.destroy_process_group()
    return stats


def cli(argv=None):
    args = get_parser().parse_args(argv)
    try:
        main(finalize_args(args))
    except (InputError, FileNotFoundError, FloatingPointError) as err:
        # Bad input (and a diverged run, named by its loss terms) is one line; a genuine bug keeps its traceback.
        print(f"error: {error_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        print(f"error: {err}" if isinstance(err, Interrupted) else "error: interrupted before training started",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
