"""hsmbridge benchmark suite: raw PKCS#11 limit, service in-process, HTTP vs moto, scale.

Entry point: `bash benchmarks/run.sh [--quick]` (or `python -m benchmarks.run`). Each measurement
family runs in its own subprocess because SoftHSM2 reads SOFTHSM2_CONF once per process and
python-pkcs11 memoises the loaded library, so one process cannot hold two environments' tokens.
"""
