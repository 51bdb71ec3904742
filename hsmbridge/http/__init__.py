"""The HTTP edge: the KMS API served over HTTP with SigV4, metrics, health and worker processes."""
