"""transformers' `DeformableDetrForObjectDetection` as the yardstick this suite did not write, and its checkpoints
as weights (build.py): for each variant (plain, box refinement, two-stage + box refinement) a random-weight
transformers model with the hub's timm ResNet is saved with `save_pretrained`, loaded through hf_port, and both
detectors run on the same padded batch of two image sizes in float64: eval-mode outputs of every decoder layer and
of the two-stage encoder head, and, in training mode with dropout 0, the gradient of one shared scalar of those
outputs with respect to every parameter. A hub layout (flat config.json, pytorch_model.bin with the head aliases,
ResNet-50, the 91-row COCO head) is served as hf:ORG/NAME from a local cache, offline; and both command lines.

Shape legend: B batch, Q queries, K classes (91 COCO ids in transformers' heads, 80 in the COCO dataset's),
C model width, S_all flattened encoder memory, L feature levels.

Tolerances (TOL, GRAD_RTOL): both models compute in float64, except where the official code itself fixes float32
(position encoding, valid ratios, encoder reference points, two-stage proposal grid), which `official_precision`
makes transformers do too; the two detectors then differ only in summation order (frozen BN folded into the conv
or not, one packed in_proj or three projections, SDPA or nn.MultiheadAttention). Measured: 5e-15 on outputs of
size ~3 and 1e-14 relative on gradients. TOL (1e-10 absolute and relative) and GRAD_RTOL (1e-10 of each
gradient's largest entry) leave 10^4 of headroom for other BLAS builds. Of the bugs planted to check these tests,
the subtlest (the position encoding's eps 1e-5 for 1e-6) moves outputs by 2e-6: 4 orders above TOL, and below
the noise of a float32 comparison; the others move outputs or gradients by 0.1 to 5.

transformers departs from the official fundamentalvision/Deformable-DETR code in these places, each shown by a
test here; model.py keeps the official behaviour and the yardstick is bent back to it only for the first:
  1. precision: position encoding, valid ratios (so encoder reference points) and proposal grids in the model's
     dtype (official: float32), the two-stage proposal embedding in float32 (official: the proposals' dtype).
     Equal in float32; float32 rounding apart in float64 (test_transformers_computes_geometry_at_other_precisions).
  2. transformers 5 trains the timm ResNet's stem and layer1, which the official code freezes for trained weights
     (its freeze rule looks for "resnet" in the backbone's model_type, "timm_backbone"); its own ResNet it
     freezes whole (test_transformers_5_freezes_other_resnet_layers_than_the_official_code).
  3. dropout on the encoder input, which the official encoder does not have
     (test_transformers_drops_out_the_encoder_input).
  4. default config: no dropout on the decoder self-attention weights nor after the FFN activation (official:
     --dropout on both), which the hub's config.json files carry (test_transformers_default_dropouts).
  5. a freshly built box-refinement model without two-stage has one class head tied across decoder layers
     (official: one per layer); save_pretrained then writes only head 0, which hf_port gives every layer
     (test_transformers_5_ties_the_class_heads_of_a_box_refinement_model).

Deviations from the paper: none (no paper equation is tested here).
"""
import json
import math
import shutil
import types

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="transformers is a test requirement: "
                                                          "pip install -r requirements-test.txt")
import huggingface_hub.constants  # noqa: E402
from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection  # noqa: E402
from transformers.models.deformable_detr import modeling_deformable_detr as hf_modeling  # noqa: E402

import build  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402
import transformers_checkpoint  # noqa: E402
from conftest import COCO_80, COCO_IDS, parse_args  # noqa: E402
from model import (DeformableEncoder, DeformableTransformer, PositionEmbeddingSine, box_sine_embed,  # noqa: E402
                   inverse_sigmoid)

TOL = dict(rtol=1e-10, atol=1e-10)
GRAD_RTOL = 1e-10
VARIANTS = {"plain": (False, False), "box-refine": (False, True), "two-stage": (True, True)}
# Small enough for a float64 forward and backward in well under a second, with every code path: 4 levels (one
# from the extra stride-2 conv), padding in both directions, 2 encoder and 2 decoder layers, distinct encoder and
# decoder point counts.
TINY = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=96, decoder_ffn_dim=96,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_n_points=2, decoder_n_points=3,
            num_queries=8, two_stage_num_proposals=8, num_feature_levels=4, dropout=0.0, num_labels=91)
# The same model as train.py flags.
TINY_FLAGS = ["--backbone", "resnet18", "--hidden-dim", "64", "--dim-feedforward", "96", "--nheads", "4",
              "--enc-layers", "2", "--dec-layers", "2", "--enc-n-points", "2", "--dec-n-points", "3",
              "--num-queries", "8", "--dropout", "0"]
HUB_ID = "SenseTime/deformable-detr-with-box-refine-two-stage"

