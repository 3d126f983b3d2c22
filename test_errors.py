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
from errors import TEMP_SUFFIX as TEMP, InputError, error_line

# Command lines, whole runs and exports: the full tier only (`pytest -m "not slow"` leaves them out).
pytestmark = pytest.mark.slow

# The tiny detector, one step of one epoch, no evaluation: every run here ends at its error or right after.
# resnet18: its checkpoints (45 MB, not resnet50's 97 MB) are copied into many tests' folders.
QUICK = [*TINY_MODEL, "--backbone", "resnet18", "--epochs", "1", "--max-steps", "1", "--device", "cpu",
         "--method", "baseline", "--eval-every", "0"]
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
    pytest.param(dict(annotations=[dict(ONE_BOX[0], id=7), dict(ONE_BOX[0], id=7, image_id=2)]),
                 ["annotation id 7 is used by more than one annotation"], id="duplicate annotation id"),
    pytest.param(dict(annotations=[{k: v for k, v in ONE_BOX[0].items() if k != "id"}]),
                 ["has no 'id', expected a unique integer id"], id="annotation without id"),
    pytest.param(dict(annotations=[dict(ONE_BOX[0], id="a1")]), ["annotation 'a1' has id 'a1' (a str)"],
                 id="string annotation id"),
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
    assert_one_line(code, lines, "holds checkpoint.pth and log.jsonl of an earlier run, which this run would overwrite")
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


