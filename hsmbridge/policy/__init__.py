"""hsmbridge.policy package."""
