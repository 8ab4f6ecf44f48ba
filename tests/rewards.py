"""Rule rewards the RL tests train on (rl.reward_function: rewards:NAME; tests/ is on sys.path under pytest)."""


def shorter(messages: list[dict], reply: str) -> float:
    """Short replies are better: a preference a tiny random model learns in a few dozen steps (stop early)."""
    return -len(reply) / 10
