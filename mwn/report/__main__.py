"""`python -m mwn.report PATH`: rebuild a run's plots, or a sweep's plots and summary table."""

import sys

from mwn.report.sweep import main

sys.exit(main())
