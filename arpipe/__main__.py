"""``python -m arpipe ...`` is ``arpipe ...``: how a Ray job runs it where the cluster's PATH has no ``arpipe``."""

import sys

from arpipe.pipeline.cli import main

sys.exit(main())
