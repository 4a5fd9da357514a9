"""``python -m epmq`` runs the command line."""

from epmq.cli import main

main()
