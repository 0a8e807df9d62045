"""Images inside archives: packed tar shards made by the upload step, WebDataset tars, zip files.

A plan entry for such an image is an ``ObjectInfo`` with a ``member``: the archive object, where
its bytes start, and how to take them out. ``listing`` makes those entries from an input
(``packed`` for the upload step's layout, ``tar`` and ``zip`` for archives a user already has);
``members`` reads a batch of them with a few ranged GETs over contiguous members.
"""
