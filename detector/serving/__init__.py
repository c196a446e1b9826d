"""Serving: the Ray Serve app (`build_app`, the import path `detector.serving:build_app`
that `serve run`, `serve deploy` and a KubeRay RayService name) and its typed HTTP API.

`build_app` loads on first use, so importing this package does not import Ray Serve."""

from __future__ import annotations

__all__ = ["build_app"]


def __getattr__(name: str):
    if name == "build_app":
        from detector.serving.app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
