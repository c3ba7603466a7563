"""kbit's local task definitions: one lm-eval task YAML per task (see README.md here).

A package only so that the YAML files ship with kbit; it holds no code.
"""
