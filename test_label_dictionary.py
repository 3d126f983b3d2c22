"""Tests for label_dictionary.py, the CLIP label dictionary f_cls of Sec. 3.2: label-embeddings files, the disk
cache and every input of its key, the random-weight text encoder, and the offline failure. CPU only, no network."""
import re
import time

import huggingface_hub.constants
import numpy as np
import pytest
import torch

import label_dictionary
from label_dictionary import ClipWeightsUnavailableError, label_embeddings


@pytest.fixture(autouse=True)
def offline_caches(tmp_path, monkeypatch):
    """Every test: caches in tmp_path and the hub offline, even if huggingface_hub was imported earlier."""
    monkeypatch.setenv('CLIP_DETR_CACHE', str(tmp_path / 'clip-detr'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hf'))



NAMES = ['red circle', 'blue triangle', 'green square']


def test_embeddings_file_pt_and_npy_are_row_normalized(tmp_path):
    table = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 1.0]])
    torch.save(table, tmp_path / 'table.pt')
    np.save(tmp_path / 'table.npy', table.double().numpy())
    expected = torch.tensor([[0.6, 0.8], [0.0, 1.0], [2 ** -0.5, 2 ** -0.5]])
    for name in ('table.pt', 'table.npy'):
        f_cls = label_embeddings(NAMES, embeddings_file=tmp_path / name)
        assert f_cls.dtype == torch.float32
        torch.testing.assert_close(f_cls, expected)


def test_embeddings_file_errors(tmp_path):
    torch.save(torch.ones(2, 5), tmp_path / 'two_rows.pt')
    with pytest.raises(ValueError, match=r"two_rows\.pt.* 2 rows, expected 3"):
        label_embeddings(NAMES, embeddings_file=tmp_path / 'two_rows.pt')
    torch.save(torch.ones(3), tmp_path / 'flat.pt')
    with pytest.raises(ValueError, match=r'flat\.pt.*2 dimensions'):
        label_embeddings(NAMES, embeddings_file=tmp_path / 'flat.pt')
    with pytest.raises(FileNotFoundError, match='missing.npy'):
        label_embeddings(NAMES, embeddings_file=tmp_path / 'missing.npy')


def test_cache_hit_does_not_rebuild(tmp_path, monkeypatch):
    calls = []

    def fake_encoder(class_names, **kwargs):
        calls.append(kwargs)
        return torch.arange(1.0, 1.0 + 2 * len(class_names)).reshape(len(class_names), 2)  # (K, 2)

    monkeypatch.setattr(label_dictionary, '_encode_with_clip', fake_encoder)
    first = label_embeddings(NAMES, model_name='RN50')
    assert len(calls) == 1
    cached = list((tmp_path / 'clip-detr' / 'label_embeddings').iterdir())
    assert len(cached) == 1 and cached[0].suffix == '.pt'

    def no_encoder(class_names, **kwargs):
        raise AssertionError('the cache was missed')

    monkeypatch.setattr(label_dictionary, '_encode_with_clip', no_encoder)
    torch.testing.assert_close(label_embeddings(NAMES, model_name='RN50'), first)
    monkeypatch.setattr(label_dictionary, '_encode_with_clip', fake_encoder)
    label_embeddings(NAMES, model_name='RN50', prompt='a drawing of a {}')
    assert len(calls) == 2, 'another prompt must be another cache entry'


@pytest.mark.parametrize('change', [
    dict(model_name='ViT-B-32'), dict(pretrained='openai'), dict(prompt='a drawing of a {}'),
    dict(class_names=['red circle', 'blue triangle', 'yellow star']), dict(class_names=list(reversed(NAMES))),
    dict(version=label_dictionary.TABLE_VERSION + 1),
], ids=['model', 'pretrained tag', 'prompt', 'names', 'order of the names', 'format version'])
def test_every_input_of_the_table_is_in_its_cache_key(change, monkeypatch):
    """A table cached for one (model, tag, prompt, names in order, format version) is never served for another: a
    key without the tag would hand a random-weight table to a run asking for CLIP's real weights, one without the
    version a table computed the old way (all names in one batch) to a run that reads rows name by name."""
    def fake_encoder(class_names, *, model_name, pretrained, prompt, device):
        # Rows that tell every input apart: one (K, 3) table per (model, tag, prompt, name, version).
        return torch.tensor([[len(model_name), len(pretrained) + 0.5 * label_dictionary.TABLE_VERSION,
                              hash((prompt, name)) % 997 + 1.0] for name in class_names])
    monkeypatch.setattr(label_dictionary, '_encode_with_clip', fake_encoder)
    base = dict(class_names=NAMES, model_name='RN50', pretrained='none', prompt='a photo of a {}')
    label_embeddings(**base)
    change = dict(change)
    if 'version' in change:
        monkeypatch.setattr(label_dictionary, 'TABLE_VERSION', change.pop('version'))
    other = dict(base, **change)
    expected = torch.nn.functional.normalize(fake_encoder(other['class_names'], model_name=other['model_name'],
                                                          pretrained=other['pretrained'], prompt=other['prompt'],
                                                          device='cpu'), dim=-1)
    torch.testing.assert_close(label_embeddings(**other), expected, rtol=0, atol=0)


