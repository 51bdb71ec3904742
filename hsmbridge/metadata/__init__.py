"""hsmbridge.metadata package."""
