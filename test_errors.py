"""Bad input through the command lines (issue 10): data, checkpoints, label embeddings and flags each end in
exit status 2 and exactly one line on stderr that names the bad file or value, never a traceback; and the
cases that used to go wrong silently (16-bit PNGs, EXIF orientation, log.jsonl after a kill, ...).

Most cases call train.cli / evaluate.cli in-process (capsys sees the same stderr a terminal would); the ones
that need a real process (DataLoader workers, the `__main__` wiring) run as subprocesses. All fail before or
within the first step of a tiny model.
"""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

import label_dictionary
import build
import data
import errors
import evaluate
import train
from conftest import HERE, TINY_MODEL, parse_args
from errors import InputError, error_line

# Command lines, whole runs and exports: the full tier only (`pytest -m "not slow"` leaves them out).
pytestmark = pytest.mark.slow

# The tiny detector, one step of one epoch, no evaluation: every run here ends at its error or right after.
QUICK = [*TINY_MODEL, "--epochs", "1", "--max-steps", "1", "--device", "cpu", "--method", "baseline",
         "--eval-every", "0"]
W, H = 32, 24  # pixels of every image of the small custom set
THREE = [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def shapes():
    """Flags of a 4 + 2 image `shapes` set of 64-pixel images (in the session cache): the runs that take steps."""
    return ["--dataset", "shapes", "--shapes-num-train", "4", "--shapes-num-val", "2", "--shapes-min-size", "64",
            "--shapes-max-size", "64", "--shapes-max-objects", "2"]


def write_set(root, images=None, annotations=None, categories=None, files=None, sections=None):
    """A COCO-format set under root: three W x H PNGs with one box each, parts replaceable (`files` maps a name
    to the bytes it gets, None removing it; `sections` replaces whole JSON sections, any JSON value); returns its
    flags."""
    os.makedirs(root / "img", exist_ok=True)
    images = images if images is not None else THREE
    if annotations is None:
        annotations = [{"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [2, 2, 10, 8], "iscrowd": 0}
                       for i in (1, 2, 3)]
    for img in images:
        Image.new("RGB", (W, H), (90, 120, 150)).save(root / "img" / str(img.get("file_name", "x.png")))
    for name, content in (files or {}).items():
        if content is None:
            os.remove(root / "img" / name)
        else:
            (root / "img" / name).write_bytes(content)
    with open(root / "ann.json", "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": categories or [{"id": 1, "name": "box"}, {"id": 2, "name": "disc"}],
                   **(sections or {})}, f)
    paths = [str(root / "ann.json"), str(root / "img")]
    return ["--dataset", "custom", "--train-json", paths[0], "--train-images", paths[1], "--val-json", paths[0],
            "--val-images", paths[1]]


def run_cli(cli, argv, capsys):
    """(exit status, stderr lines) of an in-process CLI run."""
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def assert_one_line(code, lines, named):
    assert code not in (0, None), lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in lines[0] and named in lines[0], lines


def image_bytes(size=(W, H), mode="RGB", fmt="PNG", **save_options):
    buffer = io.BytesIO()
    Image.new(mode, size, (200, 10, 10) if mode == "RGB" else 0).save(buffer, format=fmt, **save_options)
    return buffer.getvalue()


def rotated_jpeg(stored_size, orientation):
    """A JPEG whose EXIF says: turn me (6: 90 degrees clockwise) before showing."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes(stored_size, fmt="JPEG", exif=exif)


# ---------------------------------------------------------------------------------------------- data
# Each row: the parts of write_set that differ from a good set, and the texts the one error line must hold.
ONE_BOX = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 8], "iscrowd": 0}]
DATA_CASES = [
    pytest.param(dict(files={"2.png": None}), ["2.png"], id="missing image"),
    pytest.param(dict(files={"2.png": image_bytes((W + 1, H))}), [f"2.png is {W + 1}x{H}"],
                 id="image size differs from the JSON"),
    pytest.param(dict(images=THREE[:2] + [{"id": 3, "file_name": "3.jpg", "width": W, "height": H}],
                      files={"3.jpg": rotated_jpeg((W, H), 6)}),
                 [f"3.jpg is {H}x{W} but", f"EXIF orientation 6 turns the stored {W}x{H} pixels"],
                 id="JSON has the stored size of an EXIF-rotated photo"),
    pytest.param(dict(files={"2.png": b"not an image"}), ["2.png"], id="text file named .png"),
    pytest.param(dict(files={"3.png": b""}), ["3.png"], id="zero-byte image"),
    pytest.param(dict(images=THREE + [{"id": 2, "file_name": "4.png", "width": W, "height": H}]),
                 ["image id 2 is used by more than one image"], id="duplicate image id"),
    pytest.param(dict(images=THREE[:2] + [{"id": "3", "file_name": "3.png", "width": W, "height": H}],
                      annotations=[]), ["image id '3' is a str"], id="string image id"),
    pytest.param(dict(annotations=[dict(ONE_BOX[0], id=7, bbox=[2, "2", 10, 8])]),
                 ["annotation 7 has bbox [2, '2', 10, 8]"], id="string in a bbox"),
    pytest.param(dict(annotations=[]), ["has no boxes"], id="no boxes at all"),
    pytest.param(dict(images=THREE[:1], annotations=ONE_BOX), ["has 1 images, fewer than --batch-size 2"],
                 id="fewer images than the batch"),
    pytest.param(dict(sections={"annotations": None}), ["'annotations' is null (a NoneType), expected a list"],
                 id="annotations null"),
    pytest.param(dict(sections={"images": {"id": 1}}), ["'images' is {\"id\": 1} (a dict), expected a list"],
                 id="images an object"),
    pytest.param(dict(sections={"categories": [{"id": 1, "name": "box"}, "disc"]}),
                 ["'categories' holds \"disc\", expected an object"], id="a category that is a string"),
    pytest.param(dict(categories=[{"id": "c1", "name": "box"}], annotations=[dict(ONE_BOX[0], category_id="c1")]),
                 ["category id 'c1' is a str, expected an integer"], id="string category id"),
    pytest.param(dict(categories=[{"id": 1, "name": "box"}, {"id": 1, "name": "disc"}]),
                 ["category id 1 is used by more than one category"], id="duplicate category id"),
    pytest.param(dict(images=THREE[:2] + [{"id": 3, "file_name": "3.png", "width": 0, "height": H}]),
                 ["image 3 has width 0, expected a positive integer"], id="zero image width"),
    pytest.param(dict(images=THREE[:2] + [{"id": 3, "file_name": "3.png", "width": W, "height": 24.0}]),
                 ["image 3 has height 24.0, expected a positive integer"], id="float image height"),
    pytest.param(dict(images=THREE[:2] + [{"id": 3, "file_name": "3.png", "width": W, "height": -24}]),
                 ["image 3 has height -24, expected a positive integer"], id="negative image height"),
    pytest.param(dict(images=THREE[:2] + [{"id": 3, "file_name": "3.png", "width": True, "height": H}]),
                 ["image 3 has width True, expected a positive integer"], id="boolean image width"),
]


@pytest.mark.parametrize("parts, named", DATA_CASES)
def test_bad_data_is_one_line(parts, named, tmp_path, capsys, monkeypatch):
    """Each is found when the datasets are built, before the model is (not an epoch in)."""
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("the bad data was not found at build"))
    code, lines = run_cli(train.cli, [*QUICK, *write_set(tmp_path, **parts), "--output-dir", str(tmp_path / "out")],
                          capsys)
    for text in named:
        assert_one_line(code, lines, text)


def test_unreadable_image_found_in_a_dataloader_worker_is_one_line(tmp_path):
    """A truncated PNG passes the header check; two loader workers must not wrap its error in a traceback."""
    good = image_bytes()
    cut = good[:len(good) // 2]
    argv = write_set(tmp_path, files={"1.png": cut, "2.png": cut, "3.png": cut})
    argv = [*QUICK, "--num-workers", "2", *argv]  # the last --num-workers counts
    result = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *argv, "--output-dir",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=HERE,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    lines = result.stderr.strip().splitlines()
    assert_one_line(result.returncode, lines, "cannot be read")
    assert ".png" in lines[0] and "DataLoader worker" not in lines[0]


def test_error_line_unwraps_a_dataloader_worker_error():
    wrapped = ("Caught InputError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
               '  File "data.py", line 1, in load_rgb\nerrors.InputError: image /x/1.png cannot be read (OSError)')
    assert error_line(InputError(wrapped)) == "image /x/1.png cannot be read (OSError)"
    assert error_line(FileNotFoundError("plain: message")) == "plain: message"


# ---------------------------------------------------------------------------------------------- checkpoints
def _checkpoint_file(kind, path, args_dict):
    if kind == "truncated":
        torch.save({"model": {"w": torch.zeros(1000)}, "args": args_dict}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "random bytes":
        path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)))
    elif kind == "zero bytes":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("model weights go here\n")
    elif kind == "wrong type":
        torch.save([1, 2, 3], path)
    elif kind == "no args":
        torch.save({"model": {"w": torch.zeros(1)}}, path)
    return str(path)


CHECKPOINT_KINDS = ["truncated", "random bytes", "zero bytes", "text", "wrong type", "no args"]


# An official checkpoint carries no args, so "no args" is bad input only for the resume flags.
@pytest.mark.parametrize("kind, flag", [(kind, flag) for kind in CHECKPOINT_KINDS
                                        for flag in ("--resume", "--pretrained", "auto")
                                        if not (flag == "--pretrained" and kind == "no args")])
def test_bad_checkpoint_for_train_is_one_line(kind, flag, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    # --resume reads the output folder's own checkpoint; an official checkpoint lies elsewhere.
    path = _checkpoint_file(kind, (tmp_path if flag == "--pretrained" else out) / "checkpoint.pth", {"hidden_dim": 32})
    argv = ["--resume", "auto"] if flag == "auto" else [flag, path]
    code, lines = run_cli(train.cli, [*QUICK, *write_set(tmp_path), "--output-dir", str(out), *argv], capsys)
    assert_one_line(code, lines, path)


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_bad_checkpoint_for_evaluate_is_one_line(kind, tmp_path, capsys):
    path = _checkpoint_file(kind, tmp_path / "c.pth", {"hidden_dim": 32})
    code, lines = run_cli(evaluate.cli, ["--resume", path], capsys)
    assert_one_line(code, lines, path)


def test_resume_after_the_category_names_changed_is_an_error(tmp_path, capsys):
    argv = [*QUICK, *write_set(tmp_path), "--output-dir", str(tmp_path / "out")]
    args = parse_args(*argv)
    os.makedirs(args.output_dir)
    torch.save({"model": {}, "args": vars(args), "optimizer": {}, "scheduler": {}, "epoch": 0, "rng": [],
                "classes": {"ids": [1, 2], "names": ["box", "ball"]}}, tmp_path / "out" / "checkpoint.pth")
    code, lines = run_cli(train.cli, [*argv, "--resume", "auto"], capsys)
    assert_one_line(code, lines, "1: 'ball' -> 'disc'")


# ---------------------------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("name, content, named", [
    ("nan.pt", torch.tensor([[0.1, 0.2], [float("nan"), 1.0]]), "NaN or Inf in rows [1]"),
    ("inf.npy", np.array([[np.inf, 0.0], [1.0, 2.0]]), "NaN or Inf in rows [0]"),
    ("strings.npy", np.array([["a", "b"], ["c", "d"]]), "dtype <U1"),
    ("text.pt", b"box\ndisc\n", "not a file written by torch.save"),
    ("integers.pt", torch.ones(2, 4, dtype=torch.int64), "torch.int64"),
])
def test_bad_label_embeddings_are_one_line(name, content, named, tmp_path, capsys):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        torch.save(content, path)
    argv = [*QUICK, *write_set(tmp_path), "--output-dir", str(tmp_path / "out"), "--method", "alignnet",
            "--label-embeddings", str(path)]
    code, lines = run_cli(train.cli, argv, capsys)
    assert_one_line(code, lines, str(path))
    assert named in lines[0]


# ---------------------------------------------------------------------------------------------- flags
FLAG_CASES = [
    (["--device", "gpu0"], "--device 'gpu0'"),
    (["--num-queries", "0"], "--num-queries 0"),
    (["--num-feature-levels", "0"], "--num-feature-levels 0"),
    (["--num-feature-levels", "2"], "--num-feature-levels 2"),
    (["--min-size", "0"], "--min-size 0"),
    (["--min-size", "300", "--max-size", "200"], "--min-size 300 / --max-size 200"),
    (["--dec-layers", "0"], "--dec-layers 0"),
    (["--epochs", "0"], "--epochs 0"),
    (["--epochs", "-1"], "--epochs -1"),
    (["--lr-drop", "-5"], "--lr-drop -5"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--hidden-dim", "30"], "--hidden-dim 30"),
    (["--output-dir", "FILE"], "FILE"),
    (["--output-dir", "FILE/sub"], "FILE"),
    (["--lr", "nan"], "--lr nan: expected a finite number"),
    (["--lr-backbone", "inf"], "--lr-backbone inf: expected a finite number"),
    (["--weight-decay=-inf"], "--weight-decay -inf: expected a finite number"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--method", "clip"], "argument --method: invalid choice: 'clip'"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["--clip-max-norm", "nan"], "--clip-max-norm nan"),
    (["--align-loss-coef", "nan"], "--align-loss-coef nan"),
    (["--dynql-rho", "inf"], "--dynql-rho inf"),
    (["--dynql-betas", "0.1", "nan"], "--dynql-betas nan"),
    (["--dropout", "1.5"], "--dropout 1.5: expected a probability in [0, 1)"),
    (["--label-embeddings", "missing.pt"], "--label-embeddings missing.pt not found"),
]
if not torch.cuda.is_available():
    FLAG_CASES.append((["--device", "cuda"], "no CUDA GPU"))


@pytest.mark.parametrize("flags, named", FLAG_CASES)
def test_bad_flags_are_one_line(flags, named, tmp_path, capsys):
    (tmp_path / "FILE").write_text("a file where a folder should be")
    flags = [f.replace("FILE", str(tmp_path / "FILE")) for f in flags]
    code, lines = run_cli(train.cli, [*QUICK, *write_set(tmp_path), "--output-dir", str(tmp_path / "out"),
                                      *flags], capsys)
    assert_one_line(code, lines, named.replace("FILE", str(tmp_path / "FILE")))


def test_flags_through_the_scripts_are_one_line(tmp_path):
    """The `__main__` wiring of both scripts: a bad device for train.py, an empty checkpoint for evaluate.py."""
    (tmp_path / "empty.pth").write_bytes(b"")
    cases = ((["train.py", "--device", "gpu0"], "gpu0"),
             (["evaluate.py", "--resume", str(tmp_path / "empty.pth")], "empty.pth"))
    runs = [subprocess.Popen([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"))
            for argv, _ in cases]  # both at once: each is mostly Python and torch starting
    for (_, named), run in zip(cases, runs):
        _, err = run.communicate(timeout=300)
        assert_one_line(run.returncode, err.strip().splitlines(), named)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny trained-for-one-step checkpoint of the small custom set (weights are irrelevant here)."""
    root = tmp_path_factory.mktemp("ckpt")
    argv = [*QUICK, *write_set(root), "--output-dir", str(root / "out")]
    args = parse_args(*argv)
    model, _, _ = build.build_model(args, ["box", "disc"])
    path = root / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "args": vars(args),
                "classes": {"ids": [1, 2], "names": ["box", "disc"]}}, path)
    return str(path)