# transformers' own functions, before `official_precision` replaces them for the yardstick.
ORIGINAL = dict(position=hf_modeling.DeformableDetrSinePositionEmbedding.forward,
                valid_ratio=hf_modeling.DeformableDetrModel.get_valid_ratio,
                proposals=hf_modeling.DeformableDetrModel.gen_encoder_output_proposals,
                proposal_embed=hf_modeling.DeformableDetrModel.get_proposal_pos_embed)


# ----------------------------------------------------------------------------------------------------------
# Building both sides
# ----------------------------------------------------------------------------------------------------------
# The classes of the 91-row heads by name (config.json's id2label), so that ours_from's dataset classes "class i"
# get row i: classes are matched by name.
ROW_NAMES = {i: f"class {i}" for i in range(91)}
# The hub's COCO checkpoints name their 91 rows by COCO category id, 'N/A' where COCO has no category.
HUB_ROW_NAMES = {i: name or "N/A" for i, name in enumerate(data.COCO_ROW_NAMES)}


def hf_config(two_stage, refine, backbone="resnet18", id2label=ROW_NAMES):
    return DeformableDetrConfig(backbone=backbone, use_timm_backbone=True, two_stage=two_stage,
                                with_box_refine=refine, **TINY | dict(num_labels=len(id2label), id2label=id2label))


def randomize_(hf, seed):
    """Every tensor of the transformers model drawn at random. Its initialisation leaves the sampling-offset and
    attention-weight projections, the last box layer and most biases at zero: uniform attention would hide a level
    mix-up, zero offsets put every sampling point on its reference (exactly on pixel centres, the kinks of
    bilinear sampling), and zero biases hide a swapped bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*hf.named_parameters(), *hf.named_buffers()]:
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("level_embed", "query_position_embeddings.weight")):
                t.copy_(noise)
            elif "sampling_offsets.bias" in name:
                t.add_(0.3 * noise)  # keep the official spread-out grid, off the pixel centres
            elif t.dim() == 1 and name.endswith("weight"):  # LayerNorm, GroupNorm, frozen BN scales
                t.copy_(1 + 0.1 * noise)
            elif t.dim() == 1:
                t.copy_(0.1 * noise)
            else:
                t.copy_(noise / math.sqrt(t[0].numel()))  # unit-variance outputs


def ours_from(source, cat_ids=tuple(range(91)), names=None):
    """This project's detector with the checkpoint's weights, as evaluate.py --pretrained builds it (reference
    attention: transformers samples with grid_sample too)."""
    args = build.checkpoint_args(build.hf_evaluation_checkpoint(source), dict(device="cpu", attn_impl="pytorch"))
    dataset = types.SimpleNamespace(cat_ids=list(cat_ids), cat_names=names or [f"class {c}" for c in cat_ids])
    return build.hf_detector(source, args, dataset)[0]


@pytest.fixture(scope="module", autouse=True)
def official_precision():
    """transformers' geometry at the official code's precision (difference 1, shown by
    test_transformers_computes_geometry_at_other_precisions): its own position encoding, valid ratios and
    proposal grid computed in float32 and cast, and the proposal embedding in the proposals' dtype."""
    def position(self, shape, device, dtype, mask=None):
        return ORIGINAL["position"](self, shape, device, torch.float32, mask).to(dtype)

    def valid_ratio(self, mask, dtype=torch.float32):
        return ORIGINAL["valid_ratio"](self, mask, torch.float32)

    def proposals(self, enc_output, padding_mask, spatial_shapes):
        object_query, _ = ORIGINAL["proposals"](self, enc_output, padding_mask, spatial_shapes)
        # The boxes depend on masks and shapes alone: a float32 pass with identity projections gives transformers'
        # own boxes in float32.
        identity = types.SimpleNamespace(enc_output=nn.Identity(), enc_output_norm=nn.Identity())
        _, boxes = ORIGINAL["proposals"](identity, enc_output[..., :1].float(), padding_mask, spatial_shapes)
        return object_query, boxes.to(enc_output.dtype)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hf_modeling.DeformableDetrSinePositionEmbedding, "forward", position)
        mp.setattr(hf_modeling.DeformableDetrModel, "get_valid_ratio", valid_ratio)
        mp.setattr(hf_modeling.DeformableDetrModel, "gen_encoder_output_proposals", proposals)
        mp.setattr(hf_modeling.DeformableDetrModel, "get_proposal_pos_embed", official_proposal_embed)
        yield


