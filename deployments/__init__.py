"""Ray Serve deployments: thin wrappers over serve_app, wired by `deployments.app:build_app`."""
