"""``python -m mixedscale``: the same CLI as the ``mixedscale`` command."""

from .cli import main

main()
