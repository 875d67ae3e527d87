"""``python -m nmtrain.cli.torchrun ARGS``: torchrun (``torch.distributed.run``) with a process's exit code.

`nmtrain train --nproc N` launches its processes through this module instead of torchrun itself. When a
process fails, torchrun logs which one and why, then re-raises the failure through its `@record`
wrapper: a Python traceback and a 20-line report after the process's own ``error: ...`` line, and exit
code 1 whatever the process's was. Here the same launcher runs with its logging quietened, and the
exit code is the first failure's (torchrun's root cause):

- a process that exited with code C (2: bad input, 130: interrupted, 1: a bug) gives C;
- a process killed by signal S (torchrun reports -S) gives 128 + S, as a shell reports it;
- torchrun itself stopped by signal S (Ctrl-C reaches it too) gives 128 + S.

A failure with a code other than 2 or 130 adds one line naming the process; its own output (the
traceback of a bug, say) is above it. Anything else torchrun raises (a rendezvous that fails) is
a bug here or in the machine, and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys

# The processes' own messages: bad input (one line each) and an interrupt (a line on where to resume).
_SAID_ALREADY = (2, 130)


def exit_code(code: int) -> int:
    """torchrun's exit code of a process (negative: killed by that signal) as a shell's exit status."""
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # This process only launches, so its log is torchrun's bookkeeping (the OMP_NUM_THREADS banner,
    # "failed (exitcode: 2)", the SIGTERM sent to the other processes): what the processes and the exit
    # code say already. Its fatal messages still show.
    logging.disable(logging.ERROR)
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        code = exit_code(failure.exitcode)
        if code not in _SAID_ALREADY:
            print(f"error: process {rank} of the torchrun launch failed with exit code {code}; its output is above",
                  file=sys.stderr)
        return code
    except SignalException as stopped:
        return 128 + int(stopped.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
