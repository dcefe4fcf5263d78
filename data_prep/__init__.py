"""The data stages (middle floor): sources, ingest (img2dataset), filter, precompute (Ray Data). Imports ldm/ only."""

from ldm import offline

offline.apply()
