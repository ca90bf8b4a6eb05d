"""`python -m bench`: /start of the operator against a bare aiohttp server, on one machine.

A local control plane holds N WorkerQueues; the operator serves them; a load generator in its own
process posts /start at several concurrencies, first to a baseline server that answers a
precomputed body of the same size (`bench.baseline`), then to the operator. It is a measurement:
the exit code says whether the run worked, never whether a target was met.

Modules: `start` runs it all, `cluster` talks to the control plane, `procs` owns child processes,
`loadgen` and `baseline` are the two processes started per measurement, `report` prints the table.
"""
