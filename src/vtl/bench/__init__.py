"""Benchmarks: VTL side by side with kernel TCP and QUIC on emulated networks.

* :mod:`vtl.bench.transports` -- the transports and their registry (the seam
  for new ones, e.g. the Hooker);
* :mod:`vtl.bench.runner` -- the matrix runner (one topology per cell, runs
  interleaved across transports, time limits, JSON-line records);
* :mod:`vtl.bench.report` -- markdown table and PNG plots from the records;
* :mod:`vtl.bench.metrics` -- payload efficiency, physical limits, statistics;
* ``tcp_runner``, ``quic_runner``, ``vtl_runner`` -- the endpoint processes
  run inside the namespaces, with :mod:`vtl.bench.common` (payloads, line
  protocol);
* :mod:`vtl.bench.tcp_transfer` -- the kernel TCP reference used by ``vtl demo``.

The command line is ``vtl bench run`` / ``vtl bench report`` (docs/bench.md).
"""
