"""Tests for evaluate.py's ONNX paths: `evaluate.py --resume CKPT --export-onnx FILE` and `evaluate.py --onnx FILE --images DIR`
(onnxruntime on the CPU). Needs onnx, onnxruntime and onnxscript (requirements-test.txt); no network.

Two checkpoints are exported, once per module, as two `python evaluate.py --export-onnx` processes running at
the same time (tracing is mostly one thread, about a minute of CPU each): a tiny `shapes` CLIP-DETR checkpoint
whose run named --attn-impl gather, and the COCO model configuration (ResNet-50, width 256, 8 heads, 4 levels,
two-stage + box refinement) with 1+1 layers and 150 queries; random weights.

Tolerance of graph against eager model, both float32: |difference| <= 1e-4 + 1e-4 * |eager|, logits and boxes.
The two run the same operations with other kernels (oneDNN against MLAS convolutions and GEMMs, other orders of
the sums in the norms, softmax and GridSample), each off by a few float32 roundings (1e-7 relative); Group- and
LayerNorms keep the activations O(1), so logits of magnitude up to 12 differ by at most 8e-6 here and boxes by
2.4e-7 (1.4e-6 and 1.2e-7 for the COCO configuration at 800x1088): a margin above 10x. The bound still means
nothing visible, a score moved by at most 2.5e-5 (x 1 + |logit|) and a box by 0.13 pixel at 1333 pixels, while a
wrong mask, a size fixed at tracing or another attention moves them by 1e-2 or more. The one step that is not
continuous, the two-stage top-k choice of proposals, would swap a whole query on a tie closer than the rounding;
none occurs on these seeded inputs.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import build
import evaluate
import onnx_export
from conftest import HERE, parse_args
from data import SHAPES_CATEGORIES

# Command lines, whole runs and exports: the full tier only (`pytest -m "not slow"` leaves them out).
pytestmark = pytest.mark.slow

SHAPES_MODEL = ["--dataset", "shapes", "--hidden-dim", "32", "--dim-feedforward", "64", "--enc-layers", "1",
                "--dec-layers", "2", "--nheads", "4", "--num-queries", "10", "--batch-size", "2", "--min-size", "96",
                "--max-size", "128", "--method", "clip-detr", "--attn-impl", "gather"]
COCO_MODEL = ["--dataset", "coco", "--enc-layers", "1", "--dec-layers", "1", "--num-queries", "150",
              "--method", "baseline", "--clip-pretrained", "none", "--clip-model", "RN50"]
ATOL = RTOL = 1e-4
# (H, W) of the two sizes per configuration, neither the tracing example's 128x160. COCO 65x72 has 119 memory
# locations, fewer than its 150 queries: the two-stage top-k then keeps all 119 (Q is min(queries, S_all)).
SIZES = {"shapes": [(80, 112), (136, 96)], "coco": [(65, 72), (136, 200)]}


def save_checkpoint(path, argv, class_names, seed, spread=False):
    """A checkpoint as train.py writes it (model, args, classes), random weights; returns its path.

    spread: class heads' weights x6 and random last box layers, so that, unlike at initialization, scores are
    spread out (every query scores near the 0.01 prior there) and boxes are not exactly the proposals, whose
    corners sit on whole pixels (where a float32 difference would move a drawn edge by one pixel)."""
    args = parse_args(*argv, "--device", "cpu", "--output-dir", os.path.dirname(path))
    torch.manual_seed(seed)
    model, _, _ = build.build_model(args, class_names)
    if spread:
        with torch.no_grad():
            for head in model.class_embed:
                head.weight.mul_(6.0)
            for head in model.bbox_embed:
                head.layers[-1].weight.normal_(std=0.02)
    torch.save({"model": model.state_dict(), "args": vars(args),
                "classes": {"ids": list(range(1, len(class_names) + 1)), "names": class_names}}, path)
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{config: (checkpoint, onnx file)}: both exported by the CLI, in two processes at once."""
    root = tmp_path_factory.mktemp("onnx")
    shapes_names = [name for name, _, _ in SHAPES_CATEGORIES]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIP_DETR_CACHE", str(root / "cache"))  # clip-detr's random-weight CLIP label dictionary
        # Spread out: 7 to 11 detections per image pass the PNGs' threshold 0.3, none closer than 8e-4 in score.
        ckpts = {"shapes": save_checkpoint(root / "shapes.pth", SHAPES_MODEL, shapes_names, seed=0, spread=True),
                 "coco": save_checkpoint(root / "coco.pth", COCO_MODEL, [f"class {k}" for k in range(80)], seed=0)}
    runs = {}
    for config, ckpt in ckpts.items():
        cmd = [sys.executable, "evaluate.py", "--resume", ckpt, "--export-onnx", str(root / f"{config}.onnx")]
        runs[config] = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=dict(os.environ, HF_HUB_OFFLINE="1"))
    for config, run in runs.items():
        out, err = run.communicate(timeout=900)
        assert run.returncode == 0, err
        assert f"wrote {root / config}.onnx" in out, out
    return {config: (ckpt, str(root / f"{config}.onnx")) for config, ckpt in ckpts.items()}


