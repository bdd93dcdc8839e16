"""One module per stage: a function ``(config, inputs) -> outputs`` that is resumable and idempotent.

Each stage names its output by a hash of its config and input fingerprints and commits it atomically, so a
rerun with the same inputs does no work. Imports run cli -> stages ->
pipeline: a stage calls the library and is called by one CLI command.
"""
