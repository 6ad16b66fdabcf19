"""Convert an original SeMask-FPN or SeMask-Mask2Former checkpoint to a semask model folder (`semask.conversion`)."""

import sys

from semask.conversion import main

if __name__ == "__main__":
    sys.exit(main())
