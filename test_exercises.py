"""Tests for exercises.py, the course exercises: the stub keeps everything but the function's body, the copy holds the
project and nothing else, bad input is one line with exit status 2 and leaves nothing behind, docs/exercises.md is
what the command prints, and (slow) every exercise is proven: its stub fails each of its grading tests, the original
passes them. CPU only, no network."""
import ast
import json
import os
import re
import subprocess
import sys

import pytest

import exercises
from conftest import HERE


def function_node(source, qualname):
    return exercises.find_function(ast.parse(source), qualname)


@pytest.mark.parametrize("exercise", exercises.EXERCISES, ids=lambda e: e.name)
def test_stub_replaces_the_body_alone(exercise):
    """The stubbed function is its decorators, signature and docstring, then one raise naming the equation; every
    other line of the file is unchanged, and the file still compiles."""
    with open(os.path.join(HERE, exercise.path)) as f:
        source = f.read()
    stubbed = exercises.stub_source(source, exercise)
    original, stub = function_node(source, exercise.function), function_node(stubbed, exercise.function)
    assert ast.get_docstring(stub) == ast.get_docstring(original)
    assert ast.dump(stub.args) == ast.dump(original.args)
    assert [ast.dump(d) for d in stub.decorator_list] == [ast.dump(d) for d in original.decorator_list]
    assert len(stub.body) == 2 and isinstance(stub.body[1], ast.Raise)
    raised = stub.body[1].exc
    assert raised.func.id == "NotImplementedError" and exercise.equation in raised.args[0].value
    lines, stub_lines = source.splitlines(), stubbed.splitlines()
    head = original.body[0].end_lineno  # through the docstring
    assert stub_lines[:head] == lines[:head]
    assert stub_lines[head + 1:] == lines[original.end_lineno:]
    assert stub_lines[head].strip().startswith("raise NotImplementedError(")
    compile(stubbed, exercise.path, "exec")


def test_each_equation_exercise_is_the_function_the_readme_table_names():
    """Eq. (1)-(10) are the functions of the README's table, one exercise each; the other two are in it too."""
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    table = dict(re.findall(r"^\| (Eq\. \(\d+\)) \|[^|]*\| `([^`]+)` \|$", readme, re.M))
    assert len(table) == 10
    exercises_by_equation = {e.equation: f"{e.path}:{e.function}" for e in exercises.EXERCISES}
    for equation, location in table.items():
        assert exercises_by_equation[equation] == location, equation
    for e in exercises.EXERCISES:
        assert f"`{e.path}:{e.function}`" in readme, e.name
        for node_id in e.tests:
            path, name = node_id.split("::")
            with open(os.path.join(HERE, path)) as f:
                assert re.search(rf"^def {name}\(", f.read(), re.M), node_id


def test_docs_page_is_the_commands_markdown(capsys):
    exercises.cli(["list", "--markdown"])
    printed = capsys.readouterr().out
    with open(os.path.join(HERE, "docs", "exercises.md")) as f:
        assert f.read() == printed, "regenerate: python exercises.py list --markdown > docs/exercises.md"
    for e in exercises.EXERCISES:
        assert f"`{e.name}`" in printed and f"`{e.path}:{e.function}`" in printed


def test_list_names_every_exercise_and_its_grading_command(capsys):
    exercises.cli(["list"])
    printed = capsys.readouterr().out
    for e in exercises.EXERCISES:
        assert re.search(rf"^{re.escape(e.name)} +{re.escape(e.path)}:{re.escape(e.function)} ", printed, re.M)
        assert exercises.grading_command(e) in printed


