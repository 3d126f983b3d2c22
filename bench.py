"""Speed and memory benchmarks (not tests): side-by-side numbers and ratios from one run.

  python bench.py attn   [--device cuda]   ms_deform_attn_pytorch vs ms_deform_attn_gather (and ms_deform_attn_triton
                                            on CUDA) at Deformable DETR sizes (batch 2, 4 levels of an 800x1333
                                            input, 8 heads, 4 points, width 256; encoder Lq = S_all, decoder Lq = 300)
  python bench.py train  [--steps 10]       training step time and peak memory on `shapes`: baseline vs each
                                            CLIP-DETR method, same seed, same batches (training-only cost)
  python bench.py coco-step [--steps 3]     seconds per training step of the default COCO model (R50, 6+6 layers,
                                            300 queries, two-stage + refine) on one 800x1333 image
  python bench.py hf [--rounds 5] [--precision fp32 bf16] [--methods baseline clip-detr] [--attn-impl gather]
                                            baseline and clip-detr against HuggingFace transformers'
                                            DeformableDetrForObjectDetection at the same configuration (R50 random
                                            weights, 6+6, 300 queries, two-stage + refine, batch 2 at 640x640, --size):
                                            training step (forward, loss, backward, clipping, AdamW) and inference,
                                            alternating rounds in one process, min and median seconds and ratios;
                                            bf16 is CPU autocast around every model. Needs `pip install transformers`
  python bench.py onnx [--rounds 5] [--models demo coco]
                                            onnxruntime (CPU) against eager PyTorch with the reference and with `auto`
                                            attention: inference latency of the exported graph (random weights) for
                                            the demo model at its evaluation size (128x192) and the default COCO
                                            model at 800x1333, batch 1, alternating in one process; min and median
                                            ms, ratios, file size. Needs pip install -r requirements-test.txt
  python bench.py amp [--rounds 8] [-- FLAGS]   demo training steps in float32 and under --amp bf16, alternating on
                                            the same batches in one process, with the CPU's model name and bf16
                                            flags: what `--amp auto` gives on this machine
  python bench.py profile [--steps 3] [-- FLAGS]   torch.profiler of demo training steps (train.py's flags, default
                                            the demo's): self CPU time by operator, forward/backward time by
                                            stage (backbone, encoder, decoder, deformable sampling, matcher and
                                            losses, AlignNet, DynQL, data loading, optimizer)
  python bench.py padding [-- FLAGS]        padded area of the demo's training batches (one epoch, from the JSON's
                                            image sizes and BatchResize's drawn scales) against their images' area:
                                            random batches, landscape / portrait (the demo's), and eight groups
                                            of images ranked by width / height
  python bench.py gpu [--steps 20]          on a CUDA machine: the CUDA tests, `attn` (Triton vs reference, fwd and
                                            fwd+bwd, peak memory) and 20 training steps of the COCO model for
                                            baseline and clip-detr with --amp bf16 --attn-impl triton, one table;
                                            without CUDA it says so in one line and exits 0

Shape legend (attention): value (B, S_all, M, C/M), sampling locations (B, Lq, M, L, P, 2), B batch, Lq
queries, M heads, L levels, P points, S_all = sum_l H_l*W_l.

bench.py is a command like train.py: a bad flag (a count below 1, a device this machine lacks, an unknown method)
or a failed worker run ends in one line on stderr and exit status 2.

Peak memory is torch.cuda.max_memory_allocated on CUDA; on the CPU it is the peak resident set size of a
fresh process per configuration (so numbers include the Python/torch baseline of ~0.5 GB).

Deviations from the paper: none (the paper reports no timings).
"""
import contextlib
import functools
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from errors import ArgumentParser, InputError, error_line

HERE = os.path.dirname(os.path.abspath(__file__))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats):
    fn()  # warm-up (and Triton compilation)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ----------------------------------------------------------------------------------------------------------
def attn_inputs(n_queries, device, batch=2, heads=8, head_dim=32, points=4):
    """Random inputs at Deformable DETR sizes: levels of an 800x1333 input at strides 8, 16, 32, 64."""
    shapes = torch.tensor([(100, 167), (50, 84), (25, 42), (13, 21)], dtype=torch.long, device=device)
    starts = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    s_all = int(shapes.prod(1).sum())
    lq = s_all if n_queries == "encoder" else n_queries
    g = torch.Generator(device="cpu").manual_seed(0)
    value = torch.randn(batch, s_all, heads, head_dim, generator=g).to(device)
    loc = torch.rand(batch, lq, heads, 4, points, 2, generator=g).to(device)
    attn = torch.rand(batch, lq, heads, 4, points, generator=g).softmax(-1).to(device)
    return value, shapes, starts, loc, attn