# ---------------------------------------------------------------------------------------------- outputs over inputs
def graph_file(path, *, inputs=("images", "mask"), queries=5, classes=("box", "disc"), **metadata):
    """An .onnx file that evaluate.py --onnx runs: the inputs and outputs of --export-onnx's graph (every query a
    centred box, every logit 0) and its metadata; `inputs` renames the graph's inputs (another model carrying the
    metadata). Built with onnx.helper in milliseconds, where exporting a detector takes a minute."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name, array):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))
    nodes = [helper.make_node("Shape", [inputs[0]], ["shape"]), const("zero", np.array([0], np.int64)),
             const("one", np.array([1], np.int64)), helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
             const("qk", np.array([queries, len(classes)], np.int64)), const("q4", np.array([queries, 4], np.int64)),
             helper.make_node("Concat", ["batch", "qk"], ["logits_shape"], axis=0),
             helper.make_node("Concat", ["batch", "q4"], ["boxes_shape"], axis=0),
             const("logit", np.zeros((1, 1, 1), np.float32)),
             const("box", np.array([[[0.5, 0.5, 0.4, 0.4]]], np.float32)),
             helper.make_node("Expand", ["logit", "logits_shape"], ["pred_logits"]),
             helper.make_node("Expand", ["box", "boxes_shape"], ["pred_boxes"])]
    graph = helper.make_graph(nodes, "fake", [
        helper.make_tensor_value_info(inputs[0], TensorProto.FLOAT, ["B", 3, "H", "W"]),
        helper.make_tensor_value_info(inputs[1], TensorProto.BOOL, ["B", "H", "W"])], [
        helper.make_tensor_value_info("pred_logits", TensorProto.FLOAT, ["B", queries, len(classes)]),
        helper.make_tensor_value_info("pred_boxes", TensorProto.FLOAT, ["B", queries, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = dict(format="clip-detr-onnx-1", class_names=list(classes), cat_ids=list(range(1, len(classes) + 1)),
                dataset="custom", min_size=64, max_size=96, batch_size=2, num_select=10, min_side=65) | metadata
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    onnx.save(model, path)
    return str(path)


def files_under(*paths):
    """{path: bytes} of every file at or under `paths` (the state a refused command must leave)."""
    found = {}
    for path in map(str, paths):
        if os.path.isfile(path):
            found[path] = open(path, "rb").read()
        for folder, _, names in os.walk(path):
            found.update({os.path.join(folder, n): open(os.path.join(folder, n), "rb").read() for n in names})
    return found


@pytest.fixture
def user_files(checkpoint, tmp_path):
    """A user's folder: a copy of the checkpoint, photos (two PNGs, a JPEG, a results.json of their own), an ONNX
    file, a classes file, a label table, a val set, a transformers folder; returns their paths."""
    root = tmp_path / "user"
    (root / "photos").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (root / "photos" / name).write_bytes(image_bytes())
    (root / "photos" / "c.jpg").write_bytes(image_bytes(fmt="JPEG"))
    (root / "jpegs").mkdir()
    (root / "jpegs" / "c.jpg").write_bytes(image_bytes(fmt="JPEG"))
    (root / "jpegs" / "results.json").write_text("[]")
    (root / "ck.pth").write_bytes(open(checkpoint, "rb").read())
    (root / "ck2.pth").write_bytes(open(checkpoint, "rb").read())
    (root / "names.txt").write_text("box\ndisc\n")
    torch.save({"names": ["box", "disc"], "embeddings": torch.eye(2, 8)}, root / "table.pt")
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text("{}")
    val = write_set(root / "val")
    os.symlink(root / "ck.pth", root / "link.json")
    return dict(root=root, ck=str(root / "ck.pth"), ck2=str(root / "ck2.pth"), photos=str(root / "photos"),
                jpegs=str(root / "jpegs"), onnx=graph_file(root / "m.onnx"), names=str(root / "names.txt"),
                table=str(root / "table.pt"), hf=str(root / "hf"), val_json=val[-3], val_images=val[-1],
                link=str(root / "link.json"), ck_json=os.path.join(os.path.dirname(checkpoint), "ann.json"),
                ck_images=os.path.join(os.path.dirname(checkpoint), "img"))


# (argv of evaluate.py with {placeholders} of user_files, the two flags the line must name). Each writes over a file
# it reads: the same path, another spelling of it, a link to it, or a file of a folder it reads.
EVALUATE_OVER_INPUTS = [
    pytest.param("--resume {ck} --export-onnx {ck}", ["--export-onnx", "--resume"], id="export over the checkpoint"),
    pytest.param("--resume {ck} --output {ck}", ["--output", "--resume"], id="results over the checkpoint"),
    pytest.param("--resume {ck} --output {root}/photos/../ck.pth", ["--output", "--resume"],
                 id="results over the checkpoint spelled otherwise"),
    pytest.param("--resume {ck} --output {link}", ["--output", "--resume"], id="results through a symlink"),
    pytest.param("--resume {ck} --log {ck}", ["--log", "--resume"], id="log appended to the checkpoint"),
    pytest.param("--resume {ck} --images {photos} --output-dir {photos}", ["--output-dir", "--images"],
                 id="PNGs over the photos"),
    pytest.param("--resume {ck} --images {photos}/a.png --output-dir {photos}", ["--output-dir", "--images"],
                 id="the PNG of one photo over it"),
    pytest.param("--resume {ck} --images {photos} --output {photos}/b.png", ["--output", "--images"],
                 id="results over a photo"),
    pytest.param("--resume {ck} --images {jpegs} --output-dir {jpegs}", ["--output-dir", "--images"],
                 id="results.json over the folder's own"),
    pytest.param("--onnx {onnx} --images {photos} --output-dir {photos}", ["--output-dir", "--images"],
                 id="onnx PNGs over the photos"),
    pytest.param("--onnx {onnx} --images {photos} --output {onnx} --output-dir {root}/out",
                 ["--output", "--onnx"], id="onnx results over the model"),
    pytest.param("--resume {ck} --val-json {val_json} --val-images {val_images} --output {val_json}",
                 ["--output", "--val-json"], id="results over the val JSON"),
    pytest.param("--resume {ck} --visualize 1 --val-json {val_json} --val-images {val_images} "
                 "--output-dir {val_images}", ["--output-dir", "--val-images"], id="score maps over the val images"),
    pytest.param("--resume {ck} --visualize 1 --output-dir {ck_images}", ["--output-dir", "--val-json/--val-images"],
                 id="score maps over the checkpoint's val images"),
    pytest.param("--resume {ck} --output {ck_json}", ["--output", "--val-json/--val-images"],
                 id="results over the checkpoint's val JSON"),
    pytest.param("--resume {ck} --visualize 1 --compare {ck2} --log {ck2}", ["--log", "--compare"],
                 id="log over the compared checkpoint"),
    pytest.param("--resume {ck} --images {photos} --classes-file {names} --output {names}",
                 ["--output", "--classes-file"], id="results over the classes file"),
    pytest.param("--resume {ck} --images {photos} --label-embeddings {table} --log {table}",
                 ["--log", "--label-embeddings"], id="log over the label table"),
    pytest.param("--pretrained {hf} --output {hf}/config.json", ["--output", "--pretrained"],
                 id="results over a transformers folder's file"),
    pytest.param("--resume {ck} --output {root}/r.json --log {root}/r.json", ["--output", "--log"],
                 id="results and log one file"),
]


@pytest.mark.parametrize("argv, flags", EVALUATE_OVER_INPUTS)
def test_evaluate_never_writes_over_what_it_reads(argv, flags, user_files, capsys):
    """Refused before any work, in one line naming both flags; every file of the user's stays byte for byte."""
    mine = (user_files["root"], user_files["ck_json"], user_files["ck_images"])
    before = files_under(*mine)
    code, lines = run_cli(evaluate.cli, argv.format(**user_files).split(), capsys)
    for flag in flags:
        assert_one_line(code, lines, f"{flag} ")
    assert code == 2 and files_under(*mine) == before