def official_proposal_embed(self, logits):
    """The official get_proposal_pos_embed, written from fundamentalvision/Deformable-DETR: sine of the sigmoid of
    the (B, Q, 4) proposal logits in their dtype over float32 frequencies -> (B, Q, 2C). The official code fixes
    C/2 = 128 features per coordinate (its C = 256); transformers and model.py take C/2 for every width."""
    num = self.config.d_model // 2
    dim_t = 10000 ** (2 * (torch.arange(num, dtype=torch.float32, device=logits.device) // 2) / num)
    pos = (logits.sigmoid() * (2 * math.pi))[..., None] / dim_t  # (B, Q, 4, C/2)
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(2)  # (B, Q, 2C)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """variant name -> (transformers model, ours) in float64, ours loaded from transformers' save_pretrained folder;
    each variant built once per module."""
    done = {}

    def get(name):
        if name not in done:
            two_stage, refine = VARIANTS[name]
            torch.manual_seed(0)
            hf = DeformableDetrForObjectDetection(hf_config(two_stage, refine))
            randomize_(hf, seed=1)
            folder = tmp_path_factory.mktemp(name)
            hf.save_pretrained(folder)
            done[name] = types.SimpleNamespace(name=name, two_stage=two_stage, refine=refine, folder=str(folder),
                                               hf=hf.double(), ours=ours_from(str(folder)).double())
        return done[name]
    return get


@pytest.fixture(params=list(VARIANTS))
def variant(request, built):
    return built(request.param)


def padded_batch(height=80, width=96, seed=2):
    """Two images padded into one batch: image 0 is narrower, image 1 shorter, so every level has padding in both
    directions. (images (B, 3, H, W) float64, mask (B, H, W) True on padding)"""
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    mask = torch.zeros(2, height, width, dtype=torch.bool)
    mask[0, :, width * 3 // 4:] = True
    mask[1, height * 4 // 5:, :] = True
    return images, mask


def run_hf(hf, images, mask):
    """transformers' outputs as (layers, encoder head): per decoder layer (logits (B, Q, 91), boxes (B, Q, 4)),
    made with its own heads from its per-layer states as its forward makes the last one; the two-stage encoder
    head (logits (B, S_all, 91), boxes (B, S_all, 4)) or None."""
    out = hf(pixel_values=images, pixel_mask=(~mask).long())
    hs = out.intermediate_hidden_states  # (B, n_dec, Q, C)
    refs = [out.init_reference_points] + list(out.intermediate_reference_points.unbind(1))[:-1]
    layers = []
    for lvl in range(hs.shape[1]):
        delta, ref = hf.bbox_embed[lvl](hs[:, lvl]), inverse_sigmoid(refs[lvl])
        coord = delta + ref if ref.shape[-1] == 4 else torch.cat([delta[..., :2] + ref, delta[..., 2:]], -1)
        layers.append((hf.class_embed[lvl](hs[:, lvl]), coord.sigmoid()))
    assert torch.equal(layers[-1][0], out.logits) and torch.equal(layers[-1][1], out.pred_boxes)
    enc = None if out.enc_outputs_class is None else (out.enc_outputs_class, out.enc_outputs_coord_logits.sigmoid())
    return layers, enc


def run_ours(ours, images, mask):
    out = ours(images, mask)
    layers = [(o["pred_logits"], o["pred_boxes"]) for o in out["aux_outputs"] + [out]]
    enc = out.get("enc_outputs")
    return layers, None if enc is None else (enc["pred_logits"], enc["pred_boxes"])


# ----------------------------------------------------------------------------------------------------------
# The yardstick
# ----------------------------------------------------------------------------------------------------------
def test_eval_outputs_equal_transformers(variant):
    """Eval mode, float64: logits and boxes of every decoder layer and of the two-stage encoder head."""
    images, mask = padded_batch()
    with torch.no_grad():
        ours, ours_enc = run_ours(variant.ours.eval(), images, mask)
        ref, ref_enc = run_hf(variant.hf.eval(), images, mask)
    assert len(ours) == len(ref) == TINY["decoder_layers"]
    for layer, ((logits, boxes), (ref_logits, ref_boxes)) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(logits, ref_logits, **TOL, msg=lambda m: f"layer {layer} logits: {m}")
        torch.testing.assert_close(boxes, ref_boxes, **TOL, msg=lambda m: f"layer {layer} boxes: {m}")
    assert (ours_enc is None) == (ref_enc is None) == (not variant.two_stage)
    if variant.two_stage:
        torch.testing.assert_close(ours_enc[0], ref_enc[0], **TOL, msg=lambda m: f"encoder logits: {m}")
        torch.testing.assert_close(ours_enc[1], ref_enc[1], **TOL, msg=lambda m: f"encoder boxes: {m}")


def shared_scalar(layers, enc):
    """One scalar of all outputs, each weighted by fixed random numbers (a plain sum lets errors cancel)."""
    g = torch.Generator().manual_seed(3)
    tensors = [t for pair in layers + ([enc] if enc else []) for t in pair]
    return sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in tensors)


def test_gradients_equal_transformers(variant):
    """Training mode, dropout 0, float64: the gradient of `shared_scalar` with respect to every parameter, the
    frozen stem and layer1 included (both sides trainable here: freezing is test_transformers_5_freezes_...).
    Where transformers ties one tensor to several of ours (the class heads of difference 5), its gradient is the
    sum of theirs."""
    hf, ours = variant.hf.train(), variant.ours.train()
    for p in [*hf.parameters(), *ours.parameters()]:
        p.requires_grad_(True)
        p.grad = None
    images, mask = padded_batch(64, 80, seed=4)
    shared_scalar(*run_ours(ours, images, mask)).backward()
    shared_scalar(*run_hf(hf, images, mask)).backward()

    own = dict(ours.named_parameters(remove_duplicate=False))
    named = dict(hf.named_parameters(remove_duplicate=False))
    source, unknown = transformers_checkpoint.official_state_of_hf(named)
    grads, _ = transformers_checkpoint.official_state_of_hf({n: p.grad for n, p in named.items()})
    assert not unknown
    for state in (source, grads):
        transformers_checkpoint.fill_hf_heads(state, own, two_stage=variant.two_stage, with_box_refine=variant.refine)
    assert set(source) == set(own), "every parameter of ours has one of transformers', and the reverse"
    groups = {}  # transformers' tensor -> our distinct parameters made from it
    for name, p in own.items():
        key = id(source[name]) if isinstance(source[name], nn.Parameter) else name
        groups.setdefault(key, {})[id(p)] = (name, p)
    for members in groups.values():
        name = next(iter(members.values()))[0]
        ours_grad = sum(p.grad for _, p in members.values())
        torch.testing.assert_close(ours_grad, grads[name], rtol=0, atol=GRAD_RTOL * grads[name].abs().max().item(),
                                   msg=lambda m: f"gradient of {name}: {m}")


# ----------------------------------------------------------------------------------------------------------
# A hub checkpoint: its layout, ResNet-50, the COCO head, offline from the cache
# ----------------------------------------------------------------------------------------------------------
def publish(cache, repo_id, folder):
    """Put a folder's files where huggingface_hub's cache keeps a downloaded snapshot of repo_id (revision main)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache, offline: nothing is downloaded, a file missing from it is an error."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def hub_layout(saved, folder):
    """The hub checkpoints' layout from a save_pretrained folder: config.json with the flat timm backbone fields
    (use_timm_backbone, backbone, dilation) of transformers 4, and pytorch_model.bin holding every head under
    both its names, as transformers 4 saved the two-stage model (its heads and their decoder aliases were one
    module)."""
    folder.mkdir()
    config = json.loads((saved / "config.json").read_text())
    backbone = config.pop("backbone_config")["backbone"]
    config.update(use_timm_backbone=True, backbone=backbone, dilation=False, use_pretrained_backbone=True,
                  id2label={str(i): name for i, name in HUB_ROW_NAMES.items()})
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file
    state = load_file(saved / "model.safetensors")
    for key in list(state):
        if key.startswith(("model.decoder.class_embed.", "model.decoder.bbox_embed.")):
            state[key.removeprefix("model.decoder.")] = state[key]
    torch.save(state, folder / "pytorch_model.bin")


def test_hub_checkpoint_resnet50_coco_head_offline_from_the_cache(tmp_path, hub_cache):
    """hf:SenseTime/deformable-detr-with-box-refine-two-stage in the hub's layout with the hub's timm ResNet-50
    and 91-row COCO head, read offline from the cache: transformers (from_pretrained of the same files) and ours
    (the 80 COCO classes) agree in eval mode, decoder column k being transformers' column cat_ids[k] and the
    encoder head's first 80 columns (objectness row 0 ranks the proposals) being transformers' first 80."""
    torch.manual_seed(0)
    hf = DeformableDetrForObjectDetection(hf_config(True, True, backbone="resnet50"))
    randomize_(hf, seed=5)
    hf.save_pretrained(tmp_path / "saved")
    hub_layout(tmp_path / "saved", tmp_path / "hub")
    publish(hub_cache, HUB_ID, tmp_path / "hub")
    reference = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "hub").double().eval()
    assert reference.config.backbone_config.backbone == "resnet50"
    ours = ours_from(f"hf:{HUB_ID}", COCO_IDS, list(COCO_80)).double()
    # Offline, the missing model.safetensors gives way to the cached pytorch_model.bin; timm's spelling names it too.
    assert transformers_checkpoint.hf_checkpoint_files(f"hf-hub:{HUB_ID}")[1].endswith("pytorch_model.bin")
    assert transformers_checkpoint.resnet_name(ours.backbone[0].body) == "resnet50"

    images, mask = padded_batch(48, 64, seed=6)
    with torch.no_grad():
        layers, enc = run_ours(ours, images, mask)
        ref_layers, ref_enc = run_hf(reference, images, mask)
    columns = torch.as_tensor(COCO_IDS)
    for (logits, boxes), (ref_logits, ref_boxes) in zip(layers, ref_layers):
        torch.testing.assert_close(logits, ref_logits[..., columns], **TOL)
        torch.testing.assert_close(boxes, ref_boxes, **TOL)
    torch.testing.assert_close(enc[0], ref_enc[0][..., :len(COCO_IDS)], **TOL)
    torch.testing.assert_close(enc[1], ref_enc[1], **TOL)


@pytest.fixture(scope="module")
def small_model():
    """A detector matching the plain variant, to load into (its weights do not matter)."""
    args = parse_args("--dataset", "coco", "--method", "baseline", "--no-two-stage", "--no-with-box-refine",
                      "--device", "cpu", *TINY_FLAGS)
    return build.build_model(args, [f"class {i}" for i in range(91)])[0]


def edit_config(folder, target, **changes):
    """A copy of a checkpoint folder whose config.json has `changes`."""
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | changes))


