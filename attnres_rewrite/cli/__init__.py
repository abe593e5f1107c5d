"""The ``attnres`` command line (``attnres_rewrite.cli.app:main``); see docs/cli.md."""