def test_a_new_file_beside_the_inputs_is_written(user_files, capsys):
    """The check is per file: PNGs and results.json written into the folder of JPEGs replace nothing of it."""
    root = user_files["root"]
    os.remove(root / "jpegs" / "results.json")
    before = files_under(root / "jpegs")
    evaluate.cli(["--resume", user_files["ck"], "--images", user_files["jpegs"], "--output-dir", user_files["jpegs"],
                  "--min-size", "64", "--max-size", "96"])
    after = files_under(root / "jpegs")
    assert {k: after[k] for k in before} == before and sorted(os.listdir(root / "jpegs")) == \
        ["c.jpg", "c.png", "results.json"]


# (train.py flags with {out} and {other}, the flag the line names beside --output-dir).
TRAIN_OVER_INPUTS = [
    pytest.param(["--pretrained", "{out}/checkpoint.pth"], "--pretrained", id="pretrained in the run folder"),
    pytest.param(["--label-embeddings", "{out}/log.jsonl"], "--label-embeddings", id="label table as log"),
    pytest.param(["--pretrained", "{other}/official.pth", "--output-dir", "{other}/linked"], "--pretrained",
                 id="through a symlink in the run folder"),
]


@pytest.mark.parametrize("flags, named", TRAIN_OVER_INPUTS)
def test_train_never_writes_over_what_it_reads(flags, named, tmp_path, capsys):
    out, other = tmp_path / "out", tmp_path / "other"
    out.mkdir()
    (other / "linked").mkdir(parents=True)
    torch.save({"model": {"w": torch.zeros(2)}}, other / "official.pth")
    torch.save({"model": {"w": torch.zeros(2)}}, out / "checkpoint.pth")
    torch.save(torch.eye(2, 8), out / "log.jsonl")
    os.symlink(other / "official.pth", other / "linked" / "checkpoint.pth")
    argv = [*QUICK, *write_set(tmp_path), "--output-dir", str(out),
            *[f.format(out=out, other=other) for f in flags]]
    before = files_under(tmp_path)
    code, lines = run_cli(train.cli, argv, capsys)
    assert_one_line(code, lines, f"{named} ")
    assert "--output-dir would write" in lines[0] and code == 2 and files_under(tmp_path) == before


