"""``python -m kvsync``: the same command line as ``kvsync``."""

import sys

from kvsync.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m kvsync"))
