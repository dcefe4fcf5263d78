"""The precompute stage (stage.py), its encoder actors (encoders.py) and its torch-free row reading (rows.py).

Kept empty: Ray task workers import rows.py through this package, and must not pay for torch.
"""
