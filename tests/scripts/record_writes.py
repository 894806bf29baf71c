"""turnctl's CLI, recording every file this process opens for writing or renames into place.

    TURNCTL_TEST_RECORD=DIR  python record_writes.py train ...

Each process appends ``<op>\\t<absolute path>`` lines to ``DIR/writes-rank<RANK>.tsv`` (``open`` for
files opened with w/a/x/+ and torch.save targets, ``replace`` for os.replace / os.rename targets). tests/test_two_nodes.py
reads them to show which rank wrote what: files meant to be written once are written by one rank,
and no two ranks write the same path.
"""

import builtins
import io
import os
import sys


def _arm(record_dir: str) -> None:
    fd = os.open(os.path.join(record_dir, f"writes-rank{os.environ.get('RANK', '0')}.tsv"),
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(op, path):
        try:
            os.write(fd, f"{op}\t{os.path.abspath(os.fspath(path))}\n".encode())
        except TypeError:  # a file descriptor, not a path
            pass

    real_open, real_replace, real_rename = builtins.open, os.replace, os.rename

    def recording_open(file, mode="r", *args, **kwargs):
        if isinstance(mode, str) and any(c in mode for c in "wax+") and not isinstance(file, int):
            note("open", file)
        return real_open(file, mode, *args, **kwargs)

    def recording_replace(src, dst, *args, **kwargs):
        note("replace", dst)
        return real_replace(src, dst, *args, **kwargs)

    def recording_rename(src, dst, *args, **kwargs):
        note("replace", dst)
        return real_rename(src, dst, *args, **kwargs)

    builtins.open = io.open = recording_open
    os.replace, os.rename = recording_replace, recording_rename

    # torch.save to a path opens the file in C++ (the zip writer), past builtins.open.
    import torch

    real_save = torch.save

    def recording_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            note("open", f)
        return real_save(obj, f, *args, **kwargs)

    torch.save = recording_save


if __name__ == "__main__":
    if os.environ.get("TURNCTL_TEST_RECORD"):
        _arm(os.environ["TURNCTL_TEST_RECORD"])
    from turnctl.cli import main

    main(sys.argv[1:])
