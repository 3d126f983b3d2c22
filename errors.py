"""Errors and files: the one exception class for bad input, the one line the command lines print for it, which
process speaks under torchrun, and how files a user names are read and files a run owns are written.

A bad data file, flag, checkpoint or embedding table raises `InputError` (a ValueError) with a message that
names the bad thing and says what was expected; train.py and evaluate.py print that message as one line and
exit 2. Every other exception is a bug and keeps its traceback. This module sits below every other one, so
any of them can raise it, ask whether it is the main process, or write a file atomically.

`user_file` checks that a path a user names is a file (a folder is named as one), `read_text` reads a text file
a user names (UTF-8, with or without the byte-order mark editors such as Notepad write) and `read_torch_file` is
torch.load for the checkpoints and embedding tables a user names, where a damaged file is bad input, not a bug.
`write_atomically` is how every file a run owns is written (checkpoints, logs, results JSON, PNGs, the
label-dictionary cache): a kill or a full disk leaves the old file or the new one, and a failed write is one line;
`append_line` adds a line to a log the user names.

No equations, no tensors (no shape legend). Deviations from the paper: none (the paper has no CLI).
"""
import argparse
import json
import os
import pickle
import secrets
import sys

import torch
import torch.distributed as dist


class InputError(ValueError):
    """Bad input (a data file, a flag, a checkpoint, an embedding table): the message names it and says what
    was expected; the command lines print it as one line. Any other exception is a bug and keeps its traceback."""


def error_line(err):
    """The one line to show for an error: a DataLoader worker's error arrives as 'Caught X in DataLoader worker
    process N' plus the worker's traceback, whose last line is the original 'module.X: message'."""
    text = str(err).strip()
    if "\nOriginal Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (an unknown flag, a value of the wrong type or not among the choices) are one
    line, like every other bad input, instead of the whole usage text."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {os.path.basename(sys.argv[0]) or self.prog} --help)\n")


def is_distributed():
    """True inside a torchrun process group (DDP training, gathered evaluation)."""
    return dist.is_available() and dist.is_initialized()


def is_main():
    """True on the process that prints, logs and writes files: rank 0, or the only process."""
    return not is_distributed() or dist.get_rank() == 0


def user_file(path, what, expected):
    """Raise unless `path` is a file: a folder is an InputError saying so, a missing path a FileNotFoundError;
    both name `what` (a flag, or the kind of file), the path and `expected`."""
    if os.path.isdir(path):
        raise InputError(f"{what} {path} is a folder, expected {expected}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} not found, expected {expected}")


TEXT_ENCODING = "UTF-8 (with or without a byte-order mark)"


def read_text(path, what, expected):
    """The text of a file a user names, decoded as UTF-8; a leading byte-order mark (Windows Notepad writes one) is
    dropped. Any other encoding (Latin-1, UTF-16, ...) is an InputError naming the file, the first byte that is not
    UTF-8 and the encoding expected; NUL bytes (UTF-16 text of ASCII letters decodes as UTF-8) count as such."""
    user_file(path, what, expected)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{what} {path} is not {TEXT_ENCODING} text: byte 0x{raw[err.start]:02x} at offset "
                         f"{err.start} is not UTF-8 (Latin-1 or UTF-16?); save it as UTF-8") from None
    if "\0" in text:
        raise InputError(f"{what} {path} is not {TEXT_ENCODING} text: it holds NUL bytes (UTF-16?); save it as "
                         "UTF-8")
    return text


def read_torch_file(path, what, *, weights_only):
    """torch.load of a file the user named, on the CPU; one torch.save did not write (text, empty, truncated,
    random bytes) is an InputError naming `what` and the path."""
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive; files of torch < 1.6 are a pickle, which opens with the PROTO byte 0x80.
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise InputError(f"{what} {path} is {'not a file written by torch.save' if magic else 'empty'}, expected "
                         "a .pt/.pth file written by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as err:
        # A truncated zip is a RuntimeError (or, cut inside a record, an OSError 'Invalid argument'), a truncated
        # pickle an EOFError or UnpicklingError.
        reason = str(err).split(". ")[0].splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{what} {path} is damaged or incomplete ({reason}), expected a file written by "
                         "torch.save") from None


def cache_dir():
    """Where generated data is kept between runs (the `shapes` set, label dictionaries): $CLIP_DETR_CACHE, else
    ~/.cache/clip-detr."""
    # Set but empty (CLIP_DETR_CACHE= in a script) means unset, not the current folder.
    return os.environ.get("CLIP_DETR_CACHE") or os.path.expanduser(os.path.join("~", ".cache", "clip-detr"))


TEMP_SUFFIX = ".tmp"


def write_atomically(path, write):
    """`write(tmp)` to a temporary file beside `path` (PATH.<random>.tmp), then rename it over `path`: a kill
    leaves the old file or the new one, never half of one, and a failed write leaves no temporary file behind.
    The temporary name is unique, so two processes writing one path never share it. A write the system refuses
    (disk full, read-only, no permission) is an InputError naming the path and the cause: the old file is kept."""
    # Created by `write` itself (not mkstemp, whose 0600 mode would stick to the renamed file).
    tmp = f"{path}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        kept = "the previous file is kept" if os.path.exists(path) else "nothing was written"
        raise InputError(f"cannot write {path}: {err.strerror or err} ({kept})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _RecordingWriter:
    """A binary file for torch.save that keeps the OSError of a failed write: torch's zip writer reports a write
    that fails after the first one (a disk filling up mid-file) as its own RuntimeError ('unexpected pos'), which
    names neither the file nor the cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self):
        return self.f.flush()


def save_torch(path, obj):
    """torch.save, written atomically through a Python file object, so that a full disk is an OSError that says
    so wherever in the file it happens (torch.save given a path reports a bare 'PytorchStreamWriter failed
    writing file'; given a file, a write failing mid-file becomes its RuntimeError)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is None:
                    raise  # not a failed write: a bug, with its traceback
                raise writer.error from None
    write_atomically(path, write)


def append_line(path, line):
    """Add one line to a file (evaluate.py --log); a write the system refuses is an InputError naming the path."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}") from None


def write_json(path, obj):
    """One JSON document, written atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f)
    write_atomically(path, write)
