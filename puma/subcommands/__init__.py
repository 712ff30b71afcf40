"""The ``puma`` command's subcommands, one module per group, each with ``add_parsers(sub,
common)`` that adds its parsers (``common`` holds ``-v``) and sets each one's handler as
``func``; :mod:`puma.cli` only assembles :data:`GROUPS`, runs the handler and turns failures and
signals into one line and an exit status."""

#: The modules, in the order their commands appear in ``puma --help``.
GROUPS = ("puma.subcommands.run", "puma.subcommands.bench", "puma.subcommands.deploy")
