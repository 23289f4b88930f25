"""``python -m qcow2`` runs the ``qcow2-tool`` command line."""

import sys

from .cli import main

sys.exit(main())
