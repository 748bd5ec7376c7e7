"""Bailan's state in Redis, read and written on behalf of the HTTP routes.

One module per kind of state; everything that knows the key layout or RQ's
internals lives in them, and none imports worker code:

- records: a job's record and RQ job (submit, snapshot, cancel), and image and preview bytes from the blob store (bailan.blobs);
- idempotency: Idempotency-Key claims;
- workers: the live workers and the models they serve;
- wait: a queued job's estimated wait (eta_s), from the workers' measured rates;
- common: job ids, the record TTL margin and tolerant JSON, which all of them use.

Building the JSON a client sees from that state is app.views' job.
"""
