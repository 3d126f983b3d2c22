"""The walkthrough notebook, run: docs/walkthrough.ipynb executed top to bottom and stored with its outputs.

`python walkthrough.py` runs every cell of docs/walkthrough.ipynb in a fresh kernel, in the repository root, and
writes the notebook back with its outputs (figures as PNGs), so that GitHub shows them without running anything.
Run it after a change to the code the notebook calls: the stored outputs are then the code's as it is. It prints the
wall time. `--out FILE` writes the executed notebook elsewhere and leaves the stored one alone (test_walkthrough.py
runs it so, in a temporary folder); `--checkpoint PATH` names the detector to draw.

Which detector the notebook draws is said in its first cells: the checkpoint at $CLIP_DETR_WALKTHROUGH_CHECKPOINT,
by default outputs/checkpoint.pth (what `python train.py` writes), and where there is none, a small one it trains
itself. A cell that raises stops the run with the cell's traceback, and nothing is written.

Needs the notebook runner of requirements-test.txt (nbclient, nbformat, ipykernel); matplotlib draws the figures.
No equations, no tensors (the notebook has them). Deviations from the paper: none.
"""
import os
import sys
import time

from errors import ArgumentParser, InputError, error_line, write_atomically

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOK = os.path.join(HERE, "docs", "walkthrough.ipynb")
CHECKPOINT_VARIABLE = "CLIP_DETR_WALKTHROUGH_CHECKPOINT"
# A cell may train a small detector when no checkpoint is found: minutes on two free CPU cores, more on busy ones.
CELL_TIMEOUT_S = 1800


def notebook_runner():
    """nbformat and nbclient, imported when needed: they are test requirements, not the detector's."""
    try:
        import nbclient
        import nbformat
    except ImportError as err:
        raise InputError(f"the notebook runner is missing ({err.name}): pip install -r requirements-test.txt") from None
    return nbformat, nbclient


def run(notebook=NOTEBOOK, out=NOTEBOOK, *, checkpoint=None, timeout=CELL_TIMEOUT_S):
    """Execute `notebook` top to bottom in a new kernel whose working folder is the repository root and write it,
    outputs included, to `out`. Returns the wall time in seconds. `checkpoint` sets CLIP_DETR_WALKTHROUGH_CHECKPOINT
    for the kernel. A cell that raises raises here (nbclient's CellExecutionError) and `out` is not written."""
    nbformat, nbclient = notebook_runner()
    if not os.path.isfile(notebook):
        raise FileNotFoundError(f"notebook {notebook} not found")
    nb = nbformat.read(notebook, as_version=4)
    env = dict(os.environ)
    if checkpoint is not None:
        env[CHECKPOINT_VARIABLE] = os.path.abspath(checkpoint)
    # No timings in the stored cells: a rerun of unchanged code then changes no line but the figures' bytes.
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                     resources={"metadata": {"path": HERE}})
    start = time.perf_counter()
    client.execute(env=env)
    seconds = time.perf_counter() - start
    nb.metadata.pop("widgets", None)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            nbformat.write(nb, f)
    write_atomically(out, write)
    return seconds


def get_parser():
    p = ArgumentParser("walkthrough.py", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=NOTEBOOK, metavar="FILE",
                   help="where the executed notebook goes (default: docs/walkthrough.ipynb itself)")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help=f"the detector to draw (default: ${CHECKPOINT_VARIABLE}, else outputs/checkpoint.pth, else "
                        "one the notebook trains)")
    return p


def main(argv=None):
    cli = get_parser().parse_args(argv)
    if cli.checkpoint is not None and not os.path.isfile(cli.checkpoint):
        raise FileNotFoundError(f"--checkpoint {cli.checkpoint} not found: expected a checkpoint train.py wrote "
                                f"(leave --checkpoint out to let the notebook train its own)")
    if os.path.isdir(cli.out):
        raise InputError(f"--out {cli.out} is a folder, expected a notebook file name")
    seconds = run(NOTEBOOK, cli.out, checkpoint=cli.checkpoint)
    print(f"ran {os.path.relpath(NOTEBOOK, HERE)} in {seconds:.0f} s; wrote {cli.out}")
    return seconds


def cli(argv=None):
    """main() with bad input reported as one line on stderr and exit status 2; a failing cell keeps its traceback."""
    try:
        return main(argv)
    except (InputError, FileNotFoundError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
