"""The worker: joins a scheduler, pulls jobs, runs them."""
