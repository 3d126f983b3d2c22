"""Tests for results.py, the command that regenerates docs/results.md: on a tiny configuration (two seeds, one
epoch, a few 64-96 px images) the page has every table with the right rows, a second call reuses every stored run,
a run of another code revision is redone, an interrupted run continues from its checkpoint, and bad input is one
line. The train.py and evaluate.py runs execute in this process (their command lines, in-process), so the whole
page costs seconds; `launch` itself is tested on a real process."""
import contextlib
import json
import os
import re
import sys
import threading

import pytest

import bench
import evaluate
import results
import train
from conftest import TINY_SHAPES

pytestmark = pytest.mark.slow

TINY_RUN = [*TINY_SHAPES, "--hidden-dim", "32", "--dim-feedforward", "64", "--enc-layers", "1", "--dec-layers", "2",
            "--nheads", "4", "--num-queries", "10", "--batch-size", "2", "--num-workers", "0", "--epochs", "1",
            "--max-steps", "1"]
SEEDS = ["--seeds", "1", "2"]


@pytest.fixture
def in_process(monkeypatch):
    """results.launch and bench.measure_train_steps run their command in this process; returns the commands run."""
    commands = []

    def launch(cmd, log_path, env):
        commands.append(cmd)
        script, argv = os.path.basename(cmd[1]), cmd[2:]
        with monkeypatch.context() as m, open(log_path, "w") as log:
            m.setenv("CLIP_DETR_CACHE", env["CLIP_DETR_CACHE"])
            code = 0
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                try:
                    {"train.py": train.cli, "evaluate.py": evaluate.cli}[script](argv)
                except SystemExit as stop:
                    code = stop.code
        return code, 1.5, 100.0

    def measure(argv, steps, env=None):
        commands.append(["bench.py", "train", *argv])
        stored = os.path.join(env["CLIP_DETR_CACHE"], "bench.json")
        with monkeypatch.context() as m:
            m.setenv("CLIP_DETR_CACHE", env["CLIP_DETR_CACHE"])
            bench._train_worker(argv, steps, stored)
        with open(stored) as f:
            return json.load(f)

    monkeypatch.setattr(results, "launch", launch)
    monkeypatch.setattr(bench, "measure_train_steps", measure)
    return commands


def table_of(page, title):
    """The rows of the first markdown table of the section `title`, as lists of cells."""
    section = page.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    lines = section[section.index("\n|"):].strip().split("\n\n")[0].splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def rows_of(page, title):
    """The first cells of the first table of the section `title`."""
    return [row[0] for row in table_of(page, title)]


def test_every_table_has_its_rows_and_a_second_call_reuses_every_run(tmp_path, in_process, monkeypatch):
    out, runs = tmp_path / "docs" / "results.md", tmp_path / "runs"
    argv = ["--out", str(out), "--runs", str(runs), *SEEDS, "--cost-steps", "1", "--", *TINY_RUN]
    results.main(argv)
    page = out.read_text()
    trained = [c for c in in_process if c[1:2] == ["train.py"]]
    # 4 methods + 2 beta settings + 2 rho settings + the open-vocabulary run, each seed; plus the demo.
    assert len(trained) == 2 * 9 + 1, [c[2:5] for c in trained]
    assert rows_of(page, "Table 4") == ["`baseline`", "`alignnet`", "`dynql`", "`clip-detr`"]
    assert rows_of(page, "Table 6") == ["β = 0.5 ×5", "β = 0.9 ×5", "β = 0.1 0.3 0.5 0.7 0.9 (default)"]
    assert rows_of(page, "Table 8") == ["ρ = 0.4", "ρ = 1.0 (default)", "ρ = 1.5"]
    assert rows_of(page, "Table 9") == ["`baseline`"] * 2 + ["`clip-detr`"] * 2  # 2 decoder layers each
    assert rows_of(page, "Table 3") == ["novel", "base", "all"]
    assert rows_of(page, "The training-only cost") == ["`baseline`", "`alignnet`", "`dynql`", "`clip-detr`"]
    assert len(rows_of(page, "The demo itself")) == 1
    assert (tmp_path / "docs" / "score_maps_shapes.png").is_file() and "![score maps](score_maps_shapes.png)" in page
    # Every mean ± std of Table 4 has two seeds behind it, and "AP per seed" lists both.
    for row in table_of(page, "Table 4"):
        assert " ± " in row[3] and re.fullmatch(r"\d+\.\d, \d+\.\d", row[9]), row
    assert "Which DynQuery sets learn" in page
    assert "not yet run" not in page
    assert results.identity([])["cpu"] in page and results.code_revision() in page

    in_process.clear()
    monkeypatch.setattr(results, "launch", lambda *a: pytest.fail(f"a stored run was made again: {a[0]}"))
    results.main(argv)
    assert in_process == [] and out.read_text() == page