def edit_weights(folder, change):
    """A checkpoint folder's model.safetensors replaced by change(its state)."""
    from safetensors.torch import load_file, save_file
    path = str(folder / "model.safetensors")
    save_file({k: v.clone() for k, v in change(load_file(path)).items()}, path)


@pytest.mark.parametrize("case, error, match", [
    ("offline", FileNotFoundError, r"config\.json is not in the Hugging Face cache and the hub cannot be reached"),
    ("bad id", ValueError, "no model repository 'bad id!' on the Hugging Face hub"),
    ("no folder", FileNotFoundError, "nowhere. does not exist"),
    ("no config", FileNotFoundError, "the folder has no config.json"),
    ("no weights", FileNotFoundError, "neither model.safetensors nor pytorch_model.bin"),
    ("damaged", ValueError, "model.safetensors is damaged"),
    ("detr", ValueError, "model_type 'detr', expected 'deformable_detr'"),
    ("native resnet", ValueError, "its backbone is transformers' 'resnet' model"),
    ("dc5", ValueError, r"dilated \(DC5\) ResNet is not supported"),
    ("single scale", ValueError, "single-scale checkpoints"),
    ("flags", ValueError, "config.json has encoder_layers=3 where the run has --enc-layers 2; "
                          "two_stage=True where the run has --no-two-stage"),
    ("class names", ValueError, r"the dataset's categories \['class 95'\] are not among them"),
    ("one more layer", ValueError, r"have no place in this model, e\.g\. \['transformer\.decoder\.layers\.2\."),
    ("missing tensor", ValueError, r"does not match the model: missing \['input_proj\.0\.0\.bias'\]"),
])
def test_checkpoint_errors_are_one_line(case, error, match, built, small_model, hub_cache, tmp_path):
    """Each bad --pretrained is an error naming the checkpoint and what was expected (the CLIs print it as one
    line, test_cli_...); a file with tensors the model lacks (one more decoder layer) or lacking one of the model's
    is refused, never loaded in part. The cases use the plain variant's folder."""
    variant = built("plain")
    folder, names = tmp_path / "ckpt", [f"class {i}" for i in range(91)]
    edits = dict(detr=dict(model_type="detr"), dc5=dict(dilation=True), flags=dict(encoder_layers=3, two_stage=True),
                 **{"native resnet": dict(backbone_config={"model_type": "resnet"}),
                    "single scale": dict(num_feature_levels=1)})
    source = {"offline": "hf:SenseTime/deformable-detr", "bad id": "hf:bad id!",
              "no folder": str(tmp_path / "nowhere")}.get(case, str(folder))
    if case in edits:
        edit_config(variant.folder, folder, **edits[case])
    elif source == str(folder):
        shutil.copytree(variant.folder, folder)
        {"no config": lambda: (folder / "config.json").unlink(),
         "no weights": lambda: (folder / "model.safetensors").unlink(),
         "damaged": lambda: (folder / "model.safetensors").write_bytes(b"not safetensors"),
         "class names": lambda: names.__setitem__(-1, "class 95"),
         "one more layer": lambda: edit_weights(folder, lambda state: state | {
             k.replace("layers.1.", "layers.2.", 1): v for k, v in state.items() if "decoder.layers.1." in k}),
         "missing tensor": lambda: edit_weights(folder, lambda state: {
             k: v for k, v in state.items() if k != "model.input_proj.0.0.bias"})}[case]()
    with pytest.raises(error, match=match) as info:
        build.load_pretrained(small_model, source, names)
    assert "\n" not in str(info.value)