def eager_detector(ckpt_path):
    """The checkpoint's detector as --export-onnx builds it, with the reference attention."""
    ckpt = torch.load(ckpt_path, weights_only=False)
    args = build.checkpoint_args(ckpt, {"device": "cpu", "attn_impl": "pytorch"})
    return build.checkpoint_detector(ckpt, args, ckpt["classes"]["names"], ckpt_path)[0]


def batch(sizes, seed):
    """Random normalized images of the given (h, w), padded as data.collate_fn pads: (B, 3, H, W), (B, H, W)."""
    g = torch.Generator().manual_seed(seed)
    H, W = max(h for h, _ in sizes), max(w for _, w in sizes)
    images, mask = torch.zeros(len(sizes), 3, H, W), torch.ones(len(sizes), H, W, dtype=torch.bool)
    for b, (h, w) in enumerate(sizes):
        images[b, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[b, :h, :w] = False
    return images, mask


def test_export_writes_one_self_contained_file_with_dynamic_batch_height_and_width(exported):
    import onnx
    ckpt, path = exported["shapes"]
    graph = onnx.load(path)
    name = os.path.basename(path)
    assert [n for n in os.listdir(os.path.dirname(path)) if n.startswith(name)] == [name]  # no external data
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert list(dims) == ["images", "mask"]
    assert [isinstance(d, str) for d in dims["images"]] == [True, False, True, True] and dims["images"][1] == 3
    assert dims["mask"] == [dims["images"][0], *dims["images"][2:]]
    assert [o.name for o in graph.graph.output] == ["pred_logits", "pred_boxes"]
    # The checkpoint's run named --attn-impl gather; the graph samples with GridSample all the same.
    assert "GridSample" in {node.op_type for node in graph.graph.node}
    meta = {p.key: json.loads(p.value) for p in graph.metadata_props}
    stored = torch.load(ckpt, weights_only=False)
    assert meta["class_names"] == stored["classes"]["names"] and meta["cat_ids"] == stored["classes"]["ids"]
    assert (meta["dataset"], meta["min_size"], meta["max_size"], meta["batch_size"]) == ("shapes", 96, 128, 2)
    assert meta["method"] == "clip-detr" and meta["num_select"] == 100


@pytest.mark.parametrize("config", ["shapes", "coco"])
def test_graph_equals_the_eager_model_at_two_sizes_with_and_without_padding(exported, config):
    ckpt, path = exported[config]
    model = eager_detector(ckpt)
    detector = onnx_export.OnnxDetector(path)
    cases = []
    for h, w in SIZES[config]:
        cases.append([(h, w)])  # one image, no padding
        cases.append([(h, w), (h - 17, w - 30)])  # the second image padded bottom and right
    for seed, sizes in enumerate(cases):
        images, mask = batch(sizes, seed)
        with torch.no_grad():
            want = model(images, mask)
        got = detector(images, mask)
        for key in ("pred_logits", "pred_boxes"):
            assert got[key].shape == want[key].shape, (sizes, key)
            torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=RTOL, msg=f"{config} {sizes} {key}")
    if config == "coco":
        assert got["pred_logits"].shape[1] == 150 and detector(*batch([(65, 72)], 0))["pred_logits"].shape[1] == 119


def test_a_batch_below_the_graphs_minimum_side_is_padded_up_to_it_with_the_mask(exported):
    ckpt, path = exported["shapes"]
    model = eager_detector(ckpt)
    images, mask = batch([(40, 90), (30, 70)], seed=5)
    got = onnx_export.OnnxDetector(path)(images, mask)
    rows = onnx_export.ONNX_MIN_SIDE - 40
    with torch.no_grad():  # the same images with 25 rows of padding more, as a batch with a taller image has
        want = model(F.pad(images, (0, 0, 0, rows)), F.pad(mask, (0, 0, 0, rows), value=True))
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=RTOL)