# ---------------------------------------------------------------------------------------------- flags each path takes
# Values refused on the eager path (--resume CKPT --images DIR) and on the ONNX path (--onnx FILE --images DIR)
# alike, by one check, with one line: the ONNX path once took 0 for 'unset' and ran with the graph's stored size.
BAD_VALUES = [(["--min-size", "0"], "--min-size 0: expected a number >= 1"),
              (["--max-size", "0"], "--max-size 0: expected a number >= 1"),
              (["--min-size", "-3"], "--min-size -3: expected a number >= 1"),
              (["--batch-size", "0"], "--batch-size 0: expected a number >= 1"),
              (["--num-workers", "-1"], "--num-workers -1: expected a number >= 0"),
              (["--score-threshold", "1.5"], "--score-threshold 1.5: expected a score in [0, 1]"),
              (["--score-threshold", "nan"], "--score-threshold nan: expected a score in [0, 1]"),
              (["--min-size", "97", "--max-size", "96"],
               "--min-size 97 / --max-size 96: expected min-size <= max-size")]


@pytest.mark.parametrize("flags, named", BAD_VALUES, ids=[" ".join(flags) for flags, _ in BAD_VALUES])
def test_the_eager_and_the_onnx_path_refuse_the_same_values(flags, named, user_files, capsys):
    lines = {}
    for source in (["--resume", user_files["ck"]], ["--onnx", user_files["onnx"]]):
        code, lines[source[0]] = run_cli(evaluate.cli, [*source, "--images", user_files["photos"], "--output-dir",
                                                        str(user_files["root"] / "out"), *flags], capsys)
        assert_one_line(code, lines[source[0]], named)
    assert lines["--resume"] == lines["--onnx"] and not (user_files["root"] / "out").exists()


def test_num_workers_reaches_the_image_loader_on_both_paths(user_files, monkeypatch):
    """--num-workers, accepted with --images, loads the images on the eager and the ONNX path alike."""
    workers = []
    real = evaluate.DataLoader
    monkeypatch.setattr(evaluate, "DataLoader", lambda *a, **k: workers.append(k.get("num_workers")) or real(*a, **k))
    for source in (["--resume", user_files["ck"]], ["--onnx", user_files["onnx"]]):
        evaluate.main([*source, "--images", user_files["photos"], "--output-dir", str(user_files["root"] / "out"),
                       "--num-workers", "2", "--min-size", "64", "--max-size", "96"])
    assert workers == [2, 2]


# Flags a mode would silently ignore: each is refused by name. (argv with {placeholders}, the text of the line.)
IGNORED_FLAGS = [
    pytest.param("--resume {ck} --visualize 1 --output {root}/r.json", "--visualize runs the val images one at a "
                 "time and writes PNGs, no results: drop --output", id="visualize --output"),
    pytest.param("--resume {ck} --visualize 1 --batch-size 2", "drop --batch-size", id="visualize --batch-size"),
    pytest.param("--resume {ck} --visualize 1 --num-workers 1", "drop --num-workers", id="visualize --num-workers"),
    pytest.param("--resume {ck} --score-threshold 0.5", "--score-threshold only act on the PNGs of --images or "
                 "--visualize", id="AP --score-threshold"),
    pytest.param("--resume {ck} --output-dir {root}/pngs", "--output-dir only act on the PNGs", id="AP --output-dir"),
    pytest.param("--resume {ck} --per-layer --score-threshold 0.5", "--score-threshold only act",
                 id="per-layer --score-threshold"),
    pytest.param("--resume {ck} --export-onnx {root}/m2.onnx --num-workers 1", "drop --num-workers",
                 id="export --num-workers"),
    pytest.param("--resume {ck} --export-onnx {root}/m2.onnx --score-threshold 0.5", "drop --score-threshold",
                 id="export --score-threshold"),
    pytest.param("--resume {ck} --export-onnx {root}/m2.onnx --output-dir {root}/pngs", "drop --output-dir",
                 id="export --output-dir"),
]


@pytest.mark.parametrize("argv, named", IGNORED_FLAGS)
def test_a_flag_the_mode_ignores_is_refused(argv, named, user_files, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "load_checkpoint", lambda *a, **k: pytest.fail("work started"))
    before = files_under(user_files["root"])
    code, lines = run_cli(evaluate.cli, argv.format(**user_files).split(), capsys)
    assert_one_line(code, lines, named)
    assert files_under(user_files["root"]) == before


