from . import smoe_translation  # noqa: F401  (registers the task)