def test_evaluate_output_dir_that_is_a_file_fails_before_inference(checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / "pngs").write_text("a file")
    write_set(tmp_path)
    monkeypatch.setattr(evaluate, "predict", lambda *a, **k: pytest.fail("inference ran"))
    code, lines = run_cli(evaluate.cli, ["--resume", checkpoint, "--images", str(tmp_path / "img"),
                                         "--output-dir", str(tmp_path / "pngs")], capsys)
    assert_one_line(code, lines, str(tmp_path / "pngs"))
    code, lines = run_cli(evaluate.cli, ["--resume", checkpoint, "--device", "gpu0"], capsys)
    assert_one_line(code, lines, "gpu0")


def test_a_diverged_run_names_the_predictions_not_scipy(shapes, tmp_path, capsys):
    """--lr 1e9 makes the predictions NaN after one step; the error names them before the matcher sees them."""
    argv = [*QUICK, *shapes, "--output-dir", str(tmp_path / "out"), "--lr", "1e9",
            "--lr-backbone", "1e9", "--clip-max-norm", "0", "--max-steps", "3"]
    code, lines = run_cli(train.cli, argv, capsys)
    assert_one_line(code, lines, "non-finite predictions: pred_")
    assert "decoder layer 1" in lines[0] and "invalid numeric entries" not in lines[0]