@pytest.mark.parametrize("flags, named", [
    (["--shapes-num-train", "4"], "--dataset custom does not read --shapes-num-train (read by shapes): drop it"),
    (["--shapes-seed", "3", "--shapes-max-objects", "2"],
     "--dataset custom does not read --shapes-seed (read by shapes), --shapes-max-objects (read by shapes)"),
    (["--data-path", "somewhere"], "--dataset custom does not read --data-path (read by shapes, coco, ov-coco, lvis)"),
    (["--dataset", "shapes"], "--dataset shapes does not read --train-json (read by custom), --train-images (read by "
                              "custom), --val-json (read by custom), --val-images (read by custom): drop them"),
], ids=["custom --shapes-num-train", "custom --shapes-seed", "custom --data-path", "shapes --train-json"])
def test_a_flag_of_another_dataset_is_refused(flags, named, tmp_path, capsys):
    code, lines = run_cli(train.cli, [*QUICK, *write_set(tmp_path), "--output-dir", str(tmp_path / "out"), *flags],
                          capsys)
    assert_one_line(code, lines, named)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- text files
LATIN_1 = "bo\xeete\ndisc\n".encode("latin-1")  # 'boîte' as an editor saving Latin-1 writes it
UTF_16 = "box\ndisc\n".encode("utf-16")


@pytest.mark.parametrize("what, content, named", [
    ("--train-json", LATIN_1, "byte 0xee at offset 2"), ("--train-json", UTF_16, "byte 0xff at offset 0"),
    ("--classes-file", LATIN_1, "byte 0xee at offset 2"), ("--classes-file", UTF_16, "byte 0xff at offset 0"),
    ("--classes-file", "box\ndisc\n".encode("utf-16-le"), "it holds NUL bytes"),
    ("config.json", LATIN_1, "byte 0xee at offset 2"),
])
def test_a_text_file_in_another_encoding_is_one_line(what, content, named, user_files, tmp_path, capsys):
    """Every text file a command reads is UTF-8, with or without a byte-order mark; any other encoding is one line
    naming the file and the encoding expected, not a UnicodeDecodeError."""
    path = tmp_path / "text"
    path.write_bytes(content)
    if what == "--train-json":
        argv = [*QUICK, *write_set(tmp_path), "--output-dir", str(tmp_path / "out")]
        argv[argv.index("--train-json") + 1] = str(path)
        code, lines = run_cli(train.cli, argv, capsys)
    elif what == "--classes-file":
        argv = ["--resume", user_files["ck"], "--images", user_files["photos"], "--output-dir", str(tmp_path / "out"),
                "--classes-file", str(path)]
        code, lines = run_cli(evaluate.cli, argv, capsys)
    else:
        (tmp_path / "hf").mkdir()
        path = (tmp_path / "hf" / "config.json")
        path.write_bytes(content)
        (tmp_path / "hf" / "model.safetensors").write_bytes(b"")  # read after config.json
        code, lines = run_cli(evaluate.cli, ["--pretrained", str(tmp_path / "hf")], capsys)
    assert_one_line(code, lines, f"{path} is not UTF-8 (with or without a byte-order mark) text: {named}")


def test_training_categories_clip_cannot_tell_apart_are_one_line(tmp_path, capsys):
    """A JSON whose categories 'box' and 'Box' are two names but one CLIP text: refused before the model is built."""
    cats = [{"id": 1, "name": "box"}, {"id": 2, "name": "Box"}]
    argv = [*QUICK, *write_set(tmp_path, categories=cats), "--output-dir", str(tmp_path / "out"), "--method",
            "alignnet", "--clip-model", "ViT-S-32-alt", "--clip-pretrained", "none"]
    code, lines = run_cli(train.cli, argv, capsys)
    assert_one_line(code, lines, "class names 'box' and 'Box' get the same label-dictionary row (CLIP's tokenizer "
                                 "lower-cases text")
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