def write_images(folder):
    """Three images of different aspect ratios, one a JPEG; in batches of 2 (the checkpoint's) one is padded."""
    os.makedirs(folder)
    for k, (w, h) in enumerate([(120, 90), (90, 140), (200, 110)]):
        image = Image.new("RGB", (w, h), (120 + 30 * k, 120, 140 - 20 * k))
        draw = ImageDraw.Draw(image)
        draw.ellipse((10, 10, 10 + w // 3, 10 + h // 3), fill=(220, 30, 30))
        draw.rectangle((w // 2, h // 2, w - 8, h - 8), fill=(30, 180, 50))
        image.save(os.path.join(folder, f"img{k}.png" if k != 1 else "img1.jpg"))


def test_folder_detection_through_onnxruntime_equals_the_pytorch_path(exported, tmp_path):
    ckpt, path = exported["shapes"]
    write_images(tmp_path / "images")
    common = ["--images", str(tmp_path / "images")]
    evaluate.main(["--resume", ckpt, *common, "--output-dir", str(tmp_path / "torch")])
    log = evaluate.main(["--onnx", path, *common, "--output-dir", str(tmp_path / "onnx")])
    assert log["num_images"] == 3
    want = json.load(open(tmp_path / "torch" / "results.json"))
    got = json.load(open(tmp_path / "onnx" / "results.json"))
    # Every query x class is kept (10 x 8 < 100), so the two lists hold the same detections; the order of near-equal
    # scores may differ, so each eager detection is matched to the closest one of its image and class.
    assert len(got) == len(want) == 3 * 10 * 8
    unmatched = list(got)
    for det in want:
        same = [d for d in unmatched if (d["file_name"], d["category_id"]) == (det["file_name"], det["category_id"])]
        best = min(same, key=lambda d: np.abs(np.subtract(d["bbox"], det["bbox"])).max())
        assert np.abs(np.subtract(best["bbox"], det["bbox"])).max() <= 0.01, (det, best)  # pixels
        assert abs(best["score"] - det["score"]) <= 2e-5, (det, best)
        assert best["image_id"] == det["image_id"]
        unmatched.remove(best)
    names = sorted(n for n in os.listdir(tmp_path / "torch") if n.endswith(".png"))
    assert names == sorted(n for n in os.listdir(tmp_path / "onnx") if n.endswith(".png")) and len(names) == 3
    assert {d["file_name"] for d in want if d["score"] >= 0.3} == {"img0.png", "img1.jpg", "img2.png"}  # boxes drawn
    for name in names:
        a, b = (np.asarray(Image.open(tmp_path / run / name)) for run in ("torch", "onnx"))
        # Box edges are whole pixels: a corner within float32 noise of an integer may land one pixel over.
        assert a.shape == b.shape and (a != b).any(-1).mean() < 0.02, name


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.cli(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("missing, argv", [
    ("onnxruntime", ["--onnx", "model.onnx", "--images", "."]),
    ("onnxscript", ["--resume", "ckpt.pth", "--export-onnx", "model.onnx"]),
    ("onnx", ["--resume", "ckpt.pth", "--export-onnx", "model.onnx"]),
])
def test_a_missing_package_is_one_line_saying_what_to_install(missing, argv, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    line = run_cli(argv, capsys)
    assert f"'{missing}'" in line and "pip install onnx onnxruntime onnxscript" in line, line


def test_bad_onnx_input_is_one_line(tmp_path, capsys, monkeypatch):
    import onnx
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.onnx").write_text("not a model")
    assert "is not an ONNX model" in run_cli(["--onnx", "notes.onnx", "--images", "."], capsys)
    foreign = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(foreign, tmp_path / "foreign.onnx")
    assert "lacks the metadata" in run_cli(["--onnx", "foreign.onnx", "--images", "."], capsys)
    assert "none.onnx not found" in run_cli(["--onnx", "none.onnx", "--images", "."], capsys)
    assert "add --images DIR" in run_cli(["--onnx", "foreign.onnx"], capsys)
    assert "drop --device" in run_cli(["--onnx", "foreign.onnx", "--images", ".", "--device", "cpu"], capsys)
    assert "drop --images" in run_cli(["--resume", "ckpt.pth", "--export-onnx", "m.onnx", "--images", "."], capsys)
    assert "add --resume" in run_cli(["--onnx", "foreign.onnx", "--export-onnx", "m.onnx"], capsys)
    assert "is a folder" in run_cli(["--resume", "ckpt.pth", "--export-onnx", "."], capsys)
