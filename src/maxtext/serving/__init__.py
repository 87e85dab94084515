"""An OpenAI-compatible HTTP server over the inference Engine: `python3 -m maxtext.serving.server`."""
