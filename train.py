"""Training: argument parser, torchrun/DDP set-up, the training loop, checkpoints and logs (paper §4.1 setup).

`python train.py` with no arguments trains the embedded `shapes` dataset on the CPU with CLIP-DETR (AlignNet +
DynQL, a random-weight CLIP text encoder) and ends with its COCO AP table.
`torchrun --nproc_per_node=G train.py --dataset coco --data-path DIR` trains COCO with the paper's setup.

Paper ablations as flags:
  Table 4   --method {baseline,alignnet,dynql,clip-detr}
  Table 5   --align-feature {label,label+bbox,label+scale}
  Table 6/7 --dynql-betas 0.1 0.3 0.5 0.7 0.9   (a list; give it twice for "x2")
  Table 8   --dynql-rho 1.0

Every loss term of one step (Eq. 5 `loss_align`, Eq. 10 `loss_dynql_*`, the set-prediction terms) is
logged separately, one JSON line per epoch in OUTPUT_DIR/log.jsonl.

Shape legend: a batch is images (B, 3, H, W), a padding mask (B, H, W) True on padding, and B target dicts
with boxes (n_b, 4) normalized cxcywh and labels (n_b,); B is --batch-size per process.

Deviations from the paper: the `shapes` defaults (small ResNet-18 detector, few queries, short schedule) are
sized for a 2-core CPU; COCO defaults are the paper's.
"""
import argparse
import datetime
import json
import math
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import alignnet
import data
from dynql import DynQL, dynql_loss
from matcher import SetCriterion, global_num_boxes, weight_dict
from model import Backbone, DeformableDETR, DeformableTransformer, Joiner, PositionEmbeddingSine, PostProcess

METHODS = ("baseline", "alignnet", "dynql", "clip-detr")