def attention_times(fn, inputs, device, repeats):
    """(forward, forward + backward) median seconds of one attention implementation on `inputs` (attn_inputs)."""
    v, s, st, l, a = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    grad = torch.randn(v.shape[0], l.shape[1], v.shape[2] * v.shape[3], device=device)  # (B, Lq, C)

    def fwd():
        with torch.no_grad():
            fn(v, s, st, l, a)

    def fwd_bwd():
        torch.autograd.grad(fn(v, s, st, l, a), (v, l, a), grad)

    return _time(fwd, device, repeats), _time(fwd_bwd, device, repeats)


def bench_attn(args):
    import model
    device = torch.device(args.device)
    impls = {"pytorch": lambda v, s, st, l, a: model.ms_deform_attn_pytorch(v, s, l, a),
             "gather": lambda v, s, st, l, a: model.ms_deform_attn_gather(v, s, l, a)}
    if device.type == "cuda" and model.triton_available():
        impls["triton"] = model.ms_deform_attn_triton
    else:
        print(f"Triton kernel: not measured (device {device}; it needs CUDA)")
    rows = []
    for lq in ("encoder", 300):
        inputs = attn_inputs(lq, device)
        for name, fn in impls.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t_f, t_fb = attention_times(fn, inputs, device, args.repeats)
            mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
            rows.append(dict(lq="encoder" if lq == "encoder" else str(lq), impl=name, fwd_ms=1e3 * t_f,
                             fwd_bwd_ms=1e3 * t_fb, peak_mib=mem))
    print(f"{'Lq':>8} {'impl':>8} {'fwd ms':>9} {'fwd+bwd ms':>11} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['lq']:>8} {r['impl']:>8} {r['fwd_ms']:9.2f} {r['fwd_bwd_ms']:11.2f} {r['peak_mib']:9.1f}")
    for lq in ("encoder", "300"):
        ref = next(r for r in rows if r["lq"] == lq and r["impl"] == "pytorch")
        for other in (r for r in rows if r["lq"] == lq and r["impl"] != "pytorch"):
            print(f"Lq={lq}: {other['impl']} speed-up over pytorch fwd {ref['fwd_ms'] / other['fwd_ms']:.2f}x, "
                  f"fwd+bwd {ref['fwd_bwd_ms'] / other['fwd_bwd_ms']:.2f}x, memory ratio "
                  f"{other['peak_mib'] / ref['peak_mib']:.2f}")


