"""Ray job entry point: `ray job submit --working-dir . -- python jobs/retrain.py ...`.

Same flags as `detector retrain` (see `detector retrain --help`); this file only forwards them.
"""

import sys

from detector.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrain", *sys.argv[1:]], owns_process=True))
