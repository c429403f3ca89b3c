"""Kernel tests.

The Triton kernels run on CPU tensors through Triton's interpreter, which needs TRITON_INTERPRET=1
before ``triton`` is first imported: not only are our ``@triton.jit`` kernels decorated for the
interpreter at import, triton's own library functions (``tl.zeros``, ``tl.sum``, ``tl.rand``, ...) are
decorated once, when ``triton.language`` is imported. In a full ``make test`` run, megatron-core has
imported triton (uninterpreted) while the attention tests were collected, long before this file.
So the interpreter tests live in ``interpreter/`` and run in a child pytest process started with
TRITON_INTERPRET=1 (``test_kernels_interpreter.py``); in this process they skip themselves unless the
variable was already set when triton was imported (then the child run is skipped instead).
"""