# ----------------------------------------------------------------------------------------------------------
def _train_worker(argv, steps, out_path):
    """One configuration in this (fresh) process: median step time over `steps` steps on fixed batches."""
    import build
    import train
    args = train.finalize_args(train.get_parser().parse_args(argv))
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    ds = build.build_dataset("train", args)
    model, criterion, _ = build.build_model(args, ds.cat_names)
    model.to(device).train()
    optimizer = build.build_optimizer(model, args)
    _, collate = build.build_train_batches(args, ds, range(len(ds)))
    batches = [collate([ds[(i * args.batch_size + j) % len(ds)] for j in range(args.batch_size)])
               for i in range(steps + 2)]

    amp_dtype = {"bf16": torch.bfloat16}.get(args.amp)

    def step(batch):
        train.train_step(model, criterion, batch, optimizer, device, clip_max_norm=args.clip_max_norm,
                         amp_dtype=amp_dtype)

    for b in batches[:2]:
        step(b)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for b in batches[2:]:
        t0 = time.perf_counter()
        step(b)
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    with open(out_path, "w") as f:
        json.dump({"step_s": sorted(times)[len(times) // 2], "peak_mib": peak}, f)


def measure_train_steps(argv, steps, env=None):
    """{"step_s", "peak_mib"} of train.py's configuration `argv` in a fresh process: the median step time over
    `steps` steps on fixed batches, and the process's peak memory (results.py's cost table reads it too). The
    worker's failure (a bad train.py flag, a bad input: its one error line) is an InputError carrying that line."""
    with tempfile.TemporaryDirectory(prefix="clip-detr-bench-") as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "_worker", "--steps", str(steps), "--out", out, "--", *argv]
        run = subprocess.run(cmd, cwd=HERE, env=dict(env or os.environ, HF_HUB_OFFLINE="1"), stderr=subprocess.PIPE,
                             text=True)
        if run.returncode:
            said = (run.stderr.strip().splitlines() or ["no error message"])[-1].removeprefix("error: ")
            raise InputError(f"bench.py train: the run of {' '.join(argv)} failed: {said}")
        sys.stderr.write(run.stderr)
        with open(out) as f:
            return json.load(f)


def bench_train(args):
    common = ["--dataset", "shapes", "--device", args.device, "--num-workers", "0"] + args.extra
    rows = {m: measure_train_steps(common + ["--method", m], args.steps) for m in args.methods}
    base = rows.get("baseline")
    print(f"{'method':>10} {'s/step':>8} {'peak MiB':>9} {'time ratio':>11} {'memory ratio':>13}")
    for m, r in rows.items():
        tr = r["step_s"] / base["step_s"] if base else float("nan")
        mr = r["peak_mib"] / base["peak_mib"] if base else float("nan")
        print(f"{m:>10} {r['step_s']:8.3f} {r['peak_mib']:9.0f} {tr:11.3f} {mr:13.3f}")


def bench_coco_step(args):
    import build
    import train
    targs = train.finalize_args(train.get_parser().parse_args(
        ["--dataset", "coco", "--device", args.device, "--method", args.method, "--clip-pretrained", "none",
         "--clip-model", "RN50"]))
    names = [f"class {i}" for i in range(80)]
    model, criterion, _ = build.build_model(targs, names)
    device = torch.device(args.device)
    model.to(device).train()
    optimizer = build.build_optimizer(model, targs)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, 3, 800, 1333, generator=g).to(device)
    mask = torch.zeros(1, 800, 1333, dtype=torch.bool, device=device)
    targets = [{"boxes": (torch.rand(7, 4, generator=g) * 0.4 + 0.1).to(device),
                "labels": torch.randint(0, 80, (7,), generator=g).to(device)}]

    def step():
        train.train_step(model, criterion, (images, mask, targets), optimizer, device,
                         clip_max_norm=targs.clip_max_norm)

    t = _time(step, device, args.steps)
    print(f"COCO default model ({targs.backbone}, {targs.enc_layers}+{targs.dec_layers} layers, "
          f"{targs.num_queries} queries, --method {args.method}), one 800x1333 image on {device}: "
          f"{t:.2f} s per training step (median of {args.steps})")


# ----------------------------------------------------------------------------------------------------------
def _gpu_train_worker(method, steps):
    """Print JSON timings of `steps` training steps of the COCO model (--amp bf16 --attn-impl triton) on CUDA.

    A fixed synthetic batch (COCO batch size, 800x1333 images, 7 boxes each) and a random-weight RN50 CLIP
    (its label-embedding width equals RN50x64's, and the step never runs CLIP), so no data or download is needed.
    Runs in a fresh process per method so that peak memory is this method's own.
    """
    import build
    import train
    targs = train.finalize_args(train.get_parser().parse_args(
        ["--dataset", "coco", "--device", "cuda", "--method", method, "--amp", "bf16", "--attn-impl", "triton",
         "--clip-pretrained", "none", "--clip-model", "RN50"]))
    device = torch.device("cuda")
    torch.manual_seed(0)
    model, criterion, _ = build.build_model(targs, [f"class {i}" for i in range(80)])
    model.to(device).train()
    optimizer = torch.optim.AdamW(build.param_groups(model, targs), lr=targs.lr, weight_decay=targs.weight_decay)
    n = targs.batch_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 800, 1333, generator=g).to(device)  # (B, 3, H, W)
    mask = torch.zeros(n, 800, 1333, dtype=torch.bool, device=device)  # (B, H, W)
    targets = [{"boxes": (torch.rand(7, 4, generator=g) * 0.4 + 0.1).to(device),
                "labels": torch.randint(0, 80, (7,), generator=g).to(device)} for _ in range(n)]
    times, loss = [], float("nan")
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, _ = train.train_step(model, criterion, (images, mask, targets), optimizer, device,
                                   clip_max_norm=targs.clip_max_norm, amp_dtype=torch.bfloat16)
        _sync(device)
        times.append(time.perf_counter() - t0)
    warm = times[2:] or times  # the first steps compile the Triton kernels and warm up cuDNN
    print(json.dumps({"step_s": sorted(warm)[len(warm) // 2], "first_s": times[0], "steps": steps,
                      "batch": n, "peak_mib": torch.cuda.max_memory_allocated() / 2**20, "loss": loss}))


def _gpu_tests_row(failed):
    """Run the CUDA tests (names containing "cuda"): one table row."""
    t0 = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda"],
                           cwd=HERE, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    summary = (tests.stdout.strip().splitlines() or ["no output"])[-1]
    if tests.returncode:
        failed.append("CUDA tests")
        print(tests.stdout + tests.stderr)
    return ("tests", "pytest -k cuda", f"{time.perf_counter() - t0:.0f} s", "-", summary)


def _gpu_attention_rows(repeats):
    """Triton against the reference at Deformable DETR sizes, forward and forward + backward, peak memory."""
    import model
    device = torch.device("cuda")
    impls = {"pytorch": lambda v, s, st, l, a: model.ms_deform_attn_pytorch(v, s, l, a),
             "triton": model.ms_deform_attn_triton}
    rows = []
    for lq in ("encoder", 300):
        inputs = attn_inputs(lq, device)
        for name, fn in impls.items():
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t_f, t_fb = attention_times(fn, inputs, device, repeats)
            extra = (torch.cuda.max_memory_allocated() - base) / 2**20
            rows.append(("attention", f"Lq={inputs[3].shape[1]} ({lq}), {name}",
                         f"fwd {1e3 * t_f:.2f} ms, fwd+bwd {1e3 * t_fb:.2f} ms", f"{extra:.0f}",
                         "peak above the inputs, median of " + str(repeats)))
    return rows


def _gpu_train_rows(steps, failed):
    """`steps` COCO-model training steps of baseline and clip-detr (bf16, Triton), each in a fresh process."""
    rows = []
    for method in ("baseline", "clip-detr"):
        code = f"import bench; bench._gpu_train_worker({method!r}, {steps})"
        run = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"))
        config = f"COCO model, --method {method} --amp bf16 --attn-impl triton"
        if run.returncode:
            failed.append(f"training {method}")
            print(run.stdout + run.stderr)
            rows.append(("train", config, "failed", "-", (run.stderr.strip().splitlines() or ["?"])[-1]))
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        rows.append(("train", config, f"{r['step_s']:.3f} s/step", f"{r['peak_mib']:.0f}",
                     f"batch {r['batch']} of 800x1333, median of steps 3-{r['steps']}, first step "
                     f"{r['first_s']:.1f} s, last loss {r['loss']:.3f}"))
    return rows


def bench_gpu(args):
    """One command for a CUDA machine: the CUDA tests, the attention benchmark and COCO-model training steps.

    CUDA tests are the tests whose name contains "cuda" (they skip without a GPU). Without CUDA: one line, exit 0.
    Prints one table; exits non-zero when a part failed.
    """
    if not torch.cuda.is_available():
        print("bench.py gpu: no CUDA device (torch.cuda.is_available() is False); nothing run")
        return
    failed = []
    rows = [_gpu_tests_row(failed), *_gpu_attention_rows(args.repeats), *_gpu_train_rows(args.steps, failed)]
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    header = ("part", "configuration", "time", "peak MiB", "note")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(5)]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    if failed:
        sys.exit(f"bench.py gpu: {', '.join(failed)} failed (output above)")


