"""Samplers: UCGM-S, baseline ODE/SDE solvers and guidance wrappers."""
