"""Measuring tools: the gradient-method comparison and sweep behind
`python -m diffeqkit compare`, evaluation counting and memory measurement.

The core never imports this package: nothing here is part of a solve.
"""