def _hf_model(num_classes):
    """transformers' DeformableDetrForObjectDetection at the paper's configuration, random ResNet-50 weights.

    Two settings differ from transformers' defaults so that both detectors do the same work: dropout 0.1 also
    after the FFN activation and on the decoder self-attention weights (official Deformable DETR; transformers
    defaults them to 0), and layer2-4 of the ResNet train: transformers freezes its whole native ResNet (its
    freezing rule looks for parameter names its own ResNet does not use). Both then train the paper's parameters
    (stem and layer1 frozen, as the official code does for ImageNet weights).
    """
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig
    cfg = DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, num_labels=num_classes,
        backbone_config=ResNetConfig(out_features=["stage2", "stage3", "stage4"]), two_stage=True,
        with_box_refine=True, num_queries=300, two_stage_num_proposals=300, auxiliary_loss=True,
        activation_dropout=0.1, attention_dropout=0.1)
    hf = DeformableDetrForObjectDetection(cfg)
    for name, p in hf.model.backbone.model.named_parameters():
        p.requires_grad_(name.startswith(("encoder.stages.1.", "encoder.stages.2.", "encoder.stages.3.")))
    return hf


def _our_step_and_infer(method, impl, names, images, mask, targets):
    """A training step and an inference of our COCO model (random R50, stem and layer1 frozen as transformers
    trains them), as two closures."""
    import build
    import train
    targs = train.finalize_args(train.get_parser().parse_args(
        ["--dataset", "coco", "--device", "cpu", "--method", method, "--clip-pretrained", "none",
         "--clip-model", "RN50", "--attn-impl", impl]))
    model, criterion, _ = build.build_model(targs, names)
    model.backbone[0].freeze_stem_and_layer1()
    optimizer = build.build_optimizer(model, targs)

    def step():
        model.train()
        # train_step opens its own autocast, which would switch off bench's: hand it bench's dtype instead.
        amp_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        train.train_step(model, criterion, (images, mask, targets), optimizer, torch.device("cpu"),
                         clip_max_norm=targs.clip_max_norm, amp_dtype=amp_dtype)

    def infer():
        model.eval()
        with torch.no_grad():
            model(images, mask)
    return step, infer


def _hf_step_and_infer(num_classes, images, mask, targets):
    """transformers' training step (its own loss, AdamW, clipping 0.1) and inference, as two closures."""
    hf = _hf_model(num_classes)
    optimizer = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=2e-4, weight_decay=1e-4)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]

    def step():
        hf.train()
        loss = hf(pixel_values=images, pixel_mask=(~mask).long(), labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.1)
        optimizer.step()

    def infer():
        hf.eval()
        with torch.no_grad():
            hf(pixel_values=images, pixel_mask=(~mask).long())
    return step, infer


def alternate(cases, rounds):
    """Seconds of each case over `rounds` rounds that run every case once, in turn (round 0 only warms up), so that
    a slow spell of the machine falls on all of them. cases: {key: (fn, context manager factory)}."""
    times = {key: [] for key in cases}
    for r in range(rounds + 1):
        for key, (fn, context) in cases.items():
            with context():
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
            if r > 0:
                times[key].append(dt)
    return times


