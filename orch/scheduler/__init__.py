"""The scheduler: HTTP API, dispatch, reaper."""
