"""HTTP API: the Litestar app and its controllers."""
