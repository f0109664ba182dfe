"""``python -m clustermesh.datapath dump|destroy ...`` (see command.py)."""

import sys

from clustermesh.datapath.command import main

sys.exit(main())
