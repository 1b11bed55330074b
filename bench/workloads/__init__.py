"""One module per delivery workload, each `run(bench, system, ...)` -> the figures it reports.

a_user_streams     (a) N streams, each following its own user; R events/s keyed by user: latency, loss
b_broadcast        (b) the same streams on one broadcast at a rate: deliveries/s achieved, latency, loss
c_idle_streams     (c) many idle streams: web-process RSS per stream, threads, time to connect them all
d_connect_cycles   (d) connect/disconnect cycles: web RSS and asyncio tasks before and after (no leaks)

Store-to-socket, one or more source trees (bench/scaleout.py), each `run(run, tree, scale)`:

web_cpu            1,000 private streams on one, then two web processes, beside one with none: CPU per delivery
burst              N events for one user at once: does its client get them all, or is it closed?
stalled_client     a client that stops reading while MBs of broadcasts go by: web peak RSS, is it closed?
resume_memory      a client resuming by Last-Event-ID across MBs of broadcasts: web peak RSS
replay_isolation   a long replay for one stream: another stream's latency meanwhile
"""
