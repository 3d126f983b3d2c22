"""The fields read from other formats (issue 31, class 2): every field the loaders read, from a file whose values
differ from each other and from the defaults; a load that leaves anything unmatched, in either direction; and both
of torch's file formats (zip, and the legacy pickle of torch < 1.6 that older released detectors are in) for every
torch file a user names.

  transformers config.json  read_hf_config / hf_model_args / check_hf_config (transformers_checkpoint.py)
  train.py's checkpoints    load_checkpoint, MODEL_ARGS, checkpoint_args / checkpoint_detector (build.py)
  official checkpoints      official_checkpoint_state, coco_class_heads, load_pretrained (build.py)
  torch files               --resume, --compare, --pretrained .pth and pytorch_model.bin, --label-embeddings .pt

CPU, tiny detectors (a ResNet-18 of width 32 or 64), no network, no transformers (its defaults are compared where
it is installed). No equations. Deviations from the paper: none.
"""
import argparse
import json
import os

import pytest
import torch

import build
import data
import transformers_checkpoint as hf
from conftest import official_state_shapes
from errors import InputError
from label_dictionary import read_embeddings_file

# A transformers config.json whose every structural field differs from the others and from transformers' default.
HF_FIELDS = dict(d_model=64, encoder_layers=3, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=80, decoder_ffn_dim=80, num_feature_levels=5, encoder_n_points=7, decoder_n_points=6,
                 num_queries=9, two_stage_num_proposals=11, with_box_refine=True)
# The flags each field is read into: config key -> (hf_model_args key).
HF_FLAGS = dict(d_model="hidden_dim", encoder_layers="enc_layers", decoder_layers="dec_layers",
                encoder_attention_heads="nheads", encoder_ffn_dim="dim_feedforward",
                num_feature_levels="num_feature_levels", encoder_n_points="enc_n_points",
                decoder_n_points="dec_n_points", with_box_refine="with_box_refine", two_stage="two_stage")


