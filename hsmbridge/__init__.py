"""hsmbridge: AWS KMS CloudHSM custom key stores on any PKCS#11 HSM."""

__version__ = "0.1.0"