COCO_ROWS = {name: row for row, name in enumerate(data.COCO_ROW_NAMES) if name}


@pytest.mark.parametrize("two_stage, id2label, names, rows", [
    (False, {0: "disc", 1: "star", 2: "box"}, ["box", "disc", "star"], [2, 0, 1]),
    (True, {0: "disc", 1: "star", 2: "box"}, ["box", "disc", "star"], [2, 0, 1]),
    (False, HUB_ROW_NAMES, list(reversed(COCO_80)), [COCO_ROWS[n] for n in reversed(COCO_80)]),
    (False, {i: f"LABEL_{i}" for i in range(91)}, ["dog", "person", "toothbrush"], [18, 1, 90]),
], ids=["fine-tuned head in another order", "two-stage", "hub COCO head, names in another order",
        "placeholder names: the official COCO head"])
def test_a_checkpoints_class_rows_meet_the_dataset_by_name(two_stage, id2label, names, rows, tmp_path):
    """Row k of the loaded head is the checkpoint's row of the dataset's k-th name (config.json's id2label; its
    placeholders LABEL_i name nothing, and a 91-row head is then COCO's, row i for category id i), whatever the
    order or numbering of the dataset; the two-stage encoder head keeps its rows in place (row 0 is
    objectness)."""
    torch.manual_seed(0)
    hf = DeformableDetrForObjectDetection(hf_config(two_stage, two_stage, id2label=id2label))
    randomize_(hf, seed=3)
    hf.save_pretrained(tmp_path / "ckpt")
    flags = [] if two_stage else ["--no-two-stage", "--no-with-box-refine"]
    args = parse_args("--dataset", "coco", "--method", "baseline", "--device", "cpu", *flags, *TINY_FLAGS)
    model = build.build_model(args, names)[0]
    build.load_pretrained(model, str(tmp_path / "ckpt"), names)
    n_dec = TINY["decoder_layers"]
    for layer in range(n_dec):
        for kind in ("weight", "bias"):
            want = getattr(hf.class_embed[layer], kind)[rows]
            assert torch.equal(getattr(model.class_embed[layer], kind), want), (layer, kind)
    if two_stage:
        assert torch.equal(model.class_embed[n_dec].weight, hf.class_embed[n_dec].weight[:len(names)])


