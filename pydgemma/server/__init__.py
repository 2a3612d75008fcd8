"""`pydgemma serve`: an OpenAI-compatible server (needs the `serve` extra: FastAPI and uvicorn)."""

from __future__ import annotations

__all__ = ["ServerConfig", "create_app", "serve"]


def _require() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        from ..errors import PydgemmaError

        raise PydgemmaError(f"the server needs FastAPI and uvicorn ({exc.name} is missing): pip install 'pydgemma[serve]'",
                            "DG_ERR_UNSUPPORTED") from None


def create_app(config, **kwargs):
    _require()
    from .app import create_app as _create

    return _create(config, **kwargs)


def __getattr__(name: str):
    if name == "ServerConfig":
        _require()
        from .app import ServerConfig

        return ServerConfig
    raise AttributeError(name)


def serve(config, *, host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning", on_ready=None,
          on_loaded=None) -> None:
    """Runs the server until interrupted. `on_ready(url)` is called once it listens, `on_loaded()`
    once the model is loaded; a model that fails to load stops the server with that error."""
    _require()
    import uvicorn

    from ..errors import PydgemmaError

    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False))
    state = app.state.pydgemma

    def loaded(error: str | None) -> None:
        if error is not None:
            server.should_exit = True
        elif on_loaded is not None:
            on_loaded()

    state.on_loaded = loaded
    if on_ready is not None:
        startup = server.startup

        async def announce(sockets=None):
            await startup(sockets=sockets)
            if server.started:
                on_ready(f"http://{host if ':' not in host else f'[{host}]'}:{port}")

        server.startup = announce  # type: ignore[method-assign]
    server.run()
    if state.load_error is not None:
        raise PydgemmaError(f"cannot serve {config.model_path}: {state.load_error}", "DG_ERR_IO")
    if not server.started:
        raise PydgemmaError(f"cannot listen on {host}:{port} (in use, or not an address of this machine)", "DG_ERR_IO")
