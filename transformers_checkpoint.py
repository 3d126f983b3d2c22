"""Reading transformers' Deformable DETR checkpoints into this model's (the official code's) parameter names.

`--pretrained FOLDER|hf:ORG/NAME` (train.py and evaluate.py) starts from a released detector saved by
transformers: a save_pretrained folder (config.json + model.safetensors or pytorch_model.bin) or a hub id
hf:ORG/NAME (also hf-hub:ORG/NAME, timm's and open_clip's spelling), downloaded through huggingface_hub. No
transformers is needed: config.json (UTF-8) is checked against the built detector and the names are mapped onto
the official ones, strictly (every tensor of the model filled once, nothing of the file left over); its id2label
names the class head's rows (`hf_class_names`), which build.py matches to the dataset's classes by name. build.py's
`load_pretrained` hands a folder or hub id here and loads the state it gets back.

  transformers                                     official (this model)
  model.backbone.[conv_encoder.]model.X            backbone.0.body.X (timm's ResNet names are torchvision's)
  model.input_proj.N, model.level_embed            input_proj.N, transformer.level_embed
  model.query_position_embeddings                  query_embed
  model.{reference_points, enc_output[_norm], pos_trans[_norm]}   transformer.<the same>
  model.encoder.layers.N.                          transformer.encoder.layers.N.
    self_attn, self_attn_layer_norm                  self_attn, norm1
    [mlp.]fc1, [mlp.]fc2, final_layer_norm           linear1, linear2, norm2
  model.decoder.layers.N.                          transformer.decoder.layers.N.
    self_attn.{q,k,v}_proj, self_attn.{out,o}_proj   self_attn.in_proj (q, k, v stacked), self_attn.out_proj
    self_attn_layer_norm                             norm2
    encoder_attn, encoder_attn_layer_norm            cross_attn, norm1
    [mlp.]fc1, [mlp.]fc2, final_layer_norm           linear1, linear2, norm3
  class_embed.N, bbox_embed.N                      class_embed.N, bbox_embed.N
  model.decoder.{class,bbox}_embed.N               transformer.decoder.{class,bbox}_embed.N (the heads' aliases)
transformers 5 spells some names otherwise ([mlp.]fc1, o_proj, conv_encoder.); its save_pretrained writes the
hub's. A tied head (transformers 5 keeps one tensor for heads it ties) is filled from the copy the file holds.

No equations. Shape legend: C model width; transformers' q, k, v projections (C, C) stack into in_proj (3C, C).
Deviations from the paper: none (the paper starts from ImageNet weights; a released detector is an extra
starting point). The differences between transformers' port and the official code that this mapping bridges are
listed in docs/checkpoints.md.
"""
import json
import os
import re

import torch

from errors import InputError, read_text, read_torch_file

