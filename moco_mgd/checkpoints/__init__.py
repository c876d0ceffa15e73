"""Checkpoints: their formats (reading every layout, writing this project's atomically) and export to other libraries."""
