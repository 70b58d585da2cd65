"""Workloads and example plugins that ship with the repository but are not installed.

Batches import them as ``plugins.<module>`` when they run from the project root.
"""
