"""`ldmrt serve`: an HTTP server over one engine that batches requests step by step (scheduler.py), speaks its own
JSON API and AUTOMATIC1111's (app.py, a1111.py), and scales out on Ray Serve. Needs `pip install 'ldmrt[serve]'`."""
