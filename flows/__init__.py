"""How work starts (top floor): the stage registry, the `ldm` command line, and the Prefect flow."""

from ldm import offline

offline.apply()
