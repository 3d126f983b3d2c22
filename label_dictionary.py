"""The label dictionary f_cls: one CLIP text embedding per class name (paper Sec. 3.2, the input of Eq. 2).

AlignNet (alignnet.py, Eq. 2-3) and DynQL through it, and the open-vocabulary class head (model.py,
`LabelEmbeddingClassifier`, Sec. 4.2), read the dictionary; this file makes it. f_cls is the L2-normalized CLIP
text embedding of "a photo of a {name}" for every category, in category order, from an open_clip text encoder
(the paper's RN50x64 / openai by default). It is computed once per (model, pretrained tag, prompt, names) and
cached on disk under $CLIP_DETR_CACHE (default ~/.cache/clip-detr), so that later runs need neither the network
nor the CLIP weights. Each name is encoded on its own, so its row depends on the name alone: a name asked for at
inference, among any other names, gets exactly the row it had in training.

A label-embeddings file replaces the encoder: a (K, D) table (.pt or .npy) whose rows follow the class order, or
a named table, a .pt holding {"names": [K strings], "embeddings": (K, D) float tensor}, whose rows are looked up
by name (training picks its categories' rows; inference the names asked for). Whatever the source, two classes
whose rows point the same way are refused (`check_distinct_rows`): CLIP's tokenizer lower-cases and reads 77
tokens, so 'red box' and 'Red Box' would be scored alike and every detection reported twice.

Shapes: K classes, D CLIP text embedding width (1024 for RN50x64).

Deviations from the paper:
    - pretrained='none' gives a seeded random-weight text encoder, for offline smoke runs and the CPU demo: its
      rows are arbitrary but distinct directions, so nothing CLIP knows about the names reaches the detector.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from errors import InputError, read_torch_file, save_torch
from errors import cache_dir as default_cache_dir


class ClipWeightsUnavailableError(InputError):
    """The CLIP weights for the label dictionary cannot be had (no network, no cache, no file)."""


TABLE_VERSION = 2


def _cache_path(cache_dir, model_name, pretrained, prompt, class_names):
    """Cache file of one label dictionary, keyed by everything that changes its rows."""
    if cache_dir is None:
        cache_dir = default_cache_dir()
    # The last item names how rows are computed (one name per forward pass since version 2): a table computed
    # otherwise differs in the last bits and must not be served for it.
    key = json.dumps([model_name, pretrained, prompt, list(class_names), TABLE_VERSION])
    digest = hashlib.sha1(key.encode('utf-8')).hexdigest()
    return Path(cache_dir).expanduser() / 'label_embeddings' / f'{digest}.pt'


def read_embeddings_file(path):
    """(names, table): a label-embeddings file's names (None for a plain table) and its (K, D) rows of finite
    numbers. A .pt holds a plain tensor or {"names": [K strings], "embeddings": (K, D) tensor}; a .npy a plain
    array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label embeddings file '{path}' not found (expected a .pt or .npy file "
                                f"with one row per class)")
    if path.suffix not in ('.pt', '.npy'):
        raise InputError(f"label embeddings file '{path}' has suffix '{path.suffix}', expected .pt or .npy")
    names = None
    if path.suffix == '.pt':
        table = read_torch_file(path, 'label embeddings file', weights_only=True)
        if isinstance(table, dict):
            names, table = _named_table(path, table)
    else:
        try:
            table = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:  # numpy's ways of saying 'not an .npy file'
            raise InputError(f"label embeddings file '{path}' cannot be read as .npy ({err})") from None
    if isinstance(table, np.ndarray) and table.dtype.kind == 'f':
        table = torch.from_numpy(table)
    if not isinstance(table, torch.Tensor) or not table.is_floating_point():
        what = f"{type(table).__name__} of dtype {table.dtype}" if hasattr(table, 'dtype') else type(table).__name__
        raise InputError(f"label embeddings file '{path}' holds a {what}, expected a floating-point tensor")
    if table.ndim != 2:
        raise InputError(f"label embeddings file '{path}' holds a tensor of shape {tuple(table.shape)}, "
                         f"expected 2 dimensions (classes, embedding width)")
    if names is not None and len(names) != table.shape[0]:
        raise InputError(f"label embeddings file '{path}' has {len(names)} names and {table.shape[0]} rows, "
                         "expected one name per row")
    bad_rows = (~torch.isfinite(table)).any(dim=1).nonzero().flatten().tolist()  # (rows with a NaN/Inf,)
    if bad_rows:
        raise InputError(f"label embeddings file '{path}' has NaN or Inf in rows {bad_rows[:10]}"
                         f"{' ...' if len(bad_rows) > 10 else ''}, expected finite numbers")
    # Eq. 4 and the dictionary compare directions: an all-zero row has none (normalizing it gives 0 or NaN).
    zero_rows = (table == 0).all(dim=1).nonzero().flatten().tolist()  # (rows of zeros,)
    if zero_rows:
        raise InputError(f"label embeddings file '{path}' has all-zero rows {zero_rows[:10]}"
                         f"{' ...' if len(zero_rows) > 10 else ''}, expected a non-zero embedding for every class")
    return names, table


