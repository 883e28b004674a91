"""How many epochs one Ray Data execution reads."""

from raysl.data import epochs


def test_epochs_per_execution_stays_within_the_item_bound():
    assert epochs.epochs_per_execution(windows=1, epochs_left=5000) == epochs.MAX_ITEMS
    assert epochs.epochs_per_execution(windows=3, epochs_left=10) == 10
    assert epochs.epochs_per_execution(windows=10 * epochs.MAX_ITEMS, epochs_left=10) == 1
