"""hsmbridge.service package."""
