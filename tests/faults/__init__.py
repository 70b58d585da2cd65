"""Fault-injection tests: one small test per way a task, worker or plugin can misbehave."""
