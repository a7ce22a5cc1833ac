"""The web demo: one page and a small JSON API over any classifier from ``inference``.

    from cifar_inception.inference import load_classifier
    from cifar_inception.serve import create_app
    app = create_app(load_classifier("runs/googlenet"))   # an ASGI app; run it with uvicorn
"""

from cifar_inception.serve.app import create_app

__all__ = ["create_app"]