# Flags whose default depends on the dataset: the demo must run in minutes on 2 CPU cores, COCO as in the paper.
DATASET_DEFAULTS = {
    "shapes": dict(backbone="resnet18", hidden_dim=64, dim_feedforward=256, enc_layers=2, dec_layers=3,
                   nheads=4, num_queries=30, enc_n_points=4, dec_n_points=4, batch_size=8, epochs=5,
                   lr_drop=[4], lr=1e-3, lr_backbone=1e-3, dropout=0.0, clip_model="RN50", clip_pretrained="none",
                   device="cpu", num_workers=1, min_size=128, max_size=192),
    "coco": dict(backbone="resnet50", hidden_dim=256, dim_feedforward=1024, enc_layers=6, dec_layers=6, nheads=8,
                 num_queries=300, enc_n_points=4, dec_n_points=4, batch_size=2, epochs=12, lr_drop=[10],
                 lr=2e-4, lr_backbone=2e-5, dropout=0.1, clip_model="RN50x64", clip_pretrained="openai",
                 device="cuda" if torch.cuda.is_available() else "cpu", num_workers=2, min_size=800, max_size=1333),
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
    p = argparse.ArgumentParser("CLIP-DETR training", description=__doc__.split("\n")[0],
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
    d.add_argument("--shapes-num-train", type=int, default=2000)
    d.add_argument("--shapes-num-val", type=int, default=200)
    d.add_argument("--shapes-min-size", type=int, default=128, help="shortest side of generated shapes images, pixels")
    d.add_argument("--shapes-max-size", type=int, default=192, help="longest side of generated shapes images, pixels")
    d.add_argument("--shapes-max-objects", type=int, default=6)
    d.add_argument("--shapes-seed", type=int, default=0)

    m = p.add_argument_group("detector (Deformable DETR)")
    m.add_argument("--backbone", default=None, choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    m.add_argument("--pretrained-backbone", action="store_true", help="ImageNet weights via torchvision")
    m.add_argument("--pretrained", default=None, metavar="PATH", help="official Deformable DETR checkpoint")
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
    m.add_argument("--attn-impl", default="auto", choices=["auto", "pytorch", "triton"])

    c = p.add_argument_group("CLIP-DETR (training only)")
    c.add_argument("--method", default="clip-detr", choices=METHODS, help="Table 4")
    c.add_argument("--align-feature", default="label+scale", choices=["label", "label+bbox", "label+scale"],
                   help="Table 5")
    c.add_argument("--align-loss-coef", type=float, default=1.0)
    c.add_argument("--dynql-betas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9], help="Tables 6-7")
    c.add_argument("--dynql-rho", type=float, default=1.0, help="Table 8")
    c.add_argument("--clip-model", default=None, help="open_clip model name (paper: RN50x64)")
    c.add_argument("--clip-pretrained", default=None, help="open_clip pretrained tag, or 'none' (random weights)")
    c.add_argument("--label-embeddings", default=None, metavar="FILE", help=".pt/.npy table, one row per class")

    o = p.add_argument_group("optimisation")
    o.add_argument("--lr", type=float, default=None)
    o.add_argument("--lr-backbone", type=float, default=None)
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--clip-max-norm", type=float, default=0.1)
    o.add_argument("--batch-size", type=int, default=None, help="per process")
    o.add_argument("--epochs", type=int, default=None)
    o.add_argument("--lr-drop", type=int, nargs="+", default=None, help="epochs where lr is multiplied by 0.1")
    o.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="CUDA only")
    o.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps (smoke runs)")

    r = p.add_argument_group("run")
    r.add_argument("--device", default=None)
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--output-dir", default="outputs")
    r.add_argument("--resume", default=None, metavar="PATH|auto", help="checkpoint to continue from")
    r.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
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


def finalize_args(args):
    """Fill dataset-dependent defaults; reject combinations that cannot run."""
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.amp != "off" and not str(args.device).startswith("cuda"):
        raise ValueError(f"--amp {args.amp} needs a CUDA device (got --device {args.device})")
    if args.two_stage and not args.with_box_refine:
        raise ValueError("--two-stage needs --with-box-refine (the encoder proposals use the extra refinement "
                         "head, as in the official code); add --no-two-stage for single-stage Deformable DETR")
    if args.method in ("dynql", "clip-detr") and not args.two_stage:
        raise ValueError(f"--method {args.method} needs --two-stage (DynQueries carry 4-D reference boxes)")
    return args


# ----------------------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------------------
def build_model(args, class_names, label_table=None):
    """The one place that maps arguments to modules: (model, criterion, postprocess).

    `label_table` (K, D) replaces the CLIP label dictionary, e.g. the one an open-vocabulary checkpoint carries.
    """
    backbone = Joiner(Backbone(args.backbone, pretrained=args.pretrained_backbone),
                      PositionEmbeddingSine(args.hidden_dim // 2))
    transformer = DeformableTransformer(
        d_model=args.hidden_dim, n_heads=args.nheads, num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers, d_ffn=args.dim_feedforward, dropout=args.dropout,
        n_levels=args.num_feature_levels, enc_n_points=args.enc_n_points, dec_n_points=args.dec_n_points,
        two_stage=args.two_stage, two_stage_num_proposals=args.num_queries, attn_impl=args.attn_impl)
    open_vocabulary = args.dataset == "ov-coco"
    table = align = dyn = class_head = None
    if args.method != "baseline" or open_vocabulary:
        # Rank 0 builds (or downloads) the label dictionary into the disk cache; the others then read it.
        distributed = dist.is_available() and dist.is_initialized()
        if distributed and dist.get_rank() != 0:
            dist.barrier()
        table = alignnet.build_label_embeddings(args, class_names) if label_table is None else label_table
        if distributed and dist.get_rank() == 0:
            dist.barrier()
    if args.method != "baseline":
        align = alignnet.AlignNet(label_embeddings=table, d_model=args.hidden_dim, align_feature=args.align_feature)
    if open_vocabulary:
        # Classes are named by their CLIP rows, so novel ones can be scored at test time; only base classes have
        # training annotations (§4.2). Class 0 (person) is base: the two-stage proposals rank by it.
        base = set(data.OV_COCO_BASE)
        class_head = alignnet.LabelEmbeddingClassifier(
            label_embeddings=table, d_model=args.hidden_dim,
            train_classes=[k for k, name in enumerate(class_names) if name in base])
    if args.method == "dynql":
        align.logit_beta.requires_grad_(False)  # no alignment loss: beta would be an unused parameter
    if args.method in ("dynql", "clip-detr"):
        dyn = DynQL(d_model=args.hidden_dim, betas=args.dynql_betas, rho=args.dynql_rho)
    model = DeformableDETR(backbone, transformer, num_classes=len(class_names), num_queries=args.num_queries,
                           num_feature_levels=args.num_feature_levels, with_box_refine=args.with_box_refine,
                           two_stage=args.two_stage, alignnet=align, dynql=dyn,
                           align_loss=args.method in ("alignnet", "clip-detr"), class_head=class_head)
    return model, SetCriterion(len(class_names)), PostProcess()


def compute_losses(criterion, outputs, targets):
    """Set-prediction losses (§3.1), plus AlignNet's Eq. 5 and DynQL's Eq. 10 when the model made them."""
    # One all-reduce of the box count per step serves both the conventional and the DynQL normalizer.
    n = global_num_boxes(targets, outputs["pred_logits"].device)
    losses = criterion(outputs, targets, num_boxes=n)
    if "dynql_outputs" in outputs:
        losses.update(dynql_loss(outputs["dynql_outputs"], outputs["dynql_layout"], targets, n))
    if "loss_align" in outputs:
        losses["loss_align"] = outputs["loss_align"]
    return losses


def build_optimizer(model, args):
    """AdamW over `param_groups`; fused (one kernel over all parameters, CPU and CUDA) instead of a Python loop
    over ~350 tensors, which is the same update up to float rounding."""
    return torch.optim.AdamW(param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay, fused=True)


def param_groups(model, args):
    """Backbone at --lr-backbone; sampling offsets and reference points at 0.1x lr (official); rest at --lr."""
    groups = {"backbone": [], "linear_proj": [], "rest": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone.0"):
            groups["backbone"].append(p)
        elif "sampling_offsets" in name or "reference_points" in name:
            groups["linear_proj"].append(p)
        else:
            groups["rest"].append(p)
    return [{"params": groups["rest"], "lr": args.lr},
            {"params": groups["backbone"], "lr": args.lr_backbone},
            {"params": groups["linear_proj"], "lr": args.lr * 0.1}]


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


def is_main():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def unwrap(model):
    return model.module if hasattr(model, "module") else model


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
    """Write to a temporary file, then rename: a kill leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # a failed write (disk full, ...) leaves nothing half-written behind
            os.remove(tmp)


RESUME_MUST_MATCH = ("dataset", "method", "two_stage", "with_box_refine", "dynql_betas", "dynql_rho",
                     "align_feature", "lr_drop", "batch_size")


def check_resume_args(saved, args, source):
    """A resumed run must train what the checkpoint trained; the stored scheduler would override --lr-drop."""
    diff = [f"--{k.replace('_', '-')} {saved[k]!r} in the checkpoint, {getattr(args, k)!r} now"
            for k in RESUME_MUST_MATCH if k in saved and saved[k] != getattr(args, k)]
    if diff:
        raise ValueError(f"--resume {source}: the checkpoint was trained with other settings: {'; '.join(diff)}")


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=False)


def resolve_resume(resume, output_dir):
    """'auto' -> OUTPUT_DIR/checkpoint.pth when it exists (else start fresh); a path must exist."""
    if resume == "auto":
        path = os.path.join(output_dir, "checkpoint.pth")
        return path if os.path.isfile(path) else None
    return resume


def load_model_state(model, state_dict, source):
    """Strict load; a CLIP-DETR checkpoint into a baseline model may only miss alignnet.*/dynql.* keys."""
    own = model.state_dict()
    module_key = lambda k: k.startswith(("alignnet.", "dynql."))  # noqa: E731
    missing = [k for k in own if k not in state_dict and not module_key(k)]
    unexpected = [k for k in state_dict if k not in own and not module_key(k)]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
                  if k in own and v.shape != own[k].shape]
    if missing or unexpected or mismatched:
        show = lambda keys: f"{keys[:3]}{'...' if len(keys) > 3 else ''} ({len(keys)})"  # noqa: E731
        raise ValueError(f"checkpoint {source!r} does not match the model: missing {show(missing)}, "
                         f"unexpected {show(unexpected)}, shape mismatch {show(mismatched)}")
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    skipped = [k for k in list(own) + list(state_dict) if module_key(k) and (k not in own or k not in state_dict)]
    if skipped and is_main():
        print(f"loaded {source}: {len(skipped)} training-module keys (alignnet.*/dynql.*) not used")


def load_official_checkpoint(model, path, cat_ids):
    """An official Deformable DETR checkpoint: strict load; its 91-row COCO head keeps the rows of cat_ids."""
    state = load_checkpoint(path)
    state = state.get("model", state)
    if isinstance(unwrap(model).class_embed[0], alignnet.LabelEmbeddingClassifier):
        raise ValueError(f"--pretrained {path}: an official checkpoint's linear class head cannot initialise the "
                         "open-vocabulary head of --dataset ov-coco; train ov-coco without --pretrained")
    K = len(cat_ids)
    for key in list(state):
        if "class_embed" in key and state[key].shape[0] == 91 and K != 91:
            state[key] = state[key][torch.as_tensor(cat_ids)]
    load_model_state(model, state, path)


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------
def to_device(targets, device):
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def train_step(model, criterion, batch, optimizer, device, *, clip_max_norm=0.1, align_loss_coef=1.0,
               amp_dtype=None, scaler=None, where="step"):
    """One optimisation step on a collated batch; returns (total loss, {term: value}) as Python floats.

    A non-finite total stops training with the offending terms named (`where` says which step it was).
    """
    images, mask, targets = batch
    images, mask, targets = images.to(device), mask.to(device), to_device(targets, device)
    with torch.autocast(device_type="cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
        losses = compute_losses(criterion, model(images, mask, targets), targets)
        weights = weight_dict(losses, align=align_loss_coef)
        loss = sum(weights[k] * v for k, v in losses.items())
    values = {k: v.item() for k, v in losses.items()}
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
    batch_sampler = torch.utils.data.BatchSampler(train_sampler, args.batch_size, drop_last=True)
    # Workers are re-created each epoch (not persistent) so their seeds come from the restored RNG on resume.
    train_loader = DataLoader(train_set, batch_sampler=batch_sampler, collate_fn=data.collate_fn,
                              num_workers=args.num_workers)
    # Its own generator: evaluating must not advance the training RNG (a resumed run would diverge).
    val_loader = DataLoader(val_set, batch_size=args.batch_size, sampler=val_sampler, drop_last=False,
                            collate_fn=data.collate_fn, num_workers=args.num_workers,
                            generator=torch.Generator().manual_seed(args.seed))
    return train_loader, train_sampler, val_loader


def main(args):
    import evaluate
    rank, world = init_distributed(args)
    if is_main():
        print(config_line(args), flush=True)
    device = torch.device(args.device)
    seed = args.seed + rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    os.makedirs(args.output_dir, exist_ok=True)
    resume = resolve_resume(args.resume, args.output_dir) if args.resume else None
    ckpt = None
    if resume:
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume: checkpoint {resume!r} does not exist")
        ckpt = load_checkpoint(resume)
        check_resume_args(ckpt["args"], args, resume)

    train_set = data.build_dataset("train", args)
    val_set = data.build_dataset("val", args)
    model, criterion, postprocess = build_model(args, train_set.cat_names)
    model.to(device)
    if args.pretrained:
        load_official_checkpoint(model, args.pretrained, train_set.cat_ids)
    model_without_ddp = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model_without_ddp, args)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.lr_drop, gamma=0.1)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None
    train_loader, train_sampler, val_loader = make_loaders(args, train_set, val_set, rank, world)

    start_epoch = 0
    if ckpt is not None:
        load_model_state(model_without_ddp, ckpt["model"], resume)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = ckpt["epoch"] + 1
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        if is_main():
            print(f"resumed from {resume} at epoch {start_epoch}")

    n_params = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    if is_main() and args.dataset != "shapes" and not (args.pretrained_backbone or args.pretrained):
        print("warning: training from a random ResNet (no --pretrained-backbone, no --pretrained): the paper "
              "starts from ImageNet weights; expect far lower AP")
    if is_main():
        print(f"{args.method} on {args.dataset}: {len(train_set)} train / {len(val_set)} val images, "
              f"{len(train_set.cat_names)} classes, {n_params / 1e6:.2f} M trainable parameters, "
              f"{world} process(es) on {device}, total batch {world * args.batch_size}")
    stats = None
    t_start = time.time()
    for epoch in range(start_epoch, args.epochs):
        train_sampler.set_epoch(epoch)
        t0 = time.time()
        train_stats = train_one_epoch(model, criterion, train_loader, optimizer, device, epoch, args, scaler)
        log = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "time_s": round(time.time() - t0, 1),
               **{f"train_{k}": round(v, 5) for k, v in train_stats.items()}}
        scheduler.step()
        # Checkpoint before evaluating: a kill during a long COCO evaluation must not lose the epoch.
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if is_main():
            save_checkpoint(os.path.join(args.output_dir, "checkpoint.pth"), model=model_without_ddp.state_dict(),
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), epoch=epoch,
                            args=vars(args), rng=rngs, scaler=scaler.state_dict() if scaler else None,
                            classes={"ids": train_set.cat_ids, "names": train_set.cat_names})
        last = epoch == args.epochs - 1
        if last or (args.eval_every > 0 and (epoch + 1) % args.eval_every == 0):
            stats = evaluate.evaluate(model_without_ddp, postprocess, val_loader, val_set, device)
            log["coco_stats"] = stats
        if is_main():
            with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(log) + "\n")
            # The console shows the last decoder layer's terms; log.jsonl has every layer's and the proposals'.
            loss_line = " ".join(f"{k[6:]}={v:.3f}" for k, v in log.items()
                                 if k.startswith("train_loss") and not re.search(r"_(\d+|enc)$", k))
            ap = f" AP={stats[0]:.3f} AP50={stats[1]:.3f}" if "coco_stats" in log else ""
            print(f"epoch {epoch}: {loss_line} ({log['time_s']} s){ap}", flush=True)
    if is_main():
        print(f"training time {datetime.timedelta(seconds=int(time.time() - t_start))}")
        if stats is not None:
            evaluate.print_coco_table(stats, title=f"{args.dataset} val, {args.method}")
    if world > 1:
        dist.destroy_process_group()
    return stats


def cli(argv=None):
    args = get_parser().parse_args(argv)
    try:
        main(finalize_args(args))
    except (ValueError, FileNotFoundError) as err:
        # Bad input is reported as one line; a genuine bug still shows its traceback.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
