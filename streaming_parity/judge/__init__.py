"""Judging: metrics, tolerances, comparison of two runs, results as data, run stores and the one
stream-and-compare loop. Judging reads what backends produced through the interface; it never
loads a backend by name."""
