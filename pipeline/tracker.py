"""The best-epoch / early-stopping tracker of fine-tuning, whose state (:class:`pipeline.resume.TrainState`)
the per-epoch checkpoint carries."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Optional

import keras

from pipeline.resume import TrainState, save_checkpoint

log = logging.getLogger(__name__)


class Tracker(keras.callbacks.Callback):
    """Keeps the epoch with the lowest val loss (epoch 0, the head-only model, included), stops
    after ``patience`` epochs without improvement, and checkpoints after every epoch.

    With ``ema_val`` (the val dataset; the optimizer has ``use_ema``) each epoch is measured on the
    optimizer's moving average of the weights instead of the weights as trained, the average is what
    a best epoch keeps, and ``logs`` get its val metrics for the callbacks after this one.
    """

    def __init__(self, state: TrainState, patience: int, checkpoint: Optional[Path], fp: str, ema_val=None):
        super().__init__()
        self.state = state
        self.patience = patience
        self.checkpoint = checkpoint
        self.fp = fp
        self.ema_val = ema_val

    @contextlib.contextmanager
    def _averaged_weights(self) -> Iterator[None]:
        """The optimizer's moving average in place of the trained weights, for the ``with`` block."""
        trained = self.model.trainable_variables
        raw = [v.numpy() for v in trained]
        # The optimizer's averages, in the order of the variables it was built with (= trainable_variables),
        # as Keras' own SwapEMAWeights reads them; swapped back from a copy, so training resumes bit-exact.
        for v, a in zip(trained, self.model.optimizer._model_variables_moving_average):
            v.assign(a)
        try:
            yield
        finally:
            for v, a in zip(trained, raw):
                v.assign(a)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        s = self.state
        with self._averaged_weights() if self.ema_val is not None else contextlib.nullcontext():
            if self.ema_val is not None:
                loss, acc = self.model.evaluate(self.ema_val, verbose=0)
                logs["val_loss"], logs["val_accuracy"] = float(loss), float(acc)
            val_loss = float(logs["val_loss"])
            improved = val_loss < s.best_loss
            if improved:  # the weights in the model now: the average with finetune.ema
                s.best_loss, s.best_epoch, s.wait, s.best_weights = val_loss, epoch + 1, 0, self.model.get_weights()
        s.rows.append([epoch + 1, float(logs["loss"]), float(logs["accuracy"]), val_loss,
                       float(logs["val_accuracy"])])
        s.epoch = epoch + 1
        if not improved:
            s.wait += 1
            if s.wait >= self.patience:
                s.stopped = True
                self.model.stop_training = True
                log.info("no val-loss improvement for %d epochs: stopping", s.wait)
        if self.checkpoint is not None:
            save_checkpoint(self.checkpoint, self.fp, s, self.model)


def finish(model: keras.Model, state: TrainState) -> None:
    """Put the best epoch's weights into ``model``."""
    model.set_weights(state.best_weights)
    log.info("keeping epoch %d (val loss %.4f)", state.best_epoch, state.best_loss)
