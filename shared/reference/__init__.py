"""Reference assets for training and evaluating a small VLM: see scenes.py."""