def _read_cache(path, num_classes):
    """The cached table at `path`, or None when there is none. A cache file that is not a (K, D) float table of
    finite, non-zero rows (a kill mid-write by an older version, a full disk, a stray file) is said to
    be unreadable and recomputed (label_embeddings then writes it again), not an error: the cache is the
    project's own file, not the user's input."""
    if not path.is_file():
        return None
    try:
        table = read_torch_file(path, 'label dictionary cache', weights_only=True)
        if not (torch.is_tensor(table) and table.is_floating_point() and table.ndim == 2
                and table.shape[0] == num_classes and torch.isfinite(table).all() and (table != 0).any(dim=1).all()):
            raise InputError(f"label dictionary cache {path} holds no ({num_classes}, D) table of finite, non-zero "
                             "rows")
    except InputError as err:
        print(f"{err}: recomputing it")
        return None
    return table


def _named_table(path, content):
    """(names, embeddings) of a named table {"names": [...], "embeddings": tensor}, names checked."""
    if set(content) != {'names', 'embeddings'}:
        raise InputError(f"label embeddings file '{path}' holds a dict with keys {sorted(map(str, content))}, "
                         "expected exactly 'names' (a list of K strings) and 'embeddings' (a (K, D) tensor)")
    names = content['names']
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise InputError(f"label embeddings file '{path}': 'names' is a {type(names).__name__}, expected a list "
                         "of strings")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"label embeddings file '{path}' names {twice[:5]} more than once, expected each name "
                         "once")
    return list(names), content['embeddings']


def _load_embeddings_file(path, class_names):
    """The (K, D) rows of `class_names` from a label-embeddings file: a plain table's rows in class order, a
    named table's rows looked up by name."""
    names, table = read_embeddings_file(path)
    if names is None:
        if table.shape[0] != len(class_names):
            raise InputError(f"label embeddings file '{path}' has {table.shape[0]} rows, "
                             f"expected {len(class_names)} (one per class)")
        return table
    missing = [n for n in class_names if n not in names]
    if missing:
        raise InputError(f"label embeddings file '{path}' has no row named {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; its {len(names)} names: "
                         f"{', '.join(map(repr, names[:50]))}{' ...' if len(names) > 50 else ''}")
    return table[[names.index(n) for n in class_names]]  # (K, D) in class order


def _clip_checkpoint(model_name, pretrained, num_classes):
    """(local path, QuickGELU flag) of the CLIP weights for a pretrained tag, downloaded if not cached.

    The download is done here, before open_clip builds the model, so that exactly this step's failure
    (a Hugging Face hub miss, FileNotFoundError, or a URL error, URLError; both OSError) becomes one
    clear message. huggingface_hub honours HF_HUB_OFFLINE=1 by looking only at its local cache, which
    fails at once; without that flag and without network it retries for about 45 s before failing.
    """
    import open_clip  # here, not at the top: see label_embeddings
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg:
        raise InputError(f"unknown CLIP pretrained tag '{pretrained}' for model '{model_name}', expected one of "
                         f"{open_clip.list_pretrained_tags_by_model(model_name) + ['none']}")
    try:
        return open_clip.download_pretrained(tag_cfg), tag_cfg.get('quick_gelu', False)
    except OSError as error:
        raise ClipWeightsUnavailableError(
            f"cannot load CLIP weights '{model_name}/{pretrained}' (offline?): connect to the internet once to "
            f"cache the label dictionary, pass --label-embeddings FILE (.pt/.npy with {num_classes} rows), "
            f"or use --clip-pretrained none for a random-weight text encoder") from error


