"""Build: the one map from command-line arguments to objects, and the checkpoints a run starts from or resumes.

train.py and evaluate.py are peers that both import this module; nothing below it reads an argparse
namespace. Everything that turns `args` (train.py's parser, or a checkpoint's stored arguments) into objects is
here, each in one `build_*` function:
  build_dataset        the datasets of §4 (COCO, OV-COCO, LVIS, a custom COCO-format JSON, the `shapes` demo), from
                       `dataset_location`, the files each reads
  build_label_table    the CLIP label dictionary f_cls of AlignNet (Eq. 2), from label_dictionary.py
  class_split          an open-vocabulary run's base and novel classes (--novel-classes, or ov-coco's split)
  build_model          Deformable DETR (§3.1) with AlignNet (Eq. 1-5) and DynQL (Eq. 6-10) attached for training,
                       the set-prediction criterion and the post-processing
  build_optimizer      AdamW with the official parameter groups (§4.1)
the checks a run makes before any work (`check_device`, `check_output_path`, and `check_writes`: no file a command
writes is one it reads), and the weights a model starts from or resumes: `load_checkpoint` (a checkpoint
train.py wrote), `load_model_state` (strict, naming what differs), `load_pretrained` (a released Deformable
DETR: an official .pth, or a transformers checkpoint read by transformers_checkpoint.py, its class rows matched
to the dataset's classes by name: `class_head_rows`), `checkpoint_args` / `checkpoint_detector` (evaluate.py's
plain detector from a checkpoint) and `hf_detector` (from a transformers one). An open-vocabulary checkpoint scores any names at
inference: `checkpoint_vocabulary` embeds them, `checkpoint_detector(..., vocabulary=...)` swaps them in.

No equations of their own. Shape legend: K classes (91 COCO category ids in released heads), D CLIP text width,
C model width.
Deviations from the paper: none here (the paper starts from ImageNet weights; released detectors are an extra
starting point, loaded with the official code's conventions: 91-row COCO heads cut to the dataset's classes (by
name), the two-stage encoder head's objectness row kept, the ResNet's stem and layer1 frozen). The defaults that
differ for the CPU demo are train.py's.
"""
import argparse
import os
import tempfile

import torch
import torch.distributed as dist

import data
from alignnet import AlignNet
from dynql import DynQL
from errors import InputError, cache_dir, is_distributed, is_main, read_torch_file
from label_dictionary import ClipWeightsUnavailableError, label_embeddings, read_embeddings_file
from matcher import SetCriterion
from model import (Backbone, DeformableDETR, DeformableTransformer, Joiner, LabelEmbeddingClassifier,
                   PositionEmbeddingSine, PostProcess)
from transformers_checkpoint import (hf_checkpoint_files, hf_checkpoint_state, hf_model_args, is_hf_checkpoint,
                                     read_hf_config)

# LVIS keeps 300 detections per image (its protocol); COCO keeps 100.
LVIS_DETECTIONS_PER_IMAGE = 300


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------
DATASETS = ("shapes", "coco", "custom", "ov-coco", "lvis")
COCO_LAYOUT = "DIR/train2017/, DIR/val2017/, DIR/annotations/instances_{train,val}2017.json"
LVIS_LAYOUT = "DIR/train2017/, DIR/val2017/, DIR/annotations/lvis_v1_{train,val}.json"


# Each dataset flag and the datasets `build_dataset` reads it for: given for another dataset it would be ignored.
DATASET_FLAGS = {"data_path": ("shapes", "coco", "ov-coco", "lvis"),
                 **{key: ("custom",) for key in ("train_json", "train_images", "val_json", "val_images")},
                 **{f"shapes_{key}": ("shapes",) for key in data.SHAPES_DEFAULTS}}


