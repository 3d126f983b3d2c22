"""The COCO configuration's smoke tier (CPU): the `--dataset coco` model (ResNet-50, two-stage + box refinement)
takes a training step for every --method in float32 and under --amp bf16; an official 91-class Deformable DETR
checkpoint loads through --pretrained into the 80-class model; and `train.py --dataset coco` runs end to end
(train, checkpoint, evaluate) on a generated COCO-layout folder.

The model is the COCO one with fewer encoder/decoder layers and queries (the same code path: every decoder
layer has its own head, aux outputs, encoder proposals), so that a step takes seconds on 2 CPU cores.

Shape legend: B batch, S_all flattened encoder memory, Q queries, K = 80 classes, C model width.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import build
import data
import train
from conftest import COCO_80, COCO_IDS, DOG, HERE, official_checkpoint, official_state_shapes, parse_args
from model import Backbone

# Command lines, whole runs and exports: the full tier only (`pytest -m "not slow"` leaves them out).
pytestmark = pytest.mark.slow

# Fewer layers and queries than the paper's 6 + 6 and 300; everything else is the --dataset coco model.
SMALL = ["--enc-layers", "1", "--dec-layers", "2", "--num-queries", "20"]
# The checkpoint test's detector: the loader sees only names and shapes, so the ResNet and width shrink too.
SMALL_R18 = ["--backbone", "resnet18", "--hidden-dim", "32", "--dim-feedforward", "64", "--nheads", "4",
             "--dropout", "0"]
def coco_args(coco_dir, tmp_path, *extra):
    """The COCO configuration's arguments; a method with a label dictionary reads it from coco_dir/labels.pt."""
    argv = ["--dataset", "coco", "--data-path", str(coco_dir), "--device", "cpu", "--output-dir", str(tmp_path / "out"),
            *SMALL, *extra]
    if parse_args(*argv).method != "baseline":
        argv += ["--label-embeddings", str(coco_dir / "labels.pt")]
    return parse_args(*argv)


def test_coco_layout_folder_gives_the_80_coco_categories(coco_dir, tmp_path):
    ds = build.build_dataset("train", coco_args(coco_dir, tmp_path))
    assert len(COCO_80) == len(COCO_IDS) == 80
    assert ds.cat_ids == COCO_IDS and ds.cat_names == list(COCO_80)


