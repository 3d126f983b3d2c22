"""Tests for alignnet.py: Eq. 1-5 on hand-built inputs with known answers. CPU only, no network."""
import math

import pytest
import torch

from alignnet import AlignNet


def make_alignnet(num_classes=3, dim=4, d_model=6, **kwargs):
    torch.manual_seed(0)
    return AlignNet(label_embeddings=torch.randn(num_classes, dim), d_model=d_model, **kwargs)


def box_from_pixels(x0, y0, x1, y1, width, height):
    """Normalized cxcywh of a box given by pixel edges of a width x height image."""
    return [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]


# Eq. 1 ---------------------------------------------------------------------------------------------

def test_encoded_feature_is_mean_inside_box_averaged_over_levels():
    torch.manual_seed(0)
    level0 = torch.randint(0, 10, (2, 3, 8, 8)).float()  # one constant value per pixel
    level1 = torch.randint(0, 10, (2, 3, 4, 4)).float()
    # Pixel edges at 8x8: x [2, 6), y [0, 4) -> at 4x4: x [1, 3), y [0, 2); and the whole image.
    boxes = torch.tensor([box_from_pixels(2, 0, 6, 4, 8, 8), box_from_pixels(0, 0, 8, 8, 8, 8)])
    batch_index = torch.tensor([1, 0])
    z_enc = make_alignnet(d_model=3).object_encoded_feature([level0, level1], torch.ones(2, 2, 2), boxes,
                                                            batch_index)
    expected = torch.stack([
        (level0[1, :, 0:4, 2:6].mean((1, 2)) + level1[1, :, 0:2, 1:3].mean((1, 2))) / 2,
        (level0[0].mean((1, 2)) + level1[0].mean((1, 2))) / 2,
    ])
    torch.testing.assert_close(z_enc, expected)


def test_encoded_feature_ignores_padding():
    torch.manual_seed(0)
    image0 = torch.randn(1, 3, 6, 4)  # level 0 of an image 6 high, 4 wide
    image1 = torch.randn(1, 3, 3, 2)  # its level 1
    boxes = torch.tensor([box_from_pixels(1, 2, 3, 6, 4, 6)])
    net = make_alignnet(d_model=3)
    alone = net.object_encoded_feature([image0, image1], torch.ones(1, 2, 2), boxes, torch.tensor([0]))
    # The same image as the second of a batch padded to 8x8 (level 1: 4x4), next to a full-size image.
    padded0 = torch.zeros(2, 3, 8, 8)
    padded1 = torch.zeros(2, 3, 4, 4)
    padded0[0] = 5.0
    padded1[0] = 5.0
    padded0[1, :, :6, :4] = image0[0]
    padded1[1, :, :3, :2] = image1[0]
    valid_ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[4 / 8, 6 / 8], [2 / 4, 3 / 4]]])  # (w, h)
    batched = net.object_encoded_feature([padded0, padded1], valid_ratios, boxes, torch.tensor([1]))
    torch.testing.assert_close(batched, alone)
    assert not torch.allclose(alone, torch.zeros_like(alone))


def test_encoded_feature_rejects_level_count_mismatch():
    with pytest.raises(ValueError, match='memory levels'):
        make_alignnet().object_encoded_feature([torch.zeros(1, 6, 4, 4)], torch.ones(1, 2, 2),
                                               torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.tensor([0]))


# Eq. 2, 3 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('align_feature, extra', [('label', 0), ('label+bbox', 4), ('label+scale', 2)])
def test_attribute_feature_shapes(align_feature, extra):
    net = make_alignnet(dim=4, d_model=6, align_feature=align_feature)
    labels = torch.tensor([2, 0, 2, 1, 1])
    boxes = torch.rand(5, 4)
    assert net.attr_proj.in_features == 4 + extra
    assert net.object_attribute_input(labels, boxes).shape == (5, 4 + extra)
    assert net.object_attribute_feature(labels, boxes).shape == (5, 6)


@pytest.mark.parametrize('align_feature, columns', [('label+scale', [2, 3]), ('label+bbox', [0, 1, 2, 3])])
def test_attribute_feature_feeds_label_row_and_box_size(align_feature, columns):
    dim = 4
    net = make_alignnet(dim=dim, d_model=dim + len(columns), align_feature=align_feature)
    with torch.no_grad():
        net.attr_proj.weight.copy_(torch.eye(dim + len(columns)))
        net.attr_proj.bias.zero_()
    labels = torch.tensor([1, 2])
    boxes = torch.tensor([[0.5, 0.4, 0.2, 0.1], [0.3, 0.6, 0.05, 0.7]])
    z_attr = net.object_attribute_feature(labels, boxes)
    torch.testing.assert_close(z_attr[:, :dim], net.f_cls[labels])
    torch.testing.assert_close(z_attr[:, dim:], boxes[:, columns])


