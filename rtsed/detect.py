"""``python -m rtsed.detect``: the command line's module path; the command lives in rtsed.cli.detect."""

import sys

from rtsed.cli.detect import main

if __name__ == "__main__":
    sys.exit(main())
