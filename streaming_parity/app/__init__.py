"""The application layer: the ``parity`` command line, compare, nightly and demo. The only layer of
the harness that imports ``backends`` and ``fixtures``."""