# ---------------------------------------------------------------------------------------------- the wrong thing named
@pytest.mark.parametrize("argv, named", [
    ("evaluate --onnx {root} --images {photos}", "--onnx {root} is a folder, expected an .onnx file"),
    ("evaluate --resume {ck} --images {photos} --classes-file {root}", "--classes-file {root} is a folder, expected a "
                                                                        "text file"),
    ("evaluate --resume {ck} --images {photos} --label-embeddings {root}", "--label-embeddings {root} is a folder"),
    ("evaluate --resume {ck} --val-json {root} --val-images {photos}", "annotation file {root} is a folder"),
    ("evaluate --resume {ck} --val-json {val_json} --val-images {val_json}", "image folder {val_json} is a file"),
    ("train --label-embeddings {root}", "--label-embeddings {root} is a folder"),
    ("train --train-json {root}", "annotation file {root} is a folder"),
], ids=["--onnx", "--classes-file", "evaluate --label-embeddings", "--val-json", "--val-images", "train "
        "--label-embeddings", "--train-json"])
def test_a_folder_for_a_file_and_a_file_for_a_folder_are_named_so(argv, named, user_files, tmp_path, capsys):
    cli, *argv = argv.format(**user_files).split()
    if cli == "train":
        argv = [*QUICK, *write_set(tmp_path / "set"), "--output-dir", str(tmp_path / "out"), *argv]
    code, lines = run_cli(train.cli if cli == "train" else evaluate.cli, argv, capsys)
    assert_one_line(code, lines, named.format(**user_files))


def test_an_onnx_file_of_another_model_is_one_line(user_files, tmp_path, capsys):
    """Our metadata on a graph with other inputs (or other outputs): one line naming them, not onnxruntime's
    traceback at the first image."""
    for name, argv in (("inputs", dict(inputs=("pixel_values", "pixel_mask"))), ("outputs", dict(queries=5))):
        path = graph_file(tmp_path / f"{name}.onnx", **argv)
        if name == "outputs":  # another output name: the graph gives 'logits' where ours gives 'pred_logits'
            import onnx
            model = onnx.load(path)
            for node in model.graph.node:
                node.output[:] = ["logits" if out == "pred_logits" else out for out in node.output]
            model.graph.output[0].name = "logits"
            onnx.save(model, path)
        code, lines = run_cli(evaluate.cli, ["--onnx", path, "--images", user_files["photos"], "--output-dir",
                                             str(tmp_path / "out")], capsys)
        assert_one_line(code, lines, f"--onnx: the graph of {path} has {name} [")
        assert "expected [images tensor(float) of rank 4, mask tensor(bool) of rank 3]" in lines[0] or \
            "expected [pred_logits tensor(float) of rank 3, pred_boxes tensor(float) of rank 3]" in lines[0]
    assert not (tmp_path / "out").exists()


class FillingDisk:
    """A file on a disk that fills up after `room` bytes: writes beyond it fail with ENOSPC, as a real full disk
    fails them (the first checkpoint of a run fits, the second does not)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(28, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_disk_filling_up_inside_the_second_checkpoint_is_one_line(shapes, tmp_path, capsys, monkeypatch):
    """torch's zip writer turns a write failing mid-file into its own RuntimeError ('unexpected pos'); the run
    reports the full disk in one line, and the first epoch's checkpoint stays whole."""
    out = tmp_path / "out"
    argv = [*QUICK, *shapes, "--output-dir", str(out), "--epochs", "2"]
    real_open, opened = open, []

    def open_on_a_filling_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if str(path).endswith(".tmp") and "checkpoint.pth" in str(path):
            opened.append(path)
            if len(opened) == 2:
                return FillingDisk(f, room=5000)
        return f
    monkeypatch.setattr(errors, "open", open_on_a_filling_disk, raising=False)
    code, lines = run_cli(train.cli, argv, capsys)
    assert_one_line(code, lines, f"cannot write {out / 'checkpoint.pth'}: No space left on device (the previous "
                                 "file is kept)")
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] == 0
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "log.jsonl"]