def bench_hf(args):
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("bench.py hf compares against HuggingFace transformers, which is not installed: "
              "pip install transformers", file=sys.stderr)
        sys.exit(1)
    torch.manual_seed(0)
    names = [f"class {i}" for i in range(80)]
    B, S = 2, args.size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, S, S, generator=g)
    mask = torch.zeros(B, S, S, dtype=torch.bool)
    targets = [{"boxes": torch.rand(7, 4, generator=g) * 0.4 + 0.1, "labels": torch.randint(0, 80, (7,), generator=g)}
               for _ in range(B)]
    steps, infers = {}, {}
    for method, impl in ((m, i) for m in args.methods for i in args.attn_impl):
        name = method if len(args.attn_impl) == 1 else f"{method}/{impl}"
        steps[name], infers[name] = _our_step_and_infer(method, impl, names, images, mask, targets)
    steps["transformers"], infers["transformers"] = _hf_step_and_infer(len(names), images, mask, targets)
    precisions = {"fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast("cpu", torch.bfloat16)}
    cases = {(kind, name, prec): (fn, precisions[prec]) for prec in args.precision
             for kind, fns in (("train", steps), ("infer", infers)) for name, fn in fns.items()}
    print(f"batch {B} at {S}x{S}, ResNet-50 (random, stem+layer1 frozen), 6+6 layers, 300 queries, two-stage + "
          f"refine; {torch.get_num_threads()} threads; {args.rounds} alternating rounds after one warm-up",
          flush=True)
    stat = {k: (min(v), statistics.median(v)) for k, v in alternate(cases, args.rounds).items()}
    print(f"{'':>6} {'precision':>9} {'model':>17} {'min s':>7} {'median s':>9} {'vs transformers min':>20} "
          f"{'median':>7}")
    for kind, name, prec in cases:
        ref = stat[(kind, "transformers", prec)]
        mn, md = stat[(kind, name, prec)]
        print(f"{kind:>6} {prec:>9} {name:>17} {mn:7.2f} {md:9.2f} {mn / ref[0]:19.2f}x {md / ref[1]:6.2f}x")


# ----------------------------------------------------------------------------------------------------------
# (train.py flags, (H, W) of the one image, number of classes) of the models `bench.py onnx` measures.
ONNX_MODELS = {
    "demo": (["--dataset", "shapes"], (128, 192), 8),
    "coco": (["--dataset", "coco", "--clip-pretrained", "none", "--clip-model", "RN50"], (800, 1333), 80),
}


def _onnx_runs(name, tmp):
    """Export one model of ONNX_MODELS (random weights); its eager (reference and auto attention) and onnxruntime
    inference as closures, and (file size, export seconds, max |box difference| of onnxruntime vs reference)."""
    import build
    import onnx_export
    import train
    flags, (H, W), num_classes = ONNX_MODELS[name]
    targs = train.finalize_args(train.get_parser().parse_args(
        [*flags, "--method", "baseline", "--device", "cpu", "--attn-impl", "auto"]))
    names = [f"class {k}" for k in range(num_classes)]
    torch.manual_seed(0)
    model = build.build_model(targs, names)[0].eval()
    path = os.path.join(tmp, f"{name}.onnx")
    metadata = dict(format=onnx_export.ONNX_FORMAT, class_names=names, cat_ids=list(range(num_classes)),
                    dataset=targs.dataset, min_size=targs.min_size, max_size=targs.max_size, batch_size=1,
                    num_select=100, min_side=onnx_export.ONNX_MIN_SIDE)
    t0 = time.perf_counter()
    size = onnx_export.export_onnx(model, path, metadata=metadata)
    export_s = time.perf_counter() - t0
    detector = onnx_export.OnnxDetector(path, flag="bench.py onnx", spin=False)
    g = torch.Generator().manual_seed(0)
    images, mask = torch.randn(1, 3, H, W, generator=g), torch.zeros(1, H, W, dtype=torch.bool)

    def reference():
        with onnx_export.reference_attention(model), torch.no_grad():
            return model(images, mask)

    def auto():
        with torch.no_grad():
            return model(images, mask)
    runs = {"eager reference": reference, "eager auto": auto, "onnxruntime": lambda: detector(images, mask)}
    diff = (runs["onnxruntime"]()["pred_boxes"] - reference()["pred_boxes"]).abs().max().item()
    return f"{name} {H}x{W}", runs, (size, export_s, diff)


def bench_onnx(args):
    """onnxruntime (CPU) against eager PyTorch, reference and `auto` attention: inference latency, file size."""
    import tempfile

    import onnx_export
    for module in ("onnx", "onnxscript", "onnxruntime"):
        onnx_export.require_package(module, "bench.py onnx")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            label, runs, (size, export_s, diff) = _onnx_runs(name, tmp)
            times = alternate({run: (fn, contextlib.nullcontext) for run, fn in runs.items()}, args.rounds)
            ref = times["eager reference"]
            for run, ts in times.items():
                rows.append((label, run, 1e3 * min(ts), 1e3 * statistics.median(ts), min(ts) / min(ref),
                             statistics.median(ts) / statistics.median(ref),
                             f"{size / 2**20:.1f} MiB, export {export_s:.0f} s, max |box diff| {diff:.1e}"
                             if run == "onnxruntime" else ""))
    print(f"batch 1, random weights, float32; torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"onnxruntime {sys.modules['onnxruntime'].__version__} (its default threads); {args.rounds} alternating "
          "rounds after one warm-up")
    print(f"{'model':>14} {'run':>16} {'min ms':>9} {'median ms':>10} {'vs reference min':>17} {'median':>7}  file")
    for model_name, run, mn, md, rmn, rmd, note in rows:
        print(f"{model_name:>14} {run:>16} {mn:9.1f} {md:10.1f} {rmn:16.2f}x {rmd:6.2f}x  {note}".rstrip())


def cpu_model():
    """The CPU's model name and its bf16 flags, from /proc/cpuinfo (Linux), as a README row names its machine."""
    with open("/proc/cpuinfo") as f:
        lines = f.read().splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    bf16 = [flag for flag in ("avx512_bf16", "amx_bf16", "amx_tile") if flag in flags]
    return f"{name} ({', '.join(bf16) or 'no bf16 flags'})"


def padded_area(dataset, groups, batch_size, scales, max_size, seed, *, grouped):
    """One epoch's padded batch area over its images' area: each batch resized to one scale drawn from `scales`,
    then padded to its largest height and width, as BatchResize and collate_fn do."""
    import data
    random.seed(seed)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = (data.GroupedBatchSampler(order, groups, batch_size) if grouped
               else torch.utils.data.BatchSampler(order, batch_size, drop_last=True))
    padded = images = 0
    for batch in batches:
        size = random.choice(scales)
        sizes = [data.resized_size(info["width"], info["height"], size, max_size)
                 for info in (dataset.coco.imgs[dataset.ids[i]] for i in batch)]  # (h, w) of each image
        padded += len(sizes) * max(h for h, _ in sizes) * max(w for _, w in sizes)
        images += sum(h * w for h, w in sizes)
    return padded / images


def aspect_rank_groups(dataset, groups):
    """Per index, the images ranked by width / height and cut into `groups` groups of equal size."""
    ratios = [dataset.coco.imgs[i]["width"] / dataset.coco.imgs[i]["height"] for i in dataset.ids]
    order = sorted(range(len(ratios)), key=ratios.__getitem__)
    rank = {index: r for r, index in enumerate(order)}
    return [rank[index] * groups // len(ratios) for index in range(len(ratios))]


def bench_padding(args):
    """How much of the demo's padded training batches is padding, for three ways of batching."""
    import build
    import data
    import train
    targs = train.finalize_args(train.get_parser().parse_args([*args.extra, "--num-workers", "0"]))
    ds = build.build_dataset("train", targs)
    scales = data.shapes_scales(targs.min_size)
    ways = {"random batches": (None, False),
            "landscape / portrait (the demo's)": (ds.aspect_groups(), True),
            "8 groups ranked by width / height": (aspect_rank_groups(ds, 8), True)}
    print(f"`shapes` training batches of {targs.batch_size}, {len(ds)} images, one epoch (seed {targs.seed}):")
    print(f"{'batching':<40} {'padded area / image area':>24}")
    for name, (groups, grouped) in ways.items():
        ratio = padded_area(ds, groups, targs.batch_size, scales, targs.max_size, targs.seed, grouped=grouped)
        print(f"{name:<40} {ratio:24.3f}")


def bench_amp(args):
    """The demo's training step in float32 and under --amp bf16, alternating on the same batches in one process:
    what `--amp auto` (bf16 wherever the CPU has AVX512-BF16 or AMX) gives on this machine."""
    import build
    import train
    steps, batches = {}, None
    for amp in ("off", "bf16"):
        targs = train.finalize_args(train.get_parser().parse_args([*args.extra, "--amp", amp, "--num-workers", "0"]))
        torch.manual_seed(targs.seed)
        ds = build.build_dataset("train", targs)
        detr, criterion, _ = build.build_model(targs, ds.cat_names)
        detr.train()
        optimizer = build.build_optimizer(detr, targs)
        if batches is None:
            random.seed(targs.seed)
            batch_sampler, collate = build.build_train_batches(targs, ds, torch.randperm(len(ds)).tolist())
            batches = [collate([ds[i] for i in b]) for b, _ in zip(batch_sampler, range(args.rounds + 1))]
        # Each precision walks the same batches in the same order, one per round.
        steps[amp] = functools.partial(
            lambda feed, **kw: train.train_step(batch=next(feed), **kw), itertools.cycle(batches),
            model=detr, criterion=criterion, optimizer=optimizer, device=torch.device("cpu"),
            clip_max_norm=targs.clip_max_norm, align_loss_coef=targs.align_loss_coef,
            amp_dtype={"bf16": torch.bfloat16}.get(amp))
    times = alternate({amp: (fn, contextlib.nullcontext) for amp, fn in steps.items()}, args.rounds)
    print(f"demo training step, batch {targs.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}"
          f", {cpu_model()}; `--amp auto` picks {'bf16' if train.native_bf16('cpu') else 'float32'} here")
    print(f"{'--amp':>6} {'min ms':>8} {'median ms':>10} {'vs float32 (median)':>20}")
    for amp, ts in times.items():
        print(f"{amp:>6} {1e3 * min(ts):8.0f} {1e3 * statistics.median(ts):10.0f} "
              f"{statistics.median(ts) / statistics.median(times['off']):19.2f}x")


# ----------------------------------------------------------------------------------------------------------
# Profile of one demo training step, by operator and by stage
# ----------------------------------------------------------------------------------------------------------
class _Stages:
    """Profiler ranges around the stages of a training step. Forward: a record_function range per stage (module
    hooks, or wrapped functions). Backward: each autograd node is charged to the stage whose forward op created it
    (the profiler gives a forward op and its backward node one sequence number)."""

    def __init__(self):
        self.open = []

    def enter(self, name):
        scope = torch.autograd.profiler.record_function(name)
        scope.__enter__()
        self.open.append(scope)

    def exit(self):
        self.open.pop().__exit__(None, None, None)

    def hook(self, module, name):
        module.register_forward_pre_hook(lambda *_: self.enter(name))
        module.register_forward_hook(lambda *_: self.exit())

    def wrap(self, owner, attribute, name):
        """Replace owner.attribute (a function) by the same function inside a `name` range."""
        fn = getattr(owner, attribute)

        def wrapped(*args, **kwargs):
            with torch.autograd.profiler.record_function(name):
                return fn(*args, **kwargs)
        setattr(owner, attribute, wrapped)


STAGES = ("data loading", "backbone", "input_proj", "encoder", "decoder", "heads", "AlignNet", "DynQL",
          "deformable sampling", "matcher and losses", "optimizer")


def _stage_table(events, steps):
    """{stage: (forward ms, backward ms)} per step. A range's own time excludes the stages nested in it (the
    sampling inside the encoder and decoder, the heads inside the refining decoder); a backward node is charged to
    the innermost stage around the forward op that made it."""
    ranges = [e for e in events if e.name in STAGES]

    def innermost(start, exclude=None):
        around = [r for r in ranges if r is not exclude and r.time_range.start <= start <= r.time_range.end]
        return min(around, key=lambda r: r.time_range.end - r.time_range.start, default=None)

    forward, backward = dict.fromkeys(STAGES, 0.0), dict.fromkeys(STAGES, 0.0)
    for r in ranges:
        forward[r.name] += r.cpu_time_total
        parent = innermost(r.time_range.start, exclude=r)
        if parent is not None and parent.time_range.end >= r.time_range.end:
            forward[parent.name] -= r.cpu_time_total
    stage_of = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::") and e.name not in STAGES:
            around = innermost(e.time_range.start)
            if around is not None:
                stage_of.setdefault(e.sequence_nr, around.name)
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function") and e.sequence_nr in stage_of:
            backward[stage_of[e.sequence_nr]] += e.cpu_time_total
    return {name: (forward[name] / steps / 1e3, backward[name] / steps / 1e3) for name in STAGES}


def bench_profile(args):
    """torch.profiler over `steps` demo training steps (after 2 warm-up steps): self CPU time by operator, and
    forward/backward time by stage. Data loading is the main process's own (num_workers 0) so that it is seen."""
    import build
    import model as model_module
    import train
    from torch.profiler import ProfilerActivity, profile
    targs = train.finalize_args(train.get_parser().parse_args([*args.extra, "--num-workers", "0"]))
    torch.manual_seed(targs.seed)
    ds = build.build_dataset("train", targs)
    detr, criterion, _ = build.build_model(targs, ds.cat_names)
    detr.train()
    optimizer = build.build_optimizer(detr, targs)
    stages = _Stages()
    for module, name in ((detr.backbone, "backbone"), (detr.transformer.encoder, "encoder"),
                         (detr.transformer.decoder, "decoder"), (detr.alignnet, "AlignNet"), (detr.dynql, "DynQL")):
        if module is not None:
            stages.hook(module, name)
    for proj in detr.input_proj:
        stages.hook(proj, "input_proj")
    for head in [*detr.class_embed, *detr.bbox_embed]:
        stages.hook(head, "heads")
    for fn in ("ms_deform_attn_pytorch", "ms_deform_attn_gather"):
        stages.wrap(model_module, fn, "deformable sampling")
    stages.wrap(train, "compute_losses", "matcher and losses")
    stages.wrap(optimizer, "step", "optimizer")
    batch_sampler, collate = build.build_train_batches(targs, ds, torch.utils.data.RandomSampler(ds))
    loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=batch_sampler, collate_fn=collate))
    amp_dtype = {"bf16": torch.bfloat16}.get(targs.amp)

    def step():
        with torch.autograd.profiler.record_function("data loading"):
            batch = next(loader)
        train.train_step(detr, criterion, batch, optimizer, torch.device("cpu"), clip_max_norm=targs.clip_max_norm,
                         align_loss_coef=targs.align_loss_coef, amp_dtype=amp_dtype)

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    wall = (time.perf_counter() - t0) / args.steps * 1e3
    print(f"demo training step ({targs.method}, batch {targs.batch_size} at {targs.min_size}/{targs.max_size} px, "
          f"--amp {targs.amp}, {torch.get_num_threads()} threads): {wall:.0f} ms per step under the profiler, "
          f"mean of {args.steps}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))
    table = _stage_table(prof.events(), args.steps)
    table["rest (proposals, queries, clipping, ...)"] = (wall - sum(f + b for f, b in table.values()), 0.0)
    print(f"{'stage':>40} {'forward ms':>11} {'backward ms':>12} {'share':>6}")
    for name, (fwd, bwd) in table.items():
        print(f"{name:>40} {fwd:11.1f} {bwd:12.1f} {100 * (fwd + bwd) / wall:5.1f}%")


# Counts of each command that must be at least 1 (a median of no repeats is no number), and the smallest --size.
COUNTS = ("repeats", "steps", "rounds", "rows")
HF_MIN_SIZE = 160


def check_args(args):
    """The flags' values, before anything is measured: counts >= 1, a device this machine has."""
    for key in COUNTS:
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise InputError(f"--{key} {value}: expected a number >= 1")
    if getattr(args, "size", HF_MIN_SIZE) < HF_MIN_SIZE:
        raise InputError(f"--size {args.size}: expected at least {HF_MIN_SIZE} pixels (transformers needs 300 "
                         "encoder positions)")
    if getattr(args, "device", None) is not None:
        from build import check_device
        check_device(args.device)


def main(argv=None):
    from train import METHODS
    p = ArgumentParser("bench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("attn")
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a.add_argument("--repeats", type=int, default=10)
    t = sub.add_parser("train")
    t.add_argument("--device", default="cpu")
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    t.add_argument("extra", nargs="*", help="more train.py flags after --")
    c = sub.add_parser("coco-step")
    c.add_argument("--device", default="cpu")
    c.add_argument("--steps", type=int, default=3)
    c.add_argument("--method", default="baseline", choices=METHODS)
    gp = sub.add_parser("gpu", help="CUDA tests, attention benchmark and COCO training steps in one table")
    gp.add_argument("--steps", type=int, default=20)
    gp.add_argument("--repeats", type=int, default=10)
    h = sub.add_parser("hf", help="training step and inference against HuggingFace transformers")
    h.add_argument("--rounds", type=int, default=5)
    h.add_argument("--size", type=int, default=640,
                   help="square image side, pixels (at least 160: transformers needs 300 encoder positions)")
    h.add_argument("--methods", nargs="+", default=["baseline", "clip-detr"], choices=["baseline", "clip-detr"])
    h.add_argument("--attn-impl", nargs="+", default=["gather"], choices=["pytorch", "gather"],
                   help="our deformable attention (several: one row each); gather in encoder and decoder, where "
                        "--attn-impl auto would take the reference for the decoder's small calls")
    h.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                   help="bf16: CPU autocast around every model's step")
    o = sub.add_parser("onnx", help="onnxruntime (CPU) against eager PyTorch: inference latency and file size")
    o.add_argument("--rounds", type=int, default=5)
    o.add_argument("--models", nargs="+", default=["demo", "coco"], choices=list(ONNX_MODELS))
    am = sub.add_parser("amp", help="demo training steps in float32 and bf16 autocast, alternating")
    am.add_argument("--rounds", type=int, default=8)
    am.add_argument("extra", nargs="*", help="train.py flags after -- (default: the demo's)")
    pd = sub.add_parser("padding", help="padded area of the demo's training batches, three ways of batching")
    pd.add_argument("extra", nargs="*", help="train.py flags after -- (default: the demo's)")
    pr = sub.add_parser("profile", help="torch.profiler of demo training steps: by operator and by stage")
    pr.add_argument("--steps", type=int, default=3)
    pr.add_argument("--rows", type=int, default=20)
    pr.add_argument("extra", nargs="*", help="train.py flags after -- (default: the demo's)")
    w = sub.add_parser("_worker")
    w.add_argument("--steps", type=int)
    w.add_argument("--out")
    w.add_argument("argv", nargs="*")
    args = p.parse_args(argv)
    check_args(args)
    if args.what == "_worker":
        _train_worker(args.argv, args.steps, args.out)
        return
    {"attn": bench_attn, "train": bench_train, "coco-step": bench_coco_step, "gpu": bench_gpu, "hf": bench_hf,
     "amp": bench_amp, "padding": bench_padding, "profile": bench_profile, "onnx": bench_onnx}[args.what](args)


def cli(argv=None):
    """main() with bad input (a flag's value, a device this machine lacks, a failed worker run) as one line on
    stderr and exit status 2, as train.py and evaluate.py do; bugs keep their traceback."""
    try:
        main(argv)
    except (InputError, FileNotFoundError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
