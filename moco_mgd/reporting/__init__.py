"""Reporting: the figures drawn from a run's metrics log, the result tables of several runs, and benchmark timing."""
