"""Segment images or folders of images with a SeMask model (see `semask.cli`; installed as `semask-segment`)."""

import sys

from semask.cli import main

if __name__ == "__main__":
    sys.exit(main())
