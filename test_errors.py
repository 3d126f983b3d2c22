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
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import build
import data
import evaluate
import train
from conftest import HERE, TINY_MODEL, parse_args
from errors import InputError, error_line

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


def write_set(root, images=None, annotations=None, categories=None, files=None):
    """A COCO-format set under root: three W x H PNGs with one box each, parts replaceable (`files` maps a name
    to the bytes it gets, None removing it); returns its flags."""
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
                   "categories": categories or [{"id": 1, "name": "box"}, {"id": 2, "name": "disc"}]}, f)
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
    pytest.param(dict(images=THREE[:2] + [{"id": 3, "file_name": "3.jpg", "width": H, "height": W}],
                      files={"3.jpg": rotated_jpeg((W, H), 6)}),
                 [f"3.jpg is {W}x{H} but", "EXIF-rotated view (orientation 6)"], id="JSON has the EXIF-rotated size"),
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
    path = _checkpoint_file(kind, out / "checkpoint.pth", {"hidden_dim": 32})
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
    for argv, named in ((["train.py", "--device", "gpu0"], "gpu0"),
                        (["evaluate.py", "--resume", str(tmp_path / "empty.pth")], "empty.pth")):
        result = subprocess.run([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]], capture_output=True,
                                text=True, timeout=300, cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert_one_line(result.returncode, result.stderr.strip().splitlines(), named)


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
    names, skipped, subfolders = evaluate.list_images(str(folder))
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
