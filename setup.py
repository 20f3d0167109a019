"""The one compiled module, tsqp._fastpath (the protected runner's per-row passes, tsqp/trusted/protect/fast.py).
Optional: where it cannot be built, tsqp runs the same passes in torch (the reference)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("tsqp._fastpath", ["tsqp/_fastpath.c"], optional=True,
                             extra_compile_args=["-O3", "-pthread"],
                             extra_link_args=["-pthread"])])
