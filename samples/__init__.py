"""The training study (``python -m samples.train_lm``) and its committed results.

Run from the repository root; this directory is not installed. The sample *models*
(``samples:NAME`` on the command line) are part of the package, as
``attnres_rewrite.samples``.
"""
