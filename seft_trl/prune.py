"""``python -m seft_trl.prune``: the pruning command line, kept at its first address.

The command itself lives in :mod:`seft_trl.apps.prune` (also ``seft-trl prune``).
"""

from .apps.prune import main

if __name__ == "__main__":
    main()