def test_a_full_disk_while_writing_pngs_or_the_log_is_one_line(user_files, tmp_path, capsys, monkeypatch):
    """The annotated PNGs (PIL opens their temporary files) and --log's appended line: one line each."""
    real_open = open

    def open_on_a_full_disk(full):
        """open() whose files for writing of the kind `full(path, mode)` names are on a full disk."""
        return lambda path, mode="r", *a, **k: (real_open("/dev/full", "w" + mode.strip("wa")) if full(str(path), mode)
                                                else real_open(path, mode, *a, **k))
    argv = ["--resume", user_files["ck"], "--images", user_files["photos"], "--min-size", "64", "--max-size", "96"]
    png = lambda path, mode: ".png." in path and path.endswith(TEMP)  # noqa: E731  a PNG's temporary file
    monkeypatch.setattr("builtins.open", open_on_a_full_disk(png))
    code, lines = run_cli(evaluate.cli, [*argv, "--output-dir", str(tmp_path / "pngs")], capsys)
    assert_one_line(code, lines, f"cannot write {tmp_path / 'pngs' / 'a.png'}: No space left on device")
    monkeypatch.undo()
    monkeypatch.setattr(errors, "open", open_on_a_full_disk(lambda path, mode: "a" in mode), raising=False)
    code, lines = run_cli(evaluate.cli, [*argv, "--output-dir", str(tmp_path / "out"), "--log",
                                         str(tmp_path / "log.jsonl")], capsys)
    assert_one_line(code, lines, f"cannot write {tmp_path / 'log.jsonl'}: No space left on device")
    assert not [n for n in os.listdir(tmp_path / "pngs") if n.endswith(TEMP)]  # no half PNG left behind


