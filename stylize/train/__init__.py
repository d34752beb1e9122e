"""Training and evaluating the shipped `mini` model: teachers, licence-clean data, metrics.

Needs the `train` extra (`pip install "stylize[train]"`); nothing here is imported by a run.
"""
