"""``python -m rtsed.doctor``: the command line's module path; the command lives in rtsed.cli.doctor."""

import sys

from rtsed.cli.doctor import main

if __name__ == "__main__":
    sys.exit(main())
