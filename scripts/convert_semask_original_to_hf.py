"""Convert an original SeMask-FPN checkpoint to a semask model folder (see `semask.conversion`)."""

import sys

from semask.conversion import main

if __name__ == "__main__":
    sys.exit(main())
