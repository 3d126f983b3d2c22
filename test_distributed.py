"""Several processes and machines (issue 31, class 10): what a torchrun run writes, and torchrun across two machines.

Two machines are two torchrun launchers on this one, `--nnodes 2`, one process each, meeting at a c10d rendezvous on
127.0.0.1 (a free port): each launcher is given its own --output-dir, as two machines without shared storage would
have, so the test sees which process writes what.

  - rank 0 alone writes the checkpoint and the log, and prints; the other node's folder stays empty;
  - the checkpoint holds the bare detector's weights (no DDP `module.` prefix) and both ranks' generator states;
    it resumes in one process and loads in evaluate.py; on two machines, one of which lacks it, the run stops;
  - the losses and the gradients of one step on two ranks, one image each, equal one process's on both images (two
    processes of one launcher: the averaging is the same wherever the ranks run, and the two-launcher rendezvous is
    the first test's).

Every test starts processes: the full tier only. The launchers of a test run at once (most of their time is starting
Python and torch). CPU, Gloo, no network beyond 127.0.0.1.
"""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import train
from conftest import HERE, TINY, free_port, parse_args

pytestmark = pytest.mark.slow


def launcher(node_rank, port, *argv):
    """The torchrun command of one of two machines: one process, c10d rendezvous at 127.0.0.1:port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", f"clip-detr-test-{port}", "--rdzv-conf", "join_timeout=120", "--local-addr", "127.0.0.1",
            *map(str, argv)]


def run_all(commands, cwd, env):
    """Start every command at once, wait for all: [(exit status, stdout, stderr)]. A launcher whose peer died
    would wait for the rendezvous: all are killed at the timeout."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
             for cmd in commands]
    try:
        outputs = [proc.communicate(timeout=400) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outputs)]


def environment(cache):
    # PYTHONFAULTHANDLER: a worker that dies of a signal prints the Python line it died on.
    return dict(os.environ, HF_HUB_OFFLINE="1", CLIP_DETR_CACHE=str(cache), OMP_NUM_THREADS="1",
                PYTHONFAULTHANDLER="1")


