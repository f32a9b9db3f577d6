"""The training log: a JSON-lines record of every step in <output_dir>/<logging_dir>/train_log.jsonl (what resume is
checked against, and what the demo plots), its reader, and TensorBoard scalars beside it."""

import json
from pathlib import Path

import numpy as np

LOG_NAME = "train_log.jsonl"


def read_log(log_dir) -> list:
    """The records of a run's log, oldest first: {"step": n, <name>: value, ...} per line."""
    path = Path(log_dir) / LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line]


class Logger:
    """Appends one record per step to the log (after dropping records past `resume_step`), plus TensorBoard
    scalars when report_to is "tensorboard"; does nothing when not enabled (workers other than rank 0)."""

    def __init__(self, log_dir, resume_step: int, report_to: str = "tensorboard", enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / LOG_NAME
        # Steps after the resume point were never checkpointed: they will be redone, so their lines go.
        kept = [r for r in read_log(log_dir) if r.get("step", 0) <= resume_step] if self.path.is_file() else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if report_to == "tensorboard":
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(log_dir))

    def log(self, step, **values):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if value is not None and np.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
