"""``python -m libclient.cli`` is ``shoal``."""

from libclient.cli import main

main()
