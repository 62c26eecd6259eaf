"""Spark training and Beam export jobs (not built yet)."""
