"""The OpenAI-compatible HTTP server (`python main.py --mode=serve`)."""
