"""Random draws (issue 31, class 5): what should differ differs, what should repeat repeats, and evaluation draws
nothing.

  DynQL        Eq. 6's noise and Eq. 7's jitter are drawn for every DynQuery set and every instance, anew at every
               step, from torch's generator (so a seed repeats them)
  training     the shuffle follows --seed and the epoch; every torchrun rank is seeded apart; a resumed rank goes on
               with its own random stream
  evaluation   the val transforms, the val loader (with and without workers), PostProcess, evaluate() and the
               training run's evaluation of an epoch leave Python's, NumPy's and torch's generators untouched, so
               evaluating never changes what training draws next

CPU only, no network. Shape legend: N GT instances, C model width, S DynQuery sets, G padded set size.
"""
import contextlib
import io
import pickle
import random
import types

import numpy as np
import pytest
import torch

import build
import data
import train
from conftest import TINY, parse_args, write_distinct_coco
from dynql import DynQL
from model import PostProcess


@pytest.fixture
def keep_generators():
    """The tests here seed and draw on purpose: the generators are put back as they were afterwards."""
    saved = train.rng_state()
    yield
    train.set_rng_state(saved)


def generator_states():
    """Python's, NumPy's and torch's global generator states, comparable with ==."""
    return {"python": random.getstate(), "numpy": pickle.dumps(np.random.get_state()),
            "torch": torch.get_rng_state().tolist()}


@contextlib.contextmanager
def draws_nothing(what):
    """The block must leave every global generator as it found it."""
    before = generator_states()
    yield
    after = generator_states()
    moved = [name for name in before if before[name] != after[name]]
    assert not moved, f"{what} drew from {moved}: evaluating would change what training draws next"


# ----------------------------------------------------------------------------------------------------------
# DynQL: Eq. 6 and Eq. 7 for every set and instance
# ----------------------------------------------------------------------------------------------------------
SIZES = [2, 0, 3]  # GT boxes per image: N = 5


def dynql_draw(seed, betas=(0.5, 0.5, 0.3), rho=1.0):
    """(DynQL, z_attr (N, C), targets, its DynQueries): one forward of DynQL on three images."""
    g = torch.Generator().manual_seed(100)
    targets = [{"labels": torch.zeros(n, dtype=torch.int64),
                "boxes": torch.cat([0.3 + 0.4 * torch.rand(n, 2, generator=g),  # centres
                                    0.1 + 0.2 * torch.rand(n, 2, generator=g)], 1)}  # sizes
               for n in SIZES]
    z_attr = torch.randn(sum(SIZES), 16, generator=g)
    dynql = DynQL(d_model=16, betas=betas, rho=rho)
    torch.manual_seed(seed)
    queries = dynql(z_attr, targets, num_queries=4, proposal_queries=lambda p: (torch.zeros(*p.shape[:-1], 16),))
    return dynql, z_attr, targets, queries


def per_set(queries, field):
    """The valid rows of a (B, S*G, D) field, per set: S tensors (N, D) in torch.cat(targets) order."""
    B, S, G = queries.valid.shape[0], queries.num_sets, queries.group_size
    values = getattr(queries, field).view(B, S, G, -1)
    return [values[:, s][queries.valid] for s in range(S)]


def assert_all_differ(rows, what):
    """No two of `rows` (tensors of one shape) are equal anywhere: each was drawn on its own."""
    for (i, a), (j, b) in [(p, q) for p in enumerate(rows) for q in enumerate(rows) if p[0] < q[0]]:
        assert ((a - b).abs() > 1e-6).all(), f"{what} {i} and {j} share draws"


