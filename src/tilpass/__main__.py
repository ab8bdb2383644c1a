"""``python -m tilpass``: the `tilpass` command (what ``torchrun -m tilpass`` runs)."""

import sys

from tilpass.cli import main

if __name__ == "__main__":  # importing the module (as the import check does) runs nothing
    sys.exit(main())
