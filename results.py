"""Results: every results table of the documentation, regenerated from the code as it is, over seeds, resumably.

    python results.py --out docs/results.md                  all tables (about 28 demo runs)
    python results.py --out docs/results.md --only table4    one table's runs (the page is still written whole)
    python results.py --seeds 42 43 -- --epochs 2            other seeds; flags after -- go to every train.py run
    python results.py --jobs 2                               two runs at once, one core each

Each run is one `python train.py` process (the demo configuration plus the run's own flags) in RUNS/<name>/, and its
result is stored there (result.json) as soon as it finishes, so the tables fill across several sittings and an
interrupted command continues where it stopped (a run cut short resumes from its checkpoint). A run is identified by
its flags, the code it executes (a digest of the project's source files), torch's version and the CPU: a stored run
whose identity differs is run again, never mixed in. The page is written from the stored runs alone; a run not yet
made shows as such.

Tables (the `shapes` analogues of the paper's):
  table4   components: --method baseline / alignnet / dynql / clip-detr (Table 4), and which DynQuery sets learn
  table6   DynQL noise levels: --dynql-betas 0.5 x5 and 0.9 x5 against the default 0.1 ... 0.9 (Table 6)
  table8   DynQL position scale: --dynql-rho 0.4 and 1.5 against the default 1.0 (Table 8)
  table9   AP of every decoder layer, baseline and CLIP-DETR (Table 9; evaluate.py --per-layer on table4's runs)
  table3   open vocabulary: "green square" and "blue triangle" held out, AP50 novel / base / all (Table 3)
  cost     the training-only cost: step time and peak memory of each method against the baseline (bench.py)
  figure3  discriminative score maps, CLIP-DETR above the baseline (Figure 3; evaluate.py --visualize)
  demo     `python train.py` itself from an empty cache: wall time and AP on this CPU

Statistics: mean ± sample standard deviation over the seeds (n - 1), the numbers of the last epoch's COCO
evaluation of the 200 val images. Every sentence that states a number on the page is computed from the runs.

No equations. Deviations from the paper: the runs are the CPU demo's (`shapes`, ResNet-18, 5 epochs, a random-weight
CLIP text encoder offline), not COCO; the paper's COCO numbers stand beside them for direction, not for level.
"""
import concurrent.futures
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from errors import ArgumentParser, InputError, error_line, write_atomically, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
METHODS = ("baseline", "alignnet", "dynql", "clip-detr")
NOVEL = ("green square", "blue triangle")
# The paper's COCO AP (12 epochs, ResNet-50) for each setting, beside the `shapes` numbers for direction.
PAPER_TABLE4 = {"baseline": 46.3, "alignnet": 49.8, "dynql": 49.3, "clip-detr": 50.8}
PAPER_TABLE6 = {"0.5 x5": 48.2, "0.9 x5": 47.7, "default": 50.8}
PAPER_TABLE8 = {"0.4": 47.6, "1.5": 48.8, "default": 50.8}
PAPER_TABLE9 = {"baseline": (39.1, 46.3), "clip-detr": (46.2, 52.1)}  # AP of decoder layer 1 and 6
TABLES = ("table4", "table6", "table8", "table9", "table3", "cost", "figure3", "demo")
RESULT = "result.json"


# ----------------------------------------------------------------------------------------------------------
# What a run is
# ----------------------------------------------------------------------------------------------------------
def cpu_name():
    """The CPU's model name and its bf16 flags: what decides --amp auto and the kernels a run takes."""
    import bench
    return bench.cpu_model()


