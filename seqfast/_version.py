"""The one place seqfast's version is written: ``seqfast.__version__`` imports it and setup.py reads
it as text (without importing seqfast, which needs torch), so the wheel's metadata says the same."""

__version__ = "0.1.0"
