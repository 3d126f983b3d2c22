"""End-to-end tests of train.py / evaluate.py on a handful of tiny `shapes` images (CPU, seconds each)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import build
import errors
import evaluate
import train
from conftest import HERE, TINY, TINY_MODEL
from errors import InputError

# Whole runs through the command lines: the full tier only (`pytest -m "not slow"` leaves them out).
pytestmark = pytest.mark.slow


def run_cli(script, *argv, env_extra=None, timeout=240):
    return run_clis(script, [argv], env_extra=env_extra, timeout=timeout)[0]


def run_clis(script, argvs, *, env_extra=None, timeout=240):
    """`script` in a fresh process once per argv, all at once (most of each is importing torch, on one core);
    their CompletedProcess results in the order of argvs."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env_extra or {}))
    runs = [(argv, subprocess.Popen([sys.executable, os.path.join(HERE, script), *map(str, argv)], env=env, cwd=HERE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for argv in argvs]
    outputs = [run.communicate(timeout=timeout) for _, run in runs]
    return [subprocess.CompletedProcess(argv, run.returncode, *out) for (argv, run), out in zip(runs, outputs)]


def test_training_steps_lower_the_loss(tmp_path, tiny_args):
    """Overfitting one fixed batch: the total loss must drop clearly within a few steps."""
    import data
    args = tiny_args("--method", "clip-detr")
    torch.manual_seed(0)
    ds = build.build_dataset("train", args)
    model, criterion, _ = build.build_model(args, ds.cat_names)
    optimizer = torch.optim.AdamW(build.param_groups(model, args), lr=1e-3)
    batch = data.collate_fn([ds[0], ds[1]])
    model.train()
    history = []
    for _ in range(12):
        loss, losses = train.train_step(model, criterion, batch, optimizer, torch.device("cpu"), clip_max_norm=0.1)
        history.append(loss)
    assert {"loss_align", "loss_dynql_ce", "loss_dynql_bbox", "loss_dynql_giou", "loss_ce_enc"} <= set(losses)
    assert min(history[-3:]) < 0.8 * history[0], history


class FixedPredictions(nn.Module):
    """A 'detector' whose predictions are its parameters: the same gradient every step while lr is 0."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.logits = nn.Parameter(torch.randn(1, 3, 2, generator=g))
        self.boxes = nn.Parameter(torch.randn(1, 3, 4, generator=g))

    def forward(self, images, mask, targets=None):
        return {"pred_logits": self.logits, "pred_boxes": self.boxes.sigmoid()}


def test_train_step_does_not_accumulate_gradients():
    from matcher import SetCriterion
    model = FixedPredictions()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = (torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool),
             [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}])
    step = lambda: train.train_step(model, SetCriterion(2), batch, optimizer, torch.device("cpu"),  # noqa: E731
                                    clip_max_norm=0.0)
    step()
    first = [p.grad.clone() for p in model.parameters()]
    step()
    assert first[0].abs().sum() > 0
    for before, p in zip(first, model.parameters()):
        assert torch.equal(p.grad, before)


def test_param_groups_train_sampling_offsets_and_reference_points_at_a_tenth_of_the_lr(tmp_path, tiny_args):
    args = tiny_args("--method", "baseline", "--no-two-stage", "--lr", "1e-3",
                     "--lr-backbone", "2e-4")
    model, _, _ = build.build_model(args, ["a", "b"])
    groups = build.param_groups(model, args)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(lr_of)  # no parameter in two groups
    assert set(lr_of) == {id(p) for p in model.parameters() if p.requires_grad}
    transformer = model.transformer
    expected = {transformer.encoder.layers[0].self_attn.sampling_offsets.weight: 1e-4,
                transformer.decoder.layers[1].cross_attn.sampling_offsets.bias: 1e-4,
                transformer.reference_points.weight: 1e-4,
                transformer.decoder.layers[1].cross_attn.attention_weights.weight: 1e-3,
                transformer.decoder.layers[1].cross_attn.value_proj.weight: 1e-3,
                model.class_embed[0].weight: 1e-3, model.input_proj[0][0].weight: 1e-3,
                model.backbone[0].body.layer4[0].conv1.weight: 2e-4}
    for p, lr in expected.items():
        assert lr_of[id(p)] == pytest.approx(lr)


def test_train_step_logs_z_attr_norm_and_dynql_per_beta_outside_the_total(tmp_path, tiny_args):
    import data
    from matcher import weight_dict
    args = tiny_args("--method", "clip-detr", "--dynql-betas", "0.2", "0.8")
    torch.manual_seed(0)
    ds = build.build_dataset("train", args)
    model, criterion, _ = build.build_model(args, ds.cat_names)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, values = train.train_step(model.train(), criterion, data.collate_fn([ds[0], ds[1]]), optimizer,
                                    torch.device("cpu"), clip_max_norm=0.1)
    terms = [k for k in values if k.startswith("loss_")]
    assert set(values) - set(terms) == {"z_attr_norm"} | {f"dynql_b{b}_{t}" for b in ("0.2", "0.8")
                                                          for t in ("ce", "bbox", "giou")}
    assert values["z_attr_norm"] > 0
    # Logged only: the total is the weighted sum of the loss terms alone.
    weights = weight_dict(terms)
    assert loss == pytest.approx(sum(weights[k] * values[k] for k in terms), rel=1e-6)
    # One set per beta: their mean is the optimised last-layer DynQL term.
    for t in ("ce", "bbox", "giou"):
        mean = (values[f"dynql_b0.2_{t}"] + values[f"dynql_b0.8_{t}"]) / 2
        assert mean == pytest.approx(values[f"loss_dynql_{t}"], rel=1e-5), t


def test_train_evaluate_resume_auto(tmp_path, tiny_args):
    """Two epochs in one go == one epoch, a restart with --resume auto, one more epoch: identical weights."""
    straight = tiny_args("--epochs", "2", "--method", "clip-detr", out=tmp_path / "a" / "out")
    stats = train.main(straight)
    assert len(stats) == 12 and all(-1 <= s <= 1 for s in stats)
    log = [json.loads(line) for line in open(tmp_path / "a" / "out" / "log.jsonl")]
    assert [e["epoch"] for e in log] == [0, 1]
    assert {"train_loss_align", "train_loss_dynql_ce", "train_loss_ce", "coco_stats"} <= set(log[-1])
    assert {"train_z_attr_norm", "train_dynql_b0.1_ce", "train_dynql_b0.9_giou"} <= set(log[-1])

    first = tiny_args("--epochs", "1", "--method", "clip-detr", out=tmp_path / "b" / "out")
    train.main(first)
    resumed = tiny_args("--epochs", "2", "--method", "clip-detr", "--resume", "auto", out=tmp_path / "b" / "out")
    train.main(resumed)
    a = torch.load(tmp_path / "a" / "out" / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "b" / "out" / "checkpoint.pth", weights_only=False)
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_train_step_takes_float64_target_boxes_like_float32_ones(tmp_path, tiny_args):
    """A custom pipeline may hand float64 boxes: with AlignNet and DynQL on, the step gives the float32 step's loss."""
    import data
    args = tiny_args("--method", "clip-detr")
    ds = build.build_dataset("train", args)
    images, mask, targets = data.collate_fn([ds[0], ds[1]])
    wide = [dict(t, boxes=t["boxes"].double()) for t in targets]
    losses = []
    for batch_targets in (targets, wide):
        torch.manual_seed(0)
        model, criterion, _ = build.build_model(args, ds.cat_names)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        torch.manual_seed(1)
        losses.append(train.train_step(model.train(), criterion, (images, mask, batch_targets), optimizer,
                                       torch.device("cpu"))[0])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_resume_refuses_a_run_whose_resnet_starts_from_other_weights(tmp_path, tiny_args):
    """Stem and layer1 are frozen for trained ResNet weights: a run started with --pretrained resumed without it
    (or the reverse) has other parameter groups than its stored optimizer, so it is refused in one line."""
    args = tiny_args()
    saved = dict(vars(args), pretrained="official.pth")
    with pytest.raises(train.InputError, match=r"^--resume ckpt: .*ResNet started from trained weights"):
        train.check_resume_args(saved, args, "ckpt")
    with pytest.raises(train.InputError, match=r"did not start from trained weights .* does now"):
        train.check_resume_args(vars(args), tiny_args("--pretrained-backbone"), "ckpt")
    train.check_resume_args(dict(saved, pretrained=None, pretrained_backbone=True),
                            tiny_args("--pretrained", "moved/official.pth"), "ckpt")


def test_resume_restores_the_lr_scheduler_across_an_lr_drop(tmp_path, tiny_args):
    """--lr-drop 1: epoch 0, then a resumed run for epoch 1. After it the scheduler has stepped twice and every
    group sits at 0.1x its base LR, as in a straight run; a fresh scheduler would drop the LR a second time."""
    common = ("--method", "baseline", "--max-steps", "1", "--eval-every", "0", "--lr-drop", "1", "--lr", "1e-3",
              "--lr-backbone", "2e-4")
    train.main(tiny_args("--epochs", "1", *common))
    train.main(tiny_args("--epochs", "2", "--resume", "auto", *common))
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["scheduler"]["last_epoch"] == 2
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == pytest.approx([1e-4, 2e-5, 1e-5])
    assert [json.loads(line)["lr"] for line in open(tmp_path / "out" / "log.jsonl")] == pytest.approx([1e-3, 1e-4])


def full_disk_open(real_open):
    """open() as on a full disk for the temporary files of atomic writes: the file appears, half written, and
    every write to it fails with ENOSPC (/dev/full), as torch.save meets it."""
    def fake(path, mode="r", *args, **kwargs):
        if str(path).endswith(".tmp"):
            with real_open(path, "wb") as half:
                half.write(b"half a checkpoint")
            return real_open("/dev/full", mode)
        return real_open(path, mode, *args, **kwargs)
    return fake


def test_interrupted_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    train.save_checkpoint(path, epoch=0, weights=torch.zeros(1000))
    monkeypatch.setattr(errors, "open", full_disk_open(open), raising=False)
    with pytest.raises(InputError, match=f"cannot write {path}: No space left on device \\(the previous file is kept"):
        train.save_checkpoint(path, epoch=1, weights=torch.zeros(1000))
    monkeypatch.undo()
    assert build.load_checkpoint(path, keys=("epoch",))["epoch"] == 0
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left behind


def test_evaluate_cli_loads_clip_detr_checkpoint_into_baseline(tmp_path, cache, tiny_args):
    args = tiny_args("--epochs", "1", "--method", "clip-detr", "--eval-every", "0")
    train.main(args)
    ckpt = str(tmp_path / "out" / "checkpoint.pth")
    out_json = str(tmp_path / "dets.json")
    result = run_cli("evaluate.py", "--resume", ckpt, "--output", out_json, env_extra={"CLIP_DETR_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    assert "AP50" in result.stdout and "alignnet.*/dynql.*" in result.stdout
    dets = json.load(open(out_json))
    assert dets and {"image_id", "category_id", "bbox", "score"} <= set(dets[0])


def test_cli_errors_are_one_line(tmp_path, cache):
    """The whole stderr of a fresh train.py process (library warnings included) is the one error line."""
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    (tmp_path / "imgs").mkdir()
    cases = [([*TINY_MODEL, "--dataset", "coco", "--data-path", "/nonexistent/coco"], "/nonexistent/coco"),
             ([*TINY_MODEL, "--dataset", "custom", "--train-json", bad, "--train-images", tmp_path / "imgs",
               "--val-json", bad, "--val-images", tmp_path / "imgs"], str(bad)),
             ([*TINY, "--data-path", cache / "shapes", "--resume", "/nonexistent/ckpt.pth"], "/nonexistent/ckpt.pth")]
    results = run_clis("train.py", [[*argv, "--output-dir", tmp_path / f"o{i}"] for i, (argv, _) in enumerate(cases)],
                       env_extra={"CLIP_DETR_CACHE": str(cache)})
    for (argv, expected), result in zip(cases, results):
        assert result.returncode != 0, argv
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr


def test_resume_from_a_mismatching_checkpoint_is_a_clear_error(tmp_path, cache, tiny_args):
    args = tiny_args("--epochs", "1", "--method", "baseline", "--eval-every", "0")
    train.main(args)
    cases = [(["--method", "baseline", "--hidden-dim", "64"], "--hidden-dim 32 in the checkpoint, 64 now"),
             (["--method", "clip-detr"], "--method 'baseline' in the checkpoint, 'clip-detr' now")]
    results = run_clis("train.py", [[*TINY, "--data-path", cache / "shapes", "--output-dir", tmp_path / f"o{i}", *extra,
                                     "--resume", tmp_path / "out" / "checkpoint.pth"]
                                    for i, (extra, _) in enumerate(cases)], env_extra={"CLIP_DETR_CACHE": str(cache)})
    for (extra, expected), result in zip(cases, results):
        assert result.returncode != 0, extra
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.stderr


def test_non_finite_loss_names_the_terms(tmp_path, monkeypatch, tiny_args):
    real = train.compute_losses

    def poisoned(*a):
        losses = real(*a)
        losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses
    monkeypatch.setattr(train, "compute_losses", poisoned)
    args = tiny_args("--epochs", "1", "--method", "baseline", "--max-steps", "2")
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 0 step 0: \{'loss_giou': nan\}"):
        train.main(args)


def test_torchrun_two_processes_gloo(tmp_path, cache):
    env = dict(os.environ, HF_HUB_OFFLINE="1", CLIP_DETR_CACHE=str(cache), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py"), *TINY, "--data-path", str(cache / "shapes"),
           "--output-dir", str(tmp_path / "ddp"), "--epochs", "1", "--method", "clip-detr"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=HERE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert result.stdout.count("epoch 0:") == 1  # only rank 0 prints
    assert os.path.isfile(tmp_path / "ddp" / "checkpoint.pth")


# Two processes with one image each must lose what one process with both images loses (the mean of the ranks'
# losses, which is what DDP's averaged gradients descend): the images hold 1 and 3 boxes, so every term's box
# normalizer matters. The model is the tiny baseline, dropout 0, identical on every rank (same seed).
DDP_LOSSES = """
import json, os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, {here!r})
import build, train
from conftest import TINY
dist.init_process_group("gloo")
rank = dist.get_rank()
args = train.finalize_args(train.get_parser().parse_args([*TINY, "--method", "baseline", "--output-dir", {out!r}]))
images, targets = torch.load({batch!r}, weights_only=False)
torch.manual_seed(0)
model, criterion, _ = build.build_model(args, ["a", "b", "c"])
model.train()
sl = slice(rank, rank + 1) if dist.get_world_size() > 1 else slice(0, 2)
outputs = model(images[sl], torch.zeros_like(images[sl, 0], dtype=torch.bool), targets[sl])
losses = train.compute_losses(criterion, outputs, targets[sl])
values = torch.stack([losses[k].detach() for k in sorted(losses)])
dist.all_reduce(values)
if rank == 0:
    json.dump(dict(zip(sorted(losses), (values / dist.get_world_size()).tolist())), open({result!r}, "w"))
"""


def test_losses_of_two_processes_equal_one_process_on_the_same_images(tmp_path, cache):
    g = torch.Generator().manual_seed(1)
    targets = [{"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3]]), "labels": torch.tensor([1])},
               {"boxes": torch.rand(3, 2, generator=g).mul(0.5).add(0.25).repeat(1, 2).mul(
                   torch.tensor([1.0, 1.0, 0.3, 0.3])), "labels": torch.tensor([0, 2, 1])}]
    torch.save((torch.randn(2, 3, 128, 128, generator=g), targets), tmp_path / "batch.pt")  # (B, 3, H, W)
    runs = {}
    for world in (1, 2):  # both at once: most of each is starting Python and torch
        script = tmp_path / f"ddp_{world}.py"
        script.write_text(DDP_LOSSES.format(here=HERE, out=str(tmp_path / f"out{world}"),
                                            batch=str(tmp_path / "batch.pt"),
                                            result=str(tmp_path / f"losses_{world}.json")))
        runs[world] = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        f"--nproc_per_node={world}", str(script)], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                       cwd=tmp_path)
    results = {}
    for world, run in runs.items():
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        results[world] = json.loads((tmp_path / f"losses_{world}.json").read_text())
    assert set(results[1]) == set(results[2]) and "loss_ce_enc" in results[1]
    for name, value in results[1].items():
        assert results[2][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_amp_auto_is_bf16_only_where_the_device_multiplies_bf16(tmp_path, monkeypatch, tiny_args):
    """--amp auto (the shapes default) resolves once, in finalize_args: bf16 on a CPU with AVX512-BF16/AMX, off
    elsewhere (emulated bf16 is slower than float32); COCO keeps the paper's float32 unless asked."""
    monkeypatch.setattr(train, "native_bf16", lambda device: True)
    assert tiny_args().amp == "bf16"
    assert tiny_args("--amp", "off").amp == "off"
    monkeypatch.setattr(train, "native_bf16", lambda device: False)
    assert tiny_args().amp == "off"
    assert tiny_args("--amp", "bf16").amp == "bf16"
    coco = train.finalize_args(train.get_parser().parse_args(["--dataset", "coco", "--device", "cpu",
                                                              "--output-dir", str(tmp_path / "coco")]))
    assert coco.amp == "off"
    monkeypatch.undo()
    has_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert train.native_bf16("cpu") == has_bf16
    assert "(default: coco: off, shapes: auto)" in " ".join(train.get_parser().format_help().split())


def test_amp_bf16_is_allowed_on_the_cpu_and_fp16_is_not(tmp_path, tiny_args):
    assert tiny_args("--amp", "bf16", "--device", "cpu").amp == "bf16"
    with pytest.raises(ValueError, match=r"^--amp fp16 needs a CUDA device .*--device cpu\); use --amp bf16"):
        tiny_args("--amp", "fp16", "--device", "cpu")


@pytest.mark.parametrize("impl, function", [("pytorch", "ms_deform_attn_pytorch"), ("gather", "ms_deform_attn_gather")])
def test_amp_bf16_step_autocasts_the_convolutions_on_the_cpu_and_runs_the_transformer_in_float32(
        tmp_path, monkeypatch, impl, function, tiny_args):
    """train_step autocasts on the device it runs on; on the CPU the backbone's and input_proj's convolutions run
    in bf16 and the transformer, the deformable attention and the heads in float32 (the model's CPU autocast
    policy); parameters stay float32."""
    import data
    import model as model_lib
    args = tiny_args("--method", "clip-detr", "--amp", "bf16", "--device", "cpu",
                      "--attn-impl", impl)
    ds = build.build_dataset("train", args)
    torch.manual_seed(0)
    model, criterion, _ = build.build_model(args, ds.cat_names)
    seen = {"attn": set()}
    real_losses, real_attn = train.compute_losses, getattr(model_lib, function)

    def losses_spy(criterion, outputs, targets):
        seen["logits"] = outputs["pred_logits"].dtype
        return real_losses(criterion, outputs, targets)

    def attn_spy(value, spatial_shapes, loc, weights):
        out = real_attn(value, spatial_shapes, loc, weights)
        seen["attn"].add((value.dtype, loc.dtype, weights.dtype, out.dtype))
        return out
    monkeypatch.setattr(train, "compute_losses", losses_spy)
    monkeypatch.setattr(model_lib, function, attn_spy)
    model.backbone.register_forward_hook(lambda m, a, out: seen.update(backbone={x.dtype for x, _ in out[0]}))
    model.input_proj[0].register_forward_hook(lambda m, a, out: seen.update(input_proj=out.dtype))
    optimizer = torch.optim.AdamW(build.param_groups(model, args), lr=1e-4)
    loss, values = train.train_step(model, criterion, data.collate_fn([ds[0], ds[1]]), optimizer,
                                    torch.device("cpu"), amp_dtype=torch.bfloat16)
    assert math.isfinite(loss) and "loss_dynql_ce" in values and "loss_align" in values
    assert seen["backbone"] == {torch.bfloat16} and seen["input_proj"] == torch.bfloat16
    assert seen["logits"] == torch.float32
    assert seen["attn"] == {(torch.float32, torch.float32, torch.float32, torch.float32)}
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_help_shows_every_default_per_dataset_where_they_differ():
    text = " ".join(train.get_parser().format_help().split())
    assert "(default: coco: 0.0002, shapes: 0.001)" in text, "--lr differs per dataset"
    assert "(default: coco: 800, shapes: 128)" in text, "--min-size differs per dataset"
    assert "--enc-n-points ENC_N_POINTS (default: 4)" in text, "one value when the datasets agree"
    assert "--weight-decay WEIGHT_DECAY (default: 0.0001)" in text
    parser = train.get_parser()
    undocumented = [a.option_strings[0] for a in parser._actions
                    if a.option_strings and a.dest != "help" and "(default: " not in (a.help or "")]
    assert not undocumented


def test_shapes_trains_at_its_generated_size_unless_min_size_is_given():
    parse = lambda *argv: train.finalize_args(train.get_parser().parse_args(list(argv)))  # noqa: E731
    args = parse("--shapes-min-size", "64", "--shapes-max-size", "96")
    assert (args.min_size, args.max_size) == (64, 96)
    args = parse("--shapes-min-size", "64", "--shapes-max-size", "96", "--min-size", "80")
    assert (args.min_size, args.max_size) == (80, 96)
    assert (parse().min_size, parse().max_size) == (128, 192)


def test_config_line_names_what_differs_from_the_paper():
    parse = lambda *argv: train.finalize_args(train.get_parser().parse_args(list(argv)))  # noqa: E731
    line = train.config_line(parse())
    assert line.startswith("configuration (where it differs from the paper's COCO setup): --dataset shapes, ")
    assert "--backbone resnet18" in line and "--lr 0.001" in line and "no --pretrained-backbone" in line
    assert "--two-stage" not in line and "--method" not in line
    coco = train.config_line(parse("--dataset", "coco", "--pretrained-backbone"))
    assert coco.endswith("setup): none"), coco
    ablation = train.config_line(parse("--dataset", "coco", "--pretrained-backbone",
                                       "--method", "baseline", "--no-two-stage", "--min-size", "600"))
    assert ablation.endswith("setup): --min-size 600, --no-two-stage, --method baseline"), ablation


def test_bench_hf_without_transformers_says_how_to_install(monkeypatch, capsys):
    import bench
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as when it is not installed
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["hf"])
    assert exit_info.value.code == 1
    assert "pip install transformers" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["amp", "profile", "padding"])
def test_bench_demo_step_measurements_run_on_the_tiny_configuration(what, tmp_path, capsys):
    """`bench.py amp`, `profile` and `padding`, whose tables the docs quote, on the tiny configuration."""
    import bench
    flags = {"amp": ["--rounds", "1"], "profile": ["--steps", "1"], "padding": []}[what]
    bench.main([what, *flags, "--", *TINY, "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    if what == "amp":
        rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["off"], ["bf16"])]
        assert [row[0] for row in rows] == ["off", "bf16"] and rows[0][-1] == "1.00x", out
        assert "`--amp auto` picks" in out
    elif what == "padding":
        rows = out.splitlines()[2:]
        assert [r.split()[0] for r in rows] == ["random", "landscape", "8"] and all(float(r.split()[-1]) >= 1
                                                                                    for r in rows), out
    else:
        assert all(stage in out for stage in ("backbone", "encoder", "decoder", "deformable sampling",
                                              "matcher and losses", "AlignNet", "DynQL", "data loading")), out


def test_shapes_is_evaluated_on_batches_of_one_aspect(tmp_path, monkeypatch, tiny_args):
    """shapes trains on batches of one aspect, and a detector's output depends on how much of its batch is padding:
    both evaluations, after training and by evaluate.py, batch its val images by aspect too (at most the one batch
    where the leftovers meet mixes them) and see each image once."""
    loaders = []
    real = evaluate.evaluate
    monkeypatch.setattr(evaluate, "evaluate", lambda model, post, loader, *a, **k: loaders.append(loader)
                        or real(model, post, loader, *a, **k))
    flags = ("--shapes-num-val", "12", "--batch-size", "3", "--epochs", "1", "--max-steps", "1")
    train.main(tiny_args(*flags))
    evaluate.main(["--resume", str(tmp_path / "out" / "checkpoint.pth")])
    assert len(loaders) == 2
    groups = loaders[0].dataset.aspect_groups()
    in_order = [list(range(i, i + 3)) for i in range(0, 12, 3)]
    assert sum(len({groups[i] for i in b}) > 1 for b in in_order) > 1, "this val set must mix aspects in order"
    for loader in loaders:
        batches = list(loader.batch_sampler)
        assert sorted(i for b in batches for i in b) == list(range(12))
        assert sum(len({groups[i] for i in b}) > 1 for b in batches) <= 1, batches
