"""Subcommands of the ``moekit`` CLI, one module each (see ``moekit.cli``).

Each module defines ``add_parser(subparsers)``, which registers the subcommand and sets
``run`` as its handler via ``set_defaults(run=run)``, and ``run(args) -> int``.
"""
