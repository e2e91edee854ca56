"""Runnable examples of seqfast: the seed's models on data made on the spot."""
