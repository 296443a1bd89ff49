"""`m4 serve`: the model behind an HTTP server (FastAPI + uvicorn, the [serve] extra).

m4.serve.app has the routes, the chat and session handlers and the server; the modules
beside it: the scheduler (one worker for all model work), live sessions, request parsing,
client media with its limits, and metrics. Nothing here imports torch: with a bundle it
runs on an [onnx,serve] install.
"""
