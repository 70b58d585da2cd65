"""Tests of batchrun; a package so workers can import ``tests.probe``."""
