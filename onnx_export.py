"""ONNX: a checkpoint's inference graph written as ONNX, and detection through that file in onnxruntime (CPU).

`python evaluate.py --resume CKPT --export-onnx FILE` calls `export_onnx`; `python evaluate.py --onnx FILE --images
DIR` runs `OnnxDetector`, which behaves as the detector does for evaluate.py's `detect_folder`.

The graph is the detector `build.checkpoint_detector` builds: any --method exports as the plain Deformable DETR it
is at inference. Its deformable attention is the PyTorch reference (grid_sample, ONNX GridSample from opset 16)
whatever --attn-impl the checkpoint names.
  inputs    images (B, 3, H, W) float32 as the val transforms and data.collate_fn leave them (resized,
            ImageNet-normalized, zero-padded bottom/right); mask (B, H, W) bool, True on padding
  outputs   pred_logits (B, Q, K) class logits of the last decoder layer (sigmoid scores, no background class);
            pred_boxes (B, Q, 4) normalized (cx, cy, w, h), relative to each image's unpadded extent
  dynamic   B >= 1 and H, W >= ONNX_MIN_SIDE (OnnxDetector pads a smaller batch up to it with the mask); K is
            fixed; Q = min(num_queries, S_all): two-stage, an image of fewer memory positions than queries keeps
            them all
  outside   decoding, resizing, normalizing and padding images, and the top-k post-processing (PostProcess)
  metadata  class names and category ids, the val transforms' dataset and sizes, the batch size and the top-k
            (metadata_props, JSON values), so the file alone runs `--onnx FILE --images DIR`; OnnxDetector checks
            the graph's inputs and outputs too (`check_graph_signature`), so another model carrying the metadata
            is one line, not an onnxruntime error at the first image
Exporter: torch.onnx.export(dynamo=True) (torch.export and onnxscript). The TorchScript exporter records the level
sizes as constants, and its graph gave wrong boxes, silently, at any size but the traced one; torch.export keeps
H and W symbolic because model.py carries the level sizes as Python ints (`level_shapes`) and builds its grids
with arange. The price is export time: about a minute of CPU for the COCO model.

No equations. Shape legend: B batch, Q queries, K classes, H x W the padded batch in pixels, S_all the flattened
memory length.
Deviations from the paper: none (the paper has no export); the graph's deformable attention is the reference
`ms_deform_attn_pytorch`, whatever --attn-impl the checkpoint names.
"""
import contextlib
import importlib
import io
import json
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from errors import InputError, user_file, write_atomically
from model import MSDeformAttn

# H and W from this size up: the stride-64 level then has at least 2 rows and columns. torch.export decides the
# size-1 cases of its shape rules once, from the example, and guards the range it traced.
ONNX_MIN_SIDE = 65
# The tracing example: batch 2 and H != W, as torch.export fixes a size of 1 and may tie sizes equal in the
# example; every level at least 2 pixels.
ONNX_EXAMPLE_SIZE = (2, 128, 160)
ONNX_INPUTS, ONNX_OUTPUTS = ("images", "mask"), ("pred_logits", "pred_boxes")
ONNX_OPSET = 18
ONNX_FORMAT = "clip-detr-onnx-1"  # metadata 'format': the files this module writes
ONNX_METADATA_KEYS = ("format", "class_names", "cat_ids", "dataset", "min_size", "max_size", "batch_size",
                      "num_select", "min_side")


def require_package(module, flag):
    """Import an optional package of the ONNX paths; missing, one InputError line saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(f"{flag} needs the optional package '{module}': pip install onnx onnxruntime onnxscript "
                         "(or pip install -r requirements-test.txt)") from None


@contextlib.contextmanager
def reference_attention(model):
    """Inside the block every MSDeformAttn of `model` runs ms_deform_attn_pytorch, the one with an ONNX form."""
    layers = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    saved = [m.attn_impl for m in layers]
    for m in layers:
        m.attn_impl = "pytorch"
    try:
        yield model
    finally:
        for m, impl in zip(layers, saved):
            m.attn_impl = impl


class InferenceGraph(nn.Module):
    """The detector as exported: (images, mask) -> (pred_logits, pred_boxes) of the last decoder layer; the
    auxiliary and encoder outputs are not returned, so the exporter leaves them out of the graph."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, images, mask):
        out = self.detector(images, mask)
        return out["pred_logits"], out["pred_boxes"]


