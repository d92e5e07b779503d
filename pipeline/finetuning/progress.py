"""What a fine-tune run shows while it runs: a tqdm bar per epoch, the dvclive log of every epoch, and where its
wall seconds went (:class:`Clock`)."""
from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import keras
from tqdm import tqdm


class BatchProgress(keras.callbacks.Callback):
    """The batches of each fit epoch as a tqdm bar on stderr, like extract's and evaluate's bars.

    On by default only when stderr is a terminal: there the bar fills in during the epoch and
    gives way to Keras' one line per epoch (``verbose=2``); a log file keeps just those lines.
    """

    def __init__(self, steps: int, epochs: int, enabled: Optional[bool] = None):
        super().__init__()
        self.steps, self.epochs = steps, epochs
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar: Optional[tqdm] = None

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self.bar = tqdm(total=self.steps, desc=f"fine-tune epoch {epoch + 1}/{self.epochs}", unit="batch",
                        leave=False, file=sys.stderr, disable=not self.enabled)

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Clock:
    """Wall seconds by named part of a run (``seconds``: a Counter, so ``seconds.update(other)`` adds)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: Counter = Counter()
        self._open: dict[str, float] = {}

    def begin(self, name: str) -> None:
        """Start timing ``name`` until :meth:`end` (for a part that spans more than one block)."""
        self._open[name] = time.perf_counter()

    def end(self, name: str) -> None:
        """Stop timing ``name``; nothing if it was not begun."""
        if name in self._open:
            self.seconds[name] += time.perf_counter() - self._open.pop(name)

    @contextlib.contextmanager
    def part(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def by_part(self, parts: tuple[str, ...]) -> dict[str, float]:
        """``parts``' seconds, and ``setup``: the rest of the time since the clock started, first; rounded to 0.1 s."""
        out = {k: self.seconds.get(k, 0.0) for k in parts}
        out = {"setup": max(0.0, time.perf_counter() - self.start - sum(out.values())), **out}
        return {k: round(v, 1) for k, v in out.items()}


def start_live(live_dir: Path, val_loss: float, val_accuracy: float):
    """A dvclive run in ``live_dir``: step 0 = the head-only model, then one step per epoch.

    dvclive fits the epoch loop: each epoch's metrics reach ``live_dir`` (plots/metrics/*.tsv,
    and metrics.json = the latest epoch) while training runs, and DVC Studio when configured.
    ``dvcyaml=None``: dvc.yaml declares these outputs, dvclive must not rewrite it mid-stage.
    """
    from dvclive import Live

    live = Live(str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    live.log_metric("eval/loss", float(val_loss))
    live.log_metric("eval/accuracy", float(val_accuracy))
    live.next_step()
    return live


def live_callbacks(live) -> list:
    """dvclive's Keras callback (logs each epoch, ends the run after fit); none without a run."""
    if live is None:
        return []
    from dvclive.keras import DVCLiveCallback

    return [DVCLiveCallback(live=live)]


def log_history(live, rows: list) -> None:
    """Re-log the epochs a resumed run restored, so dvclive's series equal an uninterrupted run's."""
    if live is None:
        return
    for _, loss, acc, val_loss, val_acc in rows:
        for name, value in (("train/loss", loss), ("train/accuracy", acc), ("eval/loss", val_loss),
                            ("eval/accuracy", val_acc)):
            live.log_metric(name, float(value))
        live.next_step()