def write_config(folder, **fields):
    """A save_pretrained-like folder: config.json of `fields` and an (unread) weights file; returns config.json."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "deformable_detr", **fields}, f)
    open(os.path.join(folder, "model.safetensors"), "wb").close()
    return os.path.join(folder, "config.json")


def expected_args(two_stage, backbone="resnet18"):
    return dict(backbone=backbone, hidden_dim=64, nheads=2, enc_layers=3, dec_layers=1, dim_feedforward=80,
                num_feature_levels=5, enc_n_points=7, dec_n_points=6, two_stage=two_stage, with_box_refine=True,
                num_queries=11 if two_stage else 9)


# ----------------------------------------------------------------------------------------------------------
# transformers' config.json
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("two_stage", [True, False])
def test_every_config_field_is_read_from_its_own_key(two_stage, tmp_path):
    """The proposal count of a two-stage model is two_stage_num_proposals, the query count of the others
    num_queries: with all fields distinct, a field read from another key gives another number."""
    path = write_config(tmp_path, backbone="resnet18", use_timm_backbone=True, two_stage=two_stage, **HF_FIELDS)
    config = hf.read_hf_config(path, "FOLDER")
    assert hf.hf_model_args(config) == expected_args(two_stage)
    # evaluate.py --pretrained rebuilds the detector from exactly these.
    assert build.hf_evaluation_checkpoint(str(tmp_path))["args"] | expected_args(two_stage) == \
        build.hf_evaluation_checkpoint(str(tmp_path))["args"]


@pytest.mark.parametrize("backbone_fields, name", [
    (dict(backbone="resnet101", use_timm_backbone=True), "resnet101"),
    (dict(backbone="resnet50.a1_in1k", use_timm_backbone=True), "resnet50"),
    (dict(backbone_config={"model_type": "timm_backbone", "backbone": "resnet34", "out_indices": [2, 3, 4]}),
     "resnet34"),
    (dict(backbone_kwargs={"out_indices": [2, 3, 4], "output_stride": 32}), "resnet50"),
], ids=["flat", "timm tag", "transformers 5 nested", "hub kwargs"])
def test_the_backbone_is_read_from_the_flat_and_the_nested_fields(backbone_fields, name, tmp_path):
    config = hf.read_hf_config(write_config(tmp_path, **backbone_fields), "FOLDER")
    assert config["backbone"] == name


@pytest.mark.parametrize("fields, named", [
    (dict(activation_function="gelu"), "'activation_function': 'gelu'"),
    (dict(position_embedding_type="learned"), "'position_embedding_type': 'learned'"),
    (dict(num_channels=1), "'num_channels': 1"),
    (dict(encoder_attention_heads=4, decoder_attention_heads=2),
     "encoder_attention_heads=4 but decoder_attention_heads=2"),
    (dict(encoder_ffn_dim=64, decoder_ffn_dim=80), "encoder_ffn_dim=64 but decoder_ffn_dim=80"),
    (dict(dilation=True), "dilated"),
    (dict(backbone_kwargs={"output_stride": 16}), "dilated"),
    (dict(backbone_kwargs={"out_indices": [1, 2, 3, 4]}), "out_indices=[1, 2, 3, 4]"),
    (dict(backbone_config={"model_type": "timm_backbone", "backbone": "resnet50", "out_indices": [3, 4]}),
     "out_indices=[3, 4]"),
    (dict(backbone_config={"model_type": "timm_backbone", "backbone": "resnet50", "output_stride": 8}), "dilated"),
    (dict(num_feature_levels=2), "num_feature_levels=2"),
    (dict(backbone="convnext_tiny"), "'convnext_tiny' is not supported"),
    (dict(use_timm_backbone=False), "no timm backbone"),
], ids=lambda v: str(v)[:40] if isinstance(v, dict) else None)
def test_every_field_the_model_cannot_take_is_refused_naming_it(fields, named, tmp_path):
    with pytest.raises(InputError, match=named.replace("[", r"\[").replace("(", r"\(")):
        hf.read_hf_config(write_config(tmp_path, **fields), "FOLDER")


def test_fields_a_config_leaves_out_take_transformers_defaults(tmp_path):
    config = hf.read_hf_config(write_config(tmp_path), "FOLDER")
    assert hf.hf_model_args(config) == dict(backbone="resnet50", hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6,
                                            dim_feedforward=1024, num_feature_levels=4, enc_n_points=4,
                                            dec_n_points=4, two_stage=False, with_box_refine=False, num_queries=300)
    transformers = pytest.importorskip("transformers")
    defaults = transformers.DeformableDetrConfig()
    assert {key: getattr(defaults, key) for key in hf.HF_CONFIG_DEFAULTS} == hf.HF_CONFIG_DEFAULTS


@pytest.fixture(scope="module", params=[True, False], ids=["two-stage", "single-stage"])
def hf_detr(request):
    """(config, detector) for the distinct-valued config.json, the detector built from its hf_model_args."""
    config = hf.HF_CONFIG_DEFAULTS | HF_FIELDS | dict(two_stage=request.param, backbone="resnet18")
    args = argparse.Namespace(**build.HF_EVALUATION_DEFAULTS | hf.hf_model_args(config), pretrained_backbone=False)
    with torch.device("meta"):
        detr = build.build_model(args, [f"class {i}" for i in range(3)])[0]
    return config, detr


@pytest.mark.parametrize("field, other", [
    ("d_model", 96), ("encoder_layers", 2), ("decoder_layers", 4), ("encoder_attention_heads", 4),
    ("encoder_ffn_dim", 88), ("num_feature_levels", 4), ("encoder_n_points", 3), ("decoder_n_points", 5),
    ("with_box_refine", False), ("two_stage", None), ("backbone", "resnet34"), ("proposals", 13),
])
def test_every_config_field_is_checked_against_the_built_detector(field, other, hf_detr):
    """The detector built from the config passes; the same config with one field changed is refused naming that
    field, its value and the run's flag. A two-stage model's count is two_stage_num_proposals (its num_queries is
    not read); the others' is num_queries."""
    config, detr = hf_detr
    hf.check_hf_config(config, detr, "FOLDER")
    key = field
    if field == "proposals":
        key = "two_stage_num_proposals" if config["two_stage"] else "num_queries"
        unread = "num_queries" if config["two_stage"] else "two_stage_num_proposals"
        hf.check_hf_config(config | {unread: 17}, detr, "FOLDER")
    changed = {key: (not config[key]) if other is None else other}
    if field == "encoder_attention_heads":
        changed["decoder_attention_heads"] = other
    with pytest.raises(InputError, match=f"{key}={changed[key]} where the run has") as error:
        hf.check_hf_config(config | changed, detr, "FOLDER")
    flag = {"proposals": "num_queries", "backbone": "backbone"}.get(field) or HF_FLAGS[key]
    flag = flag.replace("_", "-")
    assert f"--{flag}" in str(error.value) or f"--no-{flag}" in str(error.value)


