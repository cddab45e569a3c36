"""Celery workers: tasks take ids, load rows, call one aligndiff function, store results."""
