"""End-to-end tests of train.py / evaluate.py on a handful of tiny `shapes` images (CPU, seconds each)."""
import json
import os
import subprocess
import sys

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
import evaluate  # noqa: E402
import train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--shapes-num-train", "8", "--shapes-num-val", "4", "--shapes-min-size", "64", "--shapes-max-size", "96",
        "--shapes-max-objects", "3", "--hidden-dim", "32", "--dim-feedforward", "64", "--enc-layers", "1",
        "--dec-layers", "2", "--nheads", "4", "--num-queries", "10", "--batch-size", "2", "--num-workers", "0",
        "--no-progress"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    os.environ["CLIP_DETR_CACHE"] = str(root)
    return root


def tiny_args(tmp_path, cache, *extra):
    argv = ["--data-path", str(cache / "shapes"), "--output-dir", str(tmp_path / "out"), *TINY, *extra]
    return train.finalize_args(train.get_parser().parse_args(argv))


def run_cli(script, *argv, env_extra=None, timeout=240):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, os.path.join(HERE, script), *argv], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=HERE)


def test_training_steps_lower_the_loss(tmp_path, cache):
    """Overfitting one fixed batch: the total loss must drop clearly within a few steps."""
    import data
    args = tiny_args(tmp_path, cache, "--method", "clip-detr")
    torch.manual_seed(0)
    ds = data.build_dataset("train", args)
    model, criterion, _ = train.build_model(args, ds.cat_names)
    optimizer = torch.optim.AdamW(train.param_groups(model, args), lr=1e-3)
    batch = data.collate_fn([ds[0], ds[1]])
    model.train()
    history = []
    for _ in range(12):
        loss, losses = train.train_step(model, criterion, batch, optimizer, torch.device("cpu"), clip_max_norm=0.1)
        history.append(loss)
    assert {"loss_align", "loss_dynql_ce", "loss_dynql_bbox", "loss_dynql_giou", "loss_ce_enc"} <= set(losses)
    assert min(history[-3:]) < 0.8 * history[0], history


def test_train_evaluate_resume_auto(tmp_path, cache):
    """Two epochs in one go == one epoch, a restart with --resume auto, one more epoch: identical weights."""
    straight = tiny_args(tmp_path / "a", cache, "--epochs", "2", "--method", "clip-detr")
    stats = train.main(straight)
    assert len(stats) == 12 and all(-1 <= s <= 1 for s in stats)
    log = [json.loads(line) for line in open(tmp_path / "a" / "out" / "log.jsonl")]
    assert [e["epoch"] for e in log] == [0, 1]
    assert {"train_loss_align", "train_loss_dynql_ce", "train_loss_ce", "coco_stats"} <= set(log[-1])

    first = tiny_args(tmp_path / "b", cache, "--epochs", "1", "--method", "clip-detr")
    train.main(first)
    resumed = tiny_args(tmp_path / "b", cache, "--epochs", "2", "--method", "clip-detr", "--resume", "auto")
    train.main(resumed)
    a = torch.load(tmp_path / "a" / "out" / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "b" / "out" / "checkpoint.pth", weights_only=False)
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_evaluate_cli_loads_clip_detr_checkpoint_into_baseline(tmp_path, cache):
    args = tiny_args(tmp_path, cache, "--epochs", "1", "--method", "clip-detr", "--eval-every", "0")
    train.main(args)
    ckpt = str(tmp_path / "out" / "checkpoint.pth")
    out_json = str(tmp_path / "dets.json")
    result = run_cli("evaluate.py", "--resume", ckpt, "--output", out_json, env_extra={"CLIP_DETR_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    assert "AP50" in result.stdout and "alignnet.*/dynql.*" in result.stdout
    dets = json.load(open(out_json))
    assert dets and {"image_id", "category_id", "bbox", "score"} <= set(dets[0])


@pytest.mark.parametrize("argv, expected", [
    (["--dataset", "coco", "--data-path", "/nonexistent/coco"], "/nonexistent/coco"),
    (["--dataset", "custom", "--train-json", "BAD", "--train-images", "IMGS", "--val-json", "BAD",
      "--val-images", "IMGS"], "BAD"),
    (["--resume", "/nonexistent/ckpt.pth"], "/nonexistent/ckpt.pth"),
])
def test_cli_errors_are_one_line(tmp_path, cache, argv, expected):
    if "BAD" in argv:
        bad = tmp_path / "bad.json"
        bad.write_text("{not json")
        (tmp_path / "imgs").mkdir()
        argv = [str(bad) if a == "BAD" else str(tmp_path / "imgs") if a == "IMGS" else a for a in argv]
        expected = str(bad)
    result = run_cli("train.py", *TINY, "--data-path", str(cache / "shapes"), "--output-dir", str(tmp_path / "o"),
                     *argv, env_extra={"CLIP_DETR_CACHE": str(cache)})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr


def test_resume_from_a_mismatching_checkpoint_is_a_clear_error(tmp_path, cache):
    args = tiny_args(tmp_path, cache, "--epochs", "1", "--method", "baseline", "--eval-every", "0")
    train.main(args)
    for extra, expected in [(["--method", "baseline", "--hidden-dim", "64"], "does not match the model"),
                            (["--method", "clip-detr"], "--method 'baseline' in the checkpoint, 'clip-detr' now")]:
        result = run_cli("train.py", *TINY, "--data-path", str(cache / "shapes"), "--output-dir",
                         str(tmp_path / "o2"), *extra, "--resume", str(tmp_path / "out" / "checkpoint.pth"),
                         env_extra={"CLIP_DETR_CACHE": str(cache)})
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.stderr


def test_non_finite_loss_names_the_terms(tmp_path, cache, monkeypatch):
    real = train.compute_losses

    def poisoned(*a):
        losses = real(*a)
        losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses
    monkeypatch.setattr(train, "compute_losses", poisoned)
    args = tiny_args(tmp_path, cache, "--epochs", "1", "--method", "baseline", "--max-steps", "2")
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 0 step 0: \{'loss_giou': nan\}"):
        train.main(args)


def test_torchrun_two_processes_gloo(tmp_path, cache):
    env = dict(os.environ, HF_HUB_OFFLINE="1", CLIP_DETR_CACHE=str(cache), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           os.path.join(HERE, "train.py"), *TINY, "--data-path", str(cache / "shapes"),
           "--output-dir", str(tmp_path / "ddp"), "--epochs", "1", "--method", "clip-detr"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=HERE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert result.stdout.count("epoch 0:") == 1  # only rank 0 prints
    assert os.path.isfile(tmp_path / "ddp" / "checkpoint.pth")


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