def test_non_finite_predictions_are_named_by_head_and_layer():
    finite = {"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": torch.full((1, 2, 4), 0.5)}
    outputs = dict(finite, aux_outputs=[dict(finite, pred_boxes=torch.full((1, 2, 4), float("nan")))],
                   enc_outputs=dict(finite, pred_logits=torch.full((1, 2, 3), float("inf"))))
    with pytest.raises(FloatingPointError, match=r"pred_boxes of decoder layer 1, pred_logits of encoder proposals \("):
        train.check_finite_predictions(outputs)
    train.check_finite_predictions(dict(finite, aux_outputs=[finite]))


# ---------------------------------------------------------------------------------------------- silent cases
def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    grey = (np.arange(W * H, dtype=np.uint16).reshape(H, W) * 80)  # up to 61,360 of 65,535
    Image.fromarray(grey).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(data.load_rgb(tmp_path / "deep.png"))  # (H, W, 3)
    assert np.array_equal(rgb[..., 0], np.round(grey / 257).astype(np.uint8))
    assert (rgb[..., 0] == rgb[..., 2]).all() and rgb.max() < 255


def test_images_folder_applies_exif_orientation_and_reports_what_it_skips(tmp_path):
    folder = tmp_path / "photos"
    (folder / "holiday").mkdir(parents=True)
    (folder / "phone.jpg").write_bytes(rotated_jpeg((40, 20), 6))  # stored landscape, shown portrait
    good = image_bytes()
    (folder / "cut.png").write_bytes(good[:len(good) // 2])
    (folder / "notes.txt").write_text("not an image")
    _, names, skipped, subfolders = evaluate.list_images(str(folder))
    assert (names, skipped, subfolders) == (["phone.jpg"], ["cut.png", "notes.txt"], ["holiday"])
    _, target = evaluate.ImageFolder(str(folder), names, data.make_transforms("val", eval_size=None))[0]
    assert target["orig_size"].tolist() == [40, 20]  # (H, W) of the turned photo


def test_annotations_without_area_or_iscrowd_can_be_evaluated(tmp_path):
    """pycocotools reads 'area' of every ground-truth box: without it evaluation died after a whole epoch."""
    write_set(tmp_path)  # its annotations have no 'area'
    ds = data.CocoDetection(str(tmp_path / "img"), str(tmp_path / "ann.json"))
    assert ds.coco.anns[11]["area"] == 80
    results = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 8], "score": 0.9}]
    assert evaluate.coco_stats(ds.coco, results, [1])[1] == pytest.approx(1.0)