def check_dataset_flags(dataset, given):
    """`given`: the dataset flags (DATASET_FLAGS' names) a command line sets; one `dataset` does not read is an
    InputError naming it and the datasets that read it."""
    unread = [key for key in given if dataset not in DATASET_FLAGS[key]]
    if unread:
        flags = ", ".join(f"--{key.replace('_', '-')} (read by {', '.join(DATASET_FLAGS[key])})" for key in unread)
        them = "it" if len(unread) == 1 else "them"
        raise InputError(f"--dataset {dataset} does not read {flags}: drop {them}, or choose the dataset {them} is for"
                         .replace("them is", "they are"))


def _require(paths, dataset, layout):
    """A missing piece of a standard layout is named together with the whole expected layout."""
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{dataset}: {path} not found; expected the layout {layout}")


def build_transforms(image_set, args):
    """The `image_set` pipeline of args.dataset at args.min_size / args.max_size."""
    return data.dataset_transforms(image_set, shapes=args.dataset == "shapes", min_size=args.min_size,
                                   max_size=args.max_size)


def build_train_batches(args, dataset, sampler):
    """(batch sampler, collate_fn) of training. `shapes`: batches of one aspect (landscape or portrait), resized
    together to a shorter side drawn per batch (`data.BatchResize`), so that a padded batch is mostly image
    (measured: 1.16x the images' area, against 1.52x in random batches; a demo step 0.83x as long); the other
    datasets batch as Deformable DETR does, each image at its own drawn scale."""
    if args.dataset == "shapes":
        return (data.GroupedBatchSampler(sampler, dataset.aspect_groups(), args.batch_size),
                data.BatchResize(data.shapes_scales(args.min_size), args.max_size))
    return torch.utils.data.BatchSampler(sampler, args.batch_size, drop_last=True), data.collate_fn


def build_val_batches(args, dataset, sampler):
    """The batch sampler of evaluation: every image once, in batches padded as training's were. A detector's
    output for an image depends on its batch's padding (the convolutions' windows at the image's bottom and right
    edges reach into it, and input_proj's GroupNorm averages over the padded map), so `shapes`, trained on batches
    of one aspect, is evaluated on such batches too (measured on its demo checkpoint: AP 26.2 on batches in file
    order, 42.5 on batches of one aspect)."""
    if args.dataset == "shapes":
        return data.GroupedBatchSampler(sampler, dataset.aspect_groups(), args.batch_size, drop_last=False)
    return torch.utils.data.BatchSampler(sampler, args.batch_size, drop_last=False)


def dataset_location(image_set, args):
    """(image folders, annotation file, the flag that names them) of the `image_set` split of args.dataset; a
    missing flag, folder or file of the layout is an error naming it. The `shapes` set's paths are those it has
    (or will have, once generated) in its cache folder."""
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
    if args.dataset == "shapes":
        paths = data.shapes_paths(args.data_path or cache_dir(), **shapes_options(args))
        return [paths[f"{image_set}_images"]], paths[f"{image_set}_json"], "the shapes set (--data-path)"
    if args.dataset == "custom":
        ann_file, img_folder = getattr(args, f"{image_set}_json"), getattr(args, f"{image_set}_images")
        if not ann_file or not img_folder:
            missing = [flag for flag, value in ((f"--{image_set}-json", ann_file),
                                                (f"--{image_set}-images", img_folder)) if not value]
            raise InputError(f"dataset 'custom' needs {', '.join(missing)}: a COCO-format JSON and its image folder")
        return [img_folder], ann_file, f"--{image_set}-json/--{image_set}-images"
    if args.dataset not in DATASETS:
        raise InputError(f"unknown dataset {args.dataset!r}; expected one of {', '.join(map(repr, DATASETS))}")
    layout = LVIS_LAYOUT if args.dataset == "lvis" else COCO_LAYOUT
    if not args.data_path:
        raise InputError(f"dataset {args.dataset!r} needs --data-path DIR with the layout {layout}")
    if not os.path.isdir(args.data_path):
        raise FileNotFoundError(f"{args.dataset}: data folder {args.data_path} not found; expected the layout {layout}")
    if args.dataset == "lvis":
        # LVIS v1 val draws images from COCO train2017 as well as val2017, so both folders are searched.
        folders = [os.path.join(args.data_path, "train2017"), os.path.join(args.data_path, "val2017")]
        ann_file = os.path.join(args.data_path, "annotations", f"lvis_v1_{image_set}.json")
    else:
        folders = [os.path.join(args.data_path, f"{image_set}2017")]
        ann_file = os.path.join(args.data_path, "annotations", f"instances_{image_set}2017.json")
    _require([*folders, ann_file], args.dataset, layout)
    return folders, ann_file, "--data-path"


