-- Version 4: where each worker serves its Prometheus metrics, as it said at
-- registration (a URL, e.g. http://127.0.0.1:9092/metrics; NULL: none), for
-- the scheduler's service-discovery route GET /v1/metrics/targets.
--
-- From this version on, workers.last_heartbeat and jobs.lease_expires_at are
-- on the store's lease clock (monotonic, anchored to the wall clock when the
-- store opens) rather than the wall clock; the values stay comparable and
-- recover() re-bases them at start-up, so nothing here converts them.

ALTER TABLE workers ADD COLUMN metrics TEXT;
