"""gunicorn entry point, as Label Studio ML backends conventionally have: `gunicorn _wsgi:app`."""
from peal_backend.server import create_app

app = create_app()