def dataset_files(image_set, args):
    """(flag, path) of what the `image_set` split reads, its image folders and its JSON, for `check_writes`."""
    folders, ann_file, flag = dataset_location(image_set, args)
    return [(flag, path) for path in [*folders, ann_file]]


def shapes_options(args):
    """make_shapes' keyword arguments from the --shapes-* flags."""
    return dict(num_train=args.shapes_num_train, num_val=args.shapes_num_val, seed=args.shapes_seed,
                min_size=args.shapes_min_size, max_size=args.shapes_max_size, max_objects=args.shapes_max_objects)


def build_dataset(image_set, args):
    """The `image_set` ('train' or 'val') split of args.dataset as a data.CocoDetection, from `dataset_location`.

    Reads args.dataset, args.data_path, args.min_size/max_size, args.novel_classes (held out of 'train'), for
    'custom' args.{train,val}_{json,images}, and for 'shapes' args.shapes_{num_train, num_val, seed, min_size,
    max_size, max_objects} (the set is generated into its cache folder the first time).
    """
    folders, ann_file, _ = dataset_location(image_set, args)
    if args.dataset == "shapes":
        data.make_shapes(args.data_path or cache_dir(), **shapes_options(args))
    # An open-vocabulary run trains on its base categories' annotations only and evaluates base and novel ones.
    kept = {"transforms": build_transforms(image_set, args), "drop_flag": "--novel-classes"}
    split = novel_split(args)
    if split is not None:
        base, novel = split
        kept["drop_cat_names"] = novel if image_set == "train" else ()
        if base is not None:
            kept["keep_cat_names"] = base if image_set == "train" else base + novel
    return data.CocoDetection(folders if len(folders) > 1 else folders[0], ann_file, **kept)


def novel_split(args):
    """(base names, novel names) that an open-vocabulary run trains on and holds out, read from args alone
    (before the dataset's categories are known); None for a closed-set run. ov-coco is COCO with OVR-CNN's 48
    base / 17 novel split (its other 15 categories are in neither); with --novel-classes base is None: every
    other category of the dataset."""
    if args.dataset == "ov-coco":
        return list(data.OV_COCO_BASE), list(data.OV_COCO_NOVEL)
    novel = getattr(args, "novel_classes", None)  # absent from checkpoints written before the flag existed
    return (None, list(dict.fromkeys(novel))) if novel else None


def class_split(args, class_names):
    """(base, novel): the names among `class_names` an open-vocabulary run trains on and holds out, each in
    class_names order; None for a closed-set run."""
    split = novel_split(args)
    if split is None:
        return None
    if args.dataset == "ov-coco":
        return data.ov_coco_split(class_names)
    novel = set(split[1])
    data.check_category_names(split[1], list(class_names), what="--novel-classes", where=f"dataset {args.dataset!r}")
    base = [n for n in class_names if n not in novel]
    if not base:
        raise InputError(f"--novel-classes holds out all {len(class_names)} categories of dataset {args.dataset!r}, "
                         "expected at least one base category to train on")
    return base, [n for n in class_names if n in novel]


# ----------------------------------------------------------------------------------------------------------
# The label dictionary and the model
# ----------------------------------------------------------------------------------------------------------
def build_label_table(args, class_names):
    """The CLIP label dictionary f_cls (K, D) of `class_names` from args.clip_model / clip_pretrained /
    label_embeddings. Under torchrun rank 0 builds (or downloads) it into the disk cache; the others then read it."""
    if is_distributed() and not is_main():
        dist.barrier()
    table = label_embeddings(class_names, model_name=args.clip_model, pretrained=args.clip_pretrained,
                             embeddings_file=args.label_embeddings, device=args.device)
    if is_distributed() and is_main():
        dist.barrier()
    return table


