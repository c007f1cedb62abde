"""Training recipes built on :mod:`ironpod.train`, kept apart from the library (STYLE.md lesson 5).

A recipe is ordinary user code: it shows what a real training script looks like when it adopts
ironpod, and gives the project a workload to test and benchmark against.
"""
