"""The Serve app's import path in earlier versions (`detector.serve:build_app`), kept so existing
`serve deploy` configs and RayServices keep working; new ones name
`detector.serving:build_app`."""

from detector.serving.app import build_app

__all__ = ["build_app"]
