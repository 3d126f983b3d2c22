"""Errors that would hide bugs (issue 31, class 9): the command lines turn bad input (errors.InputError, a
FileNotFoundError) into one line and exit status 2, and nothing else. InputError is a ValueError, so a handler that
caught ValueError (or Exception) would turn a genuine bug, a ValueError or RuntimeError raised inside the model or
the dataset, into a one-line "bad input" with no traceback. Here such errors are raised where the runs would meet
them (the model's forward pass, a dataset item, inside a DataLoader worker) and must leave train.cli, evaluate.cli
and bench.py as themselves; the same place raising an InputError is the one-line control.

In-process runs of the tiny configuration, stopped by the raised error at their first batch. The fast tier keeps one
bug per command line (a ValueError of the model) and the controls; the other errors and sites, and the DataLoader
worker cases (a worker process each), run in the full suite. No equations. Deviations from the paper: none.
"""
import contextlib
import io

import pytest

import data
import evaluate
import model
import train
from conftest import TINY, parse_args, share_resnet18
from errors import InputError

QUICK = [*TINY, "--epochs", "1", "--max-steps", "1", "--method", "baseline", "--eval-every", "0", "--device", "cpu"]


class Bug(RuntimeError):
    """A stand-in for a genuine bug of a type the command lines must not catch."""


def raising(error):
    def fail(*args, **kwargs):
        raise error
    return fail


@pytest.fixture(scope="module")
def checkpoint(cache, tmp_path_factory):
    """A checkpoint of the tiny baseline (random weights, no step): what evaluate.py runs on."""
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        share_resnet18(mp)
        args = parse_args(*QUICK, "--output-dir", out)
        train.save_epoch_checkpoint(train.build_run(args, 0, 1, None, None), 0)
    return str(out / "checkpoint.pth")


def run_cli(cli, argv, capsys):
    """What the command line did: ('exit', status, stderr lines) or ('raised', the exception)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cli([str(a) for a in argv])
    except SystemExit as stop:
        return "exit", stop.code, capsys.readouterr().err.strip().splitlines()
    except Exception as error:  # noqa: BLE001 - the point of the test: which exception left the command line
        return "raised", error
    return "returned", None


SITES = {"model": (model.DeformableDETR, "forward"), "dataset": (data.CocoDetection, "__getitem__")}


# The fast tier keeps the ValueError of the model (the base class of InputError: what a handler too wide would
# take); the other errors and sites run in the full suite.
CASES = [pytest.param(error, site, marks=() if (kind, site) == ("ValueError", "model") else pytest.mark.slow,
                      id=f"{kind}-{site}")
         for kind, error in (("ValueError", ValueError("a bug's ValueError")), ("RuntimeError", Bug("a bug's bug")))
         for site in SITES]


@pytest.mark.parametrize("cli_name", ["train", "evaluate"])
@pytest.mark.parametrize("error, site", CASES)
def test_a_bug_inside_the_run_keeps_its_traceback(error, site, cli_name, checkpoint, tmp_path, monkeypatch, capsys):
    """A ValueError or RuntimeError from the model's forward pass or a dataset item leaves the command line as
    itself (Python prints its traceback, exit status 1), not as a one-line exit 2."""
    share_resnet18(monkeypatch)
    monkeypatch.setattr(*SITES[site], raising(error))
    cli = {"train": train.cli, "evaluate": evaluate.cli}[cli_name]
    argv = ([*QUICK, "--output-dir", tmp_path / "out"] if cli_name == "train" else ["--resume", checkpoint])
    outcome = run_cli(cli, argv, capsys)
    assert outcome[0] == "raised" and outcome[1] is error, outcome


@pytest.mark.parametrize("cli_name", ["train", "evaluate"])
def test_the_same_place_raising_bad_input_is_one_line(cli_name, checkpoint, tmp_path, monkeypatch, capsys):
    """The control: an InputError raised at the same place is bad input, one line and exit status 2."""
    share_resnet18(monkeypatch)
    monkeypatch.setattr(data.CocoDetection, "__getitem__", raising(InputError("image x.png is not an image")))
    cli = {"train": train.cli, "evaluate": evaluate.cli}[cli_name]
    argv = ([*QUICK, "--output-dir", tmp_path / "out"] if cli_name == "train" else ["--resume", checkpoint])
    assert run_cli(cli, argv, capsys) == ("exit", 2, ["error: image x.png is not an image"])


@pytest.mark.slow
@pytest.mark.parametrize("cli_name", ["train", "evaluate"])
@pytest.mark.parametrize("error, expected", [(ValueError("a bug's ValueError"), "raised"),
                                             (InputError("image x.png is not an image"), "exit")],
                         ids=["ValueError", "InputError"])
def test_an_error_inside_a_dataloader_worker(error, expected, cli_name, checkpoint, tmp_path, monkeypatch, capsys):
    """A worker process re-raises its error in the main process under the same type: a bug's ValueError keeps its
    traceback there too (its message holds the worker's), an InputError is the one line."""
    share_resnet18(monkeypatch)
    monkeypatch.setattr(data.CocoDetection, "__getitem__", raising(error))
    cli = {"train": train.cli, "evaluate": evaluate.cli}[cli_name]
    argv = ([*QUICK, "--output-dir", tmp_path / "out"] if cli_name == "train" else ["--resume", checkpoint])
    outcome = run_cli(cli, [*argv, "--num-workers", "1"], capsys)
    if expected == "raised":
        assert outcome[0] == "raised" and type(outcome[1]) is ValueError, outcome
        assert "DataLoader worker process 0" in str(outcome[1]) and "a bug's ValueError" in str(outcome[1])
    else:
        assert outcome == ("exit", 2, ["error: image x.png is not an image"])


def test_bench_lets_a_bug_through_its_missing_package_handler(monkeypatch, capsys):
    """bench.py onnx says a missing package in one line (an InputError); any other error is a bug."""
    import bench
    import onnx_export
    monkeypatch.setattr(onnx_export, "require_package", raising(ValueError("a bug's ValueError")))
    with pytest.raises(ValueError, match="a bug's ValueError"):
        bench.cli(["onnx", "--models", "demo"])
    monkeypatch.setattr(onnx_export, "require_package", raising(InputError("bench.py onnx needs onnx: pip install")))
    with pytest.raises(SystemExit) as info:
        bench.cli(["onnx", "--models", "demo"])
    assert info.value.code == 2 and capsys.readouterr().err == "error: bench.py onnx needs onnx: pip install\n"
