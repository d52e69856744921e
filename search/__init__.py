"""The sweep driver: CLI (`detsweep`), sweep config, Optuna search space, Tuner, resume/status, final ensemble.

Imports point one way: search -> trainables -> detection. Ray and Optuna are imported inside the functions
that use them, so `detsweep train` and the config checks work without a Ray cluster.
"""