def test_eq6_noise_is_drawn_for_every_set_and_every_instance(keep_generators):
    """eps of Eq. 6, recovered from each DynQuery's content: a fresh draw per set (two sets share beta 0.5, as
    Table 7's x2 repeats a beta), per instance and per step; the same seed repeats it."""
    dynql, z_attr, _, queries = dynql_draw(seed=0)
    z_hat = dynql.unit_scale(z_attr)
    eps = [(content - (1 - beta) ** 0.5 * z_hat) / beta ** 0.5
           for content, beta in zip(per_set(queries, "content"), dynql.betas)]  # S x (N, C)
    assert_all_differ(eps, "DynQuery sets")
    for s, e in enumerate(eps):
        assert_all_differ(list(e), f"set {s}: instances")
        assert abs(e.std().item() - 1) < 0.25, "eps ~ N(0, I)"
    torch.testing.assert_close(dynql_draw(seed=0)[3].content, queries.content)
    next_step = dynql_draw(seed=1)[3]
    assert ((next_step.content - queries.content).abs()[next_step.valid.repeat(1, 3)] > 1e-6).all()


def test_eq7_jitter_is_drawn_for_every_set_and_every_instance(keep_generators):
    """The jitter of Eq. 7 in units of its step (lambda times the sign: (reference - GT) / (w/2, h/2, w, h); rho =
    0.3 keeps every box inside the image, so nothing is clipped): a fresh draw per set, per instance and per
    coordinate, within rho, and anew at every step; the same seed repeats it."""
    _, _, targets, queries = dynql_draw(seed=0, rho=0.3)
    gt = torch.cat([t["boxes"] for t in targets])
    step = torch.cat([gt[:, 2:] / 2, gt[:, 2:]], 1)  # (N, 4)
    lam = [(boxes - gt) / step for boxes in per_set(queries, "reference")]  # S x (N, 4)
    assert_all_differ(lam, "DynQuery sets")
    for s, draws in enumerate(lam):
        assert_all_differ(list(draws), f"set {s}: instances")
        assert_all_differ(list(draws.t()), f"set {s}: coordinates")
        assert draws.abs().max() <= 0.3 + 1e-5
    torch.testing.assert_close(dynql_draw(seed=0, rho=0.3)[3].reference, queries.reference)
    assert not torch.allclose(dynql_draw(seed=1, rho=0.3)[3].reference, queries.reference)


# ----------------------------------------------------------------------------------------------------------
# Training: the shuffle, the ranks, a resume
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nine_images(tmp_path_factory):
    """A custom set of 9 noise images, 5 landscape and 4 portrait, one box each; returns the dataset."""
    root = tmp_path_factory.mktemp("nine")
    sizes = [(61, 45), (45, 61), (57, 47), (47, 57), (63, 41), (41, 63), (59, 49), (49, 59), (65, 45)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [4, 5, 20, 15], "area": 300, "iscrowd": 0}
            for i in range(1, 10)]
    folder, ann_file = write_distinct_coco(root / "img", root / "ann.json", sizes, anns, [{"id": 1, "name": "x"}])
    return data.CocoDetection(folder, ann_file, transforms=data.make_transforms("val", eval_size=None))


def shuffles(tiny_args, dataset, kind, seed, epoch, rank=0, world=1):
    """(the images of the rank's sampler, its training batches) of one epoch as make_loaders builds them for the
    batching of dataset kind `kind` ('shapes': aspect groups; else plain batches)."""
    args = tiny_args("--seed", seed, "--batch-size", 2)
    args.dataset = kind  # the batching path; the images are the custom set's
    train_loader, train_sampler, _ = train.make_loaders(args, dataset, dataset, rank, world)
    train_sampler.set_epoch(epoch)
    return list(train_sampler), list(train_loader.batch_sampler)


@pytest.mark.parametrize("kind", ["shapes", "custom"])
def test_the_training_shuffle_follows_the_seed_and_the_epoch(tiny_args, nine_images, kind):
    """Aspect-grouped (`shapes`) and plain batches: a (seed, epoch) gives one order, every time; another seed or
    another epoch another; the two ranks of an epoch split one order between them, so together they see every
    image."""
    first = shuffles(tiny_args, nine_images, kind, seed=1, epoch=0)
    assert shuffles(tiny_args, nine_images, kind, seed=1, epoch=0) == first
    assert shuffles(tiny_args, nine_images, kind, seed=2, epoch=0)[1] != first[1]
    assert shuffles(tiny_args, nine_images, kind, seed=1, epoch=1)[1] != first[1]
    ranks = [shuffles(tiny_args, nine_images, kind, seed=1, epoch=0, rank=r, world=2)[0] for r in (0, 1)]
    assert set(ranks[0]) | set(ranks[1]) == set(range(9)), ranks


