"""One rank of a run that :func:`cifar_inception.training.train` split into processes.

    python -m cifar_inception.training.rank_main JOB.json   (started by the parent only)

Trains the job's configuration as the rank its environment names; rank 0 writes its result
(and, when the caller collects the log, the lines it logged) where the parent reads them.
A failure leaves its one-line message beside the job, for the parent to raise, and exit
status 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cifar_inception.errors import CifarInceptionError, describe_os_error
from cifar_inception.launch import PARENT_ENV, stop_with_parent
from cifar_inception.recipes import TrainConfig
from cifar_inception.training.loop import train
from cifar_inception.training.ranks import read_data


def main(job_path: str) -> int:
    if PARENT_ENV in os.environ:
        stop_with_parent(int(os.environ[PARENT_ENV]))
    job = json.loads(Path(job_path).read_text())
    lines: list[str] = []
    log = lines.append if job["quiet"] else None
    try:
        result = train(TrainConfig.from_dict(job["config"]), read_data(job),
                       resume=job["resume"], log=log, started_at=job["started_at"])
    except KeyboardInterrupt:
        return 130
    except (CifarInceptionError, OSError) as exc:  # the parent raises it as its own
        message = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        rank = os.environ.get("RANK", "0")
        (Path(job["errors"]) / f"error-{rank}.txt").write_text(message)
        return 2
    if os.environ.get("RANK") == "0":
        Path(job["result"]).write_text(json.dumps({**result.to_json(), "log": lines}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