# ---------------------------------------------------------------------------------------------- bench.py
@pytest.mark.parametrize("argv, named", [
    (["attn", "--repeats", "0"], "--repeats 0: expected a number >= 1"),
    (["train", "--steps", "0"], "--steps 0: expected a number >= 1"),
    (["amp", "--rounds", "-1"], "--rounds -1: expected a number >= 1"),
    (["hf", "--size", "64"], "--size 64: expected at least 160 pixels"),
    (["attn", "--device", "gpu0"], "--device 'gpu0' is not a device"),
    (["train", "--methods", "baseline", "clip"], "argument --methods: invalid choice: 'clip'"),
    (["train", "--steps", "1", "--methods", "baseline", "--", "--no-such-flag"],
     "bench.py train: the run of --dataset shapes --device cpu --num-workers 0 --no-such-flag --method baseline "
     "failed: unrecognized arguments: --no-such-flag"),
] + ([(["attn", "--device", "cuda"], "--device 'cuda': no CUDA GPU is visible")] if not torch.cuda.is_available()
     else []), ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bench_is_a_command_like_the_others(argv, named, capsys):
    """bench.py's flags end in one line and exit status 2, as train.py's do; so does a worker's failure, which its
    parent reports with the worker's own line instead of a CalledProcessError traceback."""
    import bench
    code, lines = run_cli(bench.cli, argv, capsys)
    assert_one_line(code, lines, named)


# ---------------------------------------------------------------------------------------------- classes by name
def test_compare_names_the_second_checkpoints_boxes_by_its_own_classes(checkpoint, tmp_path, capsys, monkeypatch):
    """--visualize --compare CKPT2: CKPT2's head rows are its classes in its order (here the other way round), so
    its boxes are named by them; a CKPT2 of other classes than the val set's is named, before any image."""
    ckpt = torch.load(checkpoint, weights_only=False)
    for name, classes in (("swapped", ["disc", "box"]), ("other", ["box", "star"])):
        torch.save(dict(ckpt, classes={"ids": [1, 2], "names": classes}), tmp_path / f"{name}.pth")
    drawn = []
    monkeypatch.setattr(evaluate, "draw_detections", lambda image, pred, class_names, threshold:
                        drawn.append(list(class_names)) or image)
    argv = ["--resume", checkpoint, "--visualize", "1", "--output-dir", str(tmp_path / "maps")]
    evaluate.main([*argv, "--compare", str(tmp_path / "swapped.pth")])
    assert drawn == [["box", "disc"], ["disc", "box"]]
    code, lines = run_cli(evaluate.cli, [*argv, "--compare", str(tmp_path / "other.pth")], capsys)
    assert_one_line(code, lines, "only the model has ['star'], only the val set has ['disc']")


# ---------------------------------------------------------------------------------------------- run folders
HELD = {"checkpoint and log": ("checkpoint.pth", "log.jsonl"), "log only": ("log.jsonl",),
        "checkpoint only": ("checkpoint.pth",)}


# --resume auto in a folder with a checkpoint continues that run (documented), so it meets only the log.
@pytest.mark.parametrize("how, held", [(how, held) for how in ("fresh", "--resume auto", "--resume elsewhere")
                                       for held in HELD if how != "--resume auto" or held == "log only"],
                         ids=lambda value: value)
def test_a_run_never_writes_over_another_runs_files(how, held, shapes, tmp_path, capsys):
    """Every way a run chooses its folder, against a folder holding another run's files: refused in one line, both
    runs' files byte for byte."""
    held = HELD[held]
    other, run_a = tmp_path / "b", tmp_path / "a"
    for folder, names in ((other, held), (run_a, ("checkpoint.pth", "log.jsonl"))):
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(f"{folder.name}'s {name}".encode())
    before = files_under(tmp_path)
    resume = {"fresh": [], "--resume auto": ["--resume", "auto"],
              "--resume elsewhere": ["--resume", str(run_a / "checkpoint.pth")]}[how]
    code, lines = run_cli(train.cli, [*QUICK, *shapes, "--output-dir", str(other), "--epochs", "2", *resume], capsys)
    assert_one_line(code, lines, f"--output-dir {other} holds {' and '.join(held)} of an earlier run, which this run "
                                 "would overwrite")
    assert files_under(tmp_path) == before


def test_a_run_resumed_from_elsewhere_fills_an_empty_folder_and_a_linked_folder_continues(shapes, tmp_path, capsys):
    """--resume a/checkpoint.pth --output-dir b/ with b/ empty: b/ gets the run, a/ stays as it was; the folder's
    own checkpoint named through a symlinked folder is that run continued."""
    argv = [*QUICK, *shapes]
    train.main(parse_args(*argv, "--output-dir", tmp_path / "a"))
    first = files_under(tmp_path / "a")
    train.main(parse_args(*argv, "--output-dir", tmp_path / "b", "--epochs", "2", "--resume",
                          tmp_path / "a" / "checkpoint.pth"))
    assert files_under(tmp_path / "a") == first
    assert torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=False)["epoch"] == 1
    os.symlink(tmp_path / "b", tmp_path / "b-link")
    train.main(parse_args(*argv, "--output-dir", tmp_path / "b", "--epochs", "3", "--resume",
                          tmp_path / "b-link" / "checkpoint.pth"))
    assert torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=False)["epoch"] == 2


@pytest.mark.parametrize("method, flags, said", [
    ("baseline", ["--align-feature", "label", "--dynql-rho", "0.5"], "--align-feature and --dynql-rho not used by "
                                                                      "--method baseline"),
    ("dynql", ["--align-loss-coef", "2"], "--align-loss-coef not used by --method dynql"),
    ("alignnet", ["--dynql-betas", "0.5"], "--dynql-betas not used by --method alignnet"),
])
def test_training_module_flags_a_method_does_not_use_are_said_so(method, flags, said, tmp_path, capsys):
    """A Table 4 sweep gives every method the same flags: a method that builds no AlignNet, no alignment loss or no
    DynQL says which of them it does not use (the methods that do use them say nothing)."""
    parse_args(*QUICK, *write_set(tmp_path), "--method", method, *flags)
    assert said in capsys.readouterr().out
    parse_args(*QUICK, *write_set(tmp_path), "--method", "clip-detr", *flags)
    assert "not used" not in capsys.readouterr().out