@pytest.mark.parametrize("amp", ["off", "bf16"])
@pytest.mark.parametrize("method", train.METHODS)
def test_coco_model_training_step(coco_dir, tmp_path, method, amp):
    """One train_step of the --dataset coco model on two tiny images of different sizes (padded batch)."""
    args = coco_args(coco_dir, tmp_path, "--method", method, "--amp", amp)
    assert (args.backbone, args.hidden_dim, args.nheads, args.two_stage, args.with_box_refine) == \
        ("resnet50", 256, 8, True, True)
    # Native size (no 800 px resize): the tier checks the code path, not the resolution.
    ds = data.CocoDetection(coco_dir / "train2017", coco_dir / "annotations" / "instances_train2017.json",
                            transforms=data.make_transforms("val", eval_size=None))
    batch = data.collate_fn([ds[0], ds[1]])
    assert batch[0].shape == (2, 3, 80, 96)
    torch.manual_seed(0)
    model, criterion, _ = build.build_model(args, ds.cat_names)
    model.train()
    # SGD: the optimizer is not under test, and AdamW's state for ResNet-50 would dominate the step's time.
    optimizer = torch.optim.SGD(build.param_groups(model, args), lr=1e-3)
    amp_dtype = {"off": None, "bf16": torch.bfloat16}[amp]
    loss, values = train.train_step(model, criterion, batch, optimizer, torch.device("cpu"),
                                    clip_max_norm=args.clip_max_norm, amp_dtype=amp_dtype)
    assert math.isfinite(loss) and all(math.isfinite(v) for v in values.values())
    assert {"loss_ce", "loss_bbox_0", "loss_giou_enc"} <= set(values)
    assert ("loss_align" in values) == (method in ("alignnet", "clip-detr"))
    assert ("loss_dynql_ce" in values) == (method in ("dynql", "clip-detr"))
    # Every trainable parameter took part (DDP without find_unused_parameters needs that), with a finite gradient.
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_official_coco_checkpoint_through_pretrained(coco_dir, tmp_path):
    """A 91-class two-stage + refine checkpoint under the official names, loaded as `train.py --pretrained` does
    into the 80-class model: decoder class k gets official row cat_id[k]; the encoder head keeps its objectness
    row 0 in column 0 and ranks the proposals by it; the checkpoint's stem and layer1 are frozen."""
    args = coco_args(coco_dir, tmp_path, *SMALL_R18, "--pretrained", str(tmp_path / "official.pth"))
    n_dec, Q = args.dec_layers, args.num_queries
    shapes = official_state_shapes(
        backbone_state=Backbone("resnet18").body.state_dict(), backbone_channels=(128, 256, 512),
        num_classes=91, d_model=32, n_heads=4, d_ffn=64, enc_layers=args.enc_layers, dec_layers=n_dec, n_levels=4,
        n_points=4, num_queries=Q, two_stage=True, with_box_refine=True)
    # Official names, aliases sharing their head's tensor; values of a freshly initialised 91-class detector, so
    # that a forward pass stays finite.
    state = official_checkpoint(shapes, shared_heads=False)
    torch.manual_seed(0)
    fresh = build.build_model(coco_args(coco_dir, tmp_path, *SMALL_R18, "--method", "baseline"),
                              [f"class {i}" for i in range(91)])[0].state_dict()
    for key, value in state.items():
        value.copy_(fresh[key])
    # Objectness (encoder head row 0) and row 1 (person) rank in opposite orders; dog (id 18) is marked.
    enc_w, enc_b = state[f"class_embed.{n_dec}.weight"], state[f"class_embed.{n_dec}.bias"]
    assert state[f"transformer.decoder.class_embed.{n_dec}.weight"] is enc_w
    enc_w[1], enc_b[1] = -enc_w[0], -enc_b[0]
    for layer in range(n_dec):
        state[f"class_embed.{layer}.weight"][DOG] = 0.18
        state[f"class_embed.{layer}.bias"][DOG] = 18.0
    torch.save({"model": state, "epoch": 49}, args.pretrained)

    train_set = build.build_dataset("train", args)
    model, _, _ = build.build_model(args, train_set.cat_names)
    build.load_pretrained(model, args.pretrained, train_set.cat_names)

    k_dog = train_set.cat_ids.index(DOG)
    rows = torch.as_tensor(train_set.cat_ids)
    for layer in range(n_dec):
        head = model.class_embed[layer]
        assert (head.weight[k_dog] == 0.18).all() and head.bias[k_dog] == 18.0
        assert torch.equal(head.weight, state[f"class_embed.{layer}.weight"][rows])
    assert torch.equal(model.class_embed[n_dec].weight[0], enc_w[0]) and model.class_embed[n_dec].bias[0] == enc_b[0]

    model.eval()
    captured = {}
    model.class_embed[n_dec].register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0]))
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        enc = model.transformer.encode(*model.features(images, torch.zeros(2, 64, 96, dtype=torch.bool)))
        _, _, reference, enc_out = model.transformer.select_queries(enc)
    objectness = captured["x"] @ enc_w[0] + enc_b[0]  # (B, S_all): official row 0
    torch.testing.assert_close(enc_out["pred_logits"][..., 0], objectness)
    top = objectness.topk(Q, dim=1).indices  # (B, Q)
    torch.testing.assert_close(reference, torch.gather(enc_out["pred_boxes"], 1, top[..., None].expand(-1, -1, 4)))

    body = model.backbone[0].body
    frozen = [n for n, p in body.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("conv1.", "layer1.")) for n in frozen)
    assert not any(p.requires_grad for p in body.layer1.parameters()) and not body.conv1.weight.requires_grad
    assert all(p.requires_grad for p in body.layer2.parameters())

    # A dataset naming COCO's classes in another order (numbered 1-80, as converted datasets are) meets the
    # official head by name: class k gets the row of its COCO category id.
    shuffled = list(reversed(train_set.cat_names))
    renumbered, _, _ = build.build_model(args, shuffled)
    build.load_pretrained(renumbered, args.pretrained, shuffled)
    by_name = [COCO_IDS[COCO_80.index(name)] for name in shuffled]
    for layer in range(n_dec):
        assert torch.equal(renumbered.class_embed[layer].weight, state[f"class_embed.{layer}.weight"][by_name])
    with pytest.raises(ValueError, match=r"the dataset's categories \['toothbrushes'\] are not among them"):
        build.load_pretrained(model, args.pretrained, [*train_set.cat_names[:-1], "toothbrushes"])


