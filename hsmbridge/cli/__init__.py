"""hsmbridge.cli package."""
