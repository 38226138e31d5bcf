"""Scaling laws: plan an IsoFLOP sweep, read its runs, fit L(N, D) = E + A/N^alpha + B/D^beta, predict, plot.

Pure pieces only (numpy, scipy, matplotlib, the engine's accounting): running the sweep's trainings is
`launch/`'s job, and nothing in the engine imports this package.
"""