def test_a_dataset_name_the_checkpoint_lacks_is_refused(tmp_path):
    hf = DeformableDetrForObjectDetection(hf_config(False, False, id2label={0: "disc", 1: "box"}))
    hf.save_pretrained(tmp_path / "ckpt")
    args = parse_args("--dataset", "coco", "--method", "baseline", "--device", "cpu", "--no-two-stage",
                      "--no-with-box-refine", *TINY_FLAGS)
    model = build.build_model(args, ["box", "ball"])[0]
    with pytest.raises(ValueError, match=r"its class head scores 2 named classes \(disc, box\); the dataset's "
                                         r"categories \['ball'\] are not among them"):
        build.load_pretrained(model, str(tmp_path / "ckpt"), ["box", "ball"])


def test_config_json_with_a_byte_order_mark_is_read(built, tmp_path):
    """config.json saved by an editor that writes a UTF-8 byte-order mark loads as without one."""
    folder = tmp_path / "bom"
    shutil.copytree(built("plain").folder, folder)
    (folder / "config.json").write_bytes(b"\xef\xbb\xbf" + (folder / "config.json").read_bytes())
    assert transformers_checkpoint.read_hf_config(folder / "config.json", str(folder))["d_model"] == TINY["d_model"]


# ----------------------------------------------------------------------------------------------------------
# Command lines
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_train_from_a_hub_id_and_evaluate_a_folder(built, coco_dir, hub_cache, tmp_path, capsys):
    """`train.py --pretrained hf:ORG/NAME` trains CLIP-DETR a step from the cached two-stage checkpoint (flags
    describing its model), `evaluate.py --pretrained FOLDER` scores the checkpoint on the COCO-format val set, and a
    flag that differs from config.json stops train.py with exit status 2 and one line naming both values."""
    # The checkpoint's 91 rows named as the hub's COCO checkpoints name them, so the COCO set's classes meet them.
    folder = tmp_path / "coco-head"
    edit_config(built("two-stage").folder, folder, id2label={str(i): name for i, name in HUB_ROW_NAMES.items()})
    publish(hub_cache, "ORG/NAME", folder)
    common = ["--dataset", "coco", "--data-path", str(coco_dir), "--device", "cpu", "--min-size", "64",
              "--max-size", "96"]
    argv = [*common, *TINY_FLAGS, "--label-embeddings", str(coco_dir / "labels.pt"), "--epochs", "1",
            "--max-steps", "1", "--num-workers", "0", "--no-progress", "--pretrained", "hf:ORG/NAME"]
    train.cli([*argv, "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "loaded transformers checkpoint hf:ORG/NAME (model.safetensors)" in out and "AP50" in out
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert log[-1]["train_steps"] == 1 and "train_loss_align" in log[-1]

    result = evaluate.main([*common, "--pretrained", str(folder), "--batch-size", "1"])
    assert result["checkpoint"] == str(folder) and len(result["coco_stats"]) == 12
    assert "loaded transformers checkpoint" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        train.cli([*argv, "--dec-layers", "3", "--output-dir", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "decoder_layers=2 where the run has --dec-layers 3" in err


def test_cli_offline_hub_id_is_one_line(hub_cache, capsys):
    """evaluate.py --pretrained hf:ORG/NAME offline (HF_HUB_OFFLINE=1 sets the flag hub_cache sets) with nothing
    cached: exit status 2 and one line, at once."""
    with pytest.raises(SystemExit) as exit_info:
        evaluate.cli(["--pretrained", "hf:SenseTime/deformable-detr", "--data-path", str(hub_cache)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "not in the Hugging Face cache and the hub cannot be reached (offline)" in err


@pytest.mark.parametrize("argv, match", [
    ([], "give one of --resume CKPT"),
    (["--resume", "a.pth", "--pretrained", "hf:A/B"], "give one of --resume CKPT"),
    (["--pretrained", "hf:A/B", "--images", "DIR"], "--images and --visualize take a train.py checkpoint"),
])
def test_evaluate_needs_one_checkpoint(argv, match):
    with pytest.raises(ValueError, match=match):
        evaluate.main(argv)


# ----------------------------------------------------------------------------------------------------------
# Where transformers departs from the official code
# ----------------------------------------------------------------------------------------------------------
def test_transformers_computes_geometry_at_other_precisions():
    """Difference 1. In float32 transformers' position encoding, valid ratios, proposal grid and proposal embedding
    are model.py's (the official code's) to the bit; asked for float64 the first three come out in float64, where
    the official code stays in float32, and the embedding in float32, where the official code computes in
    float64: float32 rounding apart. (At padded positions the position encoding is sin/cos of about -3e6, a value
    nothing reads; there float32 and float64 differ wholly.)"""
    mask = torch.zeros(2, 6, 7, dtype=torch.bool)  # True on padding: valid fractions 5/7 and 5/6
    mask[0, :, 5:] = True
    mask[1, 5:, :] = True

    ours = PositionEmbeddingSine(16)(mask)  # (B, C, H, W) in float32
    theirs = hf_modeling.DeformableDetrSinePositionEmbedding(16, normalize=True)
    assert torch.equal(ORIGINAL["position"](theirs, (2, 32, 6, 7), "cpu", torch.float32, mask=~mask), ours)
    wide = ORIGINAL["position"](theirs, (2, 32, 6, 7), "cpu", torch.float64, mask=~mask)
    gap = (wide - ours.double()).abs().amax(1)[~mask].max().item()  # over image positions
    assert 1e-9 < gap < 1e-6, gap

    ours = DeformableTransformer.valid_ratio(mask)  # (B, 2) in float32
    assert torch.equal(ORIGINAL["valid_ratio"](None, ~mask, torch.float32), ours)
    gap = (ORIGINAL["valid_ratio"](None, ~mask, torch.float64) - ours.double()).abs().max().item()
    assert 1e-10 < gap < 1e-7, gap

    transformer = DeformableTransformer(d_model=32, n_heads=2, num_encoder_layers=0, num_decoder_layers=1, n_levels=1)
    identity = types.SimpleNamespace(enc_output=nn.Identity(), enc_output_norm=nn.Identity())
    flat = mask.flatten(1)  # (B, S_all)
    _, ours = transformer.encoder_proposals(torch.zeros(2, 42, 32), flat, torch.tensor([[6, 7]]))
    for dtype, exact in ((torch.float32, True), (torch.float64, False)):
        _, theirs = ORIGINAL["proposals"](identity, torch.zeros(2, 42, 1, dtype=dtype), flat, [(6, 7)])
        finite = theirs.isfinite()
        assert torch.equal(finite, ours.isfinite()) and theirs.dtype == dtype
        gap = (theirs[finite] - ours[finite].to(dtype)).abs().max().item()
        assert gap == 0 if exact else 1e-9 < gap < 1e-5, (dtype, gap)

    logits = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    config = types.SimpleNamespace(config=types.SimpleNamespace(d_model=64))
    theirs32 = ORIGINAL["proposal_embed"](config, logits.float())
    assert torch.equal(theirs32, box_sine_embed(logits.float().sigmoid(), 64))
    assert torch.equal(theirs32, official_proposal_embed(config, logits.float()))
    official = official_proposal_embed(config, logits)
    assert official.dtype == torch.float64 and torch.equal(official, box_sine_embed(logits.sigmoid(), 64))
    gap = (ORIGINAL["proposal_embed"](config, logits) - official).abs().max().item()
    assert 1e-9 < gap < 1e-5, gap


def test_transformers_5_freezes_other_resnet_layers_than_the_official_code(built):
    """Difference 2. Loaded trained weights, the official code freezes the ResNet's stem and layer1 (hf_port too);
    transformers 5 trains every layer of the hub's timm ResNet, and freezes its own ResNet whole."""
    variant = built("plain")
    hf = DeformableDetrForObjectDetection(hf_config(False, False))
    body = hf.model.backbone.model
    assert body.conv1.weight.requires_grad and all(p.requires_grad for p in body.layer1.parameters())
    ours = ours_from(variant.folder).backbone[0].body
    assert not ours.conv1.weight.requires_grad and not any(p.requires_grad for p in ours.layer1.parameters())
    assert all(p.requires_grad for name in ("layer2", "layer3", "layer4") for p in getattr(ours, name).parameters())

    native = DeformableDetrConfig(use_timm_backbone=False, backbone_config=transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic",
        out_features=["stage2", "stage3", "stage4"]), **TINY | dict(d_model=32))
    assert not any(p.requires_grad for p in DeformableDetrForObjectDetection(native).model.backbone.parameters())


def test_transformers_drops_out_the_encoder_input():
    """Difference 3. With dropout 1, transformers' first encoder layer receives zeros; the official encoder (and
    model.py's) hands the flattened input projections to its first layer as they are."""
    x = torch.randn(1, 12, 32, generator=torch.Generator().manual_seed(0))  # (B, S_all, C), one 3x4 level
    seen = {}
    config = DeformableDetrConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                                  num_feature_levels=1, encoder_n_points=1, dropout=1.0)
    theirs = hf_modeling.DeformableDetrEncoder(config).train()
    theirs.layers[0].register_forward_pre_hook(lambda m, args, kwargs: seen.update(theirs=args[0]), with_kwargs=True)
    theirs(inputs_embeds=x, attention_mask=torch.ones(1, 12, dtype=torch.bool), spatial_position_embeddings=x,
           spatial_shapes=torch.tensor([[3, 4]]), spatial_shapes_list=[(3, 4)], level_start_index=torch.tensor([0]),
           valid_ratios=torch.ones(1, 1, 2))
    ours = DeformableEncoder(dict(d_model=32, d_ffn=32, dropout=1.0, n_levels=1, n_heads=2, n_points=1), 1).train()
    ours.layers[0].register_forward_pre_hook(lambda m, args: seen.update(ours=args[0]))
    ours(x, torch.tensor([[3, 4]]), torch.tensor([0]), torch.ones(1, 1, 2), x, torch.zeros(1, 12, dtype=torch.bool))
    assert not seen["theirs"].any() and torch.equal(seen["ours"], x)


def test_transformers_default_dropouts():
    """Difference 4. transformers' default (and the hub's) config drops out neither the decoder self-attention
    weights nor the FFN activations; the official code applies its one dropout rate to both."""
    config = DeformableDetrConfig()
    assert (config.dropout, config.attention_dropout, config.activation_dropout) == (0.1, 0.0, 0.0)
    theirs = hf_modeling.DeformableDetrDecoderLayer(config)
    assert theirs.self_attn.attention_dropout == theirs.mlp.activation_dropout == 0.0
    ours = DeformableTransformer(d_model=32, n_heads=2, num_encoder_layers=1, num_decoder_layers=1, dropout=0.1)
    decoder, encoder = ours.decoder.layers[0], ours.encoder.layers[0]
    assert decoder.self_attn.dropout == decoder.dropout3.p == encoder.dropout2.p == 0.1


def test_transformers_5_ties_the_class_heads_of_a_box_refinement_model(built):
    """Difference 5. transformers 5 builds box refinement without two-stage with one class head tensor for every
    decoder layer (the official code clones one per layer, as it does for the two-stage model); its save_pretrained
    folder holds head 0 only, which hf_port gives every layer as separate, equal parameters."""
    variant = built("box-refine")
    hf = DeformableDetrForObjectDetection(hf_config(False, True))
    assert hf.class_embed[1].weight.data_ptr() == hf.class_embed[0].weight.data_ptr()
    assert hf.bbox_embed[1].layers[0].weight.data_ptr() != hf.bbox_embed[0].layers[0].weight.data_ptr()
    two_stage = DeformableDetrForObjectDetection(hf_config(True, True))
    assert two_stage.class_embed[1].weight.data_ptr() != two_stage.class_embed[0].weight.data_ptr()
    heads = variant.ours.class_embed
    assert heads[1].weight is not heads[0].weight and torch.equal(heads[1].weight, heads[0].weight)
