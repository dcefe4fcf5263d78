"""The precompute stage (stage.py), its encoder actors (encoders.py) and its row reading (rows.py)."""
