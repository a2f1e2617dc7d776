"""``python -m ucgm`` (also what ``torchrun -m ucgm`` runs): the ``ucgm`` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
