"""``python -m ddpmkit`` runs the command line (also under ``torchrun -m ddpmkit``)."""

import sys

from .cli import main

sys.exit(main())
