"""`python -m detector` == the `detector` console script."""

from detector.cli import main

raise SystemExit(main())