class Stop(Exception):
    """Raised by the test's seeding hook: main has seeded its generators, nothing more is needed."""


SEED_EVERYTHING = train.seed_everything


def first_draws(monkeypatch, tiny_args, rank, seed=42):
    """{generator: first draw} of train.main as rank `rank` of two torchrun processes, right after it seeds."""
    draws = {}

    def seed_then_stop(value):
        SEED_EVERYTHING(value)
        draws.update(python=random.random(), numpy=float(np.random.rand()), torch=torch.rand(1).item())
        raise Stop

    monkeypatch.setattr(train, "seed_everything", seed_then_stop)
    monkeypatch.setattr(train, "init_distributed", lambda args: (rank, 2))
    with pytest.raises(Stop), contextlib.redirect_stdout(io.StringIO()):
        train.main(tiny_args("--seed", seed))
    return draws


def test_every_torchrun_rank_draws_its_own_random_numbers(monkeypatch, tiny_args, keep_generators):
    """Ranks seeded alike would flip the same images, pick the same scales and draw the same DynQL noise: each rank
    of a run draws its own numbers from every generator, and the same rank and --seed draw the same again."""
    ranks = [first_draws(monkeypatch, tiny_args, rank) for rank in (0, 1)]
    assert all(ranks[0][name] != ranks[1][name] for name in ranks[0]), ranks
    assert first_draws(monkeypatch, tiny_args, 1) == ranks[1]
    assert first_draws(monkeypatch, tiny_args, 1, seed=7) != ranks[1]