def export_onnx(model, path, *, metadata):
    """Write the inference graph of `model` (a DeformableDETR on the CPU) to `path`, with `metadata` (names to
    JSON-able values) in its metadata_props. Returns the file's size in bytes."""
    require_package("onnx", "--export-onnx")
    require_package("onnxscript", "--export-onnx")
    B, H, W = ONNX_EXAMPLE_SIZE
    example = (torch.zeros(B, 3, H, W), torch.zeros(B, H, W, dtype=torch.bool))
    batch = torch.export.Dim("B", min=1)
    height, width = torch.export.Dim("H", min=ONNX_MIN_SIDE), torch.export.Dim("W", min=ONNX_MIN_SIDE)
    dynamic = {"images": {0: batch, 2: height, 3: width}, "mask": {0: batch, 1: height, 2: width}}
    graph = InferenceGraph(model).eval()
    # The exporter reports its steps on stdout and warns that the images' and the mask's axes share names.
    # optimize=False: onnxscript's graph optimizer cost 10-20 s a graph and no latency (onnxruntime folds it).
    with reference_attention(model), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
        program = torch.onnx.export(graph, example, dynamo=True, opset_version=ONNX_OPSET, input_names=ONNX_INPUTS,
                                    output_names=ONNX_OUTPUTS, dynamic_shapes=dynamic, optimize=False,
                                    verbose=False)
    for key, value in metadata.items():
        program.model.metadata_props[key] = json.dumps(value)
    write_atomically(path, lambda tmp: program.save(tmp, external_data=False))
    return os.path.getsize(path)


# What the graph of export_onnx takes and gives: (name, onnxruntime's type, rank).
ONNX_SIGNATURE = {"inputs": (("images", "tensor(float)", 4), ("mask", "tensor(bool)", 3)),
                  "outputs": (("pred_logits", "tensor(float)", 3), ("pred_boxes", "tensor(float)", 3))}


def check_graph_signature(session, path, flag):
    """The loaded graph's inputs and outputs must be those export_onnx writes: another model carrying the same
    metadata would otherwise fail inside onnxruntime's run, or give outputs of another meaning."""
    found = {"inputs": session.get_inputs(), "outputs": session.get_outputs()}
    for side, wanted in ONNX_SIGNATURE.items():
        have = tuple((arg.name, arg.type, len(arg.shape)) for arg in found[side])
        if have != wanted:
            show = lambda args: ", ".join(f"{n} {t} of rank {r}" for n, t, r in args)  # noqa: E731
            raise InputError(f"{flag}: the graph of {path} has {side} [{show(have)}], expected [{show(wanted)}] (a "
                             "file written by evaluate.py --export-onnx)")


class OnnxDetector:
    """An exported graph in onnxruntime (CPU) behind the detector's interface: called on (images, mask) it returns
    {"pred_logits", "pred_boxes"} as torch tensors, so `predict` and `detect_folder` run it as the model.

    spin=False stops onnxruntime's threads from busy-waiting for the next run after each one (its default, for
    latency), which would take the CPU from whatever runs next: bench.py alternates it with eager PyTorch.
    """

    def __init__(self, path, flag="--onnx", spin=True):
        ort = require_package("onnxruntime", flag)
        user_file(path, flag, "an .onnx file written by evaluate.py --export-onnx")
        state = ort.capi.onnxruntime_pybind11_state  # where onnxruntime's exception classes live
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except (state.InvalidProtobuf, state.InvalidArgument, state.Fail) as err:
            reason = str(err).splitlines()[0].split("failed:")[-1].strip()[:160]
            raise InputError(f"{flag}: {path} is not an ONNX model onnxruntime can load ({reason}), expected a file "
                             "written by evaluate.py --export-onnx") from None
        stored = self.session.get_modelmeta().custom_metadata_map
        if stored.get("format") != json.dumps(ONNX_FORMAT) or any(key not in stored for key in ONNX_METADATA_KEYS):
            raise InputError(f"{flag}: {path} lacks the metadata of evaluate.py --export-onnx ({ONNX_FORMAT}: class "
                             "names, transforms), expected a file written by evaluate.py --export-onnx")
        check_graph_signature(self.session, path, flag)
        self.metadata = {key: json.loads(value) for key, value in stored.items()}
        self.min_side = self.metadata["min_side"]

    def eval(self):
        """`predict` puts its model in eval mode; the graph has no other."""
        return self

    def __call__(self, images, mask):
        """images (B, 3, H, W) float32, mask (B, H, W) bool -> {"pred_logits" (B, Q, K), "pred_boxes" (B, Q, 4)}."""
        pad_h, pad_w = max(self.min_side - images.shape[2], 0), max(self.min_side - images.shape[3], 0)
        if pad_h or pad_w:
            # The graph takes H, W >= min_side: padded as collate_fn pads a batch, bottom/right, marked by the mask.
            images = F.pad(images, (0, pad_w, 0, pad_h))  # (B, 3, H', W')
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=True)  # (B, H', W')
        logits, boxes = self.session.run(list(ONNX_OUTPUTS), {"images": images.float().contiguous().numpy(),
                                                              "mask": mask.contiguous().numpy()})
        return {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes)}