def fake_repository(root):
    """A repository with project files and the things a copy must leave out: git, caches, outputs, checkpoints."""
    for rel in ("dynql.py", "errors.py"):
        with open(os.path.join(HERE, rel)) as f:
            (root / rel).write_text(f.read())
    (root / "requirements.txt").write_text("torch\n")
    (root / "README.md").write_text("# readme\n")
    (root / "docs" / "img").mkdir(parents=True)
    (root / "docs" / "page.md").write_text("page\n")
    (root / "docs" / "img" / "a.png").write_bytes(b"png")
    for rel in (".git/HEAD", "__pycache__/dynql.cpython-311.pyc", ".pytest_cache/v", "outputs/checkpoint.pth",
                "docs/.ipynb_checkpoints/x.ipynb", "docs/__pycache__/x.pyc", "model.pth", ".gitignore"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("leave me out\n")
    return {"dynql.py", "errors.py", "requirements.txt", "README.md", "docs/page.md", "docs/img/a.png"}


def files_under(root):
    return {os.path.relpath(os.path.join(parent, n), root) for parent, _, names in os.walk(root) for n in names}


@pytest.mark.parametrize("existing", ["absent", "empty", "nested"])
def test_copy_holds_the_project_files_and_nothing_else(tmp_path, existing):
    repo = tmp_path / "repo"
    repo.mkdir()
    expected = fake_repository(repo)
    out = tmp_path / ("out/a/b/hw" if existing == "nested" else "out/hw")
    if existing == "empty":
        out.mkdir(parents=True)
    command = exercises.write_exercise(exercises.BY_NAME["eq7"], str(out), root=str(repo))
    assert files_under(out) == expected
    assert sorted(os.listdir(out.parent)) == ["hw"], "no temporary folder left beside the copy"
    assert (out / "docs" / "img" / "a.png").read_bytes() == b"png"
    assert (out / "errors.py").read_text() == (repo / "errors.py").read_text()
    stubbed = (out / "dynql.py").read_text()
    assert stubbed == exercises.stub_source((repo / "dynql.py").read_text(), exercises.BY_NAME["eq7"])
    assert "Eq. (7)" in stubbed and command.startswith("python -m pytest -q test_dynql.py::")


def test_exercise_command_writes_the_copy_and_prints_its_grading_command(tmp_path, capsys):
    out = tmp_path / "hw"
    exercises.cli(["eq9", "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"cd {out} && {exercises.grading_command(exercises.BY_NAME['eq9'])}" in printed.splitlines()
    assert "Eq. (9)" in printed and (out / "model.py").is_file() and (out / "docs" / "exercises.md").is_file()
    assert not (out / ".git").exists() and not (out / "outputs").exists()
    assert "raise NotImplementedError('Eq. (9)" in (out / "dynql.py").read_text()


def bad_input_cases(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep\n")
    return [
        (["eq11", "--out", str(tmp_path / "x")], "invalid choice: 'eq11'"),
        (["eq7"], "eq7 needs --out DIR"),
        (["eq7", "--out", os.path.join(HERE, "hw")], "inside the repository"),
        (["eq7", "--out", HERE], "inside the repository"),
        (["eq7", "--out", os.path.join(HERE, "docs")], "inside the repository"),
        (["eq7", "--out", os.path.dirname(HERE)], "is a folder that is not empty"),
        (["eq7", "--out", str(full)], "is a folder that is not empty"),
        (["eq7", "--out", str(a_file)], "is a file"),
        (["list", "--out", str(tmp_path / "y")], "--out writes an exercise"),
        (["eq7", "--out", str(tmp_path / "z"), "--markdown"], "--markdown goes with 'list'"),
    ]


def tree_state(root, skip=()):
    """Every path under `root` (but the folders named in `skip`) with its modification time and size."""
    state = {}
    for parent, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in names + dirs:
            path = os.path.join(parent, name)
            stat = os.stat(path)
            state[path] = (stat.st_mtime_ns, stat.st_size if name in names else None)
    return state


def repository_state():
    """The repository's project files with their times and sizes (caches and training outputs change under other
    work, and are no concern of exercises.py)."""
    return tree_state(HERE, skip=(".git", "__pycache__", ".pytest_cache", "outputs", "runs", ".benchmarks"))


def test_bad_input_is_one_line_exit_2_and_nothing_is_written(tmp_path, capsys):
    before_repo = repository_state()
    for argv, expected in bad_input_cases(tmp_path):
        before = tree_state(tmp_path)
        with pytest.raises(SystemExit) as exit_info:
            exercises.cli(argv)
        assert exit_info.value.code == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1, argv
        assert expected in captured.err, (argv, captured.err)
        assert tree_state(tmp_path) == before, argv
    assert repository_state() == before_repo
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep\n"


def test_an_unwritable_out_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A failed write (here: the copy of one file refused) leaves neither the copy nor its temporary folder."""
    real_copy = exercises.shutil.copy2

    def refuse_readme(src, dst, *args, **kwargs):
        if os.path.basename(src) == "README.md":
            raise OSError(28, "No space left on device")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(exercises.shutil, "copy2", refuse_readme)
    with pytest.raises(SystemExit) as exit_info:
        exercises.cli(["eq1", "--out", str(tmp_path / "hw")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "hw" in err
    assert os.listdir(tmp_path) == []


# The proof of every exercise ---------------------------------------------------------------------------------

# Run in one process of its own: pytest on given node ids in each of several folders (the exercise copies and the
# repository), one after another. The project's modules are dropped from sys.modules before each folder, so that its
# own files are imported; torch and the other libraries are imported once (a process per folder spent most of its
# time importing them). Reads [[folder, [node ids]], ...] as JSON on stdin, writes one JSON line per folder.
GRADER = """
import json, os, sys
import pytest

class Outcomes:
    def __init__(self):
        self.nodes, self.reports = {}, []

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.nodes[report.nodeid] = "failed" if report.when == "call" else "error"
            self.reports.append(report.longreprtext[-1500:])
        elif report.skipped:
            self.nodes.setdefault(report.nodeid, "skipped")
        elif report.when == "call":
            self.nodes.setdefault(report.nodeid, "passed")

runs = json.load(sys.stdin)
folders = {os.path.realpath(folder) for folder, _ in runs}
for folder, node_ids in runs:
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and os.path.dirname(os.path.realpath(path)) in folders:
            del sys.modules[name]
    os.chdir(folder)
    sys.path[0] = folder
    outcomes = Outcomes()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *node_ids], plugins=[outcomes])
    print("GRADED " + json.dumps({"folder": folder, "code": int(code), "nodes": outcomes.nodes,
                                  "reports": outcomes.reports}), flush=True)
"""


def grade(runs):
    """{folder: {code, nodes: {node id: passed|failed|error|skipped}, reports}} of pytest on each (folder, node ids)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", GRADER], input=json.dumps(runs), cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=900)
    graded = {}
    for line in proc.stdout.splitlines():
        if line.startswith("GRADED "):
            result = json.loads(line[len("GRADED "):])
            graded[result.pop("folder")] = result
    assert proc.returncode == 0 and len(graded) == len(runs), proc.stdout[-3000:] + proc.stderr[-3000:]
    return graded


def outcomes_of(node_id, nodes):
    """The outcomes of one selected node id: the test itself, or each of its parameters."""
    return [outcome for node, outcome in nodes.items() if node == node_id or node.startswith(node_id + "[")]


@pytest.mark.slow
def test_every_exercise_stub_fails_each_grading_test_and_the_original_passes_them(tmp_path):
    """For every exercise: in its copy, each selected grading test fails or errors, on the stub's NotImplementedError
    (a grading test that passes against the stub cannot grade the function); in the repository itself, every grading
    test passes."""
    everything = sorted({node for e in exercises.EXERCISES for node in e.tests})
    runs = [[HERE, everything]]
    for e in exercises.EXERCISES:
        command = exercises.write_exercise(e, str(tmp_path / e.name))
        runs.append([str(tmp_path / e.name), command.split()[4:]])
    graded = grade(runs)
    original = graded[HERE]
    assert original["code"] == 0, original
    for node in everything:
        assert set(outcomes_of(node, original["nodes"])) == {"passed"}, (node, original["nodes"])
    for e in exercises.EXERCISES:
        result = graded[str(tmp_path / e.name)]
        assert result["code"] == 1, (e.name, result)
        for node in e.tests:
            outcomes = outcomes_of(node, result["nodes"])
            assert outcomes and "passed" not in outcomes and "skipped" not in outcomes, (e.name, node, outcomes)
        assert all("NotImplementedError" in r and e.equation in r for r in result["reports"]), (e.name, result)
