"""hsmbridge.api package."""