def test_attribute_feature_is_the_linear_layer_of_f_cat():
    """Eq. 3 with a generic projection (not square, non-zero bias): z_attr = f_cat W^T + b, f_cat as Eq. 2 builds it."""
    net = make_alignnet(dim=4, d_model=5)
    with torch.no_grad():
        net.attr_proj.bias.normal_()
    labels = torch.tensor([2, 0, 1])
    boxes = torch.tensor([[0.5, 0.4, 0.2, 0.1], [0.3, 0.6, 0.05, 0.7], [0.1, 0.1, 0.2, 0.2]])
    f_cat = torch.cat([net.f_cls[labels], boxes[:, 2:]], dim=1)  # (N, D + 2)
    expected = f_cat @ net.attr_proj.weight.detach().t() + net.attr_proj.bias.detach()  # (N, C)
    assert net.attr_proj.bias.abs().min() > 0
    torch.testing.assert_close(net.object_attribute_feature(labels, boxes), expected)


def test_unknown_align_feature_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"label\+size.*'label', 'label\+bbox', 'label\+scale'"):
        make_alignnet(align_feature='label+size')


def test_out_of_range_label_is_rejected():
    with pytest.raises(ValueError, match=r'\[0, 2\]'):
        make_alignnet(num_classes=3).object_attribute_input(torch.tensor([3]), torch.rand(1, 4))


# Eq. 4, 5 ----------------------------------------------------------------------------------------

def test_loss_matches_hand_computation():
    net = make_alignnet()
    with torch.no_grad():
        net.logit_beta.fill_(math.log(10.0))
    z_enc = [[1.0, 0.0, 2.0], [0.0, 3.0, 1.0], [1.0, 1.0, 1.0]]
    z_attr = [[2.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, -1.0, 0.0]]

    def cosine(u, v):
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    A = [[10.0 * cosine(z_enc[i], z_attr[j]) for j in range(3)] for i in range(3)]
    rows = sum(-(A[i][i] - math.log(sum(math.exp(A[i][j]) for j in range(3)))) for i in range(3)) / 3
    cols = sum(-(A[j][j] - math.log(sum(math.exp(A[i][j]) for i in range(3)))) for j in range(3)) / 3
    assert abs(rows - cols) > 1.0  # A is far from symmetric: a loss along one axis only cannot match
    similarity = net.similarity(torch.tensor(z_enc), torch.tensor(z_attr))
    torch.testing.assert_close(similarity, torch.tensor(A))
    assert net.alignment_loss(similarity).item() == pytest.approx((rows + cols) / 2, rel=1e-5)


def test_aligned_pairs_give_lower_loss_than_shuffled():
    torch.manual_seed(1)
    net = make_alignnet()
    z_enc = torch.randn(6, 6)
    z_attr = z_enc + 0.1 * torch.randn(6, 6)
    aligned = net.alignment_loss(net.similarity(z_enc, z_attr))
    shuffled = net.alignment_loss(net.similarity(z_enc, z_attr[torch.tensor([1, 2, 3, 4, 5, 0])]))
    assert aligned < shuffled


def test_beta_starts_at_clip_value_and_is_capped():
    net = make_alignnet()
    assert net.beta.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        net.logit_beta.fill_(math.log(1000.0))
    assert net.beta.item() == pytest.approx(100.0)
    similarity = net.similarity(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]]))
    assert similarity.item() == pytest.approx(100.0)


def memory_and_ratios(batch=2, d_model=6):
    torch.manual_seed(0)
    levels = [torch.randn(batch, d_model, 8, 8, requires_grad=True), torch.randn(batch, d_model, 4, 4)]
    return levels, torch.ones(batch, 2, 2)


def targets(counts):
    torch.manual_seed(2)
    return [{'boxes': torch.rand(n, 4) * 0.4 + 0.3, 'labels': torch.randint(0, 3, (n,))} for n in counts]


def assert_gradient_reaches_parameters(net):
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name


def test_forward_trains_memory_and_parameters():
    net = make_alignnet()
    levels, valid_ratios = memory_and_ratios()
    loss = net(levels, valid_ratios, targets([2, 3]))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert_gradient_reaches_parameters(net)
    assert net.attr_proj.weight.grad.abs().sum() > 0 and net.logit_beta.grad != 0
    assert levels[0].grad.abs().sum() > 0


def test_forward_without_instances_is_zero_and_touches_every_parameter():
    net = make_alignnet()
    levels, valid_ratios = memory_and_ratios()
    loss = net(levels, valid_ratios, targets([0, 0]))
    assert loss.item() == 0.0
    loss.backward()
    assert_gradient_reaches_parameters(net)


def test_forward_with_one_instance_per_image_trains_attr_proj():
    """N = 2 instances from two images: Eq. 5 contrasts them, so the backward must reach attr_proj (z_attr)
    with a non-zero gradient. (With N = 1 the loss is a 1 x 1 cross entropy, identically 0.)"""
    net = make_alignnet()
    levels, valid_ratios = memory_and_ratios()
    loss = net(levels, valid_ratios, targets([1, 1]))
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert net.attr_proj.weight.grad.abs().sum() > 0 and net.attr_proj.bias.grad.abs().sum() > 0
    assert net.logit_beta.grad != 0 and levels[0].grad.abs().sum() > 0
    single = make_alignnet()(*memory_and_ratios(), targets([0, 1]))
    assert single.item() == 0.0


def test_label_dictionary_is_a_non_persistent_buffer():
    net = make_alignnet()
    assert 'f_cls' in dict(net.named_buffers())
    assert not any(key.startswith('f_cls') for key in net.state_dict())