def test_runs_of_other_code_are_redone_and_an_interrupted_run_continues(tmp_path, in_process, monkeypatch, capsys):
    out, runs = tmp_path / "results.md", tmp_path / "runs"
    argv = ["--out", str(out), "--runs", str(runs), *SEEDS, "--only", "table3", "--", *TINY_RUN]
    results.main(argv)
    assert len(in_process) == 2
    # A run cut short: its result is missing, its checkpoint and identity are there.
    (runs / "novel2-s2" / results.RESULT).unlink()
    checkpoint = (runs / "novel2-s2" / "checkpoint.pth").read_bytes()
    in_process.clear()
    results.main(argv)
    assert len(in_process) == 1 and in_process[0][-2:] == ["--resume", "auto"]
    assert "continuing" in capsys.readouterr().out
    assert (runs / "novel2-s2" / "checkpoint.pth").read_bytes() == checkpoint  # nothing retrained: epochs are done
    # Other code: every stored run is made again, from scratch.
    in_process.clear()
    monkeypatch.setattr(results, "code_revision", lambda files=None: "another")
    results.main(argv)
    assert len(in_process) == 2
    assert "Code revision another" in out.read_text()


def test_other_flags_or_seeds_are_other_runs(tmp_path, in_process):
    out, runs = tmp_path / "results.md", tmp_path / "runs"
    results.main(["--out", str(out), "--runs", str(runs), "--seeds", "1", "--only", "table3", "--", *TINY_RUN])
    assert len(in_process) == 1
    page = out.read_text()
    section = {title: page.split(f"## {title}", 1)[1].split("\n## ", 1)[0] for title in ("Table 3", "Table 4")}
    assert "runs are made so far" not in section["Table 3"]
    assert "*0 of this table's 4 runs are made so far" in section["Table 4"], "a table not yet made says so"
    results.main(["--out", str(out), "--runs", str(runs), "--seeds", "1", "2", "--only", "table3", "--", *TINY_RUN])
    assert len(in_process) == 2, "seed 1 is stored; only seed 2 is new"
    results.main(["--out", str(out), "--runs", str(runs), "--seeds", "1", "--only", "table3", "--", *TINY_RUN,
                  "--lr", "0.002"])
    assert len(in_process) == 3, "another flag is another run"


def test_jobs_run_at_once_on_a_share_of_the_cores_and_a_later_call_reuses_their_runs(tmp_path, monkeypatch):
    """--jobs 2: two train.py processes at once (each launch waits for the other to start), each told to use half
    the cores and recording it; a later call with another --jobs reuses them (threads are not a run's identity)."""
    started, threads = threading.Barrier(2, timeout=30), []

    def launch(cmd, log_path, env):
        folder = os.path.dirname(log_path)
        threads.append(env.get("OMP_NUM_THREADS"))
        if len(threads) <= 2:
            started.wait()  # a BrokenBarrierError unless the second run starts while the first one runs
        with open(os.path.join(folder, "log.jsonl"), "w") as f:
            f.write(json.dumps({"epoch": 0, "time_s": 1.0, "coco_stats": [0.5] * 12}) + "\n")
        return 0, 1.0, 100.0

    monkeypatch.setattr(results, "launch", launch)
    monkeypatch.setattr(results, "run_threads", lambda jobs: {1: 4, 2: 2}[jobs])
    argv = ["--out", str(tmp_path / "r.md"), "--runs", str(tmp_path / "runs"), *SEEDS, "--only", "table3"]
    results.main([*argv, "--jobs", "2"])
    assert threads == ["2", "2"]
    assert {json.loads((tmp_path / "runs" / f"novel2-s{s}" / results.RESULT).read_text())["threads"]
            for s in (1, 2)} == {2}
    results.main([*argv, "--jobs", "2"])
    results.main([*argv, "--jobs", "1"])
    assert len(threads) == 2, "stored runs are reused, whatever --jobs"
    assert "2 thread(s) per training run" in (tmp_path / "r.md").read_text()


