"""`python -m hsmbridge`: the same entry point as the `hsmbridge` console script."""

from hsmbridge.main import entry

entry()
