"""report.html: what a run did, to look at (counts, distance histograms, clusters, image grids).

summary.py condenses one shard's scores into small per-shard summaries and merges them (nothing
per sample reaches the driver); thumbnails.py turns image bytes into small embedded pictures;
html.py draws the plots (matplotlib) and writes one self-contained page.
"""
