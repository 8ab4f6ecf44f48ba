"""What the loop in medtune/train.py is built from: setup, accelerator, stage objectives, losses, rollouts."""
