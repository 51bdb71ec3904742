"""The audit trail: one CloudTrail-like event per call, whichever edge served it."""