def test_random_text_encoder_is_deterministic_and_says_so(tmp_path, capsys):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = label_embeddings(NAMES, model_name='ViT-S-32-alt', pretrained='none', cache_dir=tmp_path / 'a')
    assert 'RANDOM' in capsys.readouterr().out
    # A cache miss must leave the caller's random stream as a cache hit would: untouched.
    assert torch.equal(torch.get_rng_state(), before)
    second = label_embeddings(NAMES, model_name='ViT-S-32-alt', pretrained='none', cache_dir=tmp_path / 'b')
    assert first.shape == (3, 256)
    torch.testing.assert_close(first.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(first, second)
    assert (first @ first.t() - torch.eye(3)).abs().max() < 0.999, 'rows must be distinct'


def test_offline_without_cache_fails_fast_with_the_options(tmp_path):
    start = time.monotonic()
    with pytest.raises(ClipWeightsUnavailableError) as error:
        label_embeddings(NAMES, model_name='RN50', pretrained='openai', cache_dir=tmp_path)
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert "'RN50/openai'" in message and '\n' not in message
    for option in ('connect to the internet', '--label-embeddings FILE (.pt/.npy with 3 rows)',
                   '--clip-pretrained none'):
        assert option in message
    assert isinstance(error.value, ValueError)
    assert not (tmp_path / 'label_embeddings').exists() or not any((tmp_path / 'label_embeddings').iterdir())


def test_unknown_model_or_tag_is_rejected():
    with pytest.raises(ValueError, match="CLIP model 'RN51'"):
        label_embeddings(NAMES, model_name='RN51')
    with pytest.raises(ValueError, match=r"tag 'laion9'.*'openai'"):
        label_embeddings(NAMES, model_name='RN50', pretrained='laion9')


def test_pretrained_tag_loads_downloaded_checkpoint_with_quick_gelu(tmp_path, monkeypatch):
    import open_clip
    # A small model under a made-up tag: the tag's download and its QuickGELU flag are what is tested.
    monkeypatch.setattr(open_clip, 'get_pretrained_cfg',
                        lambda model, tag: {'hf_hub': 'org/tiny/', 'quick_gelu': True} if tag == 'tiny' else {})
    torch.manual_seed(3)
    reference = open_clip.create_model('ViT-S-32-alt', force_quick_gelu=True, pretrained_text=False).eval()
    torch.save(reference.state_dict(), tmp_path / 'tiny.bin')
    with torch.no_grad():
        tokens = open_clip.get_tokenizer('ViT-S-32-alt')([f'a photo of a {name}' for name in NAMES])
        expected = torch.nn.functional.normalize(reference.encode_text(tokens), dim=-1)
    requested = []

    def local_download(tag_cfg, **kwargs):
        requested.append(tag_cfg['hf_hub'])
        return str(tmp_path / 'tiny.bin')

    monkeypatch.setattr(open_clip, 'download_pretrained', local_download)
    f_cls = label_embeddings(NAMES, model_name='ViT-S-32-alt', pretrained='tiny')
    assert requested == ['org/tiny/']
    torch.testing.assert_close(f_cls, expected)


LONG = ' '.join(['striped'] * 80)  # a prompt of more than CLIP's 77 tokens: what follows is never read


@pytest.mark.parametrize('names, why', [
    (['red box', 'Red Box'], "CLIP's tokenizer lower-cases text and collapses spaces"),
    (['red box', 'red   box'], "CLIP's tokenizer lower-cases text and collapses spaces"),
    (['cat', 'dog', 'DOG'], "CLIP's tokenizer lower-cases text and collapses spaces"),
    ([f'{LONG} cat', f'{LONG} dog'],
     "they differ only past CLIP's 77-token context, prompt 'a photo of a {}' included"),
], ids=['case', 'spaces', 'among others', 'past the context'])
def test_names_the_text_encoder_cannot_tell_apart_are_refused(names, why, capsys):
    """Two names with one row would be scored alike: every detection twice, under two names. The encoder runs, and
    the cache it fills is read, with the same outcome."""
    for attempt in ('encoded', 'cached'):
        with pytest.raises(ValueError, match=re.escape(why)) as info:
            label_embeddings(names, model_name='ViT-S-32-alt', pretrained='none')
        assert all(f"{name[-12:]}'" in str(info.value) for name in names[-2:]), (attempt, str(info.value))
        assert 'cannot tell them apart' in str(info.value) and '\n' not in str(info.value)


def test_names_with_rows_of_one_direction_in_a_label_file_are_refused(tmp_path):
    """A named table, a plain one (a row and twice it point the same way) and a cached table alike."""
    torch.save({'names': ['cat', 'kitten', 'dog'], 'embeddings': torch.tensor([[1.0, 2.0], [1.0, 2.0], [2.0, 1.0]])},
               tmp_path / 'named.pt')
    with pytest.raises(ValueError, match=r"'cat' and 'kitten' get the same label-dictionary row \(label embeddings "
                                         r"file '.*named\.pt' gives them rows of one direction\)"):
        label_embeddings(['dog', 'cat', 'kitten'], embeddings_file=tmp_path / 'named.pt')
    label_embeddings(['dog', 'cat'], embeddings_file=tmp_path / 'named.pt')  # either of the twins alone is fine
    np.save(tmp_path / 'plain.npy', np.array([[1.0, 2.0], [3.0, 1.0], [2.0, 4.0]]))
    with pytest.raises(ValueError, match="'red circle' and 'green square' get the same"):
        label_embeddings(NAMES, embeddings_file=tmp_path / 'plain.npy')
    cached = label_dictionary._cache_path(None, 'RN50', 'none', 'a photo of a {}', NAMES)
    cached.parent.mkdir(parents=True)
    torch.save(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]), cached)
    with pytest.raises(ValueError, match="'blue triangle' and 'green square' get the same"):
        label_embeddings(NAMES, model_name='RN50', pretrained='none')


