"""Identities: who may call hsmbridge (principals, their access keys, later IAM and STS)."""
