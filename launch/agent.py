"""torchrun's agent that dies with its parent: ``python -m launch.agent <torchrun args>``.

The agent sets the parent-death signal (SIGKILL), then runs torch's own launcher unchanged.
"""

from __future__ import annotations

import os
import sys

from launch.local import LAUNCHER_PID, set_parent_death_signal


def main() -> None:
    """Set the parent-death signal, exit if the launcher is already gone, run torchrun."""
    set_parent_death_signal()
    if os.getppid() != int(os.environ.get(LAUNCHER_PID, os.getppid())):
        sys.exit(1)  # the launcher died before the signal was armed
    from torch.distributed.run import main as torchrun_main

    torchrun_main()


if __name__ == "__main__":
    main()
