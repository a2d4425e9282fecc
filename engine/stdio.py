"""Keeping stdout for a command's result (a reply, a JSON line): what libraries print while a
model loads (efficientnet_lite's "Loaded pretrained weights ...", C or Rust code writing to file
descriptor 1) goes to stderr instead."""
from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def stdout_to_stderr():
    """Within the block, file descriptor 1 and sys.stdout (which need not write to it) write to
    stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