def test_launch_gives_the_exit_code_the_wall_time_and_the_peak_memory(tmp_path):
    grow = "import sys; b = bytearray(200 * 2**20); print('x'); sys.exit(3)"
    code, wall, peak = results.launch([sys.executable, "-c", grow], str(tmp_path / "log"), dict(os.environ))
    assert code == 3 and wall > 0 and peak >= 200
    assert (tmp_path / "log").read_text() == "x\n"


@pytest.mark.parametrize("argv, expected", [
    (["--only", "table5"], "--only table5: expected tables among table4, table6"),
    (["--seeds", "1", "1"], "--seeds 1 1: a seed is given twice"),
    (["--cost-steps", "0"], "--cost-steps 0: expected a number >= 1"),
    (["--jobs", "0"], "--jobs 0: expected a number >= 1"),
    (["--out", "{runs}/page.md"], "lies inside --runs"),
    (["--out", "{tmp}"], "is a folder, expected the markdown file"),
], ids=["unknown table", "seed twice", "no cost steps", "no jobs", "page among the runs", "page is a folder"])
def test_bad_input_is_one_line(argv, expected, tmp_path, capsys):
    argv = [a.format(runs=tmp_path / "runs", tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as stop:
        results.cli(["--runs", str(tmp_path / "runs"), *(["--out", str(tmp_path / "r.md")] if "--out" not in argv
                                                          else []), *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and expected in err, err


def test_a_run_that_fails_is_one_line_naming_it_and_its_log(tmp_path, in_process, capsys):
    with pytest.raises(SystemExit) as stop:
        results.cli(["--out", str(tmp_path / "r.md"), "--runs", str(tmp_path / "runs"), "--seeds", "1", "--only",
                     "table3", "--", *TINY_RUN, "--epochs", "0"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert "run novel2-s1 stopped with exit status 2" in err and "--epochs 0" in err and "train.log" in err


def test_an_ablation_says_which_settings_go_the_papers_way_and_which_go_the_other():
    """Table 6/8's sentences: a setting whose seeds all lie on one side of the default is said to go the paper's way
    or the other way (the paper's COCO AP of both settings here is below its default); overlapping seeds are not."""
    def stored(aps):
        return dict(zip((1, 2, 3), ({"stats": [ap] * len(results.STATS), "wall_s": 60.0} for ap in aps)))
    runs = {results.run_name(label, seed): r for label, aps in [
        ("clip-detr", (0.30, 0.31, 0.32)), ("rho0.4", (0.35, 0.36, 0.37)), ("rho1.5", (0.20, 0.21, 0.22)),
        ("betas0.5x5", (0.29, 0.31, 0.33))] for seed, r in stored(aps).items()}
    paper = {"rho0.4": 47.6, "rho1.5": 48.8, "betas0.5x5": 48.2, "default": 50.8}
    page = "\n".join(results.section_ablation(
        runs, [1, 2, 3], "t", 8, [("rho0.4", "up"), ("clip-detr", "default"), ("rho1.5", "down"),
                                  ("betas0.5x5", "overlapping")], paper, "--x"))
    assert "\ndown: the paper's direction" in page and "\nup: the other direction" in page, page
    assert "overlapping: +0.0 AP (within one standard deviation" in page
    assert page.count("direction") == 2
    assert "Wall time of these runs (the default's counted in Table 4): 0:09:00" in page


def test_a_run_stored_with_its_thread_count_in_the_identity_is_still_that_run(tmp_path):
    """Runs stored while the thread count was part of the identity are reused (result.json, and identity.json when
    one was cut short); with any other field differing they are not."""
    ident = results.identity(["--seed", "1"])
    (tmp_path / results.RESULT).write_text(json.dumps({"identity": {**ident, "threads": 2}, "stats": [0.5]}))
    assert results.read_result(str(tmp_path), ident)["stats"] == [0.5]
    assert results.read_result(str(tmp_path), {**ident, "code": "another"}) is None
    assert results.same_identity({**ident, "threads": 1}, ident)
    assert not results.same_identity({**ident, "cpu": "x"}, ident)
