"""hsmbridge.keystore package."""
