"""Early stopping counts its patience over the whole run, across resumes."""

import numpy as np

from ceriakeras.nn.callbacks import RunEarlyStopping


class _Model:
    stop_training = False


def _epochs_until_stop(stopper, first_epoch, losses):
    """Feed validation losses from ``first_epoch`` (0-based) on; the 1-based epoch it stops at."""
    stopper.set_model(_Model())
    stopper.on_train_begin()
    for epoch, loss in enumerate(losses, start=first_epoch):
        stopper.on_epoch_end(epoch, {"val_loss": loss})
        if stopper.model.stop_training:
            return epoch + 1
    return None


def test_a_new_run_stops_patience_epochs_after_its_best():
    stopper = RunEarlyStopping(patience=3)
    assert _epochs_until_stop(stopper, 0, [0.5, 0.4, 0.45, 0.46, 0.47, 0.3]) == 5


def test_a_resumed_run_remembers_its_best_and_how_long_it_has_waited():
    # best 0.4 at epoch 2, resumed after epoch 4: two of three epochs of patience are spent
    stopper = RunEarlyStopping(patience=3, best_val_loss=0.4, best_epoch=2, initial_epoch=4)
    assert _epochs_until_stop(stopper, 4, [0.41, 0.42, 0.43]) == 5
    # Keras' own EarlyStopping would have started afresh, taken 0.41 as its best, and gone on
    assert stopper.best == 0.4 and stopper.best_epoch == 1


def test_a_resumed_run_that_improves_waits_again_from_there():
    stopper = RunEarlyStopping(patience=3, best_val_loss=0.4, best_epoch=2, initial_epoch=4)
    assert _epochs_until_stop(stopper, 4, [0.39, 0.5, 0.5, 0.5]) == 8
    assert np.isclose(stopper.best, 0.39)


def test_a_new_run_has_nothing_to_remember():
    stopper = RunEarlyStopping(patience=2, best_val_loss=np.inf, best_epoch=0, initial_epoch=0)
    stopper.set_model(_Model())
    stopper.on_train_begin()
    assert stopper.wait == 0 and stopper.best is None