def code_revision(files=None):
    """Digest of the project's source files a run executes (all .py files but the tests and these tools)."""
    if files is None:
        files = sorted(name for name in os.listdir(HERE) if name.endswith(".py") and not name.startswith("test_")
                       and name not in ("conftest.py", "results.py", "exercises.py", "bench.py", "walkthrough.py"))
    digest = hashlib.sha1()
    for name in files:
        with open(os.path.join(HERE, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()[:12]


def git_commit():
    """The checked-out commit (with '+changes' when the tree differs from it), or 'unknown' outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def identity(flags, kind="train"):
    """Everything that decides a stored result: a run with another identity is redone, not mixed in. The number of
    threads is not part of it (it orders float sums, as the run's own nondeterminism does, and --jobs changes it):
    each result records its own."""
    import torch
    code = code_revision() if kind != "cost" else code_revision() + "/" + code_revision(["bench.py"])
    return {"kind": kind, "flags": list(flags), "code": code, "torch": torch.__version__, "cpu": cpu_name()}


def torch_threads():
    import torch
    return torch.get_num_threads()


def same_identity(stored, ident):
    """Whether a stored identity is `ident`; runs stored while the thread count was part of it still carry it."""
    return {k: v for k, v in stored.items() if k != "threads"} == ident


def run_threads(jobs):
    """Intra-op threads of each of `jobs` train.py processes running at once: the cores shared out."""
    return max(1, torch_threads() // jobs)


def run_name(label, seed):
    return f"{label}-s{seed}" if seed is not None else label


def table_runs(table, seeds):
    """(name, train.py flags) of the runs `table` needs: {name: flags}. Runs shared by tables have one name."""
    def each_seed(label, flags):
        return {run_name(label, s): [*flags, "--seed", str(s)] for s in seeds}
    if table in ("table4", "figure3", "table9"):
        runs = {}
        # CLIP-DETR and the baseline first: an interrupted command has the two rows a reader compares first.
        for m in ("clip-detr", "baseline", "alignnet", "dynql") if table == "table4" else ("baseline", "clip-detr"):
            runs.update(each_seed(m, ["--method", m]))
        return runs if table != "figure3" else {k: v for k, v in runs.items() if k.endswith(f"-s{seeds[0]}")}
    if table == "table6":
        return {**each_seed("clip-detr", ["--method", "clip-detr"]),
                **each_seed("betas0.5x5", ["--method", "clip-detr", "--dynql-betas", *["0.5"] * 5]),
                **each_seed("betas0.9x5", ["--method", "clip-detr", "--dynql-betas", *["0.9"] * 5])}
    if table == "table8":
        return {**each_seed("clip-detr", ["--method", "clip-detr"]),
                **each_seed("rho0.4", ["--method", "clip-detr", "--dynql-rho", "0.4"]),
                **each_seed("rho1.5", ["--method", "clip-detr", "--dynql-rho", "1.5"])}
    if table == "table3":
        return each_seed("novel2", ["--method", "clip-detr", "--novel-classes", *NOVEL])
    return {}  # cost and demo are measurements of their own, not train.py runs of the tables


# ----------------------------------------------------------------------------------------------------------
# Running and storing
# ----------------------------------------------------------------------------------------------------------
def read_result(folder, ident):
    """The stored result of a run whose identity is `ident`, or None (none stored, or made with another one)."""
    path = os.path.join(folder, RESULT)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        result = json.load(f)
    return result if same_identity(result.get("identity", {}), ident) else None


def launch(cmd, log_path, env):
    """Run `cmd` to its end with stdout and stderr in `log_path`; (exit code, wall seconds, peak RSS MiB)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.wait()  # the child got the same Ctrl-C; its checkpoint is kept for the next call
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.time() - t0, usage.ru_maxrss / 1024


def failed(name, code, log_path):
    """The one line for a run that stopped with an error: its own last line, and where its log is."""
    with open(log_path) as f:
        lines = [line.strip() for line in f if line.strip()]
    last = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else "")
    return InputError(f"run {name} stopped with exit status {code} ({last}); its log: {log_path}")


def last_epoch(folder):
    """The records of log.jsonl, one per epoch."""
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_run(name, flags, extra, runs_dir, env, threads=None):
    """The stored result of run `name`, made now if it is missing or was made with another identity; the process
    runs `threads` intra-op threads (default: torch's)."""
    argv = [*flags, *extra]
    ident = identity(argv)
    if threads:
        env = dict(env, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    folder = os.path.join(runs_dir, name)
    result = read_result(folder, ident)
    if result is not None:
        return result, False
    started = os.path.join(folder, "identity.json")
    resume = os.path.isfile(started) and same_identity(json.load(open(started)), ident)
    if not resume and os.path.isdir(folder):
        shutil.rmtree(folder)  # made with another identity: nothing of it may be reused
    os.makedirs(folder, exist_ok=True)
    write_json(started, ident)
    print(f"run {name}: python train.py {' '.join(argv)}{' (continuing)' if resume else ''}", flush=True)
    cmd = [sys.executable, "train.py", *argv, "--output-dir", folder, "--no-progress", "--resume", "auto"]
    code, wall, peak = launch(cmd, os.path.join(folder, "train.log"), env)
    if code:
        raise failed(name, code, os.path.join(folder, "train.log"))
    epochs = last_epoch(folder)
    result = {"identity": ident, "threads": threads or torch_threads(), "commit": git_commit(),
              "wall_s": round(wall, 1), "peak_rss_mib": round(peak), "stats": epochs[-1].get("coco_stats"),
              "epochs": epochs,
              "finished": datetime.datetime.now().isoformat(timespec="seconds")}
    write_json(os.path.join(folder, RESULT), result)
    return result, True


def per_layer(name, result, runs_dir, env):
    """The run's AP per decoder layer (evaluate.py --per-layer), computed once and kept in its result.json."""
    if "per_layer" in result:
        return result["per_layer"], False
    folder = os.path.join(runs_dir, name)
    log = os.path.join(folder, "per_layer.jsonl")
    if os.path.exists(log):
        os.remove(log)
    cmd = [sys.executable, "evaluate.py", "--resume", os.path.join(folder, "checkpoint.pth"), "--per-layer",
           "--log", log]
    code, _, _ = launch(cmd, os.path.join(folder, "evaluate.log"), env)
    if code:
        raise failed(f"{name} (evaluate.py --per-layer)", code, os.path.join(folder, "evaluate.log"))
    with open(log) as f:
        result["per_layer"] = json.loads(f.readline())["per_layer"]
    write_json(os.path.join(folder, RESULT), result)
    return result["per_layer"], True


def cost_run(extra, runs_dir, steps, env):
    """bench.py's training-step measurement of every method (median step time on fixed batches, peak memory of a
    fresh process each), stored like a run."""
    import bench
    ident = identity([*extra, "--steps", str(steps)], kind="cost")
    folder = os.path.join(runs_dir, "cost")
    result = read_result(folder, ident)
    if result is not None:
        return result, False
    print(f"cost: {steps} training steps of each method (bench.py train)", flush=True)
    t0 = time.time()
    rows = {m: bench.measure_train_steps(["--dataset", "shapes", "--num-workers", "0", *extra, "--method", m], steps,
                                         env=env)
            for m in METHODS}
    result = {"identity": ident, "commit": git_commit(), "rows": rows, "wall_s": round(time.time() - t0, 1)}
    write_json(os.path.join(folder, RESULT), result)
    return result, True


def demo_run(extra, runs_dir, env):
    """`python train.py` (and the flags after --) from an empty cache, timed as a user would time it."""
    ident = identity(list(extra), kind="demo")
    folder = os.path.join(runs_dir, "demo")
    result = read_result(folder, ident)
    if result is not None:
        return result, False
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    print(f"demo: python train.py {' '.join(extra)} from an empty cache", flush=True)
    with tempfile.TemporaryDirectory(prefix="clip-detr-demo-cache-") as empty:
        cmd = [sys.executable, "train.py", *extra, "--output-dir", os.path.join(folder, "out"), "--no-progress"]
        code, wall, peak = launch(cmd, os.path.join(folder, "train.log"), dict(env, CLIP_DETR_CACHE=empty))
    if code:
        raise failed("demo", code, os.path.join(folder, "train.log"))
    epochs = last_epoch(os.path.join(folder, "out"))
    result = {"identity": ident, "commit": git_commit(), "wall_s": round(wall, 1), "peak_rss_mib": round(peak),
              "stats": epochs[-1].get("coco_stats"), "train_s": round(sum(e["time_s"] for e in epochs), 1)}
    write_json(os.path.join(folder, RESULT), result)
    return result, True


def figure3(runs, seed, runs_dir, out_dir, env):
    """Figure 3's score maps of the first seed's CLIP-DETR and baseline checkpoints: the third val image's PNG is
    written to OUT_DIR/score_maps_shapes.png, again only when those runs changed. Returns its path, or None without
    both runs."""
    names = [run_name(m, seed) for m in ("clip-detr", "baseline")]
    if not all(name in runs for name in names):
        return None
    target = os.path.join(out_dir, "score_maps_shapes.png")
    made_from = {name: runs[name]["finished"] for name in names}
    record = os.path.join(runs_dir, "figure3.json")
    if os.path.isfile(target) and os.path.isfile(record) and json.load(open(record)) == made_from:
        return target
    clip, base = (os.path.join(runs_dir, name, "checkpoint.pth") for name in names)
    with tempfile.TemporaryDirectory(prefix="clip-detr-figure3-") as tmp:
        cmd = [sys.executable, "evaluate.py", "--resume", clip, "--compare", base, "--visualize", "3",
               "--output-dir", tmp]
        log = os.path.join(runs_dir, "figure3.log")
        code, _, _ = launch(cmd, log, env)
        if code:
            raise failed("figure3 (evaluate.py --visualize)", code, log)
        third = sorted(name for name in os.listdir(tmp) if name.endswith(".png"))[-1]
        write_atomically(target, lambda path: shutil.copyfile(os.path.join(tmp, third), path))
    write_json(record, made_from)
    return target


# ----------------------------------------------------------------------------------------------------------
# Statistics and sentences
# ----------------------------------------------------------------------------------------------------------
def pct(values):
    """Fractions in [0, 1] as percent."""
    return [100 * v for v in values]


def mean_std(values):
    """'m ± s' (sample standard deviation) of numbers in percent, 'm' for one value, 'not yet run' for none; 'n/a'
    where pycocotools had nothing to score (-1, e.g. no large object among the val images)."""
    if not values:
        return "not yet run"
    if any(v < 0 for v in values):
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def compare(a, b, name_b):
    """How seeds `a` stand against seeds `b` (AP in percent): the difference of the means and what it means."""
    d = statistics.mean(a) - statistics.mean(b)
    if len(a) < 2 or len(b) < 2:
        return f"{d:+.1f} AP (one seed each: no spread to judge it by)"
    if min(a) > max(b):
        where = f"every seed above every {name_b} seed"
    elif max(a) < min(b):
        where = f"every seed below every {name_b} seed"
    elif abs(d) <= max(statistics.stdev(a), statistics.stdev(b)):
        where = "within one standard deviation of the seeds: no difference this budget can tell"
    else:
        where = "more than one standard deviation, with overlapping seeds"
    return f"{d:+.1f} AP ({where})"


def made_note(groups, seeds):
    """A line for a table some of whose runs are not made yet (`groups`: each row's stored results)."""
    made, wanted = sum(len(g) for g in groups), len(groups) * len(seeds)
    if made == wanted:
        return []
    return [f"*{made} of this table's {wanted} runs are made so far; `python results.py` makes the rest (each row "
            "lists the seeds it has).*", ""]


def seeds_of(runs, label, seeds):
    """The stored results of `label` over the seeds that have one, in seed order."""
    return [runs[run_name(label, s)] for s in seeds if run_name(label, s) in runs]


def stat_columns(results):
    """Mean ± std of each COCO stat over the results."""
    return [mean_std(pct([r["stats"][i] for r in results])) for i in range(len(STATS))]


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def wall(results):
    """Total wall time of runs, as h:mm:ss."""
    return str(datetime.timedelta(seconds=round(sum(r.get("wall_s", 0) for r in results))))


def seed_list(seeds):
    return ", ".join(map(str, seeds))


# ----------------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------------
def section_table4(runs, seeds):
    per = {m: seeds_of(runs, m, seeds) for m in METHODS}
    rows = []
    for m in METHODS:
        aps = pct([r["stats"][0] for r in per[m]])
        rows.append([f"`{m}`", "✓" if m in ("alignnet", "clip-detr") else "",
                     "✓" if m in ("dynql", "clip-detr") else "",
                     *stat_columns(per[m]), ", ".join(f"{a:.1f}" for a in aps) or "—", PAPER_TABLE4[m]])
    text = ["## Table 4: components", "",
            f"`python train.py --method M --seed S` for the four methods and seeds {seed_list(seeds)}; COCO AP of the "
            "val images after the last epoch, mean ± standard deviation over the seeds; the last column is the "
            "paper's COCO AP.", "",
            table(["`--method`", "AlignNet", "DynQL", *STATS, "AP per seed", "paper AP"], rows), "",
            *made_note(list(per.values()), seeds)]
    base = pct([r["stats"][0] for r in per["baseline"]])
    said = []
    for m in ("alignnet", "dynql", "clip-detr"):
        aps = pct([r["stats"][0] for r in per[m]])
        if aps and base:
            said.append(f"`{m}` {compare(aps, base, 'baseline')}")
    if said:
        gains = [f"{PAPER_TABLE4[m] - PAPER_TABLE4['baseline']:+.1f} ({m})" for m in ("alignnet", "dynql", "clip-detr")]
        text += ["Against the baseline: " + "; ".join(said) + ". The paper's gains on COCO: " + ", ".join(gains) + ".",
                 ""]
        aligned = pct([r["stats"][0] for r in per["alignnet"]])
        spread = max([statistics.stdev(x) for x in (aligned, base) if len(x) > 1] or [0.0])
        if aligned and statistics.mean(aligned) - statistics.mean(base) <= spread:
            text += ["AlignNet shows no gain here, and none is expected: offline, the demo's label dictionary comes "
                     "from a random-weight CLIP text encoder (`--clip-pretrained none`), whose rows tell the 8 classes "
                     "apart but carry none of the language knowledge §3.2 transfers into the encoder, and `shapes`' "
                     "classes differ in colour and outline, which the detector separates without help. Its loss "
                     "(Eq. 5) does fall over the epochs, so the module trains.", ""]
    text += section_dynql_sets(seeds_of(runs, "clip-detr", seeds))
    text.append(f"Wall time of these runs: {wall([r for v in per.values() for r in v])}.")
    return text


def section_dynql_sets(results):
    """Which DynQuery sets learn: the last decoder layer's DynQL classification loss per beta, by epoch (logged by
    train.py as train_dynql_b{beta}_ce), averaged over the seeds."""
    if not results:
        return []
    betas = sorted({k[len("train_dynql_b"):-len("_ce")] for k in results[0]["epochs"][0]
                    if re.fullmatch(r"train_dynql_b[0-9.]+_ce", k)}, key=float)
    if not betas:
        return []
    rows, last = [], None
    for e in range(len(results[0]["epochs"])):
        last = [statistics.mean(r["epochs"][e][f"train_dynql_b{b}_ce"] for r in results) for b in betas]
        norm = statistics.mean(r["epochs"][e]["train_z_attr_norm"] for r in results)
        rows.append([e, f"{norm:.2f}", *(f"{v:.3f}" for v in last)])
    ratio = last[-1] / last[0]
    reading = ("the content of Eq. 6 carries the class, from the informed sets to the uninformed ones, as §3.3 "
               "describes" if ratio > 1.5 else "the sets do not yet differ in how much of the class they carry")
    return ["Which DynQuery sets learn: the last decoder layer's DynQL classification loss (Eq. 10's focal term) of "
            "each noise level β, epoch means over the seeds of `clip-detr`, and ‖z_attr‖ before Eq. 6's rescaling:", "",
            table(["epoch", "‖z_attr‖", *(f"CE β={b}" for b in betas)], rows), "",
            f"In the last epoch the set with β = {betas[-1]} has {ratio:.1f}× the classification loss of the set with "
            f"β = {betas[0]}: {reading}.", ""]


def section_ablation(runs, seeds, title, table_no, settings, paper, flag_text):
    """Table 6 or 8: one row per setting, each against the default (the `clip-detr` runs of Table 4)."""
    default = pct([r["stats"][0] for r in seeds_of(runs, "clip-detr", seeds)])
    rows, said, used, groups, direction = [], [], [], [], {True: [], False: []}
    for label, shown in settings:
        results = seeds_of(runs, label, seeds)
        groups.append(results)
        used += results if label != "clip-detr" else []
        aps = pct([r["stats"][0] for r in results])
        rows.append([shown, *stat_columns(results), ", ".join(f"{a:.1f}" for a in aps) or "—",
                     paper[label if label != "clip-detr" else "default"]])
        if label != "clip-detr" and aps and default:
            paper_d = paper[label] - paper["default"]
            said.append(f"{shown}: {compare(aps, default, 'default')}; paper {paper_d:+.1f}")
            if len(aps) > 1 and len(default) > 1 and (min(aps) > max(default) or max(aps) < min(default)):
                direction[(statistics.mean(aps) > statistics.mean(default)) == (paper_d > 0)].append(shown)
    text = [f"## Table {table_no}: {title}", "",
            f"`python train.py --method clip-detr {flag_text} --seed S`, seeds {seed_list(seeds)}; the default row is "
            "Table 4's `clip-detr` runs; the last column is the paper's COCO AP.", "",
            table(["setting", *STATS, "AP per seed", "paper AP"], rows), "", *made_note(groups, seeds)]
    if said:
        text += ["Against the default: " + "; ".join(said) + ".", ""]
    if direction[True]:
        text += [f"{', '.join(direction[True])}: the paper's direction, every seed on one side of the default.", ""]
    if direction[False]:
        text += [f"{', '.join(direction[False])}: the other direction from the paper's COCO runs, every seed on one "
                 "side of the default: the best setting of this budget (the demo's configuration, from random "
                 "weights, on `shapes`) need not be COCO's, so the table shows that each setting trains and what it "
                 "changes here, not the paper's choice of it.", ""]
    text.append(f"Wall time of these runs (the default's counted in Table 4): {wall(used)}.")
    return text


def section_table9(runs, seeds):
    layers = {m: [r["per_layer"] for r in seeds_of(runs, m, seeds) if "per_layer" in r]
              for m in ("baseline", "clip-detr")}
    rows = []
    for m, per in layers.items():
        for layer in range(len(per[0]) if per else 0):
            rows.append([f"`{m}`", layer + 1, *[mean_std(pct([p[layer][i] for p in per])) for i in range(len(STATS))]])
    text = ["## Table 9: AP of every decoder layer", "",
            "`python evaluate.py --resume RUN/checkpoint.pth --per-layer` on Table 4's baseline and CLIP-DETR runs, "
            f"seeds {seed_list(seeds)}, mean ± standard deviation:", "",
            table(["`--method`", "decoder layer", *STATS], rows) if rows else "not yet run", ""]
    if layers["baseline"] and layers["clip-detr"]:
        first = [compare(pct([p[i][0] for p in layers["clip-detr"]]), pct([p[i][0] for p in layers["baseline"]]),
                         "baseline") for i in (0, -1)]
        (p1b, p6b), (p1c, p6c) = PAPER_TABLE9["baseline"], PAPER_TABLE9["clip-detr"]
        text += [f"CLIP-DETR against the baseline at the first decoder layer: {first[0]}; at the last: {first[1]}. "
                 f"The paper's gap is {p1c - p1b:+.1f} AP at layer 1 and {p6c - p6b:+.1f} at layer 6 (COCO, 6 layers; "
                 "the demo has 3).", ""]
    return text


def section_table3(runs, seeds):
    results = seeds_of(runs, "novel2", seeds)
    ov = [r["epochs"][-1].get("ov_ap50") for r in results]
    rows = [[group, mean_std(pct([o[group] for o in ov if o and o.get(group) is not None]))]
            for group in ("novel", "base", "all")]
    text = ["## Table 3: open vocabulary, two classes held out", "",
            f"`python train.py --novel-classes \"green square\" \"blue triangle\" --seed S`, seeds {seed_list(seeds)}: "
            "the two classes' annotations leave training, the decoder's class head scores the CLIP label dictionary, "
            "and evaluation reports AP50 on the novel, base and all categories (the paper's Table 3 protocol; "
            "CLIP-DETR on OV-DETR, COCO: 30.8 novel, 61.5 base, 53.5 all).", "",
            table(["AP50", "mean ± std"], rows), "", *made_note([results], seeds)]
    if ov and all(ov):
        novel = statistics.mean(pct([o["novel"] for o in ov]))
        base = statistics.mean(pct([o["base"] for o in ov]))
        text += [f"Novel AP50 is {novel:.1f} against {base:.1f} on the base classes: offline, the label dictionary "
                 "comes from a random-weight CLIP text encoder, whose rows for the held-out names have no relation to "
                 "the base names' rows, so nothing transfers; this is the floor, not a result about CLIP "
                 "([open-vocabulary.md](open-vocabulary.md)).", ""]
    text.append(f"Wall time of these runs: {wall(results)}.")
    return text


def section_cost(cost, runs, seeds):
    text = ["## The training-only cost", "",
            "`python bench.py train` (median seconds of a training step on fixed `shapes` batches, one fresh process "
            "per method, and its peak resident memory), and the median epoch time of Table 4's runs:", ""]
    if cost is None:
        return text + ["not yet run"]
    rows, base = [], cost["rows"]["baseline"]
    for m in METHODS:
        r = cost["rows"][m]
        epochs = [statistics.median(e["time_s"] for e in x["epochs"]) for x in seeds_of(runs, m, seeds)]
        rows.append([f"`{m}`", f"{r['step_s']:.3f}", f"{r['step_s'] / base['step_s']:.2f}×", f"{r['peak_mib']:.0f}",
                     f"{r['peak_mib'] / base['peak_mib']:.2f}×", f"{statistics.mean(epochs):.1f}" if epochs else "—"])
    ratio = cost["rows"]["clip-detr"]["step_s"] / base["step_s"]
    text += [table(["`--method`", "s / step", "vs baseline", "peak MiB", "vs baseline", "epoch s (Table 4 runs)"],
                   rows), "",
             f"A CLIP-DETR training step costs {ratio:.2f}× a baseline step here; in eval mode both run the same "
             "computation (tested: identical outputs), so inference is unchanged, as the paper promises.", "",
             f"Wall time: {wall([cost])}."]
    return text


def section_demo(demo):
    text = ["## The demo itself", "", "`python train.py` from an empty cache (the `shapes` set generated, the label "
            "dictionary encoded, 5 epochs trained, the val set scored), timed as a user would time it:", ""]
    if demo is None:
        return text + ["not yet run"]
    s = pct(demo["stats"])
    return text + [table(["CPU", "wall", "of which training epochs", "AP", "AP50", "peak RSS MiB"],
                         [[demo["identity"]["cpu"], str(datetime.timedelta(seconds=round(demo["wall_s"]))),
                           str(datetime.timedelta(seconds=round(demo["train_s"]))), f"{s[0]:.1f}", f"{s[1]:.1f}",
                           demo["peak_rss_mib"]]])]


def render(runs, seeds, cost, demo, figure, extra, out):
    done = [r for r in runs.values()] + [x for x in (cost, demo) if x]
    commits = sorted({r["commit"] for r in done})
    ident = identity([])
    threads = ", ".join(str(t) for t in sorted({r.get("threads", r["identity"].get("threads")) for r in runs.values()}))
    threads = threads or "no"
    flags = f" with `-- {' '.join(extra)}` after every run's flags" if extra else ""
    head = ["# Results on `shapes`", "",
            f"Generated by `python results.py --out {out}`{flags}: every number on this page comes from the "
            "runs it made; none is typed by hand. These are the `shapes` analogues of the paper's tables, each run a "
            f"`python train.py` of the demo's configuration{' with those flags' if extra else ''} (ResNet-18, "
            "width 64, 2+3 layers, 30 queries, trained from random weights; offline, a random-weight CLIP text "
            "encoder), scored on the `shapes` val images.", "",
            f"Code revision {ident['code']} (commit {', '.join(commits) or git_commit()}); {ident['cpu']}; torch "
            f"{ident['torch']}, Python {platform.python_version()}; {threads} thread(s) per training run "
            f"(`--jobs`), {torch_threads()} for the cost and demo measurements; the runs took {wall(done)} in all.",
            ""]
    body = [*section_table4(runs, seeds), "",
            *section_ablation(runs, seeds, "DynQL noise levels", 6,
                              [("betas0.5x5", "β = 0.5 ×5"), ("betas0.9x5", "β = 0.9 ×5"),
                               ("clip-detr", "β = 0.1 0.3 0.5 0.7 0.9 (default)")],
                              {"betas0.5x5": PAPER_TABLE6["0.5 x5"], "betas0.9x5": PAPER_TABLE6["0.9 x5"],
                               "default": PAPER_TABLE6["default"]}, "--dynql-betas B B B B B"), "",
            *section_ablation(runs, seeds, "DynQL position scale", 8,
                              [("rho0.4", "ρ = 0.4"), ("clip-detr", "ρ = 1.0 (default)"), ("rho1.5", "ρ = 1.5")],
                              {"rho0.4": PAPER_TABLE8["0.4"], "rho1.5": PAPER_TABLE8["1.5"],
                               "default": PAPER_TABLE8["default"]}, "--dynql-rho R"), "",
            *section_table9(runs, seeds), "",
            *section_table3(runs, seeds), "",
            *section_cost(cost, runs, seeds), "",
            "## Figure 3: discriminative score maps", "",
            ("`python evaluate.py --resume RUN/clip-detr/checkpoint.pth --compare RUN/baseline/checkpoint.pth "
             f"--visualize 3` (seed {seeds[0]}, the third val image): detections above 0.3 (left) and the l2-norm "
             "score map of the encoder memory, min-max normalized, below 0.5 left out (right); CLIP-DETR on top, "
             "baseline below.\n\n![score maps](score_maps_shapes.png)") if figure else "not yet run", "",
            *section_demo(demo)]
    return "\n".join(head + body).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def get_parser():
    p = ArgumentParser("results.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join("docs", "results.md"), help="the page to write (default: %(default)s)")
    p.add_argument("--runs", default=os.path.join("runs", "results"),
                   help="where runs and their stored results live (default: %(default)s)")
    p.add_argument("--only", nargs="+", default=None, metavar="TABLE", help=f"make only these tables' runs: {TABLES}")
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    p.add_argument("--cost-steps", type=int, default=20, help="training steps per method in the cost table")
    p.add_argument("--jobs", type=int, default=1,
                   help="train.py runs at once, the cores shared out among them (default: %(default)s, one run on "
                        "every core); cost and demo always run alone")
    p.add_argument("extra", nargs="*", metavar="-- TRAIN_FLAGS", help="flags for every train.py run")
    return p


def check_cli(cli):
    unknown = [t for t in cli.only or [] if t not in TABLES]
    if unknown:
        raise InputError(f"--only {' '.join(unknown)}: expected tables among {', '.join(TABLES)}")
    if len(set(cli.seeds)) != len(cli.seeds):
        raise InputError(f"--seeds {' '.join(map(str, cli.seeds))}: a seed is given twice")
    if cli.cost_steps < 1:
        raise InputError(f"--cost-steps {cli.cost_steps}: expected a number >= 1")
    if cli.jobs < 1:
        raise InputError(f"--jobs {cli.jobs}: expected a number >= 1")
    out = os.path.abspath(cli.out)
    if os.path.isdir(out):
        raise InputError(f"--out {cli.out} is a folder, expected the markdown file to write")
    if os.path.commonpath([out, os.path.abspath(cli.runs)]) == os.path.abspath(cli.runs):
        raise InputError(f"--out {cli.out} lies inside --runs {cli.runs}, which holds the runs")


def main(argv=None):
    cli = get_parser().parse_args(argv)
    check_cli(cli)
    tables = cli.only or list(TABLES)
    runs_dir = os.path.abspath(cli.runs)
    os.makedirs(runs_dir, exist_ok=True)
    # Every run of the tables shares one `shapes` set and label dictionary, generated on the first run.
    env = dict(os.environ, CLIP_DETR_CACHE=os.path.join(runs_dir, "cache"))
    wanted = {}
    for t in TABLES:
        wanted.update(table_runs(t, cli.seeds))
    threads = run_threads(cli.jobs)
    runs, missing = {}, []
    for name, flags in wanted.items():
        stored = read_result(os.path.join(runs_dir, name), identity([*flags, *cli.extra]))
        if stored is not None:
            runs[name] = stored
        elif any(name in table_runs(t, cli.seeds) for t in tables):
            missing.append(name)
    # --jobs runs at once, each on its share of the cores (more runs per hour than one on all of them); a run that
    # fails stops the command once the runs under way have finished and been stored.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=cli.jobs)
    try:
        futures = {name: pool.submit(train_run, name, wanted[name], cli.extra, runs_dir, env, threads)
                   for name in missing}
        for name, future in futures.items():
            runs[name] = future.result()[0]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    made = len(missing)
    if "table9" in tables:
        for name in table_runs("table9", cli.seeds):
            if name in runs:
                per_layer(name, runs[name], runs_dir, env)
    cost = read_result(os.path.join(runs_dir, "cost"), identity([*cli.extra, "--steps", str(cli.cost_steps)], "cost"))
    if cost is None and "cost" in tables:
        cost, _ = cost_run(cli.extra, runs_dir, cli.cost_steps, env)
    demo = read_result(os.path.join(runs_dir, "demo"), identity(list(cli.extra), "demo"))
    if demo is None and "demo" in tables:
        demo, _ = demo_run(cli.extra, runs_dir, env)
    out_dir = os.path.dirname(os.path.abspath(cli.out))
    figure = os.path.join(out_dir, "score_maps_shapes.png")
    if "figure3" in tables:
        figure = figure3(runs, cli.seeds[0], runs_dir, out_dir, env)
    elif not os.path.isfile(figure):
        figure = None
    page = render(runs, cli.seeds, cost, demo, figure, cli.extra, cli.out)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
    write_atomically(os.path.abspath(cli.out), write)
    print(f"wrote {cli.out} from {len(runs)} stored runs of train.py: {made} made now, {len(runs) - made} reused")
    return runs


def cli(argv=None):
    """main() with bad input as one line on stderr (exit 2) and Ctrl-C as one line (exit 130)."""
    try:
        return main(argv)
    except (InputError, FileNotFoundError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; the runs finished so far are stored: run the same command again to continue",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    cli()
