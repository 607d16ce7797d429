"""Argument checks shared by the retention modules."""
import numpy as np


def check_int(name, value, minimum):
    """An int (Python or numpy, not bool) >= minimum, returned as int; TypeError/ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
