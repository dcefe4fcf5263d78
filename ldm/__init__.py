"""The library (bottom floor): config, shared I/O, the stage protocol, models, and training code. Imports
neither data_prep/ nor flows/."""

from ldm import offline

offline.apply()
