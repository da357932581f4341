"""Fuzzing harnesses (atheris/libFuzzer, or a seeded random mutator without atheris).

``python fuzz/run.py --list`` names the targets; see docs/reliability.md for figures.
"""