def _encode_with_clip(class_names, *, model_name, pretrained, prompt, device):
    """Embed the prompted class names with the CLIP text encoder; returns (K, D) float32 on the CPU."""
    import open_clip  # here, not at the top: see label_embeddings
    if pretrained == 'none':
        checkpoint, quick_gelu = None, False
    else:
        checkpoint, quick_gelu = _clip_checkpoint(model_name, pretrained, len(class_names))
    # The random encoder is seeded inside a forked RNG: the caller's random stream (training seed, per-rank
    # seeds) must not depend on whether the table was cached.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # OpenAI's tags were trained with QuickGELU; open_clip's plain configs use GELU unless told.
        # pretrained_text=False: the full checkpoint (or none) is the only weight source, never a hub text tower.
        model = open_clip.create_model(model_name, pretrained=checkpoint, force_quick_gelu=quick_gelu,
                                       pretrained_text=False, device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    tokens = tokenizer([prompt.format(name) for name in class_names]).to(device)  # (K, context length)
    # One name per forward pass: a batch's matrix products round differently with its size, so a row would
    # depend on the names beside it, and a name asked for at inference would not score as it did in training.
    with torch.no_grad():
        f_cls = torch.cat([model.encode_text(tokens[k:k + 1]) for k in range(len(class_names))])  # (K, D)
    return f_cls.float().cpu()


# Rows at least this close in direction (cosine, in float64) point the same way up to float32 rounding: one class
# to the detector, as Eq. 4 and the open-vocabulary class head compare directions. Rows of names CLIP reads
# differently are far below it (at most 0.99 between the 80 COCO names, random-weight encoder included).
SAME_DIRECTION = 1 - 1e-12


def _same_rows(table):
    """Pairs (i, j), i < j, of rows of a (K, D) table that point the same way; in blocks of rows, so that a large
    vocabulary never holds a (K, K) matrix."""
    unit = F.normalize(table.double(), dim=-1)
    pairs = []
    for start in range(0, unit.shape[0], 1024):
        cosine = unit[start:start + 1024] @ unit.T  # (block, K)
        rows, cols = (cosine >= SAME_DIRECTION).nonzero(as_tuple=True)
        pairs += [(start + i, j) for i, j in zip(rows.tolist(), cols.tolist()) if start + i < j]
    return pairs


def _why_the_same(name_a, name_b, *, model_name, prompt):
    """Why CLIP's text encoder gives two names one embedding: what its tokenizer makes of their prompts."""
    import open_clip  # here, not at the top: see label_embeddings
    tokenizer = open_clip.get_tokenizer(model_name)
    texts = [prompt.format(name) for name in (name_a, name_b)]
    if not torch.equal(*tokenizer(texts)):
        return "its text encoder gives them the same embedding"
    if " ".join(name_a.lower().split()) == " ".join(name_b.lower().split()):
        return "CLIP's tokenizer lower-cases text and collapses spaces"
    context = getattr(tokenizer, 'context_length', 77)
    if hasattr(tokenizer, 'encode') and len(tokenizer.encode(texts[0])) + 2 > context:
        return f"they differ only past CLIP's {context}-token context, prompt {prompt!r} included"
    return "CLIP's tokenizer reads them as the same text"


def check_distinct_rows(table, class_names, why):
    """Refuse a label dictionary in which two classes have rows of one direction: the detector would score them
    alike and report every detection twice under two names. `why(a, b)` says where the rows came from."""
    pairs = _same_rows(table)
    if pairs:
        short = lambda name: repr(name if len(name) <= 60 else f"{name[:25]} ... {name[-25:]}")  # noqa: E731
        shown = "; ".join(f"{short(class_names[i])} and {short(class_names[j])}" for i, j in pairs[:3])
        i, j = pairs[0]
        raise InputError(f"class names {shown}{' ...' if len(pairs) > 3 else ''} get the same label-dictionary "
                         f"row ({why(class_names[i], class_names[j])}), so the detector cannot tell them apart: "
                         "expected a row of its own for every class (merge the names, or rename one)")


def label_embeddings(class_names, *, model_name='RN50x64', pretrained='openai', prompt='a photo of a {}',
                     cache_dir=None, embeddings_file=None, device='cpu'):
    """The label dictionary f_cls (Sec. 3.2): one L2-normalized CLIP text embedding per class, (K, D).

    Sources, first match wins: `embeddings_file` (.pt/.npy: rows in class order, or a named table whose rows
    are looked up by name, see `read_embeddings_file`); the on-disk cache under
    `cache_dir` (default $CLIP_DETR_CACHE or ~/.cache/clip-detr); the open_clip text encoder of
    `model_name`/`pretrained`, whose table is then cached. pretrained='none' uses random weights seeded
    with 0 (for offline smoke runs; it says so).
    """
    class_names = list(class_names)
    if not class_names:
        raise ValueError("class_names is empty, expected at least one class name")
    if embeddings_file is not None:
        table = _load_embeddings_file(embeddings_file, class_names)
        check_distinct_rows(table, class_names, lambda a, b: f"label embeddings file '{embeddings_file}' gives "
                                                             "them rows of one direction")
    else:
        if '{}' not in prompt:
            raise ValueError(f"prompt '{prompt}' has no '{{}}' placeholder for the class name")
        # open_clip is imported where a table is looked up, not with this module: with transformers installed it
        # imports it too (1.5 s), which every command would pay before it could report a bad flag.
        import open_clip
        if model_name not in open_clip.list_models():
            raise InputError(f"unknown CLIP model '{model_name}', expected one of open_clip.list_models(), "
                             f"e.g. RN50x64, RN50, ViT-B-32")
        path = _cache_path(cache_dir, model_name, pretrained, prompt, class_names)
        table = _read_cache(path, len(class_names))
        if table is None:
            table = _encode_with_clip(class_names, model_name=model_name, pretrained=pretrained, prompt=prompt,
                                      device=device)
            save_torch(path, table)
        check_distinct_rows(table, class_names, lambda a, b: _why_the_same(a, b, model_name=model_name,
                                                                           prompt=prompt))
        if pretrained == 'none':
            print(f"label dictionary: RANDOM-weight CLIP text encoder '{model_name}' (--clip-pretrained none); "
                  f"for smoke runs only")
    return F.normalize(table.float(), dim=-1).to(device)
