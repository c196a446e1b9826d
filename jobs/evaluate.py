"""Ray job entry point: `ray job submit --working-dir . -- python jobs/evaluate.py ...`.

Same flags as `detector evaluate` (see `detector evaluate --help`); this file only forwards them.
"""

import sys

from detector.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]], owns_process=True))
