"""The exactly-once writer: work units, a write stage, commit, verification from storage, finish.

A run composes a sink (see :class:`pipelines.sink.base.Sink`): it plans units and resumes from
what is committed, hands its write stage to Ray Data, verifies what is in storage, and finishes
(manifest, completion marker). The Parquet directory (:mod:`pipelines.sink.parquet`) is the first
backend.
"""