def test_stale_temporaries_are_removed_when_a_run_starts(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    stale = ["checkpoint.pth.tmp", "checkpoint.pth.4242-0a1b2c3d.tmp", "log.jsonl.4242-0a1b2c3d.tmp"]
    for name in stale:
        (out / name).write_bytes(b"half a file")
    code, lines = run_cli(train.cli, [*QUICK, *write_set(tmp_path, annotations=[]), "--output-dir", str(out)],
                          capsys)
    assert code == 2 and not any((out / name).exists() for name in stale)


def test_log_keeps_an_epoch_killed_during_its_evaluation(shapes, tmp_path, monkeypatch):
    """A kill between the checkpoint and the log line of epoch 1: resuming evaluates epoch 1 and logs it."""
    argv = [*QUICK, *shapes, "--output-dir", str(tmp_path / "out"), "--epochs", "2",
            "--eval-every", "1"]
    real = evaluate.evaluate
    calls = []

    def killed_at_epoch_1(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for kill -9: nothing after this line runs
        return real(*a, **k)
    monkeypatch.setattr(evaluate, "evaluate", killed_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train.main(parse_args(*argv))
    log_path = tmp_path / "out" / "log.jsonl"
    assert [json.loads(line)["epoch"] for line in open(log_path)] == [0]
    monkeypatch.setattr(evaluate, "evaluate", real)
    train.main(parse_args(*argv, "--resume", "auto"))
    log = [json.loads(line) for line in open(log_path)]
    assert [record["epoch"] for record in log] == [0, 1]
    assert all(len(record["coco_stats"]) == 12 for record in log)


# ---------------------------------------------------------------------------------------------- runs and resumes
def test_a_second_run_never_overwrites_the_first_runs_checkpoint(shapes, tmp_path, capsys):
    """A finished run's folder: a new run refuses it (its checkpoint stays byte for byte); while a live run holds
    the folder's lock, even --resume auto is refused; a lock whose process has ended is taken over."""
    out = tmp_path / "out"
    argv = [*QUICK, *shapes, "--output-dir", str(out)]
    train.main(parse_args(*argv))
    first = (out / "checkpoint.pth").read_bytes()
    code, lines = run_cli(train.cli, argv, capsys)
    assert_one_line(code, lines, "holds the checkpoint of an earlier run, which this run would overwrite")
    assert (out / "checkpoint.pth").read_bytes() == first and not (out / train.LOCK_NAME).exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / train.LOCK_NAME).write_text(f"{socket.gethostname()} {live.pid}\n")
        code, lines = run_cli(train.cli, [*argv, "--epochs", "2", "--resume", "auto"], capsys)
        assert_one_line(code, lines, f"is in use by another training run ({socket.gethostname()} {live.pid}")
        assert (out / "checkpoint.pth").read_bytes() == first
    finally:
        live.kill()
        live.wait()
    train.main(parse_args(*argv, "--epochs", "2", "--resume", "auto"))  # the lock's process has ended
    assert torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] == 1
    assert not (out / train.LOCK_NAME).exists()


def test_resume_refuses_every_flag_the_checkpoint_fixes_and_allows_the_others(tmp_path):
    """One rule for every flag: each one outside RESUME_MAY_CHANGE, changed, is refused by name."""
    args = parse_args(*QUICK, *write_set(tmp_path), "--output-dir", str(tmp_path / "out"))
    saved = dict(vars(args))
    for key, value in saved.items():
        changed = dict(saved, **{key: [value, value] if isinstance(value, list) else
                                 (not value if isinstance(value, bool) else f"{value}-other")})
        if key in train.RESUME_MAY_CHANGE:
            if key not in ("pretrained", "pretrained_backbone"):  # these are the trained-weights rule's
                train.check_resume_args(changed, args, "ckpt")
        else:
            with pytest.raises(InputError, match=f"--{key.replace('_', '-')} "):
                train.check_resume_args(changed, args, "ckpt")


def test_resume_with_a_changed_lr_is_refused_and_the_checkpoint_kept(shapes, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*QUICK, *shapes, "--output-dir", str(out)]
    train.main(parse_args(*argv))
    before = (out / "checkpoint.pth").read_bytes()
    for flags, named in ((["--lr", "0.002"], "--lr 0.001 in the checkpoint, 0.002 now"),
                         (["--num-queries", "7"], "--num-queries 10 in the checkpoint, 7 now")):
        code, lines = run_cli(train.cli, [*argv, "--epochs", "2", "--resume", "auto", *flags], capsys)
        assert_one_line(code, lines, named)
    assert (out / "checkpoint.pth").read_bytes() == before


def test_resume_auto_after_the_last_epoch_says_so(shapes, tmp_path, capsys):
    argv = [*QUICK, *shapes, "--output-dir", str(tmp_path / "out")]
    train.main(parse_args(*argv))
    capsys.readouterr()
    train.cli([*argv, "--resume", "auto"])
    assert "nothing to train: " in capsys.readouterr().out


def test_resume_given_a_folder_names_the_folder(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pth").write_bytes(b"")
    for cli in (train.cli, evaluate.cli):
        argv = [*QUICK, *write_set(tmp_path), "--output-dir", str(tmp_path / "out")] if cli is train.cli else []
        code, lines = run_cli(cli, [*argv, "--resume", str(tmp_path / "run")], capsys)
        assert_one_line(code, lines, f"{tmp_path / 'run'} is a folder, expected a checkpoint file (did you mean "
                                     f"{tmp_path / 'run' / 'checkpoint.pth'}?)")


def test_ctrl_c_mid_epoch_is_one_line_and_the_checkpoint_resumes(shapes, tmp_path):
    """SIGINT in epoch 1 (with a loader worker): one line saying where it stopped, exit 130, epoch 0 kept."""
    out = tmp_path / "out"
    steps = QUICK.index("--max-steps")
    quick = QUICK[:steps] + QUICK[steps + 2:]  # every epoch runs to its end
    argv = [*quick, *shapes, "--output-dir", str(out), "--epochs", "6", "--num-workers", "1",
            "--shapes-num-train", "24"]
    # SIGINT at its default in the child, as in a terminal: a test session started in the background (`cmd &`)
    # ignores it, children inherit that, and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *argv], cwd=HERE, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not (out / "checkpoint.pth").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    # Python's fork hooks swallow an interrupt that lands while the loader forks its worker at an epoch's start
    # (a user's Ctrl-C there is lost too): wait until epoch 1's worker exists (epoch 0's was joined before the
    # checkpoint was written), then interrupt once.
    children = f"/proc/{proc.pid}/task/{proc.pid}/children"
    while not open(children).read().split() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 130, stderr
    epoch = torch.load(out / "checkpoint.pth", weights_only=False)["epoch"]
    assert lines == [f"error: interrupted in epoch {epoch + 1} of 6 (epochs count from 0); {out / 'checkpoint.pth'} "
                     f"holds epoch {epoch}: continue with --resume auto"], stderr
    assert not (out / train.LOCK_NAME).exists()


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(shapes, tmp_path, capsys,
                                                                              monkeypatch):
    out = tmp_path / "out"
    argv = [*QUICK, *shapes, "--output-dir", str(out), "--epochs", "2"]
    real_open, writes = open, []

    def open_filling_the_disk_at_the_second_checkpoint(path, mode="r", *args, **kwargs):
        if str(path).endswith(".tmp") and "checkpoint.pth" in str(path):
            writes.append(path)
            if len(writes) == 2:
                with real_open(path, "wb") as half:
                    half.write(b"half a checkpoint")
                return real_open("/dev/full", mode)
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(errors, "open", open_filling_the_disk_at_the_second_checkpoint, raising=False)
    code, lines = run_cli(train.cli, argv, capsys)
    assert_one_line(code, lines, f"cannot write {out / 'checkpoint.pth'}: No space left on device (the previous "
                                 "file is kept)")
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] == 0
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "log.jsonl"]


