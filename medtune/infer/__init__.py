"""Using a trained model: merge, predict, chat, serve, reward scoring, delta releases."""
