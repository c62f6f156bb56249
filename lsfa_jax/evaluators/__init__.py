"""Evaluators: the steps the jobs share, each a small function over explicit inputs.

`banks` builds a class's memory banks from its training features; `class_eval` scores splits
against banks, calibrates fusion and thresholds on the normal validation samples, and computes
a class's test metrics; `outputs` writes a class's and a run's files. train_eval, test and
predict compose them, so a saved model folder gives the numbers of the run that wrote it.
"""
