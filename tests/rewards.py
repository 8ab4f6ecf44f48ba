"""Rule rewards the RL tests train on (rl.reward_function: rewards:NAME; tests/ is on sys.path under pytest)."""


def shorter(messages: list[dict], reply: str) -> float:
    """Short replies are better: a preference a tiny random model learns in a few dozen steps (stop early)."""
    return -len(reply) / 10


def nan(messages: list[dict], reply: str) -> float:
    return float("nan")


def nothing(messages: list[dict], reply: str) -> None:
    return None


CALLS = {"n": 0}


def fails_later(messages: list[dict], reply: str) -> float:
    """shorter() for 64 replies, then a KeyError: a rule that breaks mid-run."""
    CALLS["n"] += 1
    if CALLS["n"] > 64:
        raise KeyError("score")
    return shorter(messages, reply)
