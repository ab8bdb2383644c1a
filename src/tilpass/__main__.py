"""``python -m tilpass``: the `tilpass` command (what ``torchrun -m tilpass`` runs)."""

import sys

from tilpass.cli import main

sys.exit(main())