def build_model(args, class_names, label_table=None):
    """(model, criterion, postprocess) for `class_names`: Deformable DETR of args' sizes and variant, with the
    training modules of args.method, and for an open-vocabulary run (--novel-classes, ov-coco) the class head
    that scores the CLIP label dictionary, trained on the base classes only.

    `label_table` (K, D) replaces the CLIP label dictionary, e.g. the one an open-vocabulary checkpoint carries.
    """
    backbone = Joiner(Backbone(args.backbone, pretrained=args.pretrained_backbone),
                      PositionEmbeddingSine(args.hidden_dim // 2))
    transformer = DeformableTransformer(
        d_model=args.hidden_dim, n_heads=args.nheads, num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers, d_ffn=args.dim_feedforward, dropout=args.dropout,
        n_levels=args.num_feature_levels, enc_n_points=args.enc_n_points, dec_n_points=args.dec_n_points,
        two_stage=args.two_stage, two_stage_num_proposals=args.num_queries, attn_impl=args.attn_impl)
    split = class_split(args, class_names)
    open_vocabulary = split is not None
    table = align = dyn = class_head = None
    if args.method != "baseline" or open_vocabulary:
        table = build_label_table(args, class_names) if label_table is None else label_table
    if args.method != "baseline":
        align = AlignNet(label_embeddings=table, d_model=args.hidden_dim, align_feature=args.align_feature)
    if open_vocabulary:
        # Classes are named by their CLIP rows, so novel ones can be scored at test time; only base classes have
        # training annotations (§4.2). The decoder layers score with it; the two-stage encoder keeps a
        # class-agnostic objectness head (DeformableDETR), so proposals are not ranked by one class's CLIP row.
        base = set(split[0])
        class_head = LabelEmbeddingClassifier(label_embeddings=table, d_model=args.hidden_dim,
                                              train_classes=[k for k, name in enumerate(class_names) if name in base])
    if args.method == "dynql":
        align.logit_beta.requires_grad_(False)  # no alignment loss: beta would be an unused parameter
    if args.method in ("dynql", "clip-detr"):
        dyn = DynQL(d_model=args.hidden_dim, betas=args.dynql_betas, rho=args.dynql_rho)
    model = DeformableDETR(backbone, transformer, num_classes=len(class_names), num_queries=args.num_queries,
                           num_feature_levels=args.num_feature_levels, with_box_refine=args.with_box_refine,
                           two_stage=args.two_stage, alignnet=align, dynql=dyn,
                           align_loss=args.method in ("alignnet", "clip-detr"), class_head=class_head)
    return model, SetCriterion(len(class_names)), build_postprocess(args)


def build_postprocess(args):
    """Top-k post-processing: LVIS keeps 300 detections per image, the others 100."""
    return PostProcess(num_select=LVIS_DETECTIONS_PER_IMAGE if args.dataset == "lvis" else 100)


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


def build_optimizer(model, args):
    """AdamW over `param_groups`; fused (one kernel over all parameters, CPU and CUDA) instead of a Python loop
    over ~350 tensors, which is the same update up to float rounding."""
    return torch.optim.AdamW(param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay, fused=True)


# ----------------------------------------------------------------------------------------------------------
# Checks made before any work
# ----------------------------------------------------------------------------------------------------------
def default_device():
    """Where the COCO-sized runs go unless --device says otherwise: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name, flag="--device"):
    """A device string torch understands and this machine has: 'cpu', 'cuda' or 'cuda:N'."""
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's answer to an unknown device string
        raise InputError(f"{flag} {name!r} is not a device, expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"{flag} {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{flag} {name!r}: no CUDA GPU is visible to PyTorch, use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"{flag} {name!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return device


def check_output_path(path, flag, folder=True):
    """An output folder (or, folder=False, a file) that can be created and written, checked before any work: neither
    it nor a parent is a file, and the deepest folder of it that exists takes a new file (a read-only file system
    or a folder without write permission fails here, not after an epoch). Nothing is left behind by the check."""
    path = os.path.abspath(path)
    if folder and os.path.isfile(path):
        raise InputError(f"{flag} {path} is a file, expected a folder (or a path to create one at)")
    if not folder and os.path.isdir(path):
        raise InputError(f"{flag} {path} is a folder, expected a file name")
    existing = path if folder and os.path.isdir(path) else os.path.dirname(path)
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing and not os.path.isdir(existing):
        raise InputError(f"{flag} {path} lies under {existing}, which is a file, expected a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".clip-detr-write-check-"):
            pass
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot write into {existing} ({err.strerror or err}), expected a "
                         "writable folder") from None


def _entries(path):
    """The directory entries a path stands for, as (folder resolved, name): its own, and where it is a link, the
    file it reaches. A file is replaced through its own entry (a rename) or written through the link (an open)."""
    own = os.path.abspath(path)
    real = os.path.realpath(path)
    return {(os.path.realpath(os.path.dirname(own)), os.path.basename(own)),
            (os.path.dirname(real), os.path.basename(real))}


def _inode(path):
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def check_writes(writes, reads):
    """Refuse, before any work, a command that would write over what it reads: `writes` are (flag, path) of the
    files it will write, `reads` (flag, path) of the files and folders it reads, a folder standing for every file
    in it (an --images folder, a dataset's image folder). A written path collides with a read one when both name
    one directory entry (relative paths, `..` and linked folders resolved), when one reaches the other through a
    symlink, or when both are one file (a hard link); two writes of one file collide as well. The InputError
    names both flags and the file."""
    owners, inodes = {}, {}
    for flag, path in reads:
        if not path or not os.path.exists(path):
            continue
        if os.path.isdir(path):
            folder = os.path.realpath(path)
            with os.scandir(path) as members:
                for member in members:
                    if not member.is_file():
                        continue
                    where = f"a file of {flag} {path}"
                    owners.setdefault((folder, member.name), where)
                    if member.is_symlink():
                        for entry in _entries(member.path):
                            owners.setdefault(entry, where)
        else:
            for entry in _entries(path):
                owners.setdefault(entry, f"{flag} {path}")
            inodes.setdefault(_inode(path), f"{flag} {path}")
    written = {}
    for flag, path in writes:
        entries = _entries(path)
        read = next((owners[e] for e in entries if e in owners), None) or inodes.get(_inode(path) or ())
        if read is not None:
            raise InputError(f"{flag} would write {path}, which is {read}: a command never writes over what it "
                             f"reads; choose another {flag}")
        twice = next((written[e] for e in entries if e in written), None)
        if twice is not None and twice != flag:
            raise InputError(f"{twice} and {flag} would both write {path}: choose other paths")
        written.update(dict.fromkeys(entries, flag))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints and the weights a run starts from
# ----------------------------------------------------------------------------------------------------------
# Arguments build_model reads from a checkpoint: one without them was not written by train.py.
MODEL_ARGS = ("dataset", "backbone", "hidden_dim", "dim_feedforward", "enc_layers", "dec_layers", "nheads",
              "num_queries", "num_feature_levels", "enc_n_points", "dec_n_points", "dropout", "with_box_refine",
              "two_stage", "attn_impl", "device")


def load_checkpoint(path, flag="--resume", keys=("model", "args")):
    """A checkpoint as a dict on the CPU holding `keys`; anything else is an InputError naming `flag` and path."""
    if os.path.isdir(path):
        inside = os.path.join(path, "checkpoint.pth")
        hint = f" (did you mean {inside}?)" if os.path.isfile(inside) else ""
        raise InputError(f"{flag}: {path} is a folder, expected a checkpoint file{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: checkpoint {path!r} does not exist")
    ckpt = read_torch_file(path, f"{flag}: checkpoint", weights_only=False)
    if not isinstance(ckpt, dict):
        raise InputError(f"{flag}: checkpoint {path} holds a {type(ckpt).__name__}, expected the dict train.py "
                         "writes")
    missing = [key for key in keys if key not in ckpt]
    if "args" in keys and isinstance(ckpt.get("args"), dict):
        missing += [f"args.{key}" for key in MODEL_ARGS if key not in ckpt["args"]]
    if missing:
        raise InputError(f"{flag}: checkpoint {path} lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         "expected a checkpoint written by train.py")
    for key in ("model", "args"):
        if key in keys and not isinstance(ckpt[key], dict):
            raise InputError(f"{flag}: checkpoint {path} has a {type(ckpt[key]).__name__} as '{key}', expected a "
                             "dict")
    if "model" in keys and not all(torch.is_tensor(v) for v in ckpt["model"].values()):
        raise InputError(f"{flag}: checkpoint {path}: 'model' holds non-tensors, expected a state_dict")
    return ckpt


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
        raise InputError(f"checkpoint {source!r} does not match the model: missing {show(missing)}, "
                         f"unexpected {show(unexpected)}, shape mismatch {show(mismatched)}")
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    skipped = [k for k in list(own) + list(state_dict) if module_key(k) and (k not in own or k not in state_dict)]
    if skipped and is_main():
        print(f"loaded {source}: {len(skipped)} training-module keys (alignnet.*/dynql.*) not used")


def official_checkpoint_state(path):
    """(state dict, what it is) of an official Deformable DETR checkpoint (a .pth holding it, or holding it under
    'model')."""
    state = load_checkpoint(path, "--pretrained", keys=())
    state = state.get("model", state)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f"--pretrained {path} holds no state_dict (expected a dict of tensors, or one under 'model')")
    return state, f"official checkpoint {path}"


def class_head_rows(row_names, class_names, source):
    """The row of a checkpoint's class head for each of `class_names`, matched by name: `row_names` names the
    head's rows (None for a row without a class). A name the head lacks, or holds in two rows, is an InputError
    naming it: a class is never given another class's row."""
    rows = {}
    for row, name in enumerate(row_names):
        if name is not None:
            rows.setdefault(name, []).append(row)
    missing = [n for n in class_names if n not in rows]
    twice = [n for n in class_names if len(rows.get(n, ())) > 1]
    if missing or twice:
        named = [n for n in row_names if n is not None]
        problem = (f"the dataset's categories {missing[:5]}{' ...' if len(missing) > 5 else ''} are not among them"
                   if missing else f"it names {twice[:5]} in more than one row")
        raise InputError(f"{source}: its class head scores {len(named)} named classes ({', '.join(named[:8])}"
                         f"{' ...' if len(named) > 8 else ''}); {problem}, expected each of the dataset's category "
                         "names once (classes are matched by name, not by position or id)")
    return [rows[n][0] for n in class_names]


def select_class_rows(state, model, rows):
    """Cut a checkpoint's class heads to the model's classes: decoder head row `rows[k]` becomes class k. The
    two-stage encoder head keeps rows 0..K-1 in place, so its objectness row 0 stays column 0: it is
    class-agnostic (every target is class 0, proposals are ranked by that logit), its other rows only ever saw
    negatives."""
    encoder_head = f"class_embed.{model.transformer.decoder.num_layers}." if model.two_stage else None
    first = next((v for k, v in state.items() if "class_embed" in k), None)
    for key in list(state):
        if "class_embed" not in key or state[key].shape[0] != first.shape[0]:
            continue
        if encoder_head and key.removeprefix("transformer.decoder.").startswith(encoder_head):
            state[key] = state[key][:len(rows)]
        else:
            state[key] = state[key][torch.as_tensor(rows)]


def load_pretrained(model, source, class_names):
    """--pretrained: a released Deformable DETR as the starting point, strictly loaded: an official checkpoint
    (.pth) or transformers' (a save_pretrained folder or a hub id hf:ORG/NAME). Its class head's rows meet the
    dataset's `class_names` by name (`class_head_rows`): a transformers checkpoint names them in config.json
    (id2label); an official one, or one whose id2label holds transformers' placeholders, has COCO's 91-row head,
    row i being COCO category id i. Then the ResNet's stem and layer1 freeze, as the official code freezes a
    pretrained ResNet's."""
    if isinstance(model.class_embed[0], LabelEmbeddingClassifier):
        raise InputError(f"--pretrained {source}: a checkpoint's linear class head cannot initialise the "
                         "open-vocabulary head (--novel-classes, --dataset ov-coco); train it without --pretrained")
    if is_hf_checkpoint(source):
        state, what, row_names = hf_checkpoint_state(model, source)
    else:
        (state, what), row_names = official_checkpoint_state(source), None
    head = next((v for k, v in state.items() if "class_embed" in k), None)
    if row_names is None and head is not None and head.shape[0] == len(data.COCO_ROW_NAMES):
        row_names = data.COCO_ROW_NAMES
    if row_names is not None:
        select_class_rows(state, model, class_head_rows(row_names, class_names, f"--pretrained {source}"))
    load_model_state(model, state, source)
    model.backbone[0].freeze_stem_and_layer1()
    if is_main():
        print(f"loaded {what}")


def checkpoint_args(ckpt, overrides, num_workers=0):
    """The checkpoint's arguments with command-line overrides, for a plain (inference-only) detector."""
    args = argparse.Namespace(**ckpt["args"])
    for key, value in overrides.items():
        setattr(args, key, value)
    args.num_workers = num_workers
    args.method = "baseline"  # inference is plain Deformable DETR: the training modules are not built
    args.pretrained_backbone = False  # the checkpoint holds the backbone: no ImageNet download
    args.pretrained = None
    return args


def checkpoint_detector(ckpt, args, class_names, source, vocabulary=None):
    """(model in eval mode on args.device, postprocess) with the checkpoint's weights; `class_names` are the
    checkpoint's classes. An open-vocabulary checkpoint then scores the rows of `vocabulary` (K', D) instead of
    its own dictionary (`checkpoint_vocabulary`)."""
    # The class head is the one the checkpoint trained (its dataset's, its split's), whatever set it is run on now.
    trained = argparse.Namespace(**{**vars(args), "dataset": ckpt["args"]["dataset"],
                                    "novel_classes": ckpt["args"].get("novel_classes")})
    # An open-vocabulary head carries its label dictionary: evaluating it needs neither CLIP nor its cache.
    model, _, _ = build_model(trained, class_names, label_table=ckpt["model"].get("class_embed.0.label_embeddings"))
    load_model_state(model, ckpt["model"], source)
    if vocabulary is not None:
        set_vocabulary(model, vocabulary)
    return model.to(torch.device(args.device)).eval(), build_postprocess(args)


def set_vocabulary(model, table):
    """Every open-vocabulary class head of `model` scores the rows of `table` (K', D) from now on."""
    heads = [head for head in model.class_embed if isinstance(head, LabelEmbeddingClassifier)]
    if not heads:
        raise ValueError("the model has a fixed linear class head, expected an open-vocabulary one")
    for head in {id(head): head for head in heads}.values():  # without box refinement the layers share one head
        head.set_label_embeddings(table)
    model.num_classes = table.shape[0]


def checkpoint_vocabulary(ckpt, args, names=None, embeddings_file=None, source="--resume"):
    """(names, table (K, D)): the vocabulary an open-vocabulary checkpoint is asked to score.

    `names` are embedded as the training label dictionary was: the checkpoint's CLIP model and tag
    (args.clip_model / clip_pretrained), the default prompt, the same disk cache; with --clip-pretrained none the
    same seeded random encoder, so a training name gets exactly its training row. `embeddings_file` is read
    instead (a named table, rows looked up by name; or a plain one, rows in `names` order); without `names`
    its names are the vocabulary.
    """
    trained = ckpt["model"].get("class_embed.0.label_embeddings")
    if trained is None:
        count = len(ckpt.get("classes", {}).get("names", [])) or "training"
        raise InputError(f"--classes / --label-embeddings: checkpoint {source} has a fixed class head (a linear layer "
                         f"over its {count} classes) and cannot score other names; train an open-vocabulary one "
                         "with train.py --novel-classes NAME [NAME ...] (any dataset) or --dataset ov-coco")
    if embeddings_file is None and getattr(args, "label_embeddings", None):
        raise InputError(f"checkpoint {source} was trained on the label table of {args.label_embeddings}, not on "
                         "its CLIP model's embeddings: pass --label-embeddings FILE with rows for the names (a .pt "
                         "of {'names': [...], 'embeddings': (K, D) tensor})")
    if names is None:
        names, _ = read_embeddings_file(embeddings_file)
        if names is None:
            raise InputError(f"--label-embeddings {embeddings_file} is a plain table that names no classes: give "
                             "--classes NAME [NAME ...] (one per row, in row order), or a .pt of {'names': [...], "
                             "'embeddings': (K, D) tensor}")
    try:
        table = label_embeddings(names, model_name=args.clip_model, pretrained=args.clip_pretrained,
                                 embeddings_file=embeddings_file, device=args.device)
    except ClipWeightsUnavailableError:
        raise ClipWeightsUnavailableError(
            f"cannot load the checkpoint's CLIP weights '{args.clip_model}/{args.clip_pretrained}' to embed "
            f"{len(names)} name(s), and no cached table holds them (offline?): connect to the internet once (the "
            "table is then cached), pass --label-embeddings FILE (a .pt of {'names': [...], 'embeddings': (K, D) "
            "tensor} from that CLIP model), or drop --classes to score the checkpoint's own "
            f"{trained.shape[0]} classes") from None
    if table.shape[1] != trained.shape[1]:
        raise InputError(f"the label embeddings of the names are {table.shape[1]} wide, the checkpoint's class head "
                         f"projects into {trained.shape[1]}: expected embeddings of its CLIP model {args.clip_model}")
    return list(names), table


def checkpoint_classes(ckpt, args):
    """(cat_ids, cat_names) the checkpoint was trained with: stored in it, else read from its val dataset."""
    if "classes" in ckpt:
        return list(ckpt["classes"]["ids"]), list(ckpt["classes"]["names"])
    try:
        dataset = build_dataset("val", args)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"the checkpoint does not store its class names, and its dataset, where they "
                                f"are read from, is missing: {err}") from None
    return dataset.cat_ids, dataset.cat_names


# ----------------------------------------------------------------------------------------------------------
# evaluate.py --pretrained
# ----------------------------------------------------------------------------------------------------------
# What evaluate.py takes from a train.py checkpoint's arguments, for a hub model: its structure from config.json,
# the COCO evaluation defaults for the rest (the hub models are COCO models; --dataset custom scores another set).
HF_EVALUATION_DEFAULTS = dict(dataset="coco", data_path=None, val_json=None, val_images=None, dropout=0.0,
                              attn_impl="auto", device=default_device(), batch_size=1, min_size=data.COCO_MIN_SIZE,
                              max_size=data.COCO_MAX_SIZE, method="baseline",
                              **{f"shapes_{key}": value for key, value in data.SHAPES_DEFAULTS.items()})


def hf_evaluation_checkpoint(source):
    """A stand-in for the dict evaluate.load_checkpoint returns: 'args' rebuild the checkpoint's detector, 'source'
    names it for `hf_detector`; the weights are read there, once the dataset's categories are known."""
    config = read_hf_config(hf_checkpoint_files(source)[0], source)
    return {"args": HF_EVALUATION_DEFAULTS | hf_model_args(config), "source": source}


def hf_detector(source, args, dataset):
    """(model in eval mode on args.device, postprocess) for `evaluate.py --pretrained` on a val set."""
    model, _, postprocess = build_model(args, dataset.cat_names)
    load_pretrained(model, source, dataset.cat_names)
    return model.to(torch.device(args.device)).eval(), postprocess
