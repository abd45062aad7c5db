"""Evaluation: needle-in-a-haystack and passkey grids, long-context perplexity, plots.

Modules: methods (which attention to compare), generation (one compile per
method), grid (cells, scoring, summaries), niah / passkey (prompt builders),
ppl (chunked perplexity), plots (heatmaps), harness (CLI glue). Run
`python -m duojax.eval --help`.
"""