def test_two_machines_train_rank_0_alone_writes_and_its_checkpoint_resumes_in_one_process(tmp_path, cache):
    """train.py on two machines, one step of CLIP-DETR (AlignNet and DynQL) and the evaluation of the epoch; the
    checkpoint then resumes in one process (train.py) and loads in evaluate.py."""
    port = free_port()
    run = [*TINY, "--data-path", cache / "shapes", "--epochs", 1, "--max-steps", 1, "--method", "clip-detr"]
    train_py = os.path.join(HERE, "train.py")
    commands = [launcher(node, port, train_py, *run, "--output-dir", tmp_path / f"node{node}") for node in (0, 1)]
    results = run_all(commands, HERE, environment(cache))
    for node, (code, out, err) in enumerate(results):
        assert code == 0, f"node {node}:\n{out[-2000:]}\n{err[-3000:]}"
    written = [sorted(os.listdir(tmp_path / f"node{node}")) for node in (0, 1)]
    assert sorted(written) == [[], ["checkpoint.pth", "log.jsonl"]], written
    writer, other = (tmp_path / f"node{node}" for node in sorted((0, 1), key=lambda node: not written[node]))
    outs = [out for _, out, _ in results]
    assert sum(out.count("epoch 0:") for out in outs) == 1 and "2 process(es)" in "".join(outs)
    with open(writer / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [0] and records[0]["coco_stats"] is not None
    ckpt = torch.load(writer / "checkpoint.pth", weights_only=False)
    assert not [k for k in ckpt["model"] if k.startswith("module.")], "the bare detector's weights, not DDP's"
    assert len(ckpt["rng"]) == 2 and ckpt["epoch"] == 0

    # --resume auto on both machines: only rank 0's folder holds the checkpoint. Rank 1 would start afresh beside a
    # resumed rank 0; both stop instead, saying which rank lacks it, and the checkpoint is kept.
    saved = (writer / "checkpoint.pth").read_bytes()
    port = free_port()
    results = run_all([launcher(node, port, train_py, *run, "--epochs", 2, "--resume", "auto", "--output-dir",
                                tmp_path / f"node{node}") for node in (0, 1)], HERE, environment(cache))
    for node, (code, out, err) in enumerate(results):
        assert code != 0 and "error: --resume auto: rank(s) [1] find no checkpoint" in err, f"node {node}:\n{err}"
    assert (writer / "checkpoint.pth").read_bytes() == saved and not os.listdir(other)

    with contextlib.redirect_stdout(io.StringIO()):
        train.main(parse_args(*run, "--epochs", 2, "--output-dir", writer, "--resume", "auto"))
    resumed = torch.load(writer / "checkpoint.pth", weights_only=False)
    assert resumed["epoch"] == 1 and len(resumed["rng"]) == 1
    assert any(not torch.equal(resumed["model"][k], v) for k, v in ckpt["model"].items()), "epoch 1 trained"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        log = evaluate.main(["--resume", str(writer / "checkpoint.pth"), "--device", "cpu"])
    assert log["coco_stats"] is not None, buffer.getvalue()


# One training step of the tiny baseline on a fixed batch: under DDP (two processes, one image each) or alone (one
# process, both images). Rank 0 writes every loss term (the mean over ranks, what the averaged gradient descends)
# and every parameter's gradient after the backward pass (DDP averages them over the ranks).
STEP = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {here!r})
import build, train
from conftest import TINY
from matcher import weight_dict
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
args = train.finalize_args(train.get_parser().parse_args([*TINY, "--method", "baseline", "--output-dir", {out!r}]))
images, targets = torch.load({batch!r}, weights_only=False)
torch.manual_seed(0)
model, criterion, _ = build.build_model(args, ["a", "b", "c"])
model.train()
ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
part = slice(rank, rank + 1) if world > 1 else slice(0, 2)
outputs = ddp(images[part], torch.zeros_like(images[part, 0], dtype=torch.bool), targets[part])
losses = train.compute_losses(criterion, outputs, targets[part])
weights = weight_dict(losses)
sum(weights[k] * v for k, v in losses.items()).backward()
values = torch.stack([losses[k].detach() for k in sorted(losses)])
dist.all_reduce(values)
if rank == 0:
    grads = {{name: p.grad for name, p in model.named_parameters() if p.grad is not None}}
    torch.save({{"losses": dict(zip(sorted(losses), (values / world).tolist())), "grads": grads}}, {result!r})
dist.barrier()  # no rank tears its connections down while another is still writing its result
dist.destroy_process_group()
"""


def test_one_step_on_two_ranks_equals_one_process_with_the_same_total_batch(tmp_path, cache):
    """Two ranks with one image each lose what one process with both images loses, term by term (the images hold
    1 and 3 boxes, so every normalizer matters), and their averaged gradients are its gradients."""
    g = torch.Generator().manual_seed(1)
    targets = [{"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3]]), "labels": torch.tensor([1])},
               {"boxes": torch.rand(3, 2, generator=g).mul(0.5).add(0.25).repeat(1, 2).mul(
                   torch.tensor([1.0, 1.0, 0.3, 0.3])), "labels": torch.tensor([0, 2, 1])}]
    torch.save((torch.randn(2, 3, 128, 128, generator=g), targets), tmp_path / "batch.pt")  # (B, 3, H, W)
    scripts = {}
    for name in ("two", "one"):
        scripts[name] = tmp_path / f"step_{name}.py"
        scripts[name].write_text(STEP.format(here=HERE, out=str(tmp_path / f"out_{name}"),
                                             batch=str(tmp_path / "batch.pt"), result=str(tmp_path / f"{name}.pt")))
    commands = [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                 str(scripts[name])] for n, name in ((2, "two"), (1, "one"))]
    for code, out, err in run_all(commands, tmp_path, environment(cache)):
        assert code == 0, err[-3000:]
    two, one = (torch.load(tmp_path / f"{name}.pt", weights_only=False) for name in ("two", "one"))
    assert set(two["losses"]) == set(one["losses"]) and "loss_ce_enc" in one["losses"]
    for name, value in one["losses"].items():
        assert two["losses"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert set(two["grads"]) == set(one["grads"]) and len(one["grads"]) > 100
    for name, grad in one["grads"].items():
        # To float32 rounding of the tensor's scale (the biases before GroupNorm have gradient 0, give or take 1e-8).
        assert (two["grads"][name] - grad).abs().max() <= 1e-4 * grad.abs().max() + 1e-7, name
