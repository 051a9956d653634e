"""DeepSpeed ranks on the CPU without its shared-memory all-reduce op.

DeepSpeed JIT-builds that op (~50 s) into one cache folder shared by every Python environment of the machine, under a
lock file: two environments (a clean clone's and the working copy's) rebuild it in turn, and a process killed while
it holds the lock leaves every later launch waiting. The tests' ranks all-reduce through gloo instead, which the op
only speeds up."""

import importlib


def skip_shm_op() -> None:
    """Make DeepSpeed's process group skip the op (call before `deepspeed.init_distributed`). The module is looked up
    by name: `import deepspeed.comm.torch as m` binds the torch package, which deepspeed.comm re-exports as `torch`."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


# the head of a `python -c` rank program: the op skipped, then the rest of the program
RANK_PRELUDE = "from tests.deepspeed_cpu import skip_shm_op\nskip_shm_op()\n"