# ----------------------------------------------------------------------------------------------------------
# train.py's checkpoints
# ----------------------------------------------------------------------------------------------------------
# A detector's arguments, each other than train.py's `shapes` default and than the others (MODEL_ARGS and what
# checkpoint_detector reads besides).
CKPT_ARGS = dict(dataset="custom", backbone="resnet34", hidden_dim=64, dim_feedforward=48, enc_layers=3, dec_layers=1,
                 nheads=2, num_queries=7, num_feature_levels=5, enc_n_points=6, dec_n_points=8, dropout=0.2,
                 with_box_refine=True, two_stage=True, attn_impl="gather", device="cpu")
NAMES = ["ant", "bee", "cat"]


def structure(detr):
    """What each of MODEL_ARGS builds, read from the detector."""
    t = detr.transformer
    attn = [m for m in detr.modules() if type(m).__name__ == "MSDeformAttn"]
    return dict(backbone=hf.resnet_name(detr.backbone[0].body), hidden_dim=t.d_model,
                dim_feedforward={layer.linear1.out_features for layer in [*t.encoder.layers, *t.decoder.layers]},
                enc_layers=len(t.encoder.layers), dec_layers=t.decoder.num_layers, nheads={m.n_heads for m in attn},
                num_queries=(detr.num_queries, t.two_stage_num_proposals), num_feature_levels=len(detr.input_proj),
                enc_n_points={layer.self_attn.n_points for layer in t.encoder.layers},
                dec_n_points={layer.cross_attn.n_points for layer in t.decoder.layers},
                dropout={m.p for m in t.modules() if isinstance(m, torch.nn.Dropout)},
                with_box_refine=detr.with_box_refine, two_stage=detr.two_stage, attn_impl={m.attn_impl for m in attn},
                num_select=None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint as train.py writes it (model, args, classes) of a baseline detector built with CKPT_ARGS."""
    args = argparse.Namespace(**CKPT_ARGS, method="baseline", pretrained_backbone=False, novel_classes=None)
    torch.manual_seed(0)
    detr = build.build_model(args, NAMES)[0]
    ckpt = {"model": detr.state_dict(), "args": vars(args), "classes": {"ids": [4, 2, 9], "names": NAMES}}
    path = tmp_path_factory.mktemp("trained") / "checkpoint.pth"
    torch.save(ckpt, path)
    return str(path), detr


def test_model_args_are_exactly_what_build_model_reads(monkeypatch):
    """A checkpoint lacking one of MODEL_ARGS is refused as not train.py's: so every argument evaluate.py's detector
    reads from a checkpoint must be in MODEL_ARGS (else an older checkpoint fails with an AttributeError), and each
    of MODEL_ARGS must be read (else it refuses checkpoints for nothing)."""
    read = set()

    class Recording(argparse.Namespace):
        def __getattribute__(self, name):
            if not name.startswith("_"):
                read.add(name)
            return super().__getattribute__(name)

    args = CKPT_ARGS | {"device": "meta"}  # a detector of no weights: only what it reads matters here
    with torch.device("meta"):
        state = build.build_model(argparse.Namespace(**args, method="baseline", pretrained_backbone=False), NAMES)[0]
        ckpt = {"model": state.state_dict(), "args": args}
        monkeypatch.setattr(argparse, "Namespace", Recording)
        build.checkpoint_detector(ckpt, build.checkpoint_args(ckpt, {}), NAMES, "CKPT")
    set_by_checkpoint_args = {"method", "pretrained_backbone", "pretrained", "num_workers"}
    read_with_a_default = {"novel_classes"}  # absent from checkpoints written before the flag existed
    assert read - set_by_checkpoint_args - read_with_a_default == set(build.MODEL_ARGS)


@pytest.mark.parametrize("key", build.MODEL_ARGS)
def test_a_checkpoint_without_a_model_argument_is_refused_naming_it(key, tmp_path):
    args = {k: v for k, v in CKPT_ARGS.items() if k != key}
    torch.save({"model": {"query_embed.weight": torch.zeros(7, 128)}, "args": args}, tmp_path / "old.pth")
    with pytest.raises(InputError, match=f"lacks .*'args.{key}'"):
        build.load_checkpoint(str(tmp_path / "old.pth"))


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")  # the override's build
def test_the_evaluated_detector_is_built_from_every_argument_of_its_checkpoint(trained):
    """evaluate.py's detector (checkpoint_args, checkpoint_detector) has each of the checkpoint's MODEL_ARGS, and
    its weights; overrides replace only what they name."""
    path, detr = trained
    ckpt = build.load_checkpoint(path)
    rebuilt, postprocess = build.checkpoint_detector(ckpt, build.checkpoint_args(ckpt, {}), NAMES, path)
    assert structure(rebuilt) == structure(detr)
    assert structure(rebuilt)["num_queries"] == (7, 7) and structure(rebuilt)["attn_impl"] == {"gather"}
    for key, value in detr.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    args = build.checkpoint_args(ckpt, {"attn_impl": "pytorch", "dataset": "lvis", "device": "meta"})
    assert {k: getattr(args, k) for k in CKPT_ARGS if k not in ("attn_impl", "dataset", "device")} == \
        {k: v for k, v in CKPT_ARGS.items() if k not in ("attn_impl", "dataset", "device")}
    with torch.device("meta"):
        overridden, postprocess = build.checkpoint_detector(ckpt, args, NAMES, path)
    assert structure(overridden)["attn_impl"] == {"pytorch"} and postprocess.num_select == 300


# ----------------------------------------------------------------------------------------------------------
# Unmatched keys, in either direction
# ----------------------------------------------------------------------------------------------------------
def layer_keys(state, layer):
    prefix = f"transformer.decoder.layers.{layer}."
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def one_more_decoder_layer(state, last):
    """The state of the same detector with one more decoder layer (keys of layer last + 1)."""
    extra = {k.replace(f"layers.{last}.", f"layers.{last + 1}.", 1): v for k, v in layer_keys(state, last).items()}
    return state | extra


@pytest.mark.parametrize("change, named", [
    ("extra layer", "unexpected ['transformer.decoder.layers.1."),
    ("missing layer", "missing ['transformer.decoder.layers.0."),
    ("missing tensor", "missing ['input_proj.2.1.bias']"),
    ("extra tensor", "unexpected ['class_embed.0.scale']"),
    ("shape", "shape mismatch ['transformer.level_embed (4, 64) vs (5, 64)']"),
])
def test_a_state_that_does_not_match_the_model_is_refused_naming_the_keys(change, named, trained):
    """Every load of weights (--resume, evaluate.py, --pretrained) goes through load_model_state: a tensor the
    model lacks, or one of the model's that the state lacks, is an error, never a partial load."""
    _, detr = trained
    state = dict(detr.state_dict())
    if change == "extra layer":
        state = one_more_decoder_layer(state, 0)
    elif change == "missing layer":
        state = {k: v for k, v in state.items() if k not in layer_keys(state, 0)}
    elif change == "missing tensor":
        del state["input_proj.2.1.bias"]
    elif change == "extra tensor":
        state["class_embed.0.scale"] = torch.ones(1)
    else:
        state["transformer.level_embed"] = state["transformer.level_embed"][:4]
    for key in state:
        if not key.startswith("backbone.") and key in detr.state_dict():
            state[key] = state[key] + 1  # (a copy) a loaded tensor would show
    before = {k: v.clone() for k, v in detr.state_dict().items() if not k.startswith("backbone.")}
    with pytest.raises(InputError, match=named.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        build.load_model_state(detr, state, "CKPT")
    assert all(torch.equal(detr.state_dict()[k], v) for k, v in before.items()), "a refused state was loaded"


def test_only_the_training_modules_may_differ_and_are_said_to_be_skipped(tiny_detr, capsys):
    """A CLIP-DETR checkpoint into a plain Deformable DETR: its alignnet./dynql. keys are skipped, every other
    tensor is loaded."""
    from alignnet import AlignNet
    from dynql import DynQL
    full = tiny_detr(alignnet=AlignNet(label_embeddings=torch.randn(5, 16), d_model=32), dynql=DynQL(d_model=32))
    plain = tiny_detr(seed=1)
    build.load_model_state(plain, full.state_dict(), "CKPT")
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in plain.state_dict().items())
    skipped = [k for k in full.state_dict() if k.startswith(("alignnet.", "dynql."))]
    assert f"loaded CKPT: {len(skipped)} training-module keys (alignnet.*/dynql.*) not used" in capsys.readouterr().out


def test_a_checkpoint_with_one_more_decoder_layer_is_one_line_from_evaluate(trained, tmp_path, capsys):
    import evaluate
    path, detr = trained
    ckpt = torch.load(path, weights_only=False)
    ckpt["model"] = one_more_decoder_layer(ckpt["model"], 0)
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.cli(["--resume", str(tmp_path / "bad.pth"), "--images", str(tmp_path), "--output-dir",
                      str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "unexpected ['transformer.decoder.layers.1." in err[0]


# ----------------------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def official():
    """(detector args, official state dict) of a tiny two-stage detector with the official 91-row COCO class heads:
    row r of every class head holds r everywhere, so a row read from another id shows."""
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d
    sizes = dict(backbone="resnet18", num_feature_levels=4, enc_n_points=4, dec_n_points=4)
    args = argparse.Namespace(**CKPT_ARGS | sizes, method="baseline", pretrained_backbone=False, novel_classes=None)
    with torch.device("meta"):
        resnet = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    shapes = official_state_shapes(backbone_state=resnet.state_dict(), backbone_channels=(128, 256, 512),
                                   num_classes=91, d_model=64, n_heads=2, d_ffn=48, enc_layers=3, dec_layers=1,
                                   n_levels=4, n_points=4, num_queries=7, two_stage=True, with_box_refine=True)
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.arange(91.0).view(91, *[1] * (len(shape) - 1)).expand(shape).clone() if "class_embed" in key
             else torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    for key in shapes:  # an alias holds its head's tensor, as in a released checkpoint
        if key.startswith(("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")):
            state[key] = state[key.removeprefix("transformer.decoder.")]
    return args, state


@pytest.mark.parametrize("layout", ["under model", "bare"])
def test_an_official_checkpoint_fills_every_tensor_and_class_k_reads_row_cat_ids_k(layout, official, tmp_path):
    """Every tensor of the official file lands in the model; the decoder class heads' class k is row cat_ids[k], the
    two-stage encoder head keeps rows 0..K-1 (its row 0 ranks the proposals); the stem and layer1 freeze."""
    args, state = official
    torch.save({"model": state, "epoch": 49} if layout == "under model" else state, tmp_path / "official.pth")
    detr = build.build_model(args, NAMES)[0]
    cat_ids = [4, 2, 90]  # row i of COCO's 91-row head is category id i: its name is data.COCO_ROW_NAMES[i]
    build.load_pretrained(detr, str(tmp_path / "official.pth"), [data.COCO_ROW_NAMES[i] for i in cat_ids])
    loaded = detr.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        if "class_embed" not in key:
            assert torch.equal(loaded[key], value), key
    encoder_head = f"class_embed.{args.dec_layers}."
    for key in (k for k in loaded if "class_embed" in k):
        rows = [0, 1, 2] if key.removeprefix("transformer.decoder.").startswith(encoder_head) else cat_ids
        assert torch.equal(loaded[key], torch.tensor(rows, dtype=torch.float32).view(3, *[1] * (loaded[key].dim() - 1))
                           .expand_as(loaded[key])), key
    body = detr.backbone[0].body
    assert not body.conv1.weight.requires_grad and not body.layer1[0].conv1.weight.requires_grad
    assert body.layer2[0].conv1.weight.requires_grad


@pytest.mark.parametrize("change, named", [
    ("extra layer", "unexpected ['transformer.decoder.layers.1."),
    ("missing tensor", "missing ['transformer.enc_output.bias']"),
])
def test_an_official_checkpoint_that_does_not_match_is_refused(change, named, official, tmp_path):
    args, state = official
    state = one_more_decoder_layer(state, 0) if change == "extra layer" else {
        k: v for k, v in state.items() if k != "transformer.enc_output.bias"}
    torch.save(state, tmp_path / "official.pth")
    detr = build.build_model(args, NAMES)[0]
    with pytest.raises(InputError, match=named.replace("[", r"\[")):
        build.load_pretrained(detr, str(tmp_path / "official.pth"), list(data.COCO_ROW_NAMES[1:4]))


# ----------------------------------------------------------------------------------------------------------
# Both torch file formats, for every torch file a user names
# ----------------------------------------------------------------------------------------------------------
def save(obj, path, fmt):
    """torch.save in the zip format (torch >= 1.6) or the legacy pickle older released detectors are in."""
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    assert open(path, "rb").read(4)[:2] == (b"PK" if fmt == "zip" else b"\x80\x02")
    return str(path)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_every_torch_file_a_user_names_is_read_in_both_formats(fmt, tmp_path):
    state = {"query_embed.weight": torch.randn(7, 128), "transformer.level_embed": torch.randn(5, 64)}
    ckpt = {"model": state, "args": dict(CKPT_ARGS), "optimizer": {}, "scheduler": {}, "epoch": 3, "rng": [{}]}
    # train.py --resume, evaluate.py --resume and --compare
    for keys in (("model", "args", "optimizer", "scheduler", "epoch", "rng"), ("model", "args")):
        read = build.load_checkpoint(save(ckpt, tmp_path / "ckpt.pth", fmt), keys=keys)
        assert read["epoch"] == 3 and read["args"] == CKPT_ARGS
        assert all(torch.equal(read["model"][k], v) for k, v in state.items())
    # --pretrained, an official .pth (the state under 'model', or bare)
    for content in ({"model": state}, state):
        read, _ = build.official_checkpoint_state(save(content, tmp_path / "official.pth", fmt))
        assert read.keys() == state.keys() and all(torch.equal(read[k], v) for k, v in state.items())
    # --pretrained, a transformers folder's pytorch_model.bin
    read = hf.read_hf_weights(save(state, tmp_path / "pytorch_model.bin", fmt), "FOLDER")
    assert all(torch.equal(read[k], v) for k, v in state.items())
    # --label-embeddings, a plain and a named table
    table = torch.randn(3, 5)
    assert torch.equal(read_embeddings_file(save(table, tmp_path / "plain.pt", fmt))[1], table)
    names, rows = read_embeddings_file(save({"names": NAMES, "embeddings": table}, tmp_path / "named.pt", fmt))
    assert names == NAMES and torch.equal(rows, table)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_a_truncated_torch_file_of_either_format_is_bad_input(fmt, tmp_path):
    """Cut anywhere (a kill during a copy, a partial download), a checkpoint is one line naming it, not a traceback:
    torch raises RuntimeError, OSError, EOFError or UnpicklingError depending on where the cut falls."""
    ckpt = {"model": {"query_embed.weight": torch.randn(70, 128)}, "args": dict(CKPT_ARGS)}
    path = save(ckpt, tmp_path / "ckpt.pth", fmt)
    content = open(path, "rb").read()
    for cut in (16, len(content) // 4, len(content) // 2, len(content) * 3 // 4, len(content) - 1):
        with open(path, "wb") as f:
            f.write(content[:cut])
        with pytest.raises(InputError, match="is damaged or incomplete"):
            build.load_checkpoint(path)
