"""Restricted unpickling for raw datasets: now lives in :mod:`turnctl.safeload`, with every other
safe loader; re-exported here so that ``turnctl.prepare.safeload`` imports keep working.

    >>> import pickle, turnctl.safeload
    >>> load_pickle_file is turnctl.safeload.load_pickle_file
    True
    >>> restricted_loads(pickle.dumps(print), source="evil.pkl")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    turnctl.errors.DataError: evil.pkl: refusing to unpickle 'builtins.print' ...
"""

from turnctl.safeload import load_pickle_file, load_torch_file, restricted_loads

__all__ = ["load_pickle_file", "load_torch_file", "restricted_loads"]
