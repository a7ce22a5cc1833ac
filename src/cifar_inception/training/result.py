"""What a training run returns, and its JSON form, in which it crosses from a rank to the
process that started the ranks (``--processes``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class TrainResult:
    run_dir: Path | None       # None on ranks other than 0
    status: str                # "completed", "paused" (stop_after_epochs) or "interrupted"
    epoch: int                 # epochs completed
    history: list[dict]        # every epoch's metrics so far (metrics.jsonl)
    best: dict | None          # the metrics of the epoch saved as best.pt
    test: dict | None          # eval.json of best.pt, when the test set was evaluated
    message: str = ""

    def to_json(self) -> dict:
        values = asdict(self)
        values["run_dir"] = None if self.run_dir is None else str(self.run_dir)
        return values

    @classmethod
    def from_json(cls, values: dict) -> TrainResult:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        values["run_dir"] = None if values["run_dir"] is None else Path(values["run_dir"])
        return cls(**values)