def test_names_the_text_encoder_tells_apart_keep_their_rows():
    """Close names (one letter, a plural, punctuation, a difference inside the context) are distinct classes."""
    names = ['cat', 'cats', 'car', 'red box', 'red box!', f'{LONG[:300]} cat', f'{LONG[:300]} dog']
    table = label_embeddings(names, model_name='ViT-S-32-alt', pretrained='none')
    assert table.shape[0] == len(names) and not label_dictionary._same_rows(table)


@pytest.mark.parametrize('damage', [b'', b'PK\x03\x04 cut short', torch.zeros(3, 4),
                                    torch.ones(2, 4, dtype=torch.int64), torch.full((2, 4), float('nan'))],
                         ids=['empty', 'truncated', 'other shape', 'integers', 'NaN'])
def test_a_damaged_cache_is_recomputed_said_once_and_replaced(damage, capsys, monkeypatch):
    """The cache is the project's own file: a damaged one is recomputed, said once, and written again, so the next
    run reads it instead of paying for the encoder again."""
    first = label_embeddings(NAMES, model_name='ViT-S-32-alt', pretrained='none')
    cached = label_dictionary._cache_path(None, 'ViT-S-32-alt', 'none', 'a photo of a {}', NAMES)
    if isinstance(damage, bytes):
        cached.write_bytes(damage)
    else:
        torch.save(damage, cached)
    capsys.readouterr()
    torch.testing.assert_close(label_embeddings(NAMES, model_name='ViT-S-32-alt', pretrained='none'), first,
                               rtol=0, atol=0)
    assert capsys.readouterr().out.count('recomputing it') == 1

    def no_encoder(class_names, **kwargs):
        raise AssertionError('the damaged cache was not replaced')
    monkeypatch.setattr(label_dictionary, '_encode_with_clip', no_encoder)
    torch.testing.assert_close(label_embeddings(NAMES, model_name='ViT-S-32-alt', pretrained='none'), first,
                               rtol=0, atol=0)
    assert 'recomputing' not in capsys.readouterr().out
