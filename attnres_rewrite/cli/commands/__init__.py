"""One module per command: ``run(...)`` does the work and prints the JSON or the human view."""
