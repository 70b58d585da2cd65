"""Plugins that ship with batchrun and register through the same hooks as third-party plugins."""
