"""The KMS JSON protocol (awsJson 1.1): the one place wire names are spelled."""