@pytest.mark.parametrize("refine", [False, True], ids=["plain", "box-refine"])
def test_official_single_stage_checkpoints_through_pretrained(coco_dir, tmp_path, refine):
    """The released single-stage variants (one shared head, or one per layer with box refinement) load with
    --no-two-stage: every head's class k is official row cat_id[k]."""
    flags = ["--no-two-stage", "--method", "baseline"] + ([] if refine else ["--no-with-box-refine"])
    args = coco_args(coco_dir, tmp_path, *SMALL_R18, *flags, "--pretrained", str(tmp_path / "official.pth"))
    shapes = official_state_shapes(
        backbone_state=Backbone("resnet18").body.state_dict(), backbone_channels=(128, 256, 512),
        num_classes=91, d_model=32, n_heads=4, d_ffn=64, enc_layers=args.enc_layers, dec_layers=args.dec_layers,
        n_levels=4, n_points=4, num_queries=args.num_queries, two_stage=False, with_box_refine=refine)
    state = official_checkpoint(shapes, shared_heads=not refine)
    torch.save({"model": state}, args.pretrained)
    train_set = build.build_dataset("train", args)
    model, _, _ = build.build_model(args, train_set.cat_names)
    build.load_pretrained(model, args.pretrained, train_set.cat_names)
    rows = torch.as_tensor(train_set.cat_ids)
    assert len(model.class_embed) == args.dec_layers
    for layer, head in enumerate(model.class_embed):
        assert torch.equal(head.weight, state[f"class_embed.{layer}.weight"][rows])
        assert torch.equal(head.bias, state[f"class_embed.{layer}.bias"][rows])
    assert not model.backbone[0].body.conv1.weight.requires_grad


def small_images(monkeypatch):
    """COCO's transforms at the generated images' own scale (shorter side 64 px instead of 480-800 px)."""
    native = data.make_transforms
    monkeypatch.setattr(data, "make_transforms", lambda image_set, **kw: native(
        image_set, scales=(64,), max_size=96, crop=None, eval_size=64))


def check_run(out, amp):
    """The run trained one step, wrote its checkpoint and evaluated."""
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["args"]["amp"] == amp and ckpt["classes"]["ids"] == COCO_IDS
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[-1]["train_steps"] == 1 and len(log[-1]["coco_stats"]) == 12


def test_train_main_on_a_coco_layout_folder_bf16(coco_dir, tmp_path, monkeypatch):
    """train.main with --dataset coco --amp bf16 on the CPU: trains a step, writes its checkpoint, evaluates.
    The images stay small: under CPU bf16 without native bf16 instructions one step at COCO's 480-800 px takes
    minutes."""
    small_images(monkeypatch)
    args = coco_args(coco_dir, tmp_path, "--amp", "bf16", "--epochs", "1", "--max-steps", "1", "--num-workers", "0",
                     "--no-progress")
    stats = train.main(args)
    assert len(stats) == 12 and all(-1 <= s <= 1 for s in stats)
    check_run(tmp_path / "out", "bf16")


def test_train_cli_on_a_coco_layout_folder(coco_dir, tmp_path):
    """`train.py --dataset coco --amp bf16` as a subprocess for one step on the CPU: trains, writes its checkpoint,
    evaluates."""
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--dataset", "coco", "--data-path", str(coco_dir),
           "--label-embeddings", str(coco_dir / "labels.pt"), "--amp", "bf16", "--device", "cpu", *SMALL,
           "--min-size", "64", "--max-size", "96", "--epochs", "1", "--max-steps", "1", "--num-workers", "0",
           "--no-progress", "--output-dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=HERE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "80 classes" in result.stdout and "AP50" in result.stdout
    check_run(out, "bf16")