def unwritable_folder():
    """A folder this process cannot write into even as root (sysfs), or None where there is none."""
    try:
        with tempfile.NamedTemporaryFile(dir="/sys"):
            return None
    except OSError:
        return "/sys"


@pytest.mark.skipif(unwritable_folder() is None, reason="no folder here refuses writes to this user")
def test_unwritable_outputs_fail_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    folder = unwritable_folder()
    monkeypatch.setattr(train, "build_dataset", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(evaluate, "build_dataset", lambda *a, **k: pytest.fail("evaluation started"))
    code, lines = run_cli(train.cli, [*QUICK, *write_set(tmp_path), "--output-dir", f"{folder}/run"], capsys)
    assert_one_line(code, lines, f"--output-dir {folder}/run: cannot write into {folder}")
    for flag in ("--output", "--log"):
        code, lines = run_cli(evaluate.cli, ["--resume", checkpoint, flag, f"{folder}/x.json"], capsys)
        assert_one_line(code, lines, f"{flag} {folder}/x.json: cannot write into {folder}")


def test_a_cached_label_table_that_cannot_be_read_is_recomputed(tmp_path, capsys):
    """A 0-byte, truncated or wrong-shaped cache file is the project's own file gone bad: recomputed, said once."""
    names = ["red circle", "blue triangle"]
    first = label_dictionary.label_embeddings(names, model_name="RN50", pretrained="none", cache_dir=tmp_path)
    cached = label_dictionary._cache_path(tmp_path, "RN50", "none", "a photo of a {}", names)
    for damage in (b"", b"PK\x03\x04 cut short", torch.zeros(3, 4)):
        if isinstance(damage, bytes):
            cached.write_bytes(damage)
        else:
            torch.save(damage, cached)
        capsys.readouterr()
        again = label_dictionary.label_embeddings(names, model_name="RN50", pretrained="none", cache_dir=tmp_path)
        said = capsys.readouterr().out
        assert f"label dictionary cache {cached}" in said and "recomputing it" in said, said
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        assert torch.load(cached, weights_only=True).shape == (2, first.shape[1])  # the cache is whole again


# ---------------------------------------------------------------------------------------------- evaluation inputs
def evaluate_to_json(checkpoint, tmp_path, capsys, *flags):
    """(status, stderr lines, stdout, detections written) of evaluate.cli with --output."""
    out = tmp_path / f"results-{len(list(tmp_path.glob('results-*')))}.json"
    try:
        evaluate.cli(["--resume", checkpoint, "--output", str(out), *flags])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    detections = json.loads(out.read_text()) if out.exists() else None
    return code, captured.err.strip().splitlines(), captured.out, detections


def test_evaluate_matches_the_checkpoints_classes_by_name_not_by_id(checkpoint, tmp_path, capsys):
    """A val JSON that numbers box/disc the other way round: every detection keeps its class name."""
    flags = write_set(tmp_path / "a")
    code, _, _, plain = evaluate_to_json(checkpoint, tmp_path, capsys, *flags[6:])
    swapped = [{"id": 1, "name": "disc"}, {"id": 2, "name": "box"}]
    flags = write_set(tmp_path / "b", categories=swapped, annotations=[dict(ONE_BOX[0], category_id=2)])
    code2, _, _, renumbered = evaluate_to_json(checkpoint, tmp_path, capsys, *flags[6:])
    assert code == code2 == 0 and len(plain) == len(renumbered) > 0
    name_a, name_b = {1: "box", 2: "disc"}, {1: "disc", 2: "box"}
    assert [(d["image_id"], name_a[d["category_id"]], d["score"]) for d in plain] == \
        [(d["image_id"], name_b[d["category_id"]], d["score"]) for d in renumbered]


def test_evaluate_on_a_val_set_with_other_classes_names_them(checkpoint, tmp_path, capsys):
    cats = [{"id": 1, "name": "box"}, {"id": 2, "name": "disc"}, {"id": 3, "name": "star"}]
    flags = write_set(tmp_path, categories=cats)
    code, lines, _, written = evaluate_to_json(checkpoint, tmp_path, capsys, *flags[6:])
    assert_one_line(code, lines, "the model has 2 classes and ")
    assert "3: only the model has [], only the val set has ['star']" in lines[0] and written is None


def test_a_val_set_without_annotations_says_so_and_still_writes_the_detections(checkpoint, tmp_path, capsys):
    flags = write_set(tmp_path, annotations=[])
    code, lines, out, written = evaluate_to_json(checkpoint, tmp_path, capsys, *flags[6:])
    assert code == 0 and not lines
    assert f"nothing to score: {flags[7]} has no (non-crowd) annotation on its 3 images" in out, out
    assert "-100.0" not in out and len(written) == 3 * 10 * 2  # per image the top 100 of 10 queries x 2 classes


def test_images_given_one_file_detects_on_that_image(checkpoint, tmp_path, capsys):
    write_set(tmp_path)
    code, lines, out, written = evaluate_to_json(checkpoint, tmp_path, capsys, "--images",
                                                 str(tmp_path / "img" / "2.png"), "--output-dir",
                                                 str(tmp_path / "pngs"))
    assert code == 0, lines
    assert {d["file_name"] for d in written} == {"2.png"} and os.listdir(tmp_path / "pngs") == ["2.png"]


def test_label_flags_given_to_the_baseline_are_said_to_be_unused(tmp_path, capsys):
    """A Table 4 sweep passes every method the same flags: the baseline takes them and says it does not use them."""
    torch.save(torch.randn(2, 8), tmp_path / "table.pt")
    parse_args(*QUICK, *write_set(tmp_path), "--label-embeddings", tmp_path / "table.pt", "--clip-model", "RN50")
    assert ("note: --label-embeddings and --clip-model not used: --method baseline without --novel-classes builds no "
            "label dictionary") in capsys.readouterr().out
