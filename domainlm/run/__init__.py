"""The training run and its parts: the loop (train), checkpoints, the run lock, the learning-rate
schedule, metrics and console, the guards (signals, NaN/Inf, OOM) and the run report/model card.
"""