HUB_PREFIXES = ("hf:", "hf-hub:")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # huggingface_hub's preference order
HF_RESNETS = {  # (blocks per stage, bottleneck blocks) -> name, as --backbone spells it
    ((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
}
# transformers' DeformableDetrConfig defaults, for fields a config.json leaves out (transformers reads them so).
HF_CONFIG_DEFAULTS = dict(d_model=256, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                       decoder_attention_heads=8, encoder_ffn_dim=1024, decoder_ffn_dim=1024, num_feature_levels=4,
                       encoder_n_points=4, decoder_n_points=4, num_queries=300, two_stage=False,
                       two_stage_num_proposals=300, with_box_refine=False, activation_function="relu",
                       position_embedding_type="sine", dilation=False, num_channels=3)

# transformers name -> official name, first match wins. Encoder and decoder use norm1/norm2 for different places.
_HF_RENAMES = [(re.compile(pattern), replacement) for pattern, replacement in [
    (r"^model\.backbone\.(?:conv_encoder\.)?model\.", "backbone.0.body."),
    (r"^model\.input_proj\.", "input_proj."),
    (r"^model\.level_embed$", "transformer.level_embed"),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.(reference_points|enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.", r"transformer.\1."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn\.", r"transformer.encoder.layers.\1.self_attn."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.encoder.layers.\1.norm1."),
    (r"^model\.encoder\.layers\.(\d+)\.(?:mlp\.)?fc1\.", r"transformer.encoder.layers.\1.linear1."),
    (r"^model\.encoder\.layers\.(\d+)\.(?:mlp\.)?fc2\.", r"transformer.encoder.layers.\1.linear2."),
    (r"^model\.encoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.encoder.layers.\1.norm2."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.", r"transformer.decoder.layers.\1.cross_attn."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn\.(?:out_proj|o_proj)\.",
     r"transformer.decoder.layers.\1.self_attn.out_proj."),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (r"^model\.decoder\.layers\.(\d+)\.(?:mlp\.)?fc1\.", r"transformer.decoder.layers.\1.linear1."),
    (r"^model\.decoder\.layers\.(\d+)\.(?:mlp\.)?fc2\.", r"transformer.decoder.layers.\1.linear2."),
    (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
    (r"^model\.decoder\.(class_embed|bbox_embed)\.", r"transformer.decoder.\1."),
    (r"^(class_embed|bbox_embed)\.", r"\1."),
]]
_HF_QKV = re.compile(r"^model\.decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_HF_HEAD = re.compile(r"^(?:transformer\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)$")


# ----------------------------------------------------------------------------------------------------------
# Where the files are
# ----------------------------------------------------------------------------------------------------------
def is_hf_checkpoint(source):
    """A hub id or a folder: what --pretrained hands to this module (an official checkpoint is one .pth file)."""
    return source.startswith(HUB_PREFIXES) or os.path.isdir(source)


def _hf_hub_file(repo_id, filename, source):
    """One file of a hub repository through huggingface_hub's cache; its failures as one line each."""
    from huggingface_hub import errors, hf_hub_download
    try:
        return hf_hub_download(repo_id, filename)
    except (errors.RepositoryNotFoundError, errors.GatedRepoError, errors.RevisionNotFoundError,
            errors.HFValidationError):
        raise InputError(f"--pretrained {source}: no model repository {repo_id!r} on the Hugging Face hub (or it is "
                         "private or gated), expected e.g. hf:SenseTime/deformable-detr") from None
    except errors.RemoteEntryNotFoundError:
        raise FileNotFoundError(f"--pretrained {source}: the hub repository has no {filename}") from None
    except errors.LocalEntryNotFoundError:
        # Offline (HF_HUB_OFFLINE=1, or no network) and not in the cache.
        raise FileNotFoundError(f"--pretrained {source}: {filename} is not in the Hugging Face cache and the hub "
                                "cannot be reached (offline); download it where there is a network "
                                f"(`hf download {repo_id}`) or pass a folder written by save_pretrained") from None
    except errors.HfHubHTTPError as err:
        raise InputError(f"--pretrained {source}: the hub refused {filename} ({str(err).splitlines()[0]})") from None


def hf_checkpoint_files(source):
    """(config.json path, weights path) of a save_pretrained folder or of a hub id (downloaded, or from the cache)."""
    if source.startswith(HUB_PREFIXES):
        repo_id = source.split(":", 1)[1]
        config = _hf_hub_file(repo_id, "config.json", source)
        try:
            return config, _hf_hub_file(repo_id, HF_WEIGHT_FILES[0], source)
        except FileNotFoundError as first:
            # Older repositories hold only pytorch_model.bin; offline, whichever of the two is cached.
            try:
                return config, _hf_hub_file(repo_id, HF_WEIGHT_FILES[1], source)
            except FileNotFoundError:
                raise first from None
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--pretrained {source}: no such folder, expected a folder written by transformers' "
                                "save_pretrained or a hub id hf:ORG/NAME")
    config = os.path.join(source, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"--pretrained {source}: the folder has no config.json, expected a folder written by "
                                "transformers' save_pretrained (config.json + model.safetensors or pytorch_model.bin)")
    for name in HF_WEIGHT_FILES:
        if os.path.isfile(os.path.join(source, name)):
            return config, os.path.join(source, name)
    raise FileNotFoundError(f"--pretrained {source}: the folder has config.json but neither {HF_WEIGHT_FILES[0]} nor "
                            f"{HF_WEIGHT_FILES[1]} (a sharded checkpoint is not supported)")


# ----------------------------------------------------------------------------------------------------------
# config.json: which model
# ----------------------------------------------------------------------------------------------------------
def read_hf_config(path, source):
    """config.json as a dict with transformers' defaults filled in; only Deformable DETR with a timm ResNet, the
    hub's layout, is accepted. `backbone` is added: the ResNet's name as --backbone spells it."""
    text = read_text(path, f"--pretrained {source}: config.json", "the config.json of transformers' save_pretrained")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"--pretrained {source}: config.json is not valid JSON ({err})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "deformable_detr":
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise InputError(f"--pretrained {source}: config.json describes model_type {found!r}, expected "
                         "'deformable_detr' (transformers' DeformableDetrForObjectDetection)")
    config = HF_CONFIG_DEFAULTS | raw
    unsupported = {key: config[key] for key, wanted in (("activation_function", "relu"),
                   ("position_embedding_type", "sine"), ("num_channels", 3)) if config[key] != wanted}
    if unsupported:
        raise InputError(f"--pretrained {source}: config.json has {unsupported}; this model has a ReLU FFN, the sine "
                         "position encoding and RGB input, as the official Deformable DETR")
    for a, b, flag in (("encoder_attention_heads", "decoder_attention_heads", "--nheads"),
                       ("encoder_ffn_dim", "decoder_ffn_dim", "--dim-feedforward")):
        if config[a] != config[b]:
            raise InputError(f"--pretrained {source}: config.json has {a}={config[a]} but {b}={config[b]}; this model "
                             f"has one {flag} for encoder and decoder")
    config["backbone"] = _hf_timm_resnet(config, source)
    return config


def _hf_timm_resnet(config, source):
    """The timm ResNet of a config (transformers 5's nested backbone_config, or the hub's flat use_timm_backbone +
    backbone fields), checked to give C3-C5 undilated, as this model's backbone does."""
    nested = config.get("backbone_config")
    if isinstance(nested, dict):
        if nested.get("model_type") != "timm_backbone":
            raise InputError(f"--pretrained {source}: its backbone is transformers' {nested.get('model_type')!r} "
                             "model; only the timm ResNets of the hub checkpoints (use_timm_backbone) are supported")
        name, out_indices, stride = nested.get("backbone"), nested.get("out_indices"), nested.get("output_stride")
    elif nested is None and config.get("use_timm_backbone", True):
        kwargs = config.get("backbone_kwargs") or {}
        name, out_indices, stride = config.get("backbone") or "resnet50", kwargs.get("out_indices"), kwargs.get(
            "output_stride")
    else:
        raise InputError(f"--pretrained {source}: config.json has no timm backbone (use_timm_backbone false); only "
                         "the timm ResNets of the hub checkpoints are supported")
    # timm may name weights as architecture.tag (resnet50.a1_in1k): the architecture decides the parameters.
    arch = str(name).split(".")[0]
    if arch not in set(HF_RESNETS.values()):
        raise InputError(f"--pretrained {source}: backbone {name!r} is not supported, expected one of "
                         f"{sorted(set(HF_RESNETS.values()))} (timm and torchvision name their layers alike)")
    if config["dilation"] or stride not in (None, 32):
        raise InputError(f"--pretrained {source}: a dilated (DC5) ResNet is not supported, this model's layer4 has "
                         "stride 32")
    if config["num_feature_levels"] < 3 or (out_indices is not None and list(out_indices) != [2, 3, 4]):
        raise InputError(f"--pretrained {source}: single-scale checkpoints (num_feature_levels="
                         f"{config['num_feature_levels']}, backbone out_indices={out_indices}) are not supported; "
                         "this model takes C3-C5 of the ResNet and at least 3 levels")
    return arch


def hf_model_args(config):
    """build_model's model arguments (the train.py flag names) that rebuild the checkpoint's detector."""
    return dict(backbone=config["backbone"], hidden_dim=config["d_model"], nheads=config["encoder_attention_heads"],
                enc_layers=config["encoder_layers"], dec_layers=config["decoder_layers"],
                dim_feedforward=config["encoder_ffn_dim"], num_feature_levels=config["num_feature_levels"],
                enc_n_points=config["encoder_n_points"], dec_n_points=config["decoder_n_points"],
                two_stage=config["two_stage"], with_box_refine=config["with_box_refine"],
                num_queries=config["two_stage_num_proposals" if config["two_stage"] else "num_queries"])


def hf_class_names(config, source):
    """The class named by each row of the class head, from config.json's id2label: None for a row without a class
    (the hub's COCO heads name the ids COCO leaves out 'N/A'); None in place of the list when id2label names
    nothing (transformers' placeholders LABEL_0, LABEL_1, ...)."""
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None
    try:
        labels = {int(key): value for key, value in id2label.items()}
    except (TypeError, ValueError):
        raise InputError(f"--pretrained {source}: config.json's id2label has keys {sorted(id2label)[:5]}, expected "
                         "row numbers 0, 1, ...") from None
    if all(value == f"LABEL_{key}" for key, value in labels.items()):
        return None
    return [None if labels.get(row) in (None, "N/A") else str(labels[row]) for row in range(max(labels) + 1)]


def resnet_name(body):
    """--backbone of a built ResNet body, from its blocks per stage and block type."""
    blocks = tuple(len(getattr(body, f"layer{i}")) for i in range(1, 5))
    return HF_RESNETS.get((blocks, hasattr(body.layer1[0], "conv3")), "unknown")


def check_hf_config(config, detr, source):
    """Every structural setting of config.json against the built detector; all mismatches in one line, each naming
    the config value and the run's flag."""
    t = detr.transformer
    run = dict(backbone=resnet_name(detr.backbone[0].body), hidden_dim=t.d_model, nheads=t.n_heads,
               enc_layers=len(t.encoder.layers), dec_layers=t.decoder.num_layers,
               dim_feedforward=t.decoder.layers[0].linear1.out_features, num_feature_levels=len(detr.input_proj),
               enc_n_points=t.encoder.layers[0].self_attn.n_points if len(t.encoder.layers) else None,
               dec_n_points=t.decoder.layers[0].cross_attn.n_points, two_stage=detr.two_stage,
               with_box_refine=detr.with_box_refine, num_queries=detr.num_queries)
    fields = dict(backbone="backbone", hidden_dim="d_model", nheads="encoder_attention_heads",
                  enc_layers="encoder_layers", dec_layers="decoder_layers", dim_feedforward="encoder_ffn_dim",
                  num_feature_levels="num_feature_levels", enc_n_points="encoder_n_points",
                  dec_n_points="decoder_n_points", two_stage="two_stage", with_box_refine="with_box_refine",
                  num_queries="two_stage_num_proposals" if config["two_stage"] else "num_queries")
    wanted = hf_model_args(config)
    diff = []
    for key, value in run.items():
        if value is None or value == wanted[key]:
            continue
        flag = "--" + key.replace("_", "-")
        shown = (flag if value else f"--no-{flag[2:]}") if isinstance(value, bool) else f"{flag} {value}"
        diff.append(f"{fields[key]}={wanted[key]} where the run has {shown}")
    if diff:
        raise InputError(f"--pretrained {source} does not match the run's flags: config.json has {'; '.join(diff)} "
                         "(set the flags to the checkpoint's model)")


# ----------------------------------------------------------------------------------------------------------
# The weights
# ----------------------------------------------------------------------------------------------------------
def read_hf_weights(path, source):
    """The state dict of model.safetensors or pytorch_model.bin, on the CPU; a damaged file is one line."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except SafetensorError as err:
            raise InputError(f"--pretrained {source}: {os.path.basename(path)} is damaged or not a safetensors file "
                             f"({err})") from None
    state = read_torch_file(path, f"--pretrained {source}:", weights_only=True)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f"--pretrained {source}: {os.path.basename(path)} holds no state dict of tensors")
    return state


def official_state_of_hf(hf_state):
    """transformers' names -> official names: (state, keys that mean nothing here). The decoder self-attention's
    q, k, v projections become one in_proj (nn.MultiheadAttention's layout, q then k then v); frozen BatchNorm
    keeps no num_batches_tracked. Tensors are passed through, not copied (the tests map gradients with it)."""
    state, qkv, unknown = {}, {}, []
    for key, value in hf_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        match = _HF_QKV.match(key)
        if match:
            layer, which, kind = match.groups()
            qkv.setdefault((layer, kind), {})[which] = value
            continue
        for pattern, replacement in _HF_RENAMES:
            if pattern.match(key):
                state[pattern.sub(replacement, key, count=1)] = value
                break
        else:
            unknown.append(key)
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unknown += [f"model.decoder.layers.{layer}.self_attn.{w}_proj.{kind}" for w in parts]
            continue
        state[f"transformer.decoder.layers.{layer}.self_attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]])  # (3C, C) or (3C,)
    return state, unknown


def fill_hf_heads(state, own_keys, *, two_stage, with_box_refine):
    """Give every head key of the model (class_embed.i, bbox_embed.i and their transformer.decoder aliases) the
    tensor the checkpoint holds for that head, under whichever of the names it was saved.

    transformers 5 ties the class heads to class_embed.0 unless the model is two-stage (then to the decoder's
    alias), and the box heads to bbox_embed.0 unless it refines boxes; its save_pretrained writes one tensor per
    tie, so head i of a tied group comes from head 0. Returns the indices filled from head 0."""
    from_head0 = set()
    for key in own_keys:
        match = _HF_HEAD.match(key)
        if not match or key in state:
            continue
        head, i, rest = match.groups()
        candidates = [f"{head}.{i}.{rest}", f"transformer.decoder.{head}.{i}.{rest}"]
        tied_to_0 = not two_stage if head == "class_embed" else not with_box_refine
        if tied_to_0:
            candidates += [f"{head}.0.{rest}", f"transformer.decoder.{head}.0.{rest}"]
        found = next((c for c in candidates if c in state), None)
        if found is not None:
            state[key] = state[found]
            if found.startswith((f"{head}.0.", f"transformer.decoder.{head}.0.")) and i != "0":
                from_head0.add((head, int(i)))
    return from_head0


def check_shared_tensors(state, model, source):
    """Keys of one tensor of the model (a head shared by every layer, a head and its alias) must get equal values:
    load_state_dict would keep whichever came last."""
    by_tensor = {}
    for key, value in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(value.data_ptr(), []).append(key)
    for keys in by_tensor.values():
        present = [k for k in keys if k in state]
        differ = [k for k in present[1:] if state[k].shape != state[present[0]].shape
                  or not torch.equal(state[k], state[present[0]])]
        if differ:
            raise InputError(f"--pretrained {source}: {present[0]} and {differ[0]} hold different values, but this "
                             "model has one tensor for both (a head shared by all decoder layers, or a head and its "
                             "alias); are --with-box-refine/--two-stage those of the checkpoint?")


def hf_checkpoint_state(model, source):
    """(weights, what they are, the name of each class-head row or None) of a transformers checkpoint under the
    built detector's names, after checking its config.json against the detector: every key of the model filled,
    every tensor of the file used."""
    config_path, weights_path = hf_checkpoint_files(source)
    config = read_hf_config(config_path, source)
    check_hf_config(config, model, source)
    state, unknown = official_state_of_hf(read_hf_weights(weights_path, source))
    own = model.state_dict()
    unknown += [k for k in state if k not in own]
    if unknown:
        raise InputError(f"--pretrained {source}: {len(unknown)} tensors of {os.path.basename(weights_path)} have no "
                         f"place in this model, e.g. {unknown[:3]}")
    from_head0 = fill_hf_heads(state, own, two_stage=model.two_stage, with_box_refine=model.with_box_refine)
    check_shared_tensors(state, model, source)
    row_names = hf_class_names(config, source)
    rows = state["class_embed.0.weight"].shape[0] if "class_embed.0.weight" in state else None
    if row_names is not None and rows is not None and len(row_names) > rows:
        raise InputError(f"--pretrained {source}: config.json's id2label names {len(row_names)} classes, its class "
                         f"head has {rows} rows, expected one name per row")
    tied = sorted({i for head, i in from_head0 if head == "class_embed"})
    note = (f"; its class heads of decoder layers {tied} are head 0's (transformers 5 ties them)"
            if tied and model.with_box_refine else "")
    return state, f"transformers checkpoint {source} ({os.path.basename(weights_path)}){note}", row_names
