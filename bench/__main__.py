"""`python -m bench [--quick] [--json FILE] ...`; see bench/start.py."""

from __future__ import annotations

import sys

from bench import start

if __name__ == "__main__":
    sys.exit(start.main())
