"""Where metrics go: `metrics.jsonl` (always), TensorBoard, wandb / trackio (when installed and asked for), and a
one-line progress display on stderr (a bar with ETA on a terminal, plain lines otherwise). Rank 0 only."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

logger = logging.getLogger(__name__)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4f}"
        return f"{value:.3e}"
    return str(value)


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class MetricsLogger:
    """Append one JSON object per logged step to `metrics.jsonl`, mirror it to the enabled trackers."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_steps: int,
        report_to: list[str] | tuple[str, ...] = ("tensorboard",),
        enabled: bool = True,
        run_name: str | None = None,
        config: dict[str, Any] | None = None,
        stream: TextIO | None = None,
        resume: bool = False,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb: Any = None
        self._wandb: Any = None
        self._trackio: Any = None
        self._start = time.perf_counter()
        # The step the run starts from (the resumed checkpoint's): the ETA's rate counts steps done since then.
        self.start_step = 0
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in report_to and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
        name = run_name or Path(run_dir).name
        if "wandb" in report_to and importlib.util.find_spec("wandb") is not None:
            import wandb

            self._wandb = wandb.init(name=name, config=config, dir=str(run_dir), resume="allow" if resume else None)
        if "trackio" in report_to and importlib.util.find_spec("trackio") is not None:
            import trackio

            self._trackio = trackio
            trackio.init(project="alignkit", name=name, config=config)

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint's step (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        step = int(row["step"])
        for key, value in row.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if self._tb is not None:
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)
        if self._trackio is not None:
            self._trackio.log(row, step=step)
        self._progress(row)

    def _progress(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        if step == 0:  # the evaluation before training
            self.message("before training: " + " ".join(f"{k}={_format_value(v)}" for k, v in row.items() if k != "step"))
            return
        # The logger is created when the loop starts: the first logged step's time runs from then.
        done = step - self.start_step
        rate = done / max(time.perf_counter() - self._start, 1e-9)
        eta = (self.total_steps - step) / rate
        shown = {k: v for k, v in row.items()
                 if k in ("loss", "lr", "grad_norm", "mfu") or k.endswith("_per_s") or k.startswith("eval/")}
        text = " ".join(f"{k}={_format_value(v)}" + ("%" if k == "mfu" else "") for k, v in shown.items())
        eta_text = _format_duration(eta)
        if self.is_tty:
            width = 20
            filled = int(width * step / max(1, self.total_steps))
            bar = "#" * filled + "-" * (width - filled)
            line = f"\r[{bar}] {step}/{self.total_steps} {text} eta {eta_text}"
            self.stream.write(line[:200].ljust(120))
            if step >= self.total_steps:
                self.stream.write("\n")
        else:
            self.stream.write(f"step {step}/{self.total_steps} {text} eta {eta_text}\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A diagnostic line of the run (rank 0), through `logging` like every other diagnostic."""
        if self.enabled:
            if self.is_tty:
                self.stream.write("\n")  # leave the progress bar's line
            logger.info(text)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._trackio is not None:
            self._trackio.finish()
