"""hsmbridge.audit package."""
