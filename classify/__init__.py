"""Stored features to results: linear probes, evaluation protocols, metrics and reports.

This package reads feature stores only (``extract.store.FeatureStore``); it never touches images.
"""