def test_a_resumed_rank_goes_on_with_its_own_random_stream(tmp_path, keep_generators):
    """The checkpoint holds every rank's generator states: rank r of the resumed run takes state r. Resumed on more
    processes than wrote it, a rank without a state keeps its own seed (--seed + rank, as main gave it), so no two
    ranks draw alike."""
    states = []
    for seed in (11, 12):
        train.seed_everything(seed)
        states.append(train.rng_state())
    detr = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(detr.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[5])
    ckpt = {"model": detr.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": states, "epoch": 0, "log": []}
    draws = []
    for rank in range(4):
        train.seed_everything(42 + rank)  # what main does before it restores
        run = types.SimpleNamespace(detr=detr, optimizer=optimizer, scheduler=scheduler, scaler=None, rank=rank,
                                    args=types.SimpleNamespace(epochs=3, eval_every=0), history=[], saved_epoch=None,
                                    log_path=str(tmp_path / "log.jsonl"))
        with contextlib.redirect_stdout(io.StringIO()):
            assert train.restore(run, ckpt, "ckpt.pth") == 1
        draws.append((random.random(), float(np.random.rand()), torch.rand(1).item()))
    for rank in (0, 1):
        train.set_rng_state(states[rank])
        assert draws[rank] == (random.random(), float(np.random.rand()), torch.rand(1).item()), rank
    for (a, first), (b, second) in [(p, q) for p in enumerate(draws) for q in enumerate(draws) if p[0] < q[0]]:
        assert all(x != y for x, y in zip(first, second)), f"ranks {a} and {b} draw alike"


# ----------------------------------------------------------------------------------------------------------
# Evaluation draws nothing
# ----------------------------------------------------------------------------------------------------------
def test_val_transforms_and_postprocess_draw_nothing(keep_generators):
    """The evaluation pipeline of every dataset kind, at several sizes (one size: nothing to choose), and the
    post-processing."""
    image = data.Image.new("RGB", (97, 61), (90, 120, 150))
    target = {"boxes": torch.tensor([[10.0, 7.0, 40.0, 30.0]]), "labels": torch.tensor([0]),
              "area": torch.tensor([690.0]), "iscrowd": torch.tensor([0])}
    random.seed(0)
    for shapes in (True, False):
        for min_size, max_size in ((45, 77), (64, 96), (127, 211)):
            transforms = data.dataset_transforms("val", shapes=shapes, min_size=min_size, max_size=max_size)
            with draws_nothing(f"the val transforms (shapes={shapes}, {min_size}/{max_size})"):
                transforms(image, target)
                transforms(image, None)
    outputs = {"pred_logits": torch.randn(2, 10, 3), "pred_boxes": torch.rand(2, 10, 4)}
    with draws_nothing("PostProcess"):
        PostProcess()(outputs, torch.tensor([[61, 97], [83, 59]]))


@pytest.fixture(scope="module")
def tiny_sets(cache, tmp_path_factory):
    """The tiny `shapes` configuration with dropout 0.1 (a model in training mode would draw) and its datasets."""
    args = parse_args("--output-dir", tmp_path_factory.mktemp("out"), *TINY, "--dropout", "0.1", "--method", "baseline")
    return args, build.build_dataset("train", args), build.build_dataset("val", args)


@pytest.mark.parametrize("workers", [0, 1])
def test_the_val_loader_draws_nothing(tiny_sets, workers, keep_generators):
    """The val loader train.py builds, with and without worker processes (whose seeds come from its own
    generator), goes through every val image once and draws nothing."""
    args, train_set, val_set = tiny_sets
    args.num_workers = workers
    _, _, val_loader = train.make_loaders(args, train_set, val_set, 0, 1)
    with draws_nothing("the val loader"):
        batches = list(val_loader)
    assert sorted(int(t["image_id"]) for _, _, targets in batches for t in targets) == sorted(val_set.ids)


@pytest.mark.slow
def test_evaluating_an_epoch_draws_nothing(tiny_sets, keep_generators):
    """train.py's evaluation of an epoch (evaluate() over the val loader, the post-processing, COCOeval), with the
    model left in training mode by the epoch: predict switches it to eval, so its dropout draws nothing."""
    args, train_set, val_set = tiny_sets
    torch.manual_seed(0)
    detr, _, postprocess = build.build_model(args, train_set.cat_names)
    args.num_workers = 0
    _, _, val_loader = train.make_loaders(args, train_set, val_set, 0, 1)
    run = types.SimpleNamespace(detr=detr.train(), postprocess=postprocess, val_loader=val_loader, val_set=val_set,
                                device=torch.device("cpu"), train_set=train_set, args=args)
    log = {}
    with draws_nothing("train.evaluate_epoch"):
        train.evaluate_epoch(run, log)
    assert "coco_stats" in log


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step:UserWarning")  # no optimizer step here
def test_each_epoch_of_a_run_trains_in_the_order_of_its_seed_and_epoch(tiny_args, monkeypatch, tmp_path,
                                                                       keep_generators):
    """Through train.main (3 epochs; the training steps, checkpoints and evaluations stubbed out, the steps to record
    their batches): epoch e trains in the order of (--seed, e), so every epoch has its own and a resumed run would
    see the same batches."""
    orders = []

    def record(model, criterion, loader, *rest, **kwargs):
        orders.append(list(loader.batch_sampler))
        return {"loss": 0.0}
    monkeypatch.setattr(train, "train_one_epoch", record)
    monkeypatch.setattr(train, "save_epoch_checkpoint", lambda run, epoch: None)
    monkeypatch.setattr(train, "evaluate_epoch", lambda run, log: None)
    args = tiny_args("--seed", 5, "--epochs", 3)
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(args)
    assert len(orders) == 3 and orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    train_set = build.build_dataset("train", args)
    for epoch, order in enumerate(orders):
        loader, sampler, _ = train.make_loaders(args, train_set, train_set, 0, 1)
        sampler.set_epoch(epoch)
        assert list(loader.batch_sampler) == order, epoch
